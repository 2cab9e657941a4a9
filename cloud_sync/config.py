"""MQTT connection settings shared by the device side and the cloud (torch-free).

The same table is read from an agent config (`[mqtt]`) and from cloud.toml (`[mqtt]`):

    [mqtt]
    host = "broker.example.net"
    port = 8883
    username = "dev-0001"
    password_file = "/etc/pocketfleet/mqtt.password"   # or password = "..."
    tls_ca = "/etc/pocketfleet/ca.pem"                 # TLS with CA and hostname verification
    protocol = "auto"                                  # "5", "3.1.1" or "auto" (5, falling back to 3.1.1)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cloud_sync.errors import ConfigError
from pocketfleet import config

T = TypeVar("T")

PROTOCOLS = ("auto", "5", "3.1.1")


def from_table(cls: type[T], table: Mapping[str, Any] | None, where: str, base: Path | None = None) -> T:
    """Build dataclass `cls` from a TOML table (pocketfleet.config): unknown keys and wrong types raise
    ConfigError naming them; then the config's own `check(where)`.

    Fields whose name ends in `_file`, `_dir`, `_ca`, `_cert`, `_key`, `_path` or is `trust` are paths,
    resolved against `base` (the config file's folder) when relative.
    """
    paths = [f.name for f in dataclasses.fields(cls) if _is_path(f.name)]  # type: ignore[arg-type]
    obj = config.from_table(cls, table, file=where, base=base, path_fields=paths, error=ConfigError)
    check = getattr(obj, "check", None)
    if check is not None:
        check(where)
    return obj


def _is_path(name: str) -> bool:
    return name == "trust" or name.endswith(("_file", "_dir", "_ca", "_cert", "_key", "_path"))


def load_toml(path: str | Path) -> dict[str, Any]:
    return config.load_toml(path, ConfigError)


@dataclass
class MqttConfig:
    """How to reach the broker. Sessions are persistent (clean_start false) for `session_expiry_s`."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    username: str = ""
    password: str = ""
    password_file: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    protocol: str = "auto"
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    max_inflight: int = 32
    receive_maximum: int = 64
    reconnect_min_s: float = 0.25
    reconnect_max_s: float = 30.0

    def check(self, where: str = "[mqtt]") -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"{where}: protocol must be one of {list(PROTOCOLS)}, got {self.protocol!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"{where}: port {self.port} is not a TCP port")
        if self.max_inflight < 1 or self.receive_maximum < 1:
            raise ConfigError(f"{where}: max_inflight and receive_maximum must be >= 1")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError(f"{where}: need 0 < reconnect_min_s <= reconnect_max_s")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError(f"{where}: tls_cert and tls_key go together")

    def secret(self) -> str:
        """The password, read from `password_file` when one is set."""
        if self.password_file:
            try:
                return Path(self.password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"[mqtt] password_file {self.password_file}: {exc.strerror or exc}") from exc
        return self.password

    @classmethod
    def from_dict(cls, table: Mapping[str, Any] | None, where: str = "[mqtt]", base: Path | None = None) -> MqttConfig:
        return from_table(cls, table, where, base)
