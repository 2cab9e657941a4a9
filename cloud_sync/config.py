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

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

T = TypeVar("T")

PROTOCOLS = ("auto", "5", "3.1.1")


def from_table(cls: type[T], table: Mapping[str, Any] | None, where: str, base: Path | None = None) -> T:
    """Build dataclass `cls` from a TOML table: unknown keys and wrong types raise ConfigError naming them.

    Fields whose name ends in `_file`, `_dir`, `_ca`, `_cert`, `_key` or is `trust` are paths, resolved
    against `base` (the config file's folder) when relative.
    """
    table = dict(table or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(fields))})")
    values: dict[str, Any] = {}
    for name, value in table.items():
        default = fields[name].default
        if default is not dataclasses.MISSING and default is not None and not isinstance(value, type(default)):
            if not (isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)):
                raise ConfigError(
                    f"{where}: {name} must be a {type(default).__name__}, got {type(value).__name__} {value!r}"
                )
            value = float(value)
        if base is not None and isinstance(value, str) and value and _is_path(name):
            path = Path(value).expanduser()
            value = str(path if path.is_absolute() else (base / path))
        values[name] = value
    try:
        obj = cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    check = getattr(obj, "check", None)
    if check is not None:
        check(where)
    return obj


def _is_path(name: str) -> bool:
    return name == "trust" or name.endswith(("_file", "_dir", "_ca", "_cert", "_key", "_path"))


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc


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
