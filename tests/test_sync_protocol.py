"""The wire format without a broker: schemas, frames, chunk indexes, content-defined chunk reuse, gates, broker files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cloud_sync import protocol as p
from cloud_sync.broker_files import Account, check_password, hash_password, render_acl, render_passwd
from cloud_sync.chunks import ChunkIndex, Chunking, LocalChunks, choose_chunking, index_file
from cloud_sync.errors import ProtocolError, ReleaseError
from cloud_sync.releases import parse_canary, parse_gate
from cloud_sync.rollout import evaluate_gates

REL = {
    "release_id": "0123456789abcdef", "name": "digits", "version": 3, "size": 1000, "sha256": "a" * 64,
    "chunks": 2, "index_sha256": "b" * 64, "index_size": 84,
    "chunking": {"algo": "gear32", "min": 512, "avg": 2048, "max": 8192}, "rollback_auth": None,
}


def _update(**over: object) -> dict:
    msg = {"cmd_id": "00" * 8, "rollout_id": "11" * 8, "phase": "canary", "issued": 1.0, "expires": 2.0,
           "release": dict(REL), "probe": {"runs": 3}}
    msg.update(over)
    return msg


def test_encode_decode_roundtrip_every_device_message() -> None:
    raw = p.encode("pf.cmd.update/1", **_update())
    assert p.decode(raw, ("pf.cmd.update/1",))["release"]["version"] == 3
    status = p.encode("pf.status/1", device="dev-1", online=True, ts=1.0, seq=5, conn="ab" * 8,
                      active={"name": "digits", "version": 2}, models={"digits": 2})
    assert p.decode(status, ("pf.status/1",))["models"] == {"digits": 2}
    report = p.encode("pf.ota.report/1", device="dev-1", seq=6, ts=1.0, state="installed", rollout_id=None,
                      release_id="0123456789abcdef", active=None,
                      probe={"requests": 5, "errors": 0, "p95_ms": 1.5, "golden": 1.0})
    assert p.decode(report, ("pf.ota.report/1",))["probe"]["golden"] == 1.0


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"schema": "pf.nope/1"}', "unknown schema"),
        (json.dumps({"schema": "pf.status/1", "device": "a/b", "online": True, "ts": 1, "seq": 1}).encode(), "device"),
        (json.dumps({"schema": "pf.status/1", "device": "d", "online": "yes", "ts": 1, "seq": 1}).encode(), "online"),
        (json.dumps({"schema": "pf.status/1", "device": "d", "online": True, "ts": float("nan"), "seq": 1},
                    allow_nan=True).encode(), "ts"),
        (json.dumps({"schema": "pf.cmd.update/1", **_update(phase="beta")}).encode(), "phase"),
        (json.dumps({"schema": "pf.cmd.update/1", **_update(release={**REL, "sha256": "XYZ"})}).encode(), "sha256"),
        (json.dumps({"schema": "pf.cmd.update/1",
                     **_update(release={**REL, "chunking": {**REL["chunking"], "avg": 1 << 30}})}).encode(), "avg"),
        (json.dumps({"schema": "pf.chunk.request/1", "release_id": "0123456789abcdef",
                     "idx": list(range(p.MAX_REQUEST_IDX + 1))}).encode(), "idx"),
        (b"{" + b" " * p.MAX_CONTROL_BYTES + b"}", "above the"),
        (b"[" * 50_000, "JSON"),
    ],
)
def test_decode_rejects_malformed_messages_with_a_reason(payload: bytes, needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        p.decode(payload, ("pf.status/1", "pf.cmd.update/1", "pf.chunk.request/1"))


def test_decode_refuses_a_valid_message_on_the_wrong_topic() -> None:
    raw = p.encode("pf.cmd.update/1", **_update())
    with pytest.raises(ProtocolError, match="not accepted"):
        p.decode(raw, ("pf.status/1",))


def test_encode_refuses_invalid_outgoing_messages() -> None:
    with pytest.raises(ProtocolError, match="missing"):
        p.encode("pf.cmd.update/1", cmd_id="00" * 8)


def test_topics_and_shared_filters() -> None:
    assert p.dev_topic("dev-1", "cmd") == "pf/v1/dev/dev-1/cmd"
    assert p.dev_filter("ota", "workers") == "$share/workers/pf/v1/dev/+/ota"
    assert p.parse_dev_topic("pf/v1/dev/dev-1/fl/up/x") == ("dev-1", "fl/up/x")
    for bad in ("pf/v1/dev/+/cmd", "other/dev/x/cmd", "pf/v1/dev/x"):
        with pytest.raises(ProtocolError):
            p.parse_dev_topic(bad)
    with pytest.raises(ProtocolError):
        p.dev_topic("a/#", "cmd")


def test_frames_roundtrip_and_reject_bad_headers() -> None:
    raw = p.encode_frame(p.FRAME_CHUNK, "0123456789abcdef", 7, 4096, b"hello")
    assert len(raw) == p.HEADER_BYTES + 5
    f = p.decode_frame(raw)
    assert (f.kind, f.release_id, f.idx, f.offset, bytes(f.data)) == (0, "0123456789abcdef", 7, 4096, b"hello")
    with pytest.raises(ProtocolError, match="header says"):
        p.decode_frame(raw + b"x")
    with pytest.raises(ProtocolError, match="magic"):
        p.decode_frame(b"XXXX" + raw[4:])
    with pytest.raises(ProtocolError, match="shorter"):
        p.decode_frame(raw[:10])
    with pytest.raises(ProtocolError, match="limit"):
        p.encode_frame(p.FRAME_CHUNK, "0123456789abcdef", 0, 0, b"x" * (p.MAX_CHUNK_BYTES + 1))


def test_chunk_index_roundtrip_and_validation(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    (tmp_path / "a.bin").write_bytes(data)
    index = index_file(tmp_path / "a.bin", Chunking(2048, 8192, 32768))
    assert index.total == len(data) and len(index) > 10
    assert max(index.sizes) <= 32768
    again = ChunkIndex.from_bytes(index.to_bytes())
    assert again == index and again.offsets == index.offsets
    with pytest.raises(ProtocolError, match="says"):
        ChunkIndex.from_bytes(index.to_bytes()[:-1])
    with pytest.raises(ProtocolError, match="magic"):
        ChunkIndex.from_bytes(b"NOPE" + index.to_bytes()[4:])


def test_content_defined_chunks_survive_an_insertion(tmp_path: Path) -> None:
    """Bytes inserted near the start change only the chunks around them: the rest are found locally."""
    base = os.urandom(400_000)
    changed = base[:1000] + os.urandom(777) + base[1000:]
    (tmp_path / "old").write_bytes(base)
    (tmp_path / "new").write_bytes(changed)
    chunking = choose_chunking(len(changed))
    new_index = index_file(tmp_path / "new", chunking)
    local = LocalChunks(chunking, tmp_path / "cache")
    local.add_file(tmp_path / "old")
    reused = sum(s for h, s in zip(new_index.hashes, new_index.sizes, strict=True) if local.read(h) is not None)
    assert reused >= 0.9 * len(changed)
    assert list((tmp_path / "cache").iterdir()), "the per-file index is cached"


def test_local_chunks_reject_a_file_changed_after_indexing(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(50_000))
    chunking = Chunking(512, 2048, 8192)
    local = LocalChunks(chunking)
    local.add_file(path)
    first = next(iter(local.where))
    assert local.read(first) is not None
    raw = bytearray(path.read_bytes())
    raw[:100] = b"\0" * 100
    path.write_bytes(bytes(raw))
    assert local.read(first) is None


def test_choose_chunking_scales_with_size_within_bounds() -> None:
    small, big = choose_chunking(100_000), choose_chunking(2 << 30)
    assert small.avg == 2048 and big.avg == 256 * 1024 and choose_chunking(1_000_000).avg == 64 * 1024
    assert big.max <= p.MAX_CHUNK_BYTES and small.min == small.avg // 4


def test_gates_parse_and_evaluate() -> None:
    assert str(parse_gate("error_rate <= 0.01")) == "error_rate<=0.01"
    for bad in ("latency<5", "golden=>0.9", "p95_ms<=fast"):
        with pytest.raises(ReleaseError):
            parse_gate(bad)
    assert parse_canary("10%") == pytest.approx(0.1) and parse_canary("0") == 0
    with pytest.raises(ReleaseError):
        parse_canary("150%")
    rows = [
        {"device": "a", "state": "installed", "error": None,
         "probe": json.dumps({"requests": 100, "errors": 1, "p95_ms": 2.0, "golden": 0.95})},
        {"device": "b", "state": "installed", "error": None,
         "probe": json.dumps({"requests": 100, "errors": 0, "p95_ms": 9.0, "golden": 0.5})},
    ]
    ok, reason, observed = evaluate_gates([parse_gate("golden>=0.9")], rows)
    assert not ok and "golden" in reason and observed["golden"] == 0.5
    ok, _, observed = evaluate_gates([parse_gate("error_rate<=0.01"), parse_gate("p95_ms<=10")], rows)
    assert ok and observed["error_rate"] == pytest.approx(0.005) and observed["p95_ms"] == 9.0
    rows.append({"device": "c", "state": "failed", "error": "health check", "probe": None})
    ok, reason, _ = evaluate_gates([], rows)
    assert not ok and "c: health check" in reason


def test_mosquitto_password_hash_and_acl_rules() -> None:
    h = hash_password("s3cret")
    assert h.startswith("$7$101$") and check_password("s3cret", h) and not check_password("nope", h)
    accounts = [Account("dev-a", "device", h, "lab"), Account("cloud-1", "cloud", h)]
    acl = render_acl(accounts)
    assert "pattern write pf/v1/dev/%u/ota" in acl and "pattern read pf/v1/dev/%u/cmd" in acl
    assert "user cloud-1\ntopic readwrite pf/v1/#" in acl and "user dev-a\ntopic read pf/v1/grp/lab/#" in acl
    assert "pattern write pf/v1/dev/%u/cmd" not in acl
    assert render_passwd(accounts).splitlines()[0].startswith("cloud-1:$7$")


def test_device_side_imports_without_torch(no_torch) -> None:
    """The device half of cloud_sync must import where `import torch` fails."""
    code = ("import sys, cloud_sync.device, cloud_sync.ota_client, cloud_sync.probe, cloud_sync.client;"
            "from cloud_sync import DeviceLink, OtaClient, MqttSink;"
            "assert 'torch' not in sys.modules; print('ok')")
    out = no_torch.python(code, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
