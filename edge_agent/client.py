"""A small keep-alive client for the agent's local API (TCP or Unix socket), NumPy in and out.

    client = Client("http://127.0.0.1:8470")        # or Client("unix:/run/pocketfleet/agent.sock")
    pred = client.predict({"image": x})              # binary .npy/.npz on the wire, exact dtypes
    pred.outputs["logits"], pred.model               # {"name": ..., "version": ...}

One connection per Client: use one Client per thread. A non-2xx answer raises RequestError with the
agent's status, error code and message.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from edge_agent import codec
from edge_agent.errors import AgentError, RequestError
from edge_agent.httpd import set_io_timeout

DEFAULT_URL = "http://127.0.0.1:8470"


@dataclass
class Prediction:
    outputs: dict[str, np.ndarray]
    model: dict[str, Any]


class Client:
    def __init__(self, url: str = DEFAULT_URL, timeout: float = 30.0) -> None:
        self.url, self.timeout = url, timeout
        if url.startswith("unix:"):
            self._unix: str | None = url[len("unix:") :]
            self._addr: tuple[str, int] | None = None
            self._host = "localhost"
        else:
            parts = urlsplit(url if "://" in url else f"http://{url}")
            if parts.scheme != "http" or not parts.hostname:
                raise AgentError(f"agent URL must be http://HOST:PORT or unix:/path, got {url!r}")
            self._unix, self._addr = None, (parts.hostname, parts.port or 80)
            self._host = parts.netloc
        self._sock: socket.socket | None = None
        self._rfile: Any = None
        self._paths: dict[tuple[str | None, str | None], str] = {}

    # ------------------------------------------------------------------------------------------ transport

    def _connect(self) -> None:
        if self._unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            sock.connect(self._unix)
        else:
            assert self._addr is not None
            sock = socket.create_connection(self._addr, timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)  # blocking I/O with kernel timeouts: no poll() before every recv
        set_io_timeout(sock, self.timeout)
        self._sock, self._rfile = sock, sock.makefile("rb", buffering=65536)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self._rfile is not None:
                self._rfile.close()
            if self._sock is not None:
                self._sock.close()
        self._sock = self._rfile = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, path: str, body: bytes = b"", content_type: str | None = None, accept: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on the kept-alive connection (reconnects once if the agent had closed it)."""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self._host}\r\nContent-Length: {len(body)}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        if accept:
            head += f"Accept: {accept}\r\n"
        data = head.encode("latin1") + b"\r\n" + body
        for attempt in (0, 1):
            fresh = self._sock is None
            try:
                if fresh:
                    self._connect()
                assert self._sock is not None
                self._sock.sendall(data)
                return self._read_response()
            except (ConnectionError, BrokenPipeError, _Closed) as exc:
                self.close()
                if fresh or attempt:
                    raise AgentError(f"cannot reach the agent at {self.url}: {exc}") from exc
            except OSError as exc:
                self.close()
                raise AgentError(f"cannot reach the agent at {self.url}: {exc}") from exc
        raise AssertionError("unreachable")

    def _read_response(self) -> tuple[int, dict[str, str], bytes]:
        line = self._rfile.readline(65537)
        if not line:
            raise _Closed("the agent closed the connection")
        status = int(line.split(None, 2)[1])
        headers: dict[str, str] = {}
        while True:
            h = self._rfile.readline(65537)
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.decode("latin1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self._rfile.read(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body

    def _json(self, method: str, path: str, body: bytes = b"", content_type: str | None = None) -> Any:
        status, headers, data = self.request(method, path, body, content_type)
        return _decode(status, headers, data)

    # ------------------------------------------------------------------------------------------ API

    def predict(
        self, inputs: Mapping[str, Any] | np.ndarray, model: str | None = None, binary: bool = True
    ) -> Prediction:
        """Run the (named) model. `inputs`: a dict name -> array, or one array for a single-input model."""
        path = self._path(model)
        if not binary:
            named = inputs if isinstance(inputs, Mapping) else None
            if named is None:
                raise AgentError("JSON predict needs a dict of input name -> array")
            doc = {"inputs": {k: np.asarray(v).tolist() for k, v in named.items()}}
            return self._prediction(*self.request("POST", path, json.dumps(doc).encode(), codec.JSON))
        if isinstance(inputs, Mapping) and len(inputs) == 1:
            ((name, value),) = inputs.items()
            body, ctype, path = codec.npy_bytes(value), codec.NPY, self._path(model, name)
        elif isinstance(inputs, Mapping):
            body, ctype = codec.npz_bytes({k: np.asarray(v) for k, v in inputs.items()}), codec.NPZ
        else:
            body, ctype = codec.npy_bytes(inputs), codec.NPY
        return self._prediction(*self.request("POST", path, body, ctype, accept=codec.NPY))

    def _path(self, model: str | None, input_name: str | None = None) -> str:
        key = (model, input_name)
        path = self._paths.get(key)
        if path is None:
            path = "/v1/predict" if model is None else f"/v1/models/{quote(model, safe='')}/predict"
            if input_name is not None:
                path += f"?input={quote(input_name, safe='')}"
            self._paths[key] = path
        return path

    def _prediction(self, status: int, headers: dict[str, str], data: bytes) -> Prediction:
        ctype = headers.get("content-type", "")
        if status != 200 or ctype.startswith(codec.JSON):
            doc = _decode(status, headers, data)
            return Prediction({k: np.asarray(v) for k, v in doc["outputs"].items()}, doc["model"])
        model = {"name": headers.get("x-model-name"), "version": int(headers.get("x-model-version", "-1"))}
        if ctype.startswith(codec.NPY):
            return Prediction({headers.get("x-output-name", "output"): codec.npy_array(data)}, model)
        return Prediction(codec.npz_arrays(data), model)

    def health(self) -> dict[str, Any]:
        status, headers, data = self.request("GET", "/v1/health")
        if status in (200, 503):
            return json.loads(data)
        return _decode(status, headers, data)

    def models(self) -> dict[str, Any]:
        return self._json("GET", "/v1/models")

    def reload(self) -> dict[str, Any]:
        return self._json("POST", "/v1/reload")

    def add_samples(self, inputs: Mapping[str, Any], labels: Any, model: str | None = None) -> dict[str, Any]:
        """Store labelled samples on the device for federated training (a batch of inputs, one label each)."""
        doc: dict[str, Any] = {"inputs": {k: np.asarray(v).tolist() for k, v in inputs.items()},
                               "labels": [int(x) for x in np.asarray(labels).reshape(-1)]}
        if model is not None:
            doc["model"] = model
        return self._json("POST", "/v1/samples", json.dumps(doc).encode(), codec.JSON)

    def metrics(self) -> str:
        status, headers, data = self.request("GET", "/metrics")
        if status != 200:
            _decode(status, headers, data)
        return data.decode()


class _Closed(Exception):
    pass


def _decode(status: int, headers: dict[str, str], data: bytes) -> Any:
    try:
        doc = json.loads(data) if data else {}
    except ValueError as exc:
        raise AgentError(f"the agent answered {status} with a body that is not JSON") from exc
    if status >= 400:
        err = doc.get("error", {}) if isinstance(doc, dict) else {}
        fields = {k: v for k, v in err.items() if k not in ("code", "message")}
        raise RequestError(status, err.get("code", "error"), f"agent answered {status}: {err.get('message', data[:200])}", **fields)
    return doc
