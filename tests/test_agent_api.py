"""The agent's local API on a real agent (threads in this process): predict in JSON/.npy/.npz, int8 LiteRT
IO as float, every bad input answered 4xx with a clear message while the agent keeps serving, metrics,
the Unix socket, and hot swaps under load without a failed request."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from edge_agent import codec
from edge_agent.client import Client
from edge_agent.config import AgentConfig
from edge_agent.daemon import Agent
from edge_agent.errors import RequestError
from edge_agent.httpd import Request
from edge_agent.store import ModelStore
from tests.agent_fixtures import NAME, Packages, X, session_packages

MAX_BODY = 64 << 10
MAX_BATCH = 8


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    return session_packages(tmp_path_factory)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, packages: Packages) -> Iterator[Agent]:
    state = tmp_path_factory.mktemp("api") / "state"
    store = ModelStore(state, packages.public_key)
    store.install(packages.versions[1])
    store.install(packages.tflite_int8)
    cfg = AgentConfig(
        state_dir=str(state), trust=packages.public_key, listen="127.0.0.1:0", unix_socket=str(state / "agent.sock"),
        max_body_bytes=MAX_BODY, max_batch=MAX_BATCH, telemetry_interval_s=3600, watch_interval_s=0.05,
    )
    a = Agent(cfg).start()
    yield a
    a.stop()


@pytest.fixture()
def client(agent: Agent) -> Iterator[Client]:
    with Client(agent.urls()[0], timeout=30) as c:
        yield c


def _expected(packages: Packages, version: int, rows: slice = slice(None)) -> np.ndarray:
    return packages.expected[version][rows]


def test_predict_json_npy_and_npz_agree_and_name_the_version(agent: Agent, client: Client, packages: Packages) -> None:
    by_json = client.predict({"image": X}, model=NAME, binary=False)
    by_npy = client.predict({"image": X}, model=NAME)
    status, headers, body = client.request("POST", f"/v1/predict?model={NAME}", codec.npz_bytes({"image": X}), codec.NPZ)
    assert status == 200 and headers["x-model-version"] == "1"
    by_npz = json.loads(body)
    for out in (by_json.outputs["logits"], by_npy.outputs["logits"], np.asarray(by_npz["outputs"]["logits"])):
        np.testing.assert_allclose(out, _expected(packages, 1), rtol=1e-5, atol=1e-5)
    assert by_json.model == by_npy.model == by_npz["model"] == {"name": NAME, "version": 1}
    assert by_npy.outputs["logits"].dtype == np.float32
    # the path form and the "model" field of a JSON body name the model too
    doc = json.dumps({"model": NAME, "inputs": {"image": X[:1].tolist()}}).encode()
    status, _, body = client.request("POST", "/v1/predict", doc, codec.JSON)
    assert status == 200 and json.loads(body)["model"]["version"] == 1


def test_int8_litert_model_is_fed_and_answers_float(client: Client) -> None:
    x = np.array([[-0.5, 0.0, 0.25, 1.0]], np.float32)
    out = client.predict({"x": x}, model="requant").outputs["y"]
    assert out.dtype == np.float32
    q = np.clip(np.round(x / 0.1) - 3, -128, 127)  # the input's scale/zero-point, then the output's
    want = np.clip(np.round((q + 3) * 0.1 / 0.05) + 2, -128, 127)
    np.testing.assert_allclose(out, (want - 2) * 0.05, atol=1e-6)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _json(inputs: object) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


BAD = [
    # (name, path, body, content type, status, code, words in the message)
    ("wrong shape", f"/v1/models/{NAME}/predict", _npy(np.zeros((1, 1, 8, 7), np.float32)), codec.NPY, 400, "bad_input", ["'image'", "8, 7"]),
    ("wrong rank", f"/v1/models/{NAME}/predict", _json({"image": [1.0, 2.0]}), codec.JSON, 400, "bad_input", ["'image'", "dimensions"]),
    ("wrong dtype", f"/v1/models/{NAME}/predict", _npy(np.zeros((1, 1, 8, 8), np.float64)), codec.NPY, 400, "bad_input", ["'image'", "float64"]),
    ("strings", f"/v1/models/{NAME}/predict", _json({"image": [[["a"]]]}), codec.JSON, 400, "bad_input", ["'image'", "numbers"]),
    ("ragged", f"/v1/models/{NAME}/predict", _json({"image": [[1.0], [1.0, 2.0]]}), codec.JSON, 400, "bad_input", ["'image'", "rectangular"]),
    ("NaN", f"/v1/models/{NAME}/predict", b'{"inputs": {"image": [[[[NaN, 1, 2, 3, 4, 5, 6, 7]' + b", [0, 0, 0, 0, 0, 0, 0, 0]" * 7 + b"]]]}}", codec.JSON, 400, "bad_input", ["'image'", "NaN"]),
    ("infinity in npy", f"/v1/models/{NAME}/predict", _npy(np.full((1, 1, 8, 8), np.inf, np.float32)), codec.NPY, 400, "bad_input", ["'image'", "infinity"]),
    ("unknown input", f"/v1/models/{NAME}/predict", _json({"pixels": [1]}), codec.JSON, 400, "bad_input", ["'pixels'", "image"]),
    ("missing input", f"/v1/models/{NAME}/predict", _json({}), codec.JSON, 400, "bad_input", ["missing input 'image'"]),
    ("malformed JSON", f"/v1/models/{NAME}/predict", b'{"inputs": {"image": [1, 2', codec.JSON, 400, "malformed_json", ["not valid JSON"]),
    ("JSON not an object", f"/v1/models/{NAME}/predict", b"[1, 2]", codec.JSON, 400, "malformed_json", ["JSON object"]),
    ("not npy", f"/v1/models/{NAME}/predict", b"hello world, not a tensor", codec.NPY, 400, "bad_npy", [".npy"]),
    ("pickled npy", f"/v1/models/{NAME}/predict", _npy(np.array([{"a": 1}], dtype=object)), codec.NPY, 400, "bad_npy", ["object", "not a numeric tensor type"]),
    ("batch too large", f"/v1/models/{NAME}/predict", _npy(np.zeros((MAX_BATCH + 1, 1, 8, 8), np.float32)), codec.NPY, 413, "batch_too_large", ["'image'", f"max_batch {MAX_BATCH}"]),
    ("oversized body", f"/v1/models/{NAME}/predict", b"x" * (MAX_BODY + 1), codec.JSON, 413, "body_too_large", [str(MAX_BODY)]),
    ("unknown model", "/v1/models/nope/predict", _json({"image": [1]}), codec.JSON, 404, "unknown_model", ["'nope'", NAME]),
    ("model not named", "/v1/predict", _npy(X), codec.NPY, 400, "model_required", [NAME, "requant"]),
    ("media type", f"/v1/models/{NAME}/predict", b"a=1", "application/x-www-form-urlencoded", 415, "unsupported_media_type", ["Content-Type"]),
    ("unknown path", "/v2/predict", b"", codec.JSON, 404, "not_found", ["/v2/predict"]),
]


@pytest.mark.parametrize(("case", "path", "body", "ctype", "status", "code", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_a_clear_4xx_and_the_agent_keeps_serving(
    client: Client, packages: Packages, case: str, path: str, body: bytes, ctype: str, status: int, code: str, words: list[str]
) -> None:
    got, _, data = client.request("POST", path, body, ctype)
    err = json.loads(data)["error"]
    assert (got, err["code"]) == (status, code), err
    for word in words:
        assert word in err["message"], (word, err["message"])
    # the same connection (or a fresh one after a 413) serves the next request
    out = client.predict({"image": X[:1]}, model=NAME).outputs["logits"]
    np.testing.assert_allclose(out, _expected(packages, 1, slice(0, 1)), rtol=1e-5, atol=1e-5)


def test_method_not_allowed_and_client_errors(client: Client) -> None:
    status, _, data = client.request("GET", "/v1/predict")
    assert status == 405 and json.loads(data)["error"]["code"] == "method_not_allowed"
    with pytest.raises(RequestError, match="unknown model 'nope'") as info:
        client.predict({"image": X}, model="nope")
    assert info.value.status == 404


def test_health_models_and_metrics(agent: Agent, client: Client) -> None:
    client.predict({"image": X[:2]}, model=NAME)
    health = client.health()
    assert health["status"] == "ok" and health["models"][NAME]["version"] == agent.served()[NAME]
    described = {m["name"]: m for m in client.models()["models"]}
    assert set(described) == {NAME, "requant"}
    assert described[NAME]["inputs"] == [{"name": "image", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    assert described["requant"]["inputs"][0]["quantization"] == {"scale": pytest.approx(0.1), "zero_point": -3}
    text = client.metrics()
    assert f'pocketfleet_agent_requests_total{{model="{NAME}",status="200"}}' in text
    assert f'pocketfleet_agent_request_seconds_bucket{{le="0.001",model="{NAME}"}}' in text
    assert f'pocketfleet_agent_active_version{{model="{NAME}"}}' in text
    assert 'pocketfleet_agent_errors_total{code="unknown_model",model="-"}' in text


def test_unix_socket_serves_the_same_api(agent: Agent, packages: Packages) -> None:
    with Client(f"unix:{agent.config.unix_socket}") as c:
        out = c.predict(X[:1], model=NAME)
        assert c.health()["status"] == "ok"
    np.testing.assert_allclose(out.outputs["logits"], _expected(packages, agent.served()[NAME], slice(0, 1)), rtol=1e-5, atol=1e-5)


def test_reload_is_refused_from_a_non_loopback_peer(agent: Agent) -> None:
    from edge_agent.api import Api

    remote = Request("POST", "/v1/reload", {}, {}, b"", ("192.0.2.7", 40000))
    assert Api(agent)(remote).status == 403
    assert Request("POST", "/v1/reload", {}, {}, b"", ("127.0.0.1", 1)).local
    assert Request("POST", "/v1/reload", {}, {}, b"", "").local  # Unix socket


def test_hot_swaps_under_load_fail_no_request(agent: Agent, packages: Packages) -> None:
    """4 clients keep predicting while the agent swaps 10 times between versions 1 and 2: no request
    fails, and every answer's outputs are those of the version the answer names."""
    agent.store.install(packages.versions[2])
    deadline = time.monotonic() + 10
    while agent.served()[NAME] != 2 and time.monotonic() < deadline:  # the watcher picks it up
        time.sleep(0.01)
    assert agent.served()[NAME] == 2
    stop = threading.Event()
    results: list[tuple[int, bool]] = []
    failures: list[str] = []

    def load() -> None:
        with Client(agent.urls()[0]) as c:
            while not stop.is_set():
                try:
                    pred = c.predict({"image": X[:1]}, model=NAME)
                except Exception as exc:  # any failure is a test failure
                    failures.append(repr(exc))
                    continue
                v = pred.model["version"]
                ok = np.allclose(pred.outputs["logits"], packages.expected[v][:1], rtol=1e-5, atol=1e-5)
                results.append((v, ok))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    swaps_before = agent.swaps
    for i in range(10):
        time.sleep(0.05)
        target = 1 if i % 2 == 0 else 2
        agent.store.rollback(NAME, to=target)
        agent.reload()
        assert agent.served()[NAME] == target
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    assert agent.swaps - swaps_before >= 10
    assert len(results) > 40 and all(ok for _, ok in results)
    assert {v for v, _ in results} == {1, 2}


def test_requests_feed_telemetry_into_the_outbox(agent: Agent, client: Client) -> None:
    for _ in range(5):
        client.predict({"image": X}, model=NAME)
    agent.telemetry.flush()
    recs = [r.json() for r in agent.outbox.peek(1000) if r.kind == "telemetry"]
    rec = next(r for r in recs if r["model"]["name"] == NAME and r["requests"] >= 5)
    assert rec["schema"] == "pf.telemetry/1" and rec["latency_ms"]["p50"] > 0
    stats = rec["inputs"]["image"]
    assert len(stats["mean"]) == 64 and stats["count"] >= 15


def test_expect_100_continue_and_connection_close(agent: Agent, packages: Packages) -> None:
    """curl sends `Expect: 100-continue` before bodies over 1 KiB: the agent answers at once."""
    import socket

    host, port = agent.server.address
    body = codec.npy_bytes(X[:1])
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(
            f"POST /v1/models/{NAME}/predict HTTP/1.1\r\nHost: x\r\nContent-Type: {codec.NPY}\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n".encode()
        )
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        data = b""
        while chunk := s.recv(65536):  # the agent closes after the answer (Connection: close)
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in head
    np.testing.assert_allclose(json.loads(payload)["outputs"]["logits"], packages.expected[agent.served()[NAME]][:1], rtol=1e-5, atol=1e-5)
