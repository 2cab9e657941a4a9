"""`pocketfleet cloud provision`: device (or cloud worker) credentials, broker files, and an agent config.

The password is generated here, shown once (written to the device's `mqtt.password`), and kept only as a
mosquitto $7$ hash in the registry; the broker's password, ACL and dynamic-security files are regenerated
from the registry and the broker is told to reload them (SIGHUP to the pid in [broker] pid_file, when set;
a device is also added to the running broker's dynamic-security plugin through its control topic).

Changing an existing account's role (a device into a cloud worker, which may read everything, or a worker
into a device) is refused unless `allow_role_change` (`--change-role`) says so; the result says what changed.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from cloud_sync.broker_files import (
    DYNSEC_ADMIN,
    Account,
    admin_password,
    hash_password,
    new_password,
    write_files,
)
from cloud_sync.cloud import CloudConfig
from cloud_sync.errors import ConfigError
from cloud_sync.protocol import check_id


def broker_paths(config: CloudConfig) -> tuple[Path, Path]:
    b = config.broker
    passwd = Path(b.passwd_file) if b.passwd_file else config.state_dir / "mosquitto" / "passwd"
    acl = Path(b.acl_file) if b.acl_file else config.state_dir / "mosquitto" / "acl"
    return passwd, acl


def dynsec_paths(config: CloudConfig) -> tuple[Path, Path]:
    """(dynamic-security file, its admin's password file); the file sits in a folder of its own, which the
    plugin must be able to write."""
    b = config.broker
    dynsec = Path(b.dynsec_file) if b.dynsec_file else broker_paths(config)[1].parent / "dynsec" / "dynamic-security.json"
    return dynsec, broker_paths(config)[1].parent / "dynsec-admin.password"


def write_broker_files(config: CloudConfig, accounts: list[Account]) -> dict[str, Path]:
    passwd, acl = broker_paths(config)
    dynsec, admin = dynsec_paths(config)
    write_files(accounts, passwd, acl, dynsec, hash_password(admin_password(admin)))
    return {"passwd": passwd, "acl": acl, "dynsec": dynsec, "admin": admin}


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def agent_config_text(config: CloudConfig, device: str, group: str, password_file: str, state_dir: str,
                      trust: str, ca_file: str) -> str:
    d = config.devices
    host = d.mqtt_host or config.mqtt.host
    port = d.mqtt_port or config.mqtt.port
    lines = [
        f"# pocketfleet agent config for {device} (written by `pocketfleet cloud provision`)",
        f"state_dir = {_toml_str(state_dir)}",
        f"trust = {_toml_str(trust)}",
        f"device_id = {_toml_str(device)}",
        "",
        "[mqtt]",
        f"host = {_toml_str(host)}",
        f"port = {port}",
        f"username = {_toml_str(device)}",
        f"password_file = {_toml_str(password_file)}",
        f"group = {_toml_str(group)}",
    ]
    if ca_file:
        lines.append(f"tls_ca = {_toml_str(ca_file)}")
    lines += ["", "[mqtt.ota]", "# bandwidth_bps = 0          # average download cap (0 = none)",
              "# max_package_bytes = 1073741824"]
    return "\n".join(lines) + "\n"


def provision(config: CloudConfig, name: str, group: str | None, out_dir: str | Path | None = None,
              role: str = "device", reload_broker: bool = True, allow_role_change: bool = False) -> dict[str, Any]:
    """Create or renew the account `name`; returns what was written (never the password itself)."""
    check_id(name, "device id" if role == "device" else "worker id")
    if name == DYNSEC_ADMIN:
        raise ConfigError(f"{name!r} is reserved for the broker's dynamic-security administrator")
    if role == "device":
        if not group:
            raise ConfigError("--group is required for a device")
        check_id(group, "group")
    password = new_password()
    registry = config.open_registry()
    try:
        old = next((a for a in registry.accounts() if a.username == name), None)
        if old is not None and old.role != role and not allow_role_change:
            what = {"cloud": "a cloud worker (read/write pf/v1/#)", "device": "a device (its own topics only)"}
            raise ConfigError(f"{name} is {what[old.role]}; provisioning it as {what[role]} would change its role "
                              "and its password: pass --change-role to do that")
        registry.put_account(Account(name, role, hash_password(password), group if role == "device" else None))
        accounts = registry.accounts()
    finally:
        registry.close()
    files = write_broker_files(config, accounts)
    passwd, acl = files["passwd"], files["acl"]
    out = Path(out_dir) if out_dir else config.state_dir / "provisioned" / name
    out.mkdir(parents=True, exist_ok=True)
    pw_path = out / "mqtt.password"
    fd = os.open(pw_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    result: dict[str, Any] = {"name": name, "role": role, "group": group, "password_file": str(pw_path),
                              "broker_passwd": str(passwd), "broker_acl": str(acl),
                              "broker_dynsec": str(files["dynsec"]), "reloaded": False,
                              "renewed": old is not None,
                              "role_changed": f"{old.role} -> {role}" if old is not None and old.role != role else None}
    if role == "device":
        ca = config.devices.tls_ca or config.mqtt.tls_ca
        trust = config.devices.trust or config.cloud.trust
        agent = out / "agent.toml"
        agent.write_text(agent_config_text(config, name, group or "", "mqtt.password", "state", trust, ca))
        result["agent_config"] = str(agent)
    if reload_broker and config.broker.pid_file:
        result["reloaded"] = _reload(Path(config.broker.pid_file))
        if result["reloaded"] and (role == "device" or (old is not None and old.role == "device")):
            from cloud_sync import dynsec

            commands = dynsec.device_commands(name, password) if role == "device" else dynsec.delete_commands(name)
            try:
                dynsec.apply(config.mqtt, admin_password(files["admin"]), commands)
            except Exception as exc:  # noqa: BLE001 - reported: the broker takes the files when it restarts
                result["reloaded"] = False
                result["reload_error"] = f"dynamic-security update failed: {exc}"
    return result


def _reload(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
        return True
    except (OSError, ValueError):
        return False
