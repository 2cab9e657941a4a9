"""Fuzzing every MQTT message decoder: control messages (cloud_sync/protocol.py), binary chunk frames and
chunk indexes, device topics; FL control messages, secure-aggregation messages, safetensors tensors
and update codecs (cloud_sync/fl). Only ProtocolError / UpdatePayloadError come out, memory stays bounded."""

from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cloud_sync import protocol as P
from cloud_sync.chunks import ChunkIndex
from cloud_sync.errors import ProtocolError
from cloud_sync.fl import codecs as C
from cloud_sync.fl import messages as M
from cloud_sync.fl import secagg_round as S
from cloud_sync.fl import tensors as T
from cloud_sync.fl.errors import UpdatePayloadError
from tests.fuzz_helpers import (
    examples,
    huge_int,
    huge_ints,
    json_bytes,
    json_values,
    memory_bound,
    mutated,
    nested,
)

HEX16 = "0123456789abcdef"
HEX64 = "ab" * 32
VALID = {
    "pf.status/1": {"device": "dev-1", "online": True, "ts": 1.5, "seq": 3, "conn": HEX16, "group": "g",
                    "active": {"name": "m", "version": 2}, "models": {"m": 2}, "ota": None, "agent": "0.1", "proto": 1},
    "pf.cmd.update/1": {"cmd_id": HEX16, "rollout_id": HEX16, "phase": "canary", "issued": 1.0, "expires": 2.0,
                        "release": {"release_id": HEX16, "name": "m", "version": 2, "size": 10, "sha256": HEX64,
                                    "chunks": 1, "index_sha256": HEX64, "index_size": 44,
                                    "chunking": {"algo": "gear32", "min": 64, "avg": 256, "max": 1024}}},
    "pf.cmd.rollback/1": {"cmd_id": HEX16, "rollout_id": HEX16, "release_id": HEX16, "name": "m", "version": 1,
                          "issued": 1.0, "expires": 2.0},
    "pf.chunk.request/1": {"release_id": HEX16, "index": False, "again": True, "idx": [0, 1, 2]},
    "pf.ota.report/1": {"device": "dev-1", "seq": 1, "ts": 1.0, "state": "downloading", "rollout_id": HEX16,
                        "release_id": HEX16, "active": None,
                        "progress": {"have": 1, "total": 2, "bytes_rx": 3, "bytes_reused": 0}},
    "pf.outbox/1": {"device": "dev-1", "id": 2, "kind": "telemetry", "created": 1.0, "body": {}},
}
ACCEPT = [("pf.status/1",), ("pf.cmd.update/1", "pf.cmd.rollback/1"), ("pf.chunk.request/1",), ("pf.ota.report/1",),
          ("pf.outbox/1",)]


def test_valid_messages_round_trip() -> None:
    for schema, fields in VALID.items():
        raw = P.encode(schema, **fields)
        assert P.decode(raw, (schema,)) == {"schema": schema, **fields}


@st.composite
def edited_messages(draw: st.DrawFn) -> tuple[bytes, tuple[str, ...]]:
    """A valid control message with one to three fields (top level or nested) replaced, dropped or added."""
    schema = draw(st.sampled_from(sorted(VALID)))
    msg = json.loads(json.dumps({"schema": schema, **VALID[schema]}))
    for _ in range(draw(st.integers(1, 3))):
        target = msg
        nested_keys = [k for k, v in msg.items() if isinstance(v, dict)]
        if nested_keys and draw(st.booleans()):
            target = msg[draw(st.sampled_from(nested_keys))]
        key = draw(st.sampled_from([*sorted(target), "extra"]))
        if draw(st.integers(0, 4)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(json_values)
    accept = draw(st.sampled_from([a for a in ACCEPT if schema in a] + ACCEPT))
    return json_bytes(msg), accept


@settings(max_examples=examples(300))
@example(case=(nested(100_000)[:60_000], ("pf.status/1",)))
@example(case=(b'{"schema":"pf.outbox/1","device":"dev-c","id":2,"kind":"telemetry","created":1' + b"0" * 30
               + b',"body":{}}', ("pf.outbox/1",)))
@example(case=(huge_int(5000, "id"), ("pf.outbox/1",)))  # found: ValueError (int digits limit)
@given(case=st.one_of(edited_messages(), st.tuples(st.one_of(st.binary(max_size=300), huge_ints), st.sampled_from(ACCEPT))))
def test_control_message_decoder(case: tuple[bytes, tuple[str, ...]]) -> None:
    raw, accept = case
    try:
        msg = P.decode(raw, accept)
    except ProtocolError:
        return
    assert msg["schema"] in accept
    P.validate(msg)


@settings(max_examples=examples(150))
@given(raw=st.one_of(
    st.binary(max_size=80),
    st.builds(lambda k, rid, i, o, d, extra: struct.pack(">4sBBH8sIQI", b"PFCK", 1, k, 0, rid, i, o, (len(d) + extra) % 2**32) + d,
              st.integers(0, 255), st.binary(min_size=8, max_size=8), st.integers(0, 2**32 - 1),
              st.integers(0, 2**64 - 1), st.binary(max_size=64), st.sampled_from([0, 0, 1, 2**32 - 1]))))
def test_chunk_frame_decoder(raw: bytes) -> None:
    try:
        frame = P.decode_frame(raw)
    except ProtocolError:
        return
    assert len(frame.data) == len(raw) - P.HEADER_BYTES and len(frame.release_id) == 16


@settings(max_examples=examples(150))
@example(raw=b"PFIX\x01\x00\x00\x00\xff\xff\xff\xff")
@given(raw=st.one_of(
    st.binary(max_size=120),
    st.builds(lambda n, entries: b"PFIX\x01\x00\x00\x00" + struct.pack(">I", n) + entries,
              st.integers(0, 2**32 - 1), st.binary(max_size=144)),
    mutated(ChunkIndex(("ab" * 32, "cd" * 32), (100, 2000)).to_bytes())))
def test_chunk_index_decoder(raw: bytes) -> None:
    with memory_bound(1 << 20):
        try:
            index = ChunkIndex.from_bytes(raw)
        except ProtocolError:
            return
    assert len(index) == len(index.sizes) and all(s > 0 for s in index.sizes)


@settings(max_examples=examples(100))
@example(topic="pf/v1/dev/dev-1\n/status")
@given(topic=st.one_of(st.text(max_size=60), st.builds(lambda d, leaf: f"pf/v1/dev/{d}/{leaf}", st.text(max_size=70),
                                                       st.text(max_size=10))))
def test_device_topic_parser(topic: str) -> None:
    try:
        device, leaf = P.parse_dev_topic(topic)
    except ProtocolError:
        return
    assert P.valid_id(device) and leaf and "/" not in device


# ------------------------------------------------------------------------------------------------- FL

FL_VALID = {
    M.ANNOUNCE: {"task": "t", "round": 1, "attempt": 0, "model_version": 3, "state": "checkin",
                 "checkin_deadline": 1.0, "deadline": 2.0},
    M.CHECKIN: {"task": "t", "round": 1, "attempt": 0, "device": "dev-1", "num_samples": 5},
}


@settings(max_examples=examples(150))
@example(case=(nested(30_000), M.CHECKIN))
@example(case=(huge_int(), M.CHECKIN))  # found: ValueError (int digits limit)
@example(case=(json_bytes({"schema": M.CHECKIN, **FL_VALID[M.CHECKIN], "num_samples": 2**64}), M.CHECKIN))
@given(case=st.one_of(
    st.tuples(st.one_of(st.binary(max_size=200), huge_ints), st.sampled_from([M.ANNOUNCE, M.CHECKIN, M.TASK])),
    st.sampled_from(sorted(FL_VALID)).flatmap(lambda s: st.tuples(
        st.dictionaries(st.sampled_from([*FL_VALID[s], "schema"]), json_values, max_size=4)
        .map(lambda patch, s=s: json_bytes({"schema": s, **FL_VALID[s], **patch})), st.just(s)))))
def test_fl_control_decoder(case: tuple[bytes, str]) -> None:
    raw, schema = case
    try:
        msg = M.decode(raw, schema)
    except UpdatePayloadError:
        return
    assert all(v <= M.MAX_INT for v in msg.values() if isinstance(v, int))


@settings(max_examples=examples(100))
@example(raw=nested(30_000), kinds=S.UP_KINDS)
@example(raw=huge_int(), kinds=S.DOWN_KINDS)  # found: ValueError (int digits limit)
@given(raw=st.one_of(st.binary(max_size=200), huge_ints, st.builds(
    lambda kind, patch: json_bytes({"schema": S.SCHEMA, "task": "t", "round": 1, "attempt": 0, "kind": kind,
                                    "body": {}, **patch}),
    st.sampled_from([*S.UP_KINDS, *S.DOWN_KINDS, "x"]),
    st.dictionaries(st.sampled_from(["round", "attempt", "task", "body", "kind"]), json_values, max_size=3))),
    kinds=st.sampled_from([S.UP_KINDS, S.DOWN_KINDS]))
def test_secagg_message_decoder(raw: bytes, kinds: tuple[str, ...]) -> None:
    """Both directions: device -> cloud (keys, shares, masked, unmask) and cloud -> device (roster, ...)."""
    try:
        msg = S.decode(raw, kinds)
    except UpdatePayloadError:
        return
    assert msg["kind"] in kinds


def test_secagg_bodies_of_the_wrong_shape_are_malformed() -> None:
    """Found by review of what the decoder lets through: a 'keys' body that is a list, or shares that are
    not [x, y] field elements, were stored and crashed the aggregator when it replayed them to unmask."""
    honest = S.encode("t", 1, 0, "unmask", {"b": {"d1": [1, 5]}, "s": {}}, device="d2")
    assert S.decode(honest, S.UP_KINDS)["kind"] == "unmask"
    for kind, body in [("keys", []), ("keys", {"c_pk": 1, "s_pk": "x"}), ("masked", {"y": 3}), ("shares", {"d": 1}),
                       ("unmask", {"b": {"d1": [0, 5]}}), ("unmask", {"b": {"d1": [1, 2**600]}}),
                       ("unmask", {"s": {"d1": [1, 2, 3]}}), ("unmask", {"b": []})]:
        with pytest.raises(UpdatePayloadError, match="wrong shape"):
            S.decode(S.encode("t", 1, 0, kind, body, device="d2"), S.UP_KINDS)
    for kind, body in [("roster", {"roster": {"d": {"c_pk": "a"}}, "threshold": 2}), ("mask", {"mask_set": "d"}),
                       ("unmask_request", {"survivors": ["a"], "dropped": [1]})]:
        with pytest.raises(UpdatePayloadError, match="wrong shape"):
            S.decode(S.encode("t", 1, 0, kind, body), S.DOWN_KINDS)


@settings(max_examples=examples(60))
@given(text=st.one_of(st.text(max_size=40), st.binary(max_size=40).map(lambda b: __import__("base64").b64encode(b).decode())),
       length=st.integers(0, 12))
def test_secagg_vector_decoder(text: str, length: int) -> None:
    try:
        v = S.vec_from_b64(text, length)
    except UpdatePayloadError:
        return
    assert v.shape == (length,)


def _st_bytes(header: object, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


DTYPES = ["F32", "F16", "I8", "U8", "I32", "I64", "BOOL", "F64", "BF16", "X9", ""]
tensor_entries = st.one_of(json_values, st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPES),
    "shape": st.lists(st.one_of(st.integers(0, 6), st.integers(-2, 2**62)), max_size=4),
    "data_offsets": st.lists(st.integers(-1, 200), min_size=2, max_size=2)}))
metadata = st.dictionaries(st.sampled_from(["pf", "x"]),
                           st.one_of(st.text(max_size=30), json_values.map(json.dumps), st.just(nested(5000).decode()),
                                     huge_ints.map(bytes.decode)),
                           max_size=2)
tensor_headers = st.builds(lambda h, m: {**h, "__metadata__": m} if m is not None else h,
                           st.dictionaries(st.text(min_size=1, max_size=8), tensor_entries, max_size=3),
                           st.one_of(st.none(), metadata))


@settings(max_examples=examples(200))
@example(raw=T.to_bytes({"a": np.zeros(2, np.float32)}, None)[:8] + b"x")
@example(raw=_st_bytes({"__metadata__": {"pf": nested(5000).decode()}, "a": {"dtype": "F32", "shape": [1],
                                                                             "data_offsets": [0, 4]}}, b"\0" * 4))
@example(raw=_st_bytes({"__metadata__": {"pf": huge_int().decode()}, "a": {"dtype": "F32", "shape": [1],
                                                                        "data_offsets": [0, 4]}}, b"\0" * 4))  # found
@given(raw=st.one_of(st.binary(max_size=200),
                     st.builds(_st_bytes, tensor_headers, st.binary(max_size=200)),
                     mutated(T.to_bytes({"a": np.arange(6, dtype=np.float32)}, {"schema": "x", "round": 1}))))
def test_safetensors_payload_decoders(raw: bytes) -> None:
    with memory_bound(4 << 20):
        for call in (lambda: T.from_bytes(raw, 1 << 20), lambda: T.peek_header(raw),
                     lambda: T.weights_from_bytes(raw, {"a": (6,)}, max_bytes=1 << 20)):
            with contextlib.suppress(UpdatePayloadError):
                call()


SHAPES = {"conv.w": (4, 3, 3, 3), "conv.b": (4,), "fc.w": (10, 300), "fc.b": (10,)}


@st.composite
def updates(draw: st.DrawFn) -> bytes:
    """A real encoded update (random codec), then its header or tensors edited."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    delta = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    cfg = C.CodecConfig(topk=draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0])), int8=draw(st.booleans()),
                        min_sparse=draw(st.sampled_from([1, 1024])))
    header = {"task": "t", "round": 1, "attempt": 0, "device": "d", "num_samples": 5, "metrics": {"loss": 0.5}}
    payload = C.encode_update(delta, cfg, header, seed=1)
    how = draw(st.sampled_from(["none", "header", "tensor", "bytes"]))
    if how == "none":
        return payload
    if how == "bytes":
        return draw(mutated(payload))
    h, tensors = T.from_bytes(payload, 1 << 30)
    if how == "header":
        path = draw(st.sampled_from(["num_samples", "codec", "tensors", "metrics", "schema", "tensors.fc.w",
                                     "tensors.fc.w.k", "metrics.loss"]))
        value = draw(st.one_of(json_values, st.sampled_from([10**400, -1, 0, 3001, {"enc": "topk", "k": 3000}]),
                               st.integers(0, 4000)))
        parts = path.split(".", 1)
        if len(parts) == 1:
            h[path] = value
        elif parts[0] == "metrics":
            h["metrics"] = {"loss": value}
        elif parts[1] == "fc.w" or not isinstance(h["tensors"].get("fc.w"), dict):
            h["tensors"]["fc.w"] = value
        else:
            h["tensors"]["fc.w"]["k"] = value
    else:
        name = draw(st.sampled_from(sorted(tensors) + ["idx16", "bitmap", "scales", "junk"]))
        kind = draw(st.sampled_from(["drop", "dtype", "resize", "values"]))
        arr = tensors.get(name, np.zeros(3, np.float32))
        if kind == "drop":
            tensors.pop(name, None)
        elif kind == "dtype":
            tensors[name] = arr.astype(draw(st.sampled_from([np.float64, np.int8, np.uint16, np.int32, np.float16])))
        elif kind == "resize":
            tensors[name] = np.resize(arr, draw(st.integers(0, arr.size + 5)))
        else:
            fill = draw(st.sampled_from([np.nan, np.inf, -1, 0, 255, 65535, 3e38]))
            a = arr.copy()
            if a.size:
                with np.errstate(all="ignore"):
                    a.flat[draw(st.integers(0, a.size - 1))] = np.array(fill).astype(a.dtype)
            tensors[name] = a
    return T.to_bytes(tensors, h)


@settings(max_examples=examples(200))
@example(raw=C.encode_update({k: np.ones(s, np.float32) for k, s in SHAPES.items()}, C.CodecConfig(),
                             {"num_samples": 1, "metrics": {"loss": 10**400}}))  # found: float(10**400) OverflowError
@example(raw=C.encode_update({k: np.ones(s, np.float32) for k, s in SHAPES.items()}, C.CodecConfig(),
                             {"num_samples": 10**30}))  # found: breaks the weighted mean and the SQLite insert
@given(raw=updates())
def test_fl_update_decoder(raw: bytes) -> None:
    with memory_bound(8 << 20):
        try:
            out = C.decode_update(raw, SHAPES, C.DecodeLimits(max_bytes=1 << 20))
        except UpdatePayloadError:
            return
    assert {k: v.shape for k, v in out.delta.items()} == SHAPES
    assert all(np.isfinite(v).all() for v in out.delta.values()) and 1 <= out.num_samples <= C.MAX_NUM_SAMPLES
    assert all(np.isfinite(v) for v in out.metrics.values())
