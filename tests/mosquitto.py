"""Test helper: a real mosquitto on a free port with a generated config (passwords, ACL, TLS, queue limits).

    with Mosquitto(tmp_path, accounts={"dev-a": ("device", "grp"), "cloud": ("cloud", None)}) as broker:
        cfg = broker.mqtt_config("dev-a")          # MqttConfig with host/port/username/password (and CA)
        broker.restart()                           # SIGTERM, then start again on the same port/persistence
        broker.kill()                              # SIGKILL

Tests that need mosquitto call `require_mosquitto()`: with the environment variable CI set, a missing
binary FAILS the test (CI installs it); elsewhere the test is skipped.
"""

from __future__ import annotations

import atexit
import datetime as dt
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from cloud_sync.broker_files import (
    DYNSEC_ADMIN,
    Account,
    broker_owner,
    hash_password,
    mosquitto_conf,
    write_files,
)
from cloud_sync.config import MqttConfig

BINARY = "/usr/sbin/mosquitto"


def mosquitto_binary() -> str | None:
    if os.path.exists(BINARY):
        return BINARY
    return shutil.which("mosquitto")


def require_mosquitto() -> str:
    path = mosquitto_binary()
    if path is None:
        msg = "mosquitto is not installed (apt-get install -y mosquitto)"
        if os.environ.get("CI"):
            pytest.fail(msg + "; CI must run the broker tests", pytrace=False)
        pytest.skip(msg)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tls(out: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for `hosts` (written as PEM): (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("pocketfleet test CA")).issuer_name(name("pocketfleet test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder().subject_name(name(hosts[0])).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = (out / "ca.pem", out / "server.pem", out / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(paths[2], 0o600)
    return paths


class Mosquitto:
    """A mosquitto process owned by one test. `accounts`: username -> (role, group); password = 'pw-' + name."""

    def __init__(
        self,
        workdir: Path,
        accounts: dict[str, tuple[str, str | None]] | None = None,
        tls: bool = False,
        persistence: bool = True,
        max_queued_messages: int = 100_000,
        max_inflight_messages: int = 64,
        max_packet_size: int = 4 * 1024 * 1024,
        port: int | None = None,
        files: tuple[Path, Path] | tuple[Path, Path, Path] | None = None,
        run_as_root: bool | None = None,
    ) -> None:
        """`files`: (passwd, acl[, dynamic-security file]) maintained by someone else (`pocketfleet cloud
        provision`). With accounts, devices live in mosquitto's dynamic-security plugin (see broker_files).

        A root test runs mosquitto as the packaged service does: it drops to the `mosquitto` user, so the
        broker's folder is made under /tmp (pytest's tmp_path is not reachable by that user) and given to
        it. Only with `files` kept elsewhere (or `run_as_root=True`) does the config say `user root`."""
        self.binary = require_mosquitto()
        self.run_as_root = (files is not None) if run_as_root is None else run_as_root
        self.owner = broker_owner() if not self.run_as_root else None
        if self.owner is not None:
            self.dir = Path(tempfile.mkdtemp(prefix="pf-mosquitto-", dir="/tmp"))
            self.dir.chmod(0o755)
            os.chown(self.dir, *self.owner)
            atexit.register(shutil.rmtree, self.dir, True)
        else:
            self.dir = Path(workdir) / f"mosquitto-{id(self):x}"
            self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.accounts = dict(accounts or {})
        self.tls = make_tls(self.dir / "tls") if tls else None
        self.external = files is not None
        self.passwd = files[0] if files else self.dir / "passwd" if accounts is not None else None
        self.acl = files[1] if files else self.dir / "acl" if accounts is not None else None
        self.dynsec = (files[2] if files and len(files) > 2 else None) if files else (
            self.dir / "dynsec" / "dynamic-security.json" if accounts is not None else None)
        self.log = self.dir / "mosquitto.log"
        self.conf = self.dir / "mosquitto.conf"
        self.persistence = self.dir / "data" if persistence else None
        if self.persistence:
            self.persistence.mkdir(exist_ok=True)
        if self.owner is not None:
            for path in [p for p in (self.persistence,) if p] + ([self.dir / "tls", *self.dir.glob("tls/*")]
                                                               if self.tls else []):
                os.chown(path, *self.owner)
        self._write_accounts()
        self.conf.write_text(
            mosquitto_conf(
                self.port, self.passwd, self.acl, tls=self.tls, persistence_dir=self.persistence,
                max_queued_messages=max_queued_messages, max_inflight_messages=max_inflight_messages,
                max_packet_size=max_packet_size, log_path=self.log, dynsec_path=self.dynsec,
                extra=["user root"] if os.geteuid() == 0 and self.run_as_root else [],  # else: drops to 'mosquitto'
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def password(username: str) -> str:
        return f"pw-{username}"

    def _write_accounts(self) -> None:
        if self.passwd is None or self.acl is None or self.external:
            return
        accounts = [
            Account(name, role, hash_password(self.password(name)), group)
            for name, (role, group) in self.accounts.items()
        ]
        write_files(accounts, self.passwd, self.acl, self.dynsec, hash_password(self.password(DYNSEC_ADMIN)))

    def add_account(self, username: str, role: str = "device", group: str | None = None) -> None:
        """Add an account and make the running broker reload its password and ACL files (SIGHUP); a device
        is added to the dynamic-security plugin through its control topic."""
        from cloud_sync import dynsec

        self.accounts[username] = (role, group)
        self._write_accounts()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)
            time.sleep(0.3)
            if role == "device":
                dynsec.apply(self.mqtt_config(), self.password(DYNSEC_ADMIN),
                             dynsec.device_commands(username, self.password(username)))

    def mqtt_config(self, username: str | None = None, **overrides: object) -> MqttConfig:
        cfg = MqttConfig(
            host="127.0.0.1" if self.tls is None else "localhost",
            port=self.port,
            client_id=username or "",
            username=username or "",
            password=self.password(username) if username else "",
            tls_ca=str(self.tls[0]) if self.tls else "",
            reconnect_min_s=0.1,
            reconnect_max_s=1.0,
        )
        for key, value in overrides.items():
            setattr(cfg, key, value)
        return cfg

    def start(self, timeout: float = 10.0) -> Mosquitto:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                log = self.log.read_text() if self.log.exists() else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err}\n{log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self, down_s: float = 0.5) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
