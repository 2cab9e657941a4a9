"""The read-only fleet console and /metrics over HTTP, in the cloud worker's process.

    GET /                 the page (cloud_sync/console/static/index.html, app.js, app.css: no CDN, no build step)
    GET /api/state        console_state() as JSON
    GET /metrics          Prometheus text exposition (cloud_sync.metrics)
    GET /healthz          "ok"

Only GET and HEAD exist. On a loopback address without a token the Host header must name the loopback
(a web page elsewhere cannot read the console through DNS rebinding); with `[console] token_file`,
/api/* and /metrics need `Authorization: Bearer <token>` (the page takes it from its URL fragment,
`http://host:port/#token=...`, which the browser never sends to a server).
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from cloud_sync.console.settings import ConsoleSettings, is_loopback, split_listen

log = logging.getLogger("pocketfleet.console")

STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/app.css": ("app.css", "text/css; charset=utf-8")}
_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                       "script-src 'self'; connect-src 'self'; frame-ancestors 'none'"}
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")


def _host_of(header: str) -> str:
    """The host part of a Host header ('127.0.0.1:8470' -> '127.0.0.1', '[::1]:8470' -> '[::1]')."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0]


def _static(name: str) -> bytes:
    return resources.files("cloud_sync.console").joinpath("static", name).read_bytes()


class ConsoleServer:
    """Serves the console for one cloud worker; `state()` and `metrics()` are called per request."""

    def __init__(self, cloud: Any, settings: ConsoleSettings) -> None:
        self.cloud = cloud
        self.settings = settings
        host, port = split_listen(settings.listen, "[console]")
        self.token = settings.token()
        self.check_host = is_loopback(host) and self.token is None
        self.registry = cloud.config.open_registry()  # its own connection: readers never wait for the writers
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "pocketfleet-console"
            sys_version = ""

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("%s " + fmt, self.address_string(), *args)

            def do_HEAD(self) -> None:  # noqa: N802
                self._serve(head=True)

            def do_GET(self) -> None:  # noqa: N802
                self._serve(head=False)

            def _refuse(self) -> None:
                self._send(405, b"read-only console: GET only\n", "text/plain; charset=utf-8")

            do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

            def _send(self, code: int, body: bytes, ctype: str, head: bool = False,
                      extra: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in {**_HEADERS, **(extra or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _serve(self, head: bool) -> None:
                path = urlsplit(self.path).path
                if server.check_host and _host_of(self.headers.get("Host") or "") not in _LOOPBACK_NAMES:
                    self._send(403, b"Host must be the loopback address\n", "text/plain; charset=utf-8", head)
                    return
                if path in STATIC:
                    name, ctype = STATIC[path]
                    self._send(200, _static(name), ctype, head)
                    return
                if path == "/healthz":
                    self._send(200, b"ok\n", "text/plain; charset=utf-8", head)
                    return
                if path not in ("/api/state", "/metrics"):
                    self._send(404, b"not found\n", "text/plain; charset=utf-8", head)
                    return
                if server.token is not None:
                    got = self.headers.get("Authorization") or ""
                    want = f"Bearer {server.token}"
                    if not hmac.compare_digest(got.encode(), want.encode()):
                        self._send(401, b"token required\n", "text/plain; charset=utf-8", head,
                                   {"WWW-Authenticate": 'Bearer realm="pocketfleet"'})
                        return
                try:
                    if path == "/metrics":
                        body, ctype = server.metrics()
                    else:
                        body, ctype = json.dumps(server.state()).encode(), "application/json"
                except Exception:  # noqa: BLE001 - one failed read must not take the console down
                    log.exception("console: %s failed", path)
                    self._send(500, b"internal error (see the worker log)\n", "text/plain; charset=utf-8", head)
                    return
                self._send(200, body, ctype, head)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="console", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"

    def state(self) -> dict[str, Any]:
        from cloud_sync.console.state import console_state

        with self._lock:
            out = console_state(self.registry, self.cloud.config.state_dir, settings=self.cloud.config.telemetry)
        out["refresh_s"] = self.settings.refresh_s
        out["worker"] = self.cloud.config.cloud.worker_id
        return out

    def metrics(self) -> tuple[bytes, str]:
        from cloud_sync.metrics import render

        return render(self.cloud)

    def start(self) -> ConsoleServer:
        self._thread.start()
        log.info("fleet console on %s", self.url)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)
        self.registry.close()
