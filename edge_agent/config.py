"""The agent's configuration: one dataclass, read from TOML, every key also a command-line flag.

    state_dir = "/var/lib/pocketfleet"
    listen = "127.0.0.1:8470"
    trust = "/etc/pocketfleet/trust"      # a public key file or a directory of *.pub

    [mqtt]                                # kept as given for the sync client (cloud_sync)
    host = "broker.example.net"

Flags override the file (`--max-batch 32` overrides `max_batch = 64`). An unknown key or a value of the
wrong type is a ConfigError naming the key. Relative paths in the file are relative to the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import ConfigError
from pocketfleet import config

PATH_KEYS = ("state_dir", "trust", "unix_socket", "outbox_path", "dataset_dir")


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class AgentConfig:
    """Settings of `pocketfleet agent run` (see docs/agent.md for the reference)."""

    state_dir: str = _opt("", "directory of the model store, outbox and agent state (required)")
    trust: str = _opt("", "public key file, directory of trusted *.pub keys, or one holding root.json (required to install)")
    listen: str = _opt("127.0.0.1:8470", "HOST:PORT of the local HTTP API ('' for none; port 0 picks one)")
    unix_socket: str = _opt("", "also serve the API on this Unix socket path")
    device_id: str = _opt("", "this device's id in telemetry (default: the host name)")
    threads: int = _opt(1, "intra-op threads per model runtime")
    keep_versions: int = _opt(3, "known-good versions kept on disk (for rollback) besides the active one")
    max_body_bytes: int = _opt(8 << 20, "largest request body accepted (413 above)")
    max_batch: int = _opt(256, "largest batch (leading dimension) per request")
    max_connections: int = _opt(64, "simultaneous API connections (503 above)")
    keepalive_s: float = _opt(60.0, "idle keep-alive connections are closed after this many seconds")
    request_timeout_s: float = _opt(30.0, "a request (line, headers, body) must arrive whole within this many seconds")
    watch_interval_s: float = _opt(0.5, "how often the agent checks the store for a new active version")
    telemetry_interval_s: float = _opt(60.0, "seconds between telemetry records written to the outbox")
    drift_max_features: int = _opt(256, "per-input features tracked for drift (larger inputs are pooled)")
    outbox_path: str = _opt("", "outbox SQLite file (default: STATE_DIR/outbox.sqlite)")
    outbox_max_bytes: int = _opt(16 << 20, "bound on the outbox's record bytes")
    sink: str = _opt("none", "where the outbox drains: 'none' (keep until the sync client runs) or 'jsonl:PATH'")
    drain_interval_s: float = _opt(5.0, "seconds between outbox drain attempts")
    log_level: str = _opt("info", "debug, info, warning or error")
    samples_max: int = _opt(100_000, "labelled samples kept for on-device training (POST /v1/samples)")
    dataset_dir: str = _opt("", "local labelled dataset for federated training (default: the posted samples)")
    mqtt: dict[str, Any] = field(default_factory=dict, metadata={"help": "[mqtt] table: connect to the cloud"})
    # where the config file was (relative paths of the [mqtt] table are resolved against it); not a key
    base_dir: str = field(default="", repr=False, metadata={"internal": True})

    def check(self) -> None:
        if not self.state_dir:
            raise ConfigError("state_dir is required (state_dir = \"...\" in the config or --state-dir DIR)")
        for key in ("threads", "keep_versions", "max_body_bytes", "max_batch", "max_connections", "drift_max_features", "outbox_max_bytes", "samples_max"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("keepalive_s", "request_timeout_s", "watch_interval_s", "telemetry_interval_s", "drain_interval_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.listen:
            self.listen_address()
        if not self.listen and not self.unix_socket:
            raise ConfigError("listen and unix_socket are both empty: the API needs at least one")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level must be debug, info, warning or error, got {self.log_level!r}")
        if self.sink != "none" and not self.sink.startswith("jsonl:"):
            raise ConfigError(f"sink must be 'none' or 'jsonl:PATH', got {self.sink!r}")

    def listen_address(self) -> tuple[str, int]:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(f"listen must be HOST:PORT (e.g. 127.0.0.1:8470), got {self.listen!r}")
        return host.strip("[]") or "127.0.0.1", int(port)

    @property
    def device(self) -> str:
        return self.device_id or socket.gethostname()

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def samples_file(self) -> Path:
        return self.state_path / "samples.sqlite"

    @property
    def outbox_file(self) -> Path:
        return Path(self.outbox_path) if self.outbox_path else self.state_path / "outbox.sqlite"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(AgentConfig) if not f.metadata.get("internal")}
_HINTS = typing.get_type_hints(AgentConfig)
_INTERNAL = {f.name: "unknown key; known keys: " + ", ".join(sorted(_FIELDS))
             for f in dataclasses.fields(AgentConfig) if f.metadata.get("internal")}


def _kind(name: str) -> type:
    hint = _HINTS[name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def config_from_dict(table: dict[str, Any], where: str = "config", base: Path | None = None) -> AgentConfig:
    """Build an AgentConfig from a parsed TOML table (unknown keys and wrong types are errors)."""
    try:
        cfg, _ = config.parse_config(AgentConfig, table, "", excluded=_INTERNAL)
    except config.ConfigError as exc:
        raise ConfigError(exc.problem, exc.path, where) from None
    if base is not None:
        for name in PATH_KEYS:
            value = getattr(cfg, name)
            if value:
                path = Path(value).expanduser()
                setattr(cfg, name, str(path if path.is_absolute() else base / path))
    return cfg


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> AgentConfig:
    """Read the TOML file (optional), apply `overrides` (flags that were given), validate."""
    table: dict[str, Any] = {}
    where, base = "flags", None
    if path:
        path = Path(path)
        where, base = str(path), path.resolve().parent
        table = config.load_toml(path, ConfigError)
    cfg = config_from_dict(table, where, base)
    cfg.base_dir = str(base or "")
    for name, value in (overrides or {}).items():
        try:
            setattr(cfg, name, config.check_type(value, _HINTS[name], f"--{name.replace('_', '-')}"))
        except config.ConfigError as exc:
            raise ConfigError(exc.problem, exc.path) from None
    cfg.check()
    return cfg


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per scalar config key (`max_batch` -> `--max-batch`); unset flags stay None."""
    for name, f in _FIELDS.items():
        kind = _kind(name)
        if kind not in (str, int, float):
            continue
        meta = "DIR" if name.endswith("_dir") else "PATH" if name in PATH_KEYS else name.upper().split("_")[-1]
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=f"cfg_{name}", type=kind, default=None, metavar=meta,
            help=f"{f.metadata['help']} (config key {name})",
        )


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys that were given as flags."""
    return {n: getattr(args, f"cfg_{n}") for n in _FIELDS if getattr(args, f"cfg_{n}", None) is not None}
