"""A lean HTTP/1.1 server for the local API: one thread per keep-alive connection, over TCP and/or a Unix
socket, with the handler running in the connection's thread (onnxruntime releases the GIL while it runs).

Why not http.server: its per-request header parsing (email.parser) and unbuffered writes cost more than
the whole 0.3 ms overhead budget of a ~50 us model; this parser reads the request line and headers with a
buffered reader and answers with a single sendall (see docs/agent.md, "Latency").

Limits: request line and each header <= 8 KiB, <= 64 headers, body <= max_body (413, after draining a
bounded amount so the client can read the answer), no chunked request bodies (411), max_connections
(503 beyond, as an answer the client can read), idle keep-alive connections closed after keepalive_s.
A request must arrive whole (line, headers and body) within request_timeout_s of its first byte, so a
client that trickles bytes cannot hold a connection; and when every connection is taken, the longest-idle
keep-alive connection (one waiting for its next request, no byte of it received) is closed to make room.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

log = logging.getLogger("pocketfleet.agent.http")

MAX_LINE = 8192
MAX_HEADERS = 64
DRAIN_LIMIT = 64 << 20
REASONS = {
    200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 411: "Length Required", 413: "Content Too Large", 415: "Unsupported Media Type",
    422: "Unprocessable Content", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    503: "Service Unavailable", 505: "HTTP Version Not Supported",
}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    peer: Any  # (host, port) for TCP, "" for a Unix socket

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    @property
    def local(self) -> bool:
        """True for a Unix-socket or loopback peer."""
        if not isinstance(self.peer, tuple):
            return True
        host = self.peer[0]
        return host == "::1" or host.startswith("127.") or host.startswith("::ffff:127.")


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(status: int, doc: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, json.dumps(doc).encode(), "application/json", headers or [])


def error_response(status: int, code: str, message: str, **fields: Any) -> Response:
    return json_response(status, {"error": {"code": code, "message": message, **fields}})


Handler = Callable[[Request], Response]


class _HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class HttpServer:
    """Serve `handler` on TCP (`host`, `port`) and/or a Unix socket path until `close()`."""

    def __init__(
        self,
        handler: Handler,
        tcp: tuple[str, int] | None = None,
        unix_path: str | None = None,
        max_body: int = 8 << 20,
        max_connections: int = 64,
        keepalive_s: float = 60.0,
        request_timeout_s: float = 30.0,
    ) -> None:
        self.handler = handler
        self.max_body, self.max_connections, self.keepalive_s = max_body, max_connections, keepalive_s
        self.request_timeout_s = request_timeout_s
        self._listeners: list[socket.socket] = []
        self._conns: set[socket.socket] = set()
        self._idle: dict[socket.socket, float] = {}  # waiting for a request, nothing received: since when
        self._deadlines: dict[socket.socket, float] = {}  # a request is arriving: it must be whole by then
        self._busy: set[socket.socket] = set()  # connections inside a request (set ops are atomic)
        self._conns_lock = threading.Lock()
        self._closing = threading.Event()
        self.address: tuple[str, int] | None = None
        self.unix_path = unix_path
        if tcp is not None:
            family = socket.AF_INET6 if ":" in tcp[0] else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(tcp)
            sock.listen(128)
            self.address = sock.getsockname()[:2]
            self._listeners.append(sock)
        if unix_path:
            path = Path(unix_path)
            if path.exists() and stat.S_ISSOCK(path.stat().st_mode):
                path.unlink()  # a stale socket of a previous run
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
            os.chmod(path, 0o660)
            sock.listen(128)
            self._listeners.append(sock)

    def start(self) -> HttpServer:
        for sock in self._listeners:
            threading.Thread(target=self._accept_loop, args=(sock,), name="http-accept", daemon=True).start()
        threading.Thread(target=self._reaper, name="http-reaper", daemon=True).start()
        return self

    def _reaper(self) -> None:
        """Cut connections whose request did not arrive whole within request_timeout_s."""
        tick = min(0.25, self.request_timeout_s / 4)
        while not self._closing.wait(tick):
            now = time.monotonic()
            with self._conns_lock:
                late = [c for c, t in self._deadlines.items() if now > t]
            for conn in late:
                self._deadlines.pop(conn, None)
                log.info("closing a connection whose request took longer than %.1f s", self.request_timeout_s)
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def close(self, grace_s: float = 5.0) -> None:
        """Stop accepting; let requests in progress finish (up to grace_s); close idle connections."""
        self._closing.set()
        for sock in self._listeners:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self.unix_path:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with self._conns_lock:
                busy = [c for c in self._conns if c in self._busy]
                idle = [c for c in self._conns if c not in self._busy]
            for c in idle:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
            if not busy:
                break
            time.sleep(0.01)

    # ------------------------------------------------------------------------------------------ internals

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._closing.is_set():
            try:
                conn, peer = listener.accept()
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.01)  # EMFILE and friends: back off instead of spinning
                continue
            evict = None
            with self._conns_lock:
                full = len(self._conns) >= self.max_connections
                if full and self._idle:  # room for a new client: close the longest-idle keep-alive connection
                    evict = min(self._idle, key=self._idle.__getitem__)
                    self._idle.pop(evict)
                    self._conns.discard(evict)
                    full = False
                if not full:
                    self._conns.add(conn)
            if evict is not None:
                with contextlib.suppress(OSError):
                    evict.shutdown(socket.SHUT_RDWR)
            if full:
                threading.Thread(target=self._refuse, args=(conn,), name="http-refuse", daemon=True).start()
                continue
            threading.Thread(target=self._serve, args=(conn, peer), name="http-conn", daemon=True).start()

    def _refuse(self, conn: socket.socket) -> None:
        """Answer 503 so that the client can read it: send, half-close, read away what it sent, then close
        (closing with unread bytes would reset the connection and lose the answer)."""
        with contextlib.suppress(OSError):
            body = json.dumps({"error": {"code": "too_many_connections", "message": f"the agent serves at most {self.max_connections} connections"}}).encode()
            set_io_timeout(conn, 1.0)
            conn.sendall(_head(503, "application/json", len(body), False, []) + body)
            conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and conn.recv(65536):
                pass
        conn.close()

    def _serve(self, conn: socket.socket, peer: Any) -> None:
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_io_timeout(conn, self.keepalive_s)
        rfile = conn.makefile("rb", buffering=65536)
        try:
            while not self._closing.is_set():
                with self._conns_lock:
                    self._idle[conn] = time.monotonic()
                try:
                    if not rfile.peek(1):  # waits up to keepalive_s for the first byte of a request
                        return
                finally:
                    with self._conns_lock:
                        idle = self._idle.pop(conn, None) is not None
                        if idle:
                            self._deadlines[conn] = time.monotonic() + self.request_timeout_s
                if not idle:  # evicted to make room for a new client
                    return
                try:
                    req, keep = self._read_request(rfile, peer, conn)
                except _HttpError as exc:
                    body = json.dumps({"error": {"code": exc.code, "message": str(exc)}}).encode()
                    conn.sendall(_head(exc.status, "application/json", len(body), False, []) + body)
                    return
                finally:
                    self._deadlines.pop(conn, None)
                if req is None:
                    return
                self._busy.add(conn)
                try:
                    resp = self._call(req)
                    keep = keep and not self._closing.is_set()
                    conn.sendall(_head(resp.status, resp.content_type, len(resp.body), keep, resp.headers) + resp.body)
                finally:
                    self._busy.discard(conn)
                if not keep:
                    return
        except (OSError, ValueError):
            pass  # peer went away, timeout on an idle connection
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
                self._idle.pop(conn, None)
                self._deadlines.pop(conn, None)
            with contextlib.suppress(OSError):
                rfile.close()
                conn.close()

    def _call(self, req: Request) -> Response:
        try:
            return self.handler(req)
        except Exception as exc:  # a handler bug answers 500 and the connection keeps serving
            log.exception("handler failed on %s %s", req.method, req.path)
            return error_response(500, "internal", f"{type(exc).__name__}: {exc}")

    def _read_request(self, rfile: Any, peer: Any, conn: socket.socket) -> tuple[Request | None, bool]:
        line = rfile.readline(MAX_LINE + 1)
        while line in (b"\r\n", b"\n"):  # tolerate blank lines between requests
            line = rfile.readline(MAX_LINE + 1)
        if not line:
            return None, False
        if len(line) > MAX_LINE or not line.endswith(b"\n"):
            raise _HttpError(431, "request_line_too_long", f"the request line is longer than {MAX_LINE} bytes")
        parts = line.decode("latin1").split()
        if len(parts) != 3:
            raise _HttpError(400, "bad_request_line", "malformed HTTP request line")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _HttpError(505, "http_version", f"{version} is not supported (HTTP/1.1 and 1.0 are)")
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            h = rfile.readline(MAX_LINE + 1)
            if h in (b"\r\n", b"\n"):
                break
            if not h:
                return None, False
            if len(h) > MAX_LINE:
                raise _HttpError(431, "header_too_long", f"a header line is longer than {MAX_LINE} bytes")
            name, sep, value = h.decode("latin1").partition(":")
            if not sep:
                raise _HttpError(400, "bad_header", f"malformed header line {name.strip()[:60]!r}")
            headers[name.strip().lower()] = value.strip()
        else:
            raise _HttpError(431, "too_many_headers", f"more than {MAX_HEADERS} headers")
        conn_hdr = headers.get("connection", "").lower()
        keep = ("close" not in conn_hdr) if version == "HTTP/1.1" else ("keep-alive" in conn_hdr)
        if "transfer-encoding" in headers:
            raise _HttpError(411, "length_required", "chunked request bodies are not accepted: send Content-Length")
        length_txt = headers.get("content-length", "0")
        if not (length_txt.isascii() and length_txt.isdigit() and len(length_txt) <= 18):  # "²".isdigit() is True
            raise _HttpError(400, "bad_content_length", f"Content-Length {length_txt[:30]!r} is not a number")
        length = int(length_txt)
        expect = headers.get("expect", "").lower() == "100-continue"  # curl asks before bodies > 1 KiB
        if length > self.max_body:
            if not expect:  # the body is on its way: read it away so that the client sees the answer
                _drain(rfile, length)
            raise _HttpError(413, "body_too_large", f"the body has {length} bytes, more than the limit of {self.max_body}")
        if expect and length:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = rfile.read(length) if length else b""
        if len(body) != length:
            return None, False
        path, _, qs = target.partition("?")
        query = dict(parse_qsl(qs)) if qs else {}
        return Request(method, path, query, headers, body, peer), keep


def _drain(rfile: Any, length: int) -> None:
    """Read and discard an oversized body (bounded), so the client gets to read the 413."""
    left = min(length, DRAIN_LIMIT)
    deadline = time.monotonic() + 5.0
    with contextlib.suppress(OSError, ValueError):
        while left > 0 and time.monotonic() < deadline:
            chunk = rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)


def _head(status: int, content_type: str, length: int, keep: bool, headers: list[tuple[str, str]]) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
    close = "" if keep else "Connection: close\r\n"
    return (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n{close}{extra}\r\n"
    ).encode("latin1")


def set_io_timeout(sock: socket.socket, seconds: float) -> None:
    """Kernel-side receive/send timeouts (SO_RCVTIMEO/SO_SNDTIMEO) on a blocking socket: unlike
    settimeout(), no poll() before every recv; a timeout surfaces as an OSError."""
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
