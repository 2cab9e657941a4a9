"""`[console]` in cloud.toml: where the worker serves the read-only fleet console and /metrics."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cloud_sync.errors import ConfigError


def split_listen(listen: str, where: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{where}: listen {listen!r} must be HOST:PORT (e.g. 127.0.0.1:8470; port 0 = any free port)")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ConsoleSettings:
    """listen = "" turns the console off; any address that is not loopback needs token_file."""

    listen: str = ""
    token_file: str = ""
    refresh_s: float = 2.0

    def check(self, where: str) -> None:
        if not self.listen:
            return
        host, _ = split_listen(self.listen, where)
        if not is_loopback(host) and not self.token_file:
            raise ConfigError(f"{where}: listen {self.listen!r} is not a loopback address: set token_file "
                              "(a file holding the access token) or listen on 127.0.0.1")
        if self.refresh_s <= 0:
            raise ConfigError(f"{where}: refresh_s must be > 0")

    def token(self) -> str | None:
        if not self.token_file:
            return None
        try:
            token = Path(self.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"[console] token_file {self.token_file}: {exc.strerror}") from exc
        if len(token) < 16:
            raise ConfigError(f"[console] token_file {self.token_file}: the token must be at least 16 characters")
        return token
