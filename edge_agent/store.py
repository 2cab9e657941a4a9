"""The versioned model store: crash-safe install, atomic switch of the active version, rollback,
quarantine, and fallback to the last known good version at start-up.

Layout under the state directory:

    versions/<name>/<version>/   extracted package: manifest.json, manifest.sig, model file, samples
    tmp/                         staging directories (same filesystem; removed at start-up)
    quarantine/<name>-<version>-<utc time>/   versions set aside, with reason.json
    state.json                   per model: active version, known-good versions, highest version seen
    events.jsonl                 installs, switches, fallbacks, quarantines, with reasons
    .lock                        flock held by whoever changes the store (agent or CLI)

Install: verify the package (signature, hashes, expiry) -> version check -> extract into tmp/ (hashing
while writing) -> fsync every file and directory -> rename into versions/ -> health check -> switch the
active pointer by writing state.json atomically. A SIGKILL at any point leaves state.json pointing at a
complete, verified version; a half-done install is finished by running it again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import (
    DowngradeError,
    HealthCheckError,
    StoreError,
    TrustConfigError,
    VersionConflictError,
)
from edge_agent.health import ServedModel, health_check
from export.errors import UntrustedKeyError
from export.installed import verify_installed
from export.manifest import iso, utc_now
from export.signing import Trust, TrustLike, load_trust
from export.verify import extract_package, verify_package
from pocketfleet import PocketfleetError
from pocketfleet.faults import fault_point
from pocketfleet.fs import FileLock, atomic_write_bytes, atomic_write_json, fsync_dir, fsync_tree

STATE_FILE = "state.json"
EVENTS_FILE = "events.jsonl"
STATE_SCHEMA = "pocketfleet.agent.state/1"
MAX_EVENTS_BYTES = 1 << 20
ROLLBACK_FLAG = "rollback"  # manifest extra.rollback = true: a signed package allowed to go back in version


@dataclass
class ModelState:
    """One model name in state.json."""

    active: int | None = None
    good: list[int] = field(default_factory=list)  # versions that passed a health check and served
    highest: int = -1  # highest version ever activated: installs must not go below (rollback protection)

    def to_dict(self) -> dict[str, Any]:
        return {"active": self.active, "good": self.good, "highest": self.highest}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelState:
        active, good, highest = data.get("active"), data.get("good", []), data.get("highest", -1)
        if not (active is None or isinstance(active, int)) or not isinstance(highest, int):
            raise ValueError("active/highest must be integers")
        if not isinstance(good, list) or not all(isinstance(v, int) for v in good):
            raise ValueError("good must be a list of integers")
        return cls(active, list(good), highest)

    def promote(self, version: int) -> None:
        self.good = [v for v in self.good if v != version] + [version]
        self.active = version
        self.highest = max(self.highest, version)


@dataclass
class InstallResult:
    name: str
    version: int
    previous: int | None
    status: str  # "installed" | "resumed" (version dir was already complete) | "already-active"
    health: dict[str, float]
    path: str

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


class ModelStore:
    """The store under `state_dir`. `trust` (key file, directory, or loaded keys) is needed to verify."""

    def __init__(
        self, state_dir: str | Path, trust: TrustLike | None = None, threads: int = 1, keep: int = 3
    ) -> None:
        self.root = Path(state_dir)
        self.keep = max(1, keep)  # known-good versions kept on disk besides the active one
        self.versions = self.root / "versions"
        self.tmp = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        self.state_path = self.root / STATE_FILE
        self.events_path = self.root / EVENTS_FILE
        self.threads = threads
        self._trust_src = trust
        self._trust: Trust | None = None
        for d in (self.root, self.versions, self.tmp, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)

    @property
    def trust(self) -> Trust:
        if self._trust is None:
            if self._trust_src is None or self._trust_src == "":
                raise TrustConfigError("no trusted key configured: give --trust PUBLIC_KEY (or trust = ... in the config)")
            try:
                self._trust = load_trust(self._trust_src)
            except PocketfleetError as exc:
                raise TrustConfigError(f"the trust setting {self._trust_src!s} is unusable: {exc}") from exc
        return self._trust

    def lock(self) -> FileLock:
        return FileLock(self.root / ".lock")

    # ------------------------------------------------------------------------------------------ state

    def read_state(self) -> dict[str, ModelState]:
        """state.json; raises StoreError when it is unreadable (recover() rebuilds it)."""
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            if any(self.installed(n) for n in self.names()):  # versions but no state: deleted (recover() rebuilds)
                raise StoreError(f"{self.state_path} is missing while {self.versions} holds versions") from None
            return {}
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self.state_path} is unreadable: {exc}") from exc
        if not isinstance(data, dict) or data.get("schema") != STATE_SCHEMA or not isinstance(data.get("models"), dict):
            raise StoreError(f"{self.state_path} is not a {STATE_SCHEMA} document")
        try:
            return {name: ModelState.from_dict(m) for name, m in data["models"].items()}
        except (ValueError, AttributeError) as exc:
            raise StoreError(f"{self.state_path}: {exc}") from exc

    def write_state(self, models: dict[str, ModelState]) -> None:
        doc = {"schema": STATE_SCHEMA, "updated": iso(utc_now()), "models": {n: m.to_dict() for n, m in sorted(models.items())}}
        atomic_write_json(self.state_path, doc, fault="state")

    def state_stamp(self) -> tuple[int, int] | None:
        """A cheap change detector for state.json (inode, mtime): os.replace gives a new inode."""
        try:
            st = os.stat(self.state_path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    # ------------------------------------------------------------------------------------------ events

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        entry = {"ts": iso(utc_now()), "event": event, **fields}
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > MAX_EVENTS_BYTES:
            lines = self.events_path.read_bytes().splitlines(keepends=True)
            atomic_write_bytes(self.events_path, b"".join(lines[len(lines) // 2 :]))
        return entry

    def events(self, last: int = 20) -> list[dict[str, Any]]:
        try:
            lines = self.events_path.read_text().splitlines()[-last:]
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn last line after a crash
        return out

    # ------------------------------------------------------------------------------------------ versions

    def version_dir(self, name: str, version: int) -> Path:
        return self.versions / name / str(version)

    def installed(self, name: str) -> list[int]:
        d = self.versions / name
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())

    def names(self) -> list[str]:
        return sorted(p.name for p in self.versions.iterdir() if p.is_dir())

    def load(self, name: str, version: int) -> ServedModel:
        """Verify the installed files and health-check the version; HealthCheckError/VerificationError else."""
        path = self.version_dir(name, version)
        if not path.is_dir():
            raise StoreError(f"{name} v{version} is not installed ({path} is missing)")
        manifest = verify_installed(path, self.trust)
        if (manifest.name, manifest.version) != (name, version):
            raise HealthCheckError(f"{path} holds {manifest.name} v{manifest.version}, not {name} v{version}")
        return health_check(path, manifest, self.threads)

    def quarantine(self, name: str, version: int, reason: str) -> Path | None:
        """Move a version out of versions/ (atomic rename) and record why; it never serves again from there."""
        src = self.version_dir(name, version)
        if not src.exists():
            return None
        stamp = utc_now().strftime("%Y%m%dT%H%M%SZ")
        dest = self.quarantine_dir / f"{name}-{version}-{stamp}-{uuid.uuid4().hex[:6]}"
        os.rename(src, dest)
        fsync_dir(src.parent)
        fsync_dir(self.quarantine_dir)
        (dest / "reason.json").write_text(json.dumps({"name": name, "version": version, "reason": reason, "ts": stamp}))
        self.record("quarantine", model=name, version=version, reason=reason, path=str(dest))
        return dest

    def quarantined(self) -> list[dict[str, Any]]:
        out = []
        for d in sorted(self.quarantine_dir.iterdir()):
            try:
                out.append({**json.loads((d / "reason.json").read_text()), "path": str(d)})
            except (OSError, ValueError):
                out.append({"path": str(d), "reason": "(no reason.json)"})
        return out

    # ------------------------------------------------------------------------------------------ install

    def install(self, package: str | Path, allow_downgrade: bool = False, activate: bool = True) -> InstallResult:
        """Verify, unpack, health-check and (by default) activate a package. Idempotent after a crash.

        `allow_downgrade`: the caller verified a signed rollback authorization (the sync client does);
        a package whose signed manifest sets extra.rollback = true may also go back in version.
        """
        package = Path(package)
        manifest = verify_package(package, self.trust)
        fault_point("install.after_verify")
        name, version = manifest.name, manifest.version
        with self.lock():
            models = self._state_or_rebuild()
            state = models.setdefault(name, ModelState())
            downgrade_ok = allow_downgrade or manifest.extra.get(ROLLBACK_FLAG) is True
            if state.active == version and self.version_dir(name, version).is_dir():
                return InstallResult(name, version, version, "already-active", {}, str(self.version_dir(name, version)))
            if version < state.highest and not downgrade_ok:
                raise DowngradeError(
                    f"{package.name}: {name} v{version} is older than v{state.highest}, the highest version installed "
                    "(rollback protection; use `pocketfleet agent rollback` or a signed rollback release)"
                )
            dest = self.version_dir(name, version)
            status = "installed"
            if dest.exists():
                try:
                    installed = verify_installed(dest, self.trust)
                    status = "resumed"
                except PocketfleetError as exc:
                    self.quarantine(name, version, f"incomplete or changed before re-install: {exc}")
                else:
                    if installed.to_dict() != manifest.to_dict():
                        raise VersionConflictError(
                            f"{package.name}: {name} v{version} is already installed with different contents; "
                            "a version number is never reused: publish the change as a new version")
            if status == "installed":
                self._unpack(package, name, version, dest)
            try:
                loaded = self.load(name, version)
            except PocketfleetError as exc:
                self.quarantine(name, version, f"failed its health check at install: {exc}")
                raise
            fault_point("install.after_health")
            previous = state.active
            if activate:
                state.promote(version)
                self.write_state(models)
                if self._prune(name, state):
                    self.write_state(models)
            self.record("install", model=name, version=version, previous=previous, activated=activate, status=status)
            return InstallResult(name, version, previous, status, loaded.health, str(dest))

    def _unpack(self, package: Path, name: str, version: int, dest: Path) -> None:
        staging = self.tmp / f"{name}-{version}-{uuid.uuid4().hex[:8]}"
        try:
            extract_package(package, staging, self.trust)  # verifies again while writing: no TOCTOU
            fault_point("install.after_unpack")
            fsync_tree(staging)
            fsync_dir(self.tmp)
            fault_point("install.after_fsync")
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, dest)
            fsync_dir(dest.parent)
            fsync_dir(self.tmp)
            fault_point("install.after_rename")
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _prune(self, name: str, state: ModelState) -> list[int]:
        """Delete installed versions beyond the active one and the `keep` most recent known-good ones."""
        keep = set(state.good[-self.keep :]) | {state.active}
        removed = []
        for version in self.installed(name):
            if version not in keep:
                trash = self.tmp / f"prune-{name}-{version}-{uuid.uuid4().hex[:6]}"
                os.rename(self.version_dir(name, version), trash)  # atomic: gone from versions/ at once
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(version)
        state.good = [v for v in state.good if v in keep]
        return removed

    # ------------------------------------------------------------------------------------------ switching

    def set_active(self, name: str, version: int, event: str, only_if: int | None = None, **fields: Any) -> bool:
        """Point `name` at an installed version (which the caller has health-checked). Takes the lock.

        With `only_if`, switch only while the active version is still `only_if` (compare-and-set);
        returns whether the pointer was switched."""
        with self.lock():
            models = self._state_or_rebuild()
            state = models.setdefault(name, ModelState())
            previous = state.active
            if only_if is not None and previous != only_if:
                return False
            state.promote(version)
            self.write_state(models)
        self.record(event, model=name, version=version, previous=previous, **fields)
        return True

    def rollback(self, name: str | None = None, to: int | None = None) -> dict[str, Any]:
        """Switch back to the previous known-good version, which then serves; the version left stops being
        known-good. With `to`, switch to that installed version (nothing stops being known-good).
        Either way the target is verified and health-checked first."""
        with self.lock():
            models = self._state_or_rebuild()
            name = self._pick_name(models, name)
            state = models[name]
            current = state.active
            explicit = to is not None
            if to is None:
                earlier = [v for v in state.good if v != current and self.version_dir(name, v).is_dir()]
                if not earlier:
                    raise StoreError(f"{name}: no earlier known-good version is installed to roll back to")
                to = earlier[-1]
            elif to == current:
                raise StoreError(f"{name} v{to} is already the active version")
            self.load(name, to)  # verify + health before switching
            if not explicit:  # a plain rollback says the current version is bad: it stops being known-good
                state.good = [v for v in state.good if v != current]
            state.promote(to)
            self.write_state(models)
        self.record("rollback", model=name, version=to, previous=current)
        return {"model": name, "version": to, "previous": current}

    def _pick_name(self, models: dict[str, ModelState], name: str | None) -> str:
        active = sorted(n for n, m in models.items() if m.active is not None)
        if name is None:
            if len(active) != 1:
                raise StoreError(f"name the model (--model): the store has {active or 'no active models'}")
            return active[0]
        if name not in models:
            raise StoreError(f"model {name!r} is not installed (installed: {sorted(models) or 'none'})")
        return name

    # ------------------------------------------------------------------------------------------ start-up

    def _state_or_rebuild(self) -> dict[str, ModelState]:
        try:
            return self.read_state()
        except StoreError as exc:
            models = {n: ModelState(None, [], max(self.installed(n), default=-1)) for n in self.names()}
            for n, m in models.items():
                m.good = self.installed(n)
            self.record("state-rebuilt", reason=str(exc), models={n: m.to_dict() for n, m in models.items()})
            return models

    def recover(self, on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, ServedModel]:
        """Start-up: clear staging leftovers, then load each model's active version; a version that fails
        to verify, load or pass its health check is quarantined and the next known-good one is tried.
        Returns the loaded models (the agent serves these objects directly)."""
        loaded: dict[str, ServedModel] = {}
        with self.lock():
            self._clear_tmp()
            models = self._state_or_rebuild()
            if any(self.installed(n) for n in models):
                self.trust  # noqa: B018 - TrustConfigError now, before anything could be quarantined
            untrusted: dict[str, list[str]] = {}
            changed = False
            for name, state in models.items():
                original = state.active
                candidates = [v for v in [state.active, *reversed(state.good)] if v is not None]
                if original is None:  # rebuilt state: try every installed version, newest first
                    candidates = list(reversed(self.installed(name)))
                tried: set[int] = set()
                for version in candidates:
                    if version in tried:
                        continue
                    tried.add(version)
                    try:
                        loaded[name] = self.load(name, version)
                        break
                    except UntrustedKeyError as exc:  # a trust setting problem, not a bad version: kept
                        untrusted.setdefault(name, []).append(str(exc))
                    except PocketfleetError as exc:
                        self.quarantine(name, version, f"failed at start-up: {exc}")
                        state.good = [v for v in state.good if v != version]
                        changed = True
                if name not in loaded and name in untrusted:
                    raise TrustConfigError(
                        f"no installed version of {name} is signed by a key the trust setting "
                        f"({self._trust_src!s}) holds: {untrusted[name][0]} -- fix the trust setting; nothing was "
                        "quarantined")
                if name in loaded:
                    version = loaded[name].version
                    if version != original:
                        state.promote(version)
                        changed = True
                        entry = self.record("fallback", model=name, version=version, previous=original)
                        if on_event:
                            on_event(entry)
                elif state.active is not None:
                    state.active = None
                    changed = True
                    self.record("no-good-version", model=name, previous=original)
            if changed or not self.state_path.exists():
                self.write_state(models)
        return loaded

    def _clear_tmp(self) -> None:
        for p in self.tmp.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        self.state_path.with_name(STATE_FILE + ".tmp").unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------ report

    def status(self) -> dict[str, Any]:
        try:
            models = self.read_state()
            error = None
        except StoreError as exc:
            models, error = {}, str(exc)
        return {
            "state_dir": str(self.root),
            "state_error": error,
            "models": {
                n: {**m.to_dict(), "installed": self.installed(n)} for n, m in sorted(models.items())
            },
            "quarantine": self.quarantined(),
            "events": self.events(10),
            "time": time.time(),
        }
