"""cloud_sync.fl.rounds over the in-process wire: full rounds with real NumPy head training on digits,
over-selection, dropouts and deadlines, abandon + retry, late / duplicate / malformed / oversized
updates, and resuming from SQLite after the aggregator object is thrown away mid-round."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloud_sync.fl import tensors as T
from cloud_sync.fl.client import FLClient
from cloud_sync.fl.codecs import CodecConfig, encode_update
from cloud_sync.fl.rounds import Aggregator, TaskConfig
from cloud_sync.fl.transport import InProcessHub
from edge_agent.fl import head_trainer_fn
from edge_agent.training import DenseLayer, Head, HeadTrainer, LocalDataset
from tests.fl_helpers import digits_flat

HEAD = Head([DenseLayer("w", "b")])
X, Y = digits_flat("train")
XT, YT = digits_flat("test")


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def _fleet(tmp: Path, n: int = 12, clock: Clock | None = None, hub: InProcessHub | None = None, db: str = "fl.db"):
    clock = clock or Clock()
    hub = hub or InProcessHub()
    agg = Aggregator(tmp / db, hub, evaluate=lambda t, w: {"accuracy": float((HEAD.predict(w, XT) == YT).mean())},
                     clock=clock)
    hub.aggregator = agg
    if not hub.clients:
        parts = np.array_split(np.random.default_rng(0).permutation(len(Y)), n)
        for i, p in enumerate(parts):
            dev = f"dev{i:02d}"
            ds = LocalDataset({"features": X[p]}, Y[p])
            checkin, update = hub.device_links(dev)
            hub.attach(dev, FLClient(dev, head_trainer_fn(HeadTrainer(HEAD), ds), len(p), tmp / dev, checkin, update,
                                     clock=clock, send_secagg=hub.secagg_link(dev)))
    return agg, hub, clock


def _config(**kw) -> TaskConfig:
    base = dict(task="digits", rounds=3, clients_per_round=4, over_selection=1.5, checkin_target=12,
                train={"epochs": 2, "lr": 0.1}, checkin_s=10, round_s=30)
    base.update(kw)
    return TaskConfig(**base)


def _drive(agg: Aggregator, hub: InProcessHub, task: str = "digits", steps: int = 200) -> dict:
    for _ in range(steps):
        hub.pump()
        agg.tick()
        if agg.store.task(task)["state"] != "running":
            break
    return agg.status(task)


def test_rounds_train_a_head_and_aggregate_exactly_the_target(tmp_path):
    agg, hub, _ = _fleet(tmp_path)
    agg.create_task(_config(codec={"topk": 0.1, "int8": True, "min_sparse": 1}), HEAD.init([64, 10], seed=0))
    st = _drive(agg, hub)
    assert st["state"] == "finished" and st["model_version"] == 3
    done = [r for r in st["rounds"] if r["state"] == "done"]
    assert [r["result"]["participants"] for r in done] == [4, 4, 4]
    c = st["counters"]
    assert c["selected"] == 18 and c["accepted"] == 12 and c["surplus"] == 6 and c["rounds_done"] == 3
    acc = [r["result"]["metrics"]["accuracy"] for r in done]
    assert acc[-1] > 0.4 and acc[-1] > (HEAD.predict(HEAD.init([64, 10], seed=0), XT) == YT).mean() + 0.2
    dense = len(encode_update({"w": np.ones((10, 64), np.float32), "b": np.ones(10, np.float32)}, CodecConfig(),
                              {"task": "digits", "round": 0, "attempt": 0, "device": "dev00", "num_samples": 100}))
    assert c["bytes_up"] < 0.5 * 12 * dense  # top-k + int8 payloads, headers included


def test_duplicate_deliveries_are_counted_once(tmp_path):
    agg, hub, _ = _fleet(tmp_path)
    hub.duplicate_updates = True
    agg.create_task(_config(rounds=2), HEAD.init([64, 10]))
    st = _drive(agg, hub)
    assert [r["result"]["participants"] for r in st["rounds"] if r["state"] == "done"] == [4, 4]
    assert st["counters"]["accepted"] == 8 and st["counters"]["duplicate"] >= 8


def test_dropouts_close_the_round_at_the_deadline_with_the_minimum(tmp_path):
    agg, hub, clock = _fleet(tmp_path)
    agg.create_task(_config(rounds=1, clients_per_round=6, min_clients=3, over_selection=1.0), HEAD.init([64, 10]))
    hub.pump()
    agg.tick()  # selection: 6 devices
    rnd = agg.store.current_round("digits")
    hub.offline |= set(rnd["selected"][:3])  # three drop out after selection
    hub.pump()
    agg.tick()
    assert agg.store.task("digits")["state"] == "running"  # 3 of 6: wait for the deadline
    clock.t += 31
    st = _drive(agg, hub)
    assert st["state"] == "finished" and st["rounds"][0]["result"]["participants"] == 3


def test_too_few_updates_abandon_and_retry_then_late_updates_are_counted(tmp_path):
    agg, hub, clock = _fleet(tmp_path)
    agg.create_task(_config(rounds=1, clients_per_round=6, min_clients=4, over_selection=1.0), HEAD.init([64, 10]))
    hub.pump()
    agg.tick()
    first = agg.store.current_round("digits")
    late = first["selected"][0]
    hub.offline |= set(first["selected"][:3])
    hub.pump()
    agg.tick()
    clock.t += 31
    agg.tick()  # 3 < 4 by the deadline: abandoned, attempt 1 announced
    rnd = agg.store.current_round("digits")
    assert (rnd["round"], rnd["attempt"], rnd["state"]) == (0, 1, "checkin")
    assert agg.store.update_count("digits", 0) == 0  # the abandoned attempt's updates are gone
    # the straggler's update for attempt 0 arrives now: dropped and counted as late
    stale = encode_update({"w": np.zeros((10, 64), np.float32), "b": np.zeros(10, np.float32)}, CodecConfig(),
                          {"task": "digits", "round": 0, "attempt": 0, "device": late, "num_samples": 5})
    assert agg.on_update(late, stale) == "late"
    hub.offline.clear()
    hub.pump()
    clock.t += 11  # the three that were offline missed the new announce: select at the check-in deadline
    st = _drive(agg, hub)
    assert st["state"] == "finished" and st["counters"]["abandoned"] == 1 and st["counters"]["late"] >= 1
    assert [r["state"] for r in st["rounds"]] == ["abandoned", "done"]


def test_bad_payloads_are_rejected_and_counted_never_crash(tmp_path):
    agg, hub, _ = _fleet(tmp_path)
    cfg = _config(rounds=1, max_update_bytes=4096)
    agg.create_task(cfg, HEAD.init([64, 10]))
    hub.pump()
    agg.tick()
    dev = agg.store.current_round("digits")["selected"][0]
    hdr = {"task": "digits", "round": 0, "attempt": 0, "device": dev, "num_samples": 5}
    shapes = {"w": (10, 64), "b": (10,)}
    good = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    assert agg.on_update(dev, b"garbage") == "rejected_malformed"
    assert agg.on_update(dev, encode_update({"w": np.zeros((3, 3), np.float32), "b": good["b"]}, CodecConfig(), hdr)) == "rejected_malformed"
    nan = dict(good, b=np.full(10, np.nan, np.float32))
    assert agg.on_update(dev, encode_update(nan, CodecConfig(), hdr)) == "rejected_malformed"
    big = T.to_bytes({"pad": np.zeros(4096, np.float32)}, {**hdr, "schema": "pf.fl.update/1"})
    assert agg.on_update(dev, big) == "rejected_oversize"
    assert agg.on_update("dev99", encode_update(good, CodecConfig(), hdr)) == "spoofed"
    assert agg.on_update(dev, encode_update(good, CodecConfig(), {**hdr, "task": "other"})) == "unknown_task"
    st = _drive(agg, hub)
    assert st["state"] == "finished"
    assert st["counters"]["rejected_malformed"] == 2 and st["counters"]["rejected_oversize"] == 1
    assert st["unattributed"]["rejected_malformed"] == 1 and st["unattributed"]["unknown_task"] == 1


@pytest.mark.parametrize("crash_after", ["checkin", "selection", "some_updates"])
def test_a_new_aggregator_on_the_same_database_resumes_the_round(tmp_path, crash_after):
    agg, hub, clock = _fleet(tmp_path)
    agg.create_task(_config(rounds=2, strategy="fedadam", strategy_args={"server_lr": 0.05}, over_selection_grace=0.0),
                    HEAD.init([64, 10]))
    hub.pump(limit=5)  # a few check-ins
    if crash_after != "checkin":
        hub.pump()
        agg.tick()
    if crash_after == "some_updates":
        hub.pump(limit=8)
    # the aggregator dies here: its pending work is lost (messages in flight to it are dropped)
    hub.queue = type(hub.queue)(item for item in hub.queue if getattr(item[0], "__self__", None) is not agg)
    agg.store.close()
    agg2, hub, _ = _fleet(tmp_path, clock=clock, hub=hub)
    assert agg2.resume_all() == ["digits"]
    clock.t += 11  # past the check-in window, if it was still open
    st = _drive(agg2, hub)
    assert st["state"] == "finished" and st["model_version"] == 2
    assert all(r["result"]["participants"] == 4 for r in st["rounds"] if r["state"] == "done")


def test_dp_task_reports_epsilon_per_round_and_keeps_it_across_restart(tmp_path):
    agg, hub, clock = _fleet(tmp_path)
    dp = {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5, "population": 12}
    agg.create_task(_config(rounds=3, dp=dp), HEAD.init([64, 10]))
    for _ in range(50):
        hub.pump()
        agg.tick()
        if agg.store.current_round("digits")["round"] == 2:
            break
    agg.store.close()
    hub.queue.clear()
    agg2, hub, _ = _fleet(tmp_path, clock=clock, hub=hub)
    agg2.resume_all()
    clock.t += 11
    st = _drive(agg2, hub)
    eps = [r["result"]["epsilon"] for r in st["rounds"] if r["state"] == "done"]
    assert st["state"] == "finished" and len(eps) == 3 and 0 < eps[0] < eps[1] < eps[2]
    from cloud_sync.fl.dp import PrivacyAccountant

    assert eps[2] == pytest.approx(PrivacyAccountant(12, 1.0, 1e-5, [4 / 12] * 3).epsilon())


def _secagg_round(tmp_path, drop: int, at: str = "masked"):
    """Run one secure round; `drop` selected devices go offline when phase `at` begins ("masked": after
    sharing keys, before sending their masked input; "unmask": after masking, before unmasking)."""
    agg, hub, clock = _fleet(tmp_path)
    init = HEAD.init([64, 10], seed=0)
    agg.create_task(_config(rounds=1, clients_per_round=6, over_selection=1.0,
                            secagg={"threshold": 0.6, "clip": 0.5, "phase_s": 10}), init)
    for _ in range(40):
        hub.pump()
        agg.tick()
        phase = agg.secagg.phase("digits", 0, 0)
        if phase and phase[0] == at:
            break
    rnd = agg.store.current_round("digits")
    gone = rnd["selected"][:drop]
    hub.offline |= set(gone)
    for _ in range(5):
        hub.pump()
        agg.tick()
    clock.t += 11  # the unmask phase deadline
    st = _drive(agg, hub)
    xs = {d: hub.clients[d].secagg.sessions[("digits", 0, 0)]["x"] for d in rnd["selected"]}
    masked = dict(agg.store.all("SELECT device, body FROM secagg_msgs WHERE kind = 'masked'"))
    return agg, st, init, xs, gone, masked


@pytest.mark.parametrize("dropped, at", [(0, "masked"), (1, "masked"), (2, "masked"), (2, "unmask")])
def test_secure_aggregation_round_equals_the_plain_int8_mean(tmp_path, dropped, at):
    from cloud_sync.fl.secagg import dequantize_sum
    from cloud_sync.fl.secagg_round import vec_from_b64

    agg, st, init, xs, gone, masked = _secagg_round(tmp_path, dropped, at)
    survivors = [d for d in xs if d not in gone] if at == "masked" else list(xs)
    assert st["state"] == "finished" and st["rounds"][0]["result"]["participants"] == len(survivors)
    total = np.zeros(650, np.uint32)
    for d in survivors:
        total = total + xs[d]
        # the aggregator only ever held masked vectors: nothing like the device's small int8 values
        assert not np.array_equal(vec_from_b64(json_loads(masked[d])["y"], 650), xs[d])
    expected = T.add(init, T.unflatten(dequantize_sum(total, 0.5, len(survivors)), init, sorted(init)))
    got = agg.weights("digits")
    assert all(np.array_equal(got[k], expected[k]) for k in init)
    assert st["rounds"][0]["result"]["metrics"]["accuracy"] > (HEAD.predict(init, XT) == YT).mean() + 0.1


def test_secure_aggregation_one_dropout_past_the_threshold_abandons_the_round(tmp_path):
    agg, st, *_ = _secagg_round(tmp_path, 3)  # t = ceil(0.6 x 6) = 4: three gone leaves 3 (2 is the most)
    rounds = agg.status("digits")["rounds"]
    assert rounds[0]["state"] == "abandoned" and "threshold" in rounds[0]["result"]["reason"]


def json_loads(text: str):
    import json

    return json.loads(text)
