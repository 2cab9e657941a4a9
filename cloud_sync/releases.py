"""Releases: a verified package copied into the cloud's artifact store, chunked, and started as a rollout.

`create_release` runs where the cloud's state directory is (the `pocketfleet release` command); the running
cloud workers pick the new rollout up from SQLite on their next tick. A release is refused when its
package does not verify against the cloud's trusted keys (unsigned, tampered, expired) or when it is not
newer than what the group runs, unless it is an explicitly signed rollback release: then a rollback
authorization (name, version, package SHA-256, release id, validity) signed with a trusted private key
travels with it, and devices check that signature before they accept the older version.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_sync.chunks import choose_chunking, file_sha256, index_file
from cloud_sync.errors import ReleaseError
from cloud_sync.registry import Registry, Release
from pocketfleet.fs import atomic_copy, atomic_write_bytes

GATE_RE = re.compile(r"^\s*(error_rate|p95_ms|golden|failures)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")
GATE_METRICS = {
    "failures": "canary devices that failed or refused the install",
    "error_rate": "probe errors / probe requests over all canary devices",
    "p95_ms": "the worst canary device's p95 latency of the probe, in ms",
    "golden": "the worst canary device's accuracy on the package's labelled sample inputs",
}
ROLLBACK_PURPOSE = "pf.rollback/1"


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"

    def passes(self, observed: float | None) -> bool:
        if observed is None:
            return False
        return {"<=": observed <= self.value, ">=": observed >= self.value,
                "<": observed < self.value, ">": observed > self.value}[self.op]


def parse_gate(text: str) -> Gate:
    m = GATE_RE.match(text)
    if not m:
        raise ReleaseError(
            f"gate {text!r} must look like METRIC<=VALUE with METRIC one of {sorted(GATE_METRICS)} "
            "and an operator among <=, >=, <, > (e.g. error_rate<=0.01, p95_ms<=25, golden>=0.9)"
        )
    try:
        value = float(m.group(3))
    except ValueError as exc:
        raise ReleaseError(f"gate {text!r}: {m.group(3)!r} is not a number") from exc
    return Gate(m.group(1), m.group(2), value)


def parse_canary(text: str | float) -> float:
    """'10%' or '0.1' -> 0.1; 0 means no canary phase."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError as exc:
        raise ReleaseError(f"--canary {text!r} must be a percentage like 10% or a fraction like 0.1") from exc
    if not 0 <= value <= 1:
        raise ReleaseError(f"--canary {text!r} must lie between 0% and 100%")
    return value


def new_id() -> str:
    return secrets.token_hex(8)


def sign_rollback(key: Any, release_id: str, name: str, version: int, sha256: str, from_version: int,
                  valid_s: float = 7 * 86400) -> str:
    """The rollback authorization string carried in the update command (signed with an Ed25519 key)."""
    from export.signing import canonical_json, sign_bytes

    now = time.time()
    doc = {"purpose": ROLLBACK_PURPOSE, "release_id": release_id, "name": name, "version": version,
           "sha256": sha256, "from_version": from_version, "issued": now, "expires": now + valid_s}
    sig = json.loads(sign_bytes(canonical_json(doc), key))
    return json.dumps({"doc": doc, "sig": sig}, separators=(",", ":"), sort_keys=True)


def select_canary(registry: Registry, group: str, fraction: float, rollout_id: str) -> tuple[list[str], list[str]]:
    """(canary devices, the rest): online devices first, then a stable per-rollout shuffle."""
    devices = registry.devices(group)
    if not devices:
        raise ReleaseError(f"group {group!r} has no devices (provision some with `pocketfleet cloud provision`)")
    if fraction <= 0:
        return [], [d["id"] for d in devices]
    n = min(len(devices), max(1, math.ceil(fraction * len(devices))))
    ranked = sorted(devices, key=lambda d: (-int(d["online"]), hashlib.sha256(f"{rollout_id}/{d['id']}".encode()).digest()))
    canary = sorted(d["id"] for d in ranked[:n])
    return canary, sorted(d["id"] for d in ranked[n:])


def create_release(
    registry: Registry,
    artifacts_dir: str | Path,
    package: str | Path,
    group: str,
    trust: Any,
    canary: float = 0.1,
    gates: list[str] | None = None,
    rollback: bool = False,
    rollback_key: Any = None,
    plan: Any = None,
    abort: list[str] | None = None,
) -> dict[str, Any]:
    """Verify, store and chunk a package, then create its rollout; returns a summary dict.

    With `plan` (cloud_sync.staged.StagePlan) the rollout is staged instead of canary + gates, stopped by
    the `abort` criteria (cloud_sync.staged)."""
    from export.verify import verify_package

    package = Path(package)
    criteria: list[Any] = []
    if plan is not None:
        from cloud_sync.staged import DEFAULT_CRITERIA, parse_criterion

        if gates:
            raise ReleaseError("--gate judges a canary; a staged rollout (--stages/--rate) is stopped by --abort criteria")
        criteria = [parse_criterion(c) for c in (abort or DEFAULT_CRITERIA)]
    elif abort:
        raise ReleaseError("--abort needs a staged rollout: give --stages or --rate")
    if not trust:
        raise ReleaseError("the cloud has no trusted key: set [cloud] trust in cloud.toml to the public key(s)")
    manifest = verify_package(package, trust)  # unsigned / untrusted / tampered / expired -> VerificationError
    parsed = [parse_gate(g) for g in gates or []]
    current = registry.group_release(group)
    rollback_auth = None
    release_id = new_id()
    if current is not None and current.name == manifest.name and manifest.version <= current.version:
        if not rollback:
            raise ReleaseError(
                f"{package.name} is {manifest.name} v{manifest.version}, not newer than v{current.version} which "
                f"group {group!r} runs; an older version needs an explicitly signed rollback release (--rollback --key)"
            )
        if manifest.version == current.version:
            raise ReleaseError(f"{package.name}: group {group!r} already runs v{current.version}")
    elif rollback:
        raise ReleaseError(f"--rollback: {package.name} v{manifest.version} is not older than the group's release")
    artifacts = Path(artifacts_dir)
    artifacts.mkdir(parents=True, exist_ok=True)
    stored = artifacts / f"{release_id}.pfpkg"
    atomic_copy(package, stored)
    size = stored.stat().st_size
    chunking = choose_chunking(size)
    index = index_file(stored, chunking)
    index_raw = index.to_bytes()
    index_path = artifacts / f"{release_id}.index"
    atomic_write_bytes(index_path, index_raw)
    sha = file_sha256(stored)
    if rollback:
        if rollback_key is None:
            raise ReleaseError("--rollback needs --key: the rollback must be signed with a trusted private key")
        assert current is not None
        rollback_auth = sign_rollback(rollback_key, release_id, manifest.name, manifest.version, sha, current.version)
    rel = Release(
        id=release_id, name=manifest.name, version=manifest.version, size=size, sha256=sha,
        package_path=str(stored), index_path=str(index_path), index_sha256=hashlib.sha256(index_raw).hexdigest(),
        index_size=len(index_raw), chunks=len(index), chunking=chunking.to_dict(), rollback_auth=rollback_auth,
        created=time.time(), manifest=manifest.to_dict(),
    )
    registry.add_release(rel)
    rollout_id = new_id()
    if plan is not None:
        from cloud_sync.staged import add_staged_rollout

        staged = add_staged_rollout(registry, rollout_id, release_id, group, plan, criteria,
                                    current.id if current else None)
        return {
            "rollout_id": rollout_id, "release_id": release_id, "group": group, "name": manifest.name,
            "version": manifest.version, "size": size, "chunks": len(index), "chunk_avg": chunking.avg,
            "canary": [], "gates": [], "rollback": rollback, "superseded": staged["superseded"],
            "stages": staged["stages"], "plan": plan.describe(), "abort": staged["criteria"],
        }
    canary_devices, rest = select_canary(registry, group, canary, rollout_id)
    superseded = registry.add_rollout(rollout_id, release_id, group, canary, [str(g) for g in parsed],
                                      current.id if current else None, canary_devices, rest)
    return {
        "rollout_id": rollout_id, "release_id": release_id, "group": group, "name": manifest.name,
        "version": manifest.version, "size": size, "chunks": len(index), "chunk_avg": chunking.avg,
        "canary": canary_devices, "gates": [str(g) for g in parsed], "rollback": rollback,
        "superseded": superseded,
    }
