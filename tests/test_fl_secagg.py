"""cloud_sync.fl.secagg: the unmasked sum equals the plain sum exactly with 0, 1 and the maximum
tolerated dropouts; one past the threshold aborts; the server never holds an unmasked vector."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_sync.fl.errors import SecAggAbort, SecAggError
from cloud_sync.fl.secagg import (
    SecAggClient,
    SecAggServer,
    dequantize_sum,
    quantize_fixed,
    shamir_combine,
    shamir_split,
)

N, T_, L = 7, 4, 2000  # 7 devices, threshold 4: up to 3 may drop out after masking


def _setup(seed: int = 0):
    rng = np.random.default_rng(seed)
    devs = [f"dev{i}" for i in range(N)]
    updates = {d: rng.normal(0, 0.15, L).astype(np.float32) for d in devs}
    xs = {d: quantize_fixed(u, 1.0, rng) for d, u in updates.items()}
    clients = {d: SecAggClient(d, L, T_) for d in devs}
    server = SecAggServer(L, T_)
    for d in devs:
        server.add_keys(clients[d].advertise())
    roster = server.roster()
    for d in devs:
        server.add_shares(d, clients[d].share_keys(roster))
    for d in devs:
        clients[d].receive_shares(server.shares_for(d))
    return devs, updates, xs, clients, server


def _finish(devs, xs, clients, server, drop_before_mask=(), drop_before_unmask=()):
    mask_set = server.mask_set()
    for d in devs:
        if d not in drop_before_mask:
            y = clients[d].masked_input(xs[d], mask_set)
            assert not np.array_equal(y, xs[d])
            server.add_masked(d, y)
    req = server.unmask_request()
    for d in req["survivors"]:
        if d not in drop_before_unmask:
            server.add_unmask(d, clients[d].unmask(req["survivors"], req["dropped"]))
    return server.unmasked_sum(), req


@pytest.mark.parametrize("dropped", [0, 1, N - T_])
def test_unmasked_sum_equals_plain_sum_exactly(dropped):
    devs, updates, xs, clients, server = _setup(dropped)
    gone = devs[1 : 1 + dropped]
    total, req = _finish(devs, xs, clients, server, drop_before_mask=gone)
    plain = np.zeros(L, np.uint32)
    for d in devs:
        if d not in gone:
            plain = plain + xs[d]
    assert np.array_equal(total, plain) and req["dropped"] == sorted(gone)
    # and the integer sum decodes to the mean update within the int8 step
    mean = dequantize_sum(total, 1.0, N - dropped)
    true = np.mean([updates[d] for d in devs if d not in gone], axis=0)
    assert np.abs(mean - true).max() <= 1.0 / 127 + 1e-6


def test_dropouts_during_unmasking_are_tolerated_up_to_the_threshold():
    devs, _, xs, clients, server = _setup(5)
    total, _ = _finish(devs, xs, clients, server, drop_before_mask=devs[:1], drop_before_unmask=devs[1:3])
    assert np.array_equal(total, sum((xs[d] for d in devs[1:]), np.zeros(L, np.uint32)).astype(np.uint32))


def test_one_dropout_past_the_threshold_aborts_cleanly():
    devs, _, xs, clients, server = _setup(7)
    with pytest.raises(SecAggAbort, match="threshold"):
        _finish(devs, xs, clients, server, drop_before_mask=devs[: N - T_ + 1])
    devs, _, xs, clients, server = _setup(8)
    with pytest.raises(SecAggAbort, match="threshold"):
        _finish(devs, xs, clients, server, drop_before_unmask=devs[: N - T_ + 1])


def test_server_sees_no_update_in_the_clear_and_clients_refuse_bad_requests():
    devs, _, xs, clients, server = _setup(9)
    mask_set = server.mask_set()
    y = clients[devs[0]].masked_input(xs[devs[0]], mask_set)
    # a masked vector is uniform-looking: nothing like the small int8 values it hides
    assert (np.abs(y.view(np.int32).astype(np.int64)) > 1000).mean() > 0.99
    server.add_masked(devs[0], y)
    with pytest.raises(SecAggError, match="both"):
        clients[devs[0]].unmask([devs[0], devs[1]], [devs[1]])  # would reveal b and s of devs[1]
    with pytest.raises(SecAggError, match="does not decrypt"):
        tampered = dict(server.shares_for(devs[2]))
        sender = next(iter(tampered))
        tampered[sender] = tampered[sender][:-4] + ("AAAA" if not tampered[sender].endswith("AAAA") else "BBBB")
        clients[devs[2]].receive_shares(tampered)
    with pytest.raises(SecAggError, match="uint32"):
        server.add_masked(devs[1], np.zeros(L, np.int64))


def test_shamir_any_t_shares_rebuild_the_secret():
    secret = int.from_bytes(bytes(range(32)), "big")
    shares = shamir_split(secret, 6, 3)
    assert shamir_combine(shares[3:], 3) == secret and shamir_combine(shares[::2], 3) == secret
    assert shamir_combine(shares[:2] + [(9, 1)], 3) != secret
    with pytest.raises(SecAggAbort):
        shamir_combine(shares[:2], 3)


def test_bad_unmask_shares_abort_instead_of_crashing_the_aggregator():
    """A survivor that sends shares which do not rebuild a 256-bit seed aborts the round (SecAggAbort),
    not an OverflowError out of the aggregator's round loop."""
    devs, _, xs, clients, server = _setup(3)
    mask_set = server.mask_set()
    for d in devs:
        server.add_masked(d, clients[d].masked_input(xs[d], mask_set))
    req = server.unmask_request()
    for d in req["survivors"]:
        reply = clients[d].unmask(req["survivors"], req["dropped"])
        reply["b"] = {owner: [x, (y + 2**300) % (2**521 - 1)] for owner, (x, y) in reply["b"].items()}
        server.add_unmask(d, reply)
    with pytest.raises(SecAggAbort, match="do not rebuild a 256-bit seed"):
        server.unmasked_sum()
