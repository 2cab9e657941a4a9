"""mosquitto password and ACL files for a pocketfleet fleet (torch-free, no mosquitto_passwd needed).

Devices authenticate with a username equal to their device id; the broker is configured with
`use_username_as_clientid true`, so a device cannot take over another device's session by choosing
its client id, and the ACL patterns (`%u`, which then equals `%c`) confine each device to its own topics:
it may write only pf/v1/dev/<self>/{status,ota,req,telemetry,fl/up/#} and read only
pf/v1/dev/<self>/{cmd,chunk,fl/down/#} plus its group's pf/v1/grp/<group>/#. Cloud workers may read
and write everything under pf/v1/.

mosquitto's ACL file never refuses a SUBSCRIBE (it checks read access when it delivers), so a device could
subscribe to the cloud's shared group (`$share/<group>/pf/v1/dev/+/telemetry`) and mosquitto would hand it
its share of every device's messages, then drop them at delivery. mosquitto 2's dynamic-security plugin does
check subscriptions: devices are its clients (it holds their password hashes, so a device it does not know
cannot log in at all: fail closed) with the role `pf-device`, which denies every `$share/#` subscription. Its
other checks defer to the ACL file. Cloud workers stay in the password file. The plugin reads its file only
at start; `cloud provision` changes a running broker through `$CONTROL/dynamic-security/v1` as `pf-admin`.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import hmac
import json
import os
import pwd
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_sync.protocol import DEVICE_PUBLISHES, DEVICE_RECEIVES, ROOT, check_id
from pocketfleet.fs import atomic_write_bytes

PBKDF2_ITERATIONS = 101  # mosquitto 2.0's default for $7$ hashes
ROLES = ("device", "cloud")
DYNSEC_ADMIN = "pf-admin"  # the dynamic-security plugin's administrator (only `cloud provision` uses it)
DEVICE_ROLE = "pf-device"
ADMIN_ROLE = "pf-admin"
BROKER_USER = "mosquitto"  # a packaged mosquitto drops to this user after start
DYNSEC_PLUGIN_GLOBS = ("/usr/lib/*/mosquitto_dynamic_security.so", "/usr/lib/mosquitto_dynamic_security.so",
                       "/usr/local/lib/mosquitto_dynamic_security.so", "/usr/lib/*/mosquitto/mosquitto_dynamic_security.so")


@dataclass(frozen=True)
class Account:
    username: str
    role: str  # "device" | "cloud"
    pw_hash: str  # a mosquitto $7$ line value
    group: str | None = None


def new_password() -> str:
    return secrets.token_urlsafe(24)


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """mosquitto 2.x password hash: $7$<iterations>$<b64 salt>$<b64 PBKDF2-HMAC-SHA512>."""
    salt = salt or os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, pw_hash: str) -> bool:
    _, alg, iterations, salt, digest = pw_hash.split("$")
    if alg != "7":
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), base64.b64decode(salt), int(iterations))
    return hmac.compare_digest(base64.b64encode(got).decode(), digest)


def render_passwd(accounts: Iterable[Account], roles: tuple[str, ...] = ROLES) -> str:
    return "".join(f"{check_id(a.username, 'username')}:{a.pw_hash}\n"
                   for a in sorted(accounts, key=lambda a: a.username) if a.role in roles)


def find_dynsec_plugin() -> str | None:
    """The path of mosquitto's dynamic-security plugin (Debian: /usr/lib/<arch>/mosquitto_dynamic_security.so)."""
    for pattern in DYNSEC_PLUGIN_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def _dynsec_password(pw_hash: str) -> dict[str, Any]:
    _, alg, iterations, salt, digest = pw_hash.split("$")
    if alg != "7" or len(base64.b64decode(salt)) != 12:
        raise ValueError("the dynamic-security plugin needs a $7$ hash with a 12-byte salt")
    return {"password": digest, "salt": salt, "iterations": int(iterations)}


def dynsec_roles() -> list[dict[str, Any]]:
    deny_share = {"acltype": "subscribePattern", "topic": "$share/#", "allow": False, "priority": 0}
    admin = [{"acltype": t, "topic": "$CONTROL/dynamic-security/#", "allow": True, "priority": 0}
             for t in ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")]
    return [{"rolename": DEVICE_ROLE, "textname": "a device: never a member of a shared subscription group",
             "acls": [deny_share]},
            {"rolename": ADMIN_ROLE, "textname": "pocketfleet provisioning", "acls": admin}]


def render_dynsec(accounts: Iterable[Account], admin_hash: str) -> str:
    """The dynamic-security plugin's file: every device (with its password hash) under the pf-device role."""
    clients: list[dict[str, Any]] = [{"username": DYNSEC_ADMIN, **_dynsec_password(admin_hash),
                                      "roles": [{"rolename": ADMIN_ROLE}]}]
    for acc in sorted(accounts, key=lambda a: a.username):
        if acc.role == "device":
            clients.append({"username": check_id(acc.username, "username"), **_dynsec_password(acc.pw_hash),
                            "roles": [{"rolename": DEVICE_ROLE}]})
    doc = {
        # no match in a role = defer to the ACL file (publish/receive) and to mosquitto's default (subscribe)
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False, "subscribe": False,
                             "unsubscribe": False},
        "clients": clients, "groups": [], "roles": dynsec_roles(),
    }
    return json.dumps(doc, indent=2) + "\n"


def render_acl(accounts: Iterable[Account]) -> str:
    lines = ["# pocketfleet ACL (generated by `pocketfleet cloud provision`; edits are overwritten)",
             "# every device: its own topics only (username == client id, see use_username_as_clientid)"]
    lines += [f"pattern write {ROOT}/dev/%u/{leaf}" + ("/#" if leaf.startswith("fl/") else "") for leaf in DEVICE_PUBLISHES]
    lines += [f"pattern read {ROOT}/dev/%u/{leaf}" + ("/#" if leaf.startswith("fl/") else "") for leaf in DEVICE_RECEIVES]
    for acc in sorted(accounts, key=lambda a: a.username):
        lines.append("")
        lines.append(f"user {check_id(acc.username, 'username')}")
        if acc.role == "cloud":
            lines.append(f"topic readwrite {ROOT}/#")
        elif acc.group:
            lines.append(f"topic read {ROOT}/grp/{check_id(acc.group, 'group')}/#")
    return "\n".join(lines) + "\n"


def broker_owner(user: str = BROKER_USER) -> tuple[int, int] | None:
    """(uid, gid) the broker's files must belong to: the `mosquitto` user when we run as root and it exists."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _write_private(path: Path, text: str, owner: tuple[int, int] | None) -> None:
    # mode 0600, but owned by the user mosquitto drops to so that it can read the file
    atomic_write_bytes(path, text.encode(), mode=0o600, owner=owner)


def write_files(accounts: Iterable[Account], passwd_path: Path, acl_path: Path, dynsec_path: Path | None = None,
                admin_hash: str | None = None, owner: tuple[int, int] | None | str = "auto") -> None:
    """Write the files atomically (temp + rename); mosquitto re-reads the password and ACL files on SIGHUP.

    With `dynsec_path` (and the admin's hash), devices go into the dynamic-security file and only cloud
    workers into the password file. When run as root the files (mode 0600) and the folder holding the
    dynamic-security file (which the plugin rewrites) are given to the `mosquitto` user (`owner="auto"`).
    """
    accounts = list(accounts)
    who = broker_owner() if owner == "auto" else owner
    assert not isinstance(who, str)
    roles = ("cloud",) if dynsec_path is not None else ROLES
    files = [(passwd_path, render_passwd(accounts, roles)), (acl_path, render_acl(accounts))]
    if dynsec_path is not None:
        if admin_hash is None:
            raise ValueError("write_files: a dynamic-security file needs the admin's password hash")
        files.append((dynsec_path, render_dynsec(accounts, admin_hash)))
    for path, text in files:
        _write_private(path, text, who)
    if dynsec_path is not None and who is not None:
        os.chown(dynsec_path.parent, *who)  # the plugin saves changes as <file>.new + rename


def admin_password(path: Path) -> str:
    """The dynamic-security admin's password, made on first use (mode 0600, readable only by us)."""
    if path.exists():
        return path.read_text().strip()
    password = new_password()
    _write_private(path, password + "\n", None)
    return password


def mosquitto_conf(
    port: int,
    passwd_path: Path | None,
    acl_path: Path | None,
    host: str = "127.0.0.1",
    tls: tuple[Path, Path, Path] | None = None,
    persistence_dir: Path | None = None,
    max_queued_messages: int = 100_000,
    max_inflight_messages: int = 64,
    max_packet_size: int = 4 * 1024 * 1024,
    log_path: Path | None = None,
    extra: Iterable[str] = (),
    dynsec_path: Path | None = None,
    dynsec_plugin: str | None = None,
) -> str:
    """A mosquitto 2.x config for a pocketfleet broker.

    `max_queued_messages` is raised from mosquitto's default of 1000, which silently drops QoS 1
    messages for a slow subscriber (the cloud during a burst, or an offline device's queued commands).
    """
    lines = [
        "per_listener_settings false",
        f"listener {port} {host}",
        f"max_queued_messages {max_queued_messages}",
        "max_queued_bytes 0",
        f"max_inflight_messages {max_inflight_messages}",
        f"max_packet_size {max_packet_size}",
        "persistent_client_expiration 14d",
        "set_tcp_nodelay true",
    ]
    if tls is not None:
        ca, cert, key = tls
        lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}", "require_certificate false",
                  "tls_version tlsv1.2"]
    if passwd_path is not None:
        lines += ["allow_anonymous false", f"password_file {passwd_path}", "use_username_as_clientid true"]
    else:
        lines += ["allow_anonymous true"]
    if acl_path is not None:
        lines.append(f"acl_file {acl_path}")
    if dynsec_path is not None:
        plugin = dynsec_plugin or find_dynsec_plugin()
        if plugin is None:
            raise ValueError("mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) was not found; "
                             "without it devices can join the cloud's shared subscription groups")
        lines += [f"plugin {plugin}", f"plugin_opt_config_file {dynsec_path}"]
    if persistence_dir is not None:
        lines += ["persistence true", f"persistence_location {persistence_dir}/", "autosave_interval 1"]
    if log_path is not None:
        lines += [f"log_dest file {log_path}", "log_type error", "log_type warning", "log_type notice",
                  "log_type information", "connection_messages true"]
    else:
        lines += ["log_dest stderr", "log_type error", "log_type warning"]
    lines += list(extra)
    return "\n".join(lines) + "\n"
