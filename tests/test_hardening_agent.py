"""Agent hardening (issue 12, cases 3, 4, 5, 6, 11, 12, 13 and 14): decompression bombs, trust settings that
must not wipe the store, idle and trickling connections, a deleted state.json, same version with other
bytes, 400 instead of 500, `agent install` that must see the agent serve, the MQTT link state."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import struct
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent import codec
from edge_agent.client import Client
from edge_agent.config import AgentConfig
from edge_agent.daemon import Agent
from edge_agent.errors import RequestError
from edge_agent.store import ModelStore
from pocketfleet import PocketfleetError
from tests.agent_fixtures import FIELDS, NAME, Packages, X, cli, conv_net, session_packages

MAX_BODY = 64 << 10


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    return session_packages(tmp_path_factory)


def _agent(state: Path, packages: Packages, **over: object) -> Agent:
    cfg = AgentConfig(state_dir=str(state), trust=packages.public_key, listen="127.0.0.1:0",
                      max_body_bytes=MAX_BODY, telemetry_interval_s=3600, watch_interval_s=0.05, **over)
    return Agent(cfg).start()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, packages: Packages) -> Iterator[Agent]:
    state = tmp_path_factory.mktemp("hard") / "state"
    ModelStore(state, packages.public_key).install(packages.versions[1])
    a = _agent(state, packages)
    yield a
    a.stop()


def _raw(agent: Agent, data: bytes, timeout: float = 5.0) -> bytes:
    assert agent.server is not None and agent.server.address is not None
    with socket.create_connection(agent.server.address, timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return out


def _post(agent: Agent, path: str, body: bytes, ctype: str = "application/json") -> tuple[int, dict]:
    raw = _raw(agent, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                      f"Connection: close\r\n\r\n".encode() + body)
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload or b"{}")


# ------------------------------------------------------------------------------------------- case 3: npz bomb


def _npy_zeros_header(shape: tuple[int, ...]) -> bytes:
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape!r}, }}"
    pad = 63 - (10 + len(header)) % 64
    text = (header + " " * pad + "\n").encode("latin1")
    return codec.NPY_MAGIC + b"\x01\x00" + struct.pack("<H", len(text)) + text


def _bomb(rows: int) -> bytes:
    """A deflated .npz of one float32 [rows, 1, 8, 8] tensor of zeros (compresses ~1000:1)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z, z.open("image.npy", "w", force_zip64=True) as f:
        f.write(_npy_zeros_header((rows, 1, 8, 8)))
        block = bytes(1 << 20)
        left = rows * 256
        while left:
            f.write(block[: min(left, len(block))])
            left -= min(left, len(block))
    return buf.getvalue()


def test_an_npz_decompression_bomb_is_refused_before_it_inflates(agent: Agent) -> None:
    """Before: a 1 MB .npz inflated the agent by ~1 GB before any shape check."""
    bomb = _bomb(64 * 1024)  # 16 MiB of float32 zeros in ~16 KB
    assert len(bomb) < MAX_BODY
    status, doc = _post(agent, f"/v1/predict?model={NAME}", bomb, codec.NPZ)
    assert status == 413 and doc["error"]["code"] == "inflated_too_large", doc
    # a member whose header lies about its size is caught while streaming, not trusted
    liar = bytearray(_bomb(4096))
    cd = liar.rfind(b"PK\x01\x02")
    struct.pack_into("<I", liar, cd + 24, 1000)  # central directory: uncompressed size 1000 bytes
    with pytest.raises(RequestError) as info:
        codec.npz_arrays(bytes(liar), max_bytes=1 << 20)
    assert info.value.status in (400, 413)
    # an honest .npz still works
    ok = codec.npz_bytes({"image": X})
    status, doc = _post(agent, f"/v1/predict?model={NAME}", ok, codec.NPZ)
    assert status == 200, doc


# --------------------------------------------------------------------------------- case 4: bad trust setting


def test_an_unusable_trust_setting_refuses_to_start_and_quarantines_nothing(tmp_path: Path, packages: Packages) -> None:
    """Before: no --trust, a mistyped path, the wrong key or a non-key file moved every version to quarantine/."""
    state = tmp_path / "state"
    ModelStore(state, packages.public_key).install(packages.versions[1])
    junk = tmp_path / "trust-dir"
    junk.mkdir()
    shutil.copy(packages.public_key, junk / "good.pub")
    (junk / "notes.pub").write_text("not a key\n")
    wrong = Path(packages.dir) / "other-keys" / "pocketfleet.pub"
    for trust in ("", str(tmp_path / "typo.pub"), str(wrong), str(junk)):
        cfg = AgentConfig(state_dir=str(state), trust=trust, listen="127.0.0.1:0", telemetry_interval_s=3600)
        with pytest.raises(PocketfleetError, match="trust"):
            Agent(cfg).start().stop()
        assert ModelStore(state).installed(NAME) == [1], trust
        assert list((state / "quarantine").iterdir()) == [], trust
    agent = _agent(state, packages)
    try:
        assert agent.served() == {NAME: 1}
    finally:
        agent.stop()
    out = cli("agent", "run", "--state-dir", str(state), "--trust", str(wrong), "--listen", "127.0.0.1:0", timeout=60)
    assert out.returncode != 0 and "trust" in out.stderr and "Traceback" not in out.stderr, out.stderr


# ------------------------------------------------------------------------------- case 5: idle connections


def _get_health(address: tuple[str, int], timeout: float = 3.0) -> int:
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split()[1])


def test_idle_and_trickling_connections_do_not_lock_clients_out(tmp_path: Path, packages: Packages) -> None:
    """Before: max_connections idle sockets (or one byte every 20 s each) refused everyone for keepalive_s,
    and a refused client got a reset instead of the 503."""
    state = tmp_path / "state"
    ModelStore(state, packages.public_key).install(packages.versions[1])
    agent = _agent(state, packages, max_connections=8, keepalive_s=60.0, request_timeout_s=1.0)
    socks: list[socket.socket] = []
    try:
        address = agent.server.address  # type: ignore[union-attr]
        socks = [socket.create_connection(address) for _ in range(8)]  # idle: never send a byte
        time.sleep(0.2)
        t0 = time.monotonic()
        assert _get_health(address) == 200  # an idle connection made room
        assert time.monotonic() - t0 < 2.0
        for s in socks:
            s.close()
        # trickling: each connection has started a request and sends a byte now and then
        socks = [socket.create_connection(address) for _ in range(8)]
        for s in socks:
            s.sendall(b"GET /v1/he")
        time.sleep(0.2)
        with socket.create_connection(address, timeout=3) as s:  # full of requests in progress: a readable 503
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            data = s.recv(65536)
            assert data.startswith(b"HTTP/1.1 503") and b"too_many_connections" in data, data
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.3):
                for s in socks:
                    with contextlib.suppress(OSError):
                        s.send(b"a")

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        time.sleep(1.8)  # past request_timeout_s: the trickling requests were cut
        try:
            assert _get_health(address) == 200
        finally:
            stop.set()
            t.join()
    finally:
        for s in socks:
            s.close()
        agent.stop()


# ----------------------------------------------------------------------------- case 6: state.json deleted


def test_a_deleted_state_json_is_rebuilt_from_the_versions_on_disk(tmp_path: Path, packages: Packages) -> None:
    """Before: the agent served nothing and the highest-version record was reset, so v1 installed over v2."""
    state = tmp_path / "state"
    store = ModelStore(state, packages.public_key)
    store.install(packages.versions[1])
    store.install(packages.versions[2])
    (state / "state.json").unlink()
    agent = _agent(state, packages)
    try:
        assert agent.served() == {NAME: 2}
        with pytest.raises(PocketfleetError, match="older"):
            agent.store.install(packages.versions[1])
    finally:
        agent.stop()
    (state / "state.json").unlink()
    with pytest.raises(PocketfleetError, match="older"):  # also when nothing ran in between
        ModelStore(state, packages.public_key).install(packages.versions[1])


# ------------------------------------------------------------------------ case 11: same version, other bytes


def test_the_same_version_with_other_bytes_is_refused(tmp_path: Path, packages: Packages) -> None:
    """Before: after a rollback from v3, a different v3 reported "resumed" and re-activated the old v3 bytes."""
    from export import Samples, build_package
    from export.runtimes import load_runtime

    state = tmp_path / "state"
    store = ModelStore(state, packages.public_key)
    for v in (1, 2, 3):
        store.install(packages.versions[v])
    store.rollback(NAME)
    assert store.read_state()[NAME].active == 2
    model = conv_net(tmp_path / "other.onnx", seed=33)
    other = tmp_path / "other-v3.pfpkg"
    build_package(model, {**FIELDS, "name": NAME, "version": 3},
                  Samples({"image": X}, load_runtime(model).run({"image": X})), other, key=packages.private_key)
    with pytest.raises(PocketfleetError, match="different"):
        store.install(other)
    assert store.read_state()[NAME].active == 2
    out = cli("agent", "install", str(other), "--state-dir", str(state), "--trust", packages.public_key)
    assert out.returncode == 4 and "different" in out.stderr, (out.returncode, out.stderr)


# ---------------------------------------------------------------------------------- case 12: 400, not 500


def test_deep_json_huge_labels_and_bad_content_length_are_400s_and_500s_are_counted(agent: Agent) -> None:
    deep = b'{"inputs": {"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    assert len(deep) < MAX_BODY * 4
    status, doc = _post(agent, f"/v1/predict?model={NAME}", deep[: MAX_BODY - 10] if len(deep) > MAX_BODY else deep)
    assert status == 400, doc
    status, doc = _post(agent, "/v1/samples", b'{"x":' + b"[" * 20_000 + b"]" * 20_000 + b"}")
    assert status == 400, doc
    body = json.dumps({"model": NAME, "inputs": {"image": X[:1].tolist()}, "labels": [2**70]}).encode()
    status, doc = _post(agent, "/v1/samples", body)
    assert status == 400 and "label" in doc["error"]["message"], doc
    raw = _raw(agent, "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: \u00b2\r\n\r\n".encode("utf-8"))
    assert raw.startswith(b"HTTP/1.1 400"), raw
    raw = _raw(agent, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 4"), raw
    # a handler failure (a bug) answers 500 and is counted in /metrics
    before = agent.metrics.render().decode() if isinstance(agent.metrics.render(), bytes) else agent.metrics.render()
    original = agent.describe
    agent.describe = lambda: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
    try:
        raw = _raw(agent, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    finally:
        agent.describe = original  # type: ignore[method-assign]
    assert raw.startswith(b"HTTP/1.1 500"), raw
    after = agent.metrics.render()
    after = after.decode() if isinstance(after, bytes) else after
    assert 'status="500"' in after and 'status="500"' not in before, after


# ------------------------------------------------------------------------------ case 13: agent install


def test_agent_install_fails_when_the_running_agent_does_not_serve_the_version(tmp_path: Path, packages: Packages) -> None:
    """Before: `agent install` exited 0 while the agent went on serving {} (it had no trusted key) or the old version."""
    state = tmp_path / "state"
    ModelStore(state, packages.public_key).install(packages.versions[1])
    agent = _agent(state, packages)
    try:
        agent.store._trust = {}  # the running agent now trusts nothing: it cannot load what gets installed
        out = cli("agent", "install", str(packages.versions[2]), "--state-dir", str(state), "--trust",
                  packages.public_key, "--json")
        assert out.returncode != 0 and "serv" in out.stderr, (out.returncode, out.stdout, out.stderr)
        assert agent.served() == {NAME: 1}
        agent.store._trust = None
        out = cli("agent", "install", str(packages.versions[3]), "--state-dir", str(state), "--trust",
                  packages.public_key, "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["agent"]["serving"] == {NAME: 3}
    finally:
        agent.stop()


# ----------------------------------------------------------------------------- case 14: MQTT link state


def test_an_unreachable_broker_is_logged_and_shown_in_health_and_metrics(tmp_path: Path, packages: Packages,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    from tests.mosquitto import free_port

    state = tmp_path / "state"
    ModelStore(state, packages.public_key).install(packages.versions[1])
    port = free_port()  # nothing listens there
    caplog.set_level("WARNING")
    agent = _agent(state, packages, device_id="dev-x",
                   mqtt={"host": "127.0.0.1", "port": port, "username": "dev-x", "password": "p", "group": "lab",
                         "reconnect_min_s": 0.1, "reconnect_max_s": 0.5})
    try:
        with Client(agent.urls()[0], timeout=10) as client:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                link = client.health().get("mqtt")
                if link and link.get("connect_failures", 0) >= 1:
                    break
                time.sleep(0.1)
            assert link is not None and link["connected"] is False and "reach" in link["last_error"], link
        metrics = agent.metrics.render()
        metrics = metrics.decode() if isinstance(metrics, bytes) else metrics
        assert "pocketfleet_agent_mqtt_connected 0" in metrics
        assert any("cannot reach the broker" in r.getMessage() for r in caplog.records)
    finally:
        agent.stop()
