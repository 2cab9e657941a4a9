"""Verify and safely extract `.pfpkg` packages (torch-free). The order of checks is documented in
docs/package-format.md; nothing from the manifest is used before its signature has verified.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from export.errors import (
    ExpiredPackageError,
    FileMismatchError,
    MissingFileError,
    OversizeError,
    UnexpectedFileError,
    UnsafePathError,
    UnsignedPackageError,
    VerificationError,
)
from export.manifest import MANIFEST, RESERVED, SIGNATURE, Manifest, safe_member_path
from export.package import DEFAULT_LIMITS, Limits, PackageReader, parse_manifest
from export.signing import TrustLike, load_trust, verify_bytes
from export.trust_root import RootTrust, catch_up_from_package


def verify_package(
    path: str | Path,
    trust: TrustLike,
    now: datetime | None = None,
    limits: Limits = DEFAULT_LIMITS,
    check_expiry: bool = True,
) -> Manifest:
    """Return the manifest of a package that passes every check; raise a VerificationError otherwise."""
    keys = load_trust(trust)
    with PackageReader(path, limits) as reader:
        return check_package(reader, keys, now=now, check_expiry=check_expiry)


def extract_package(
    path: str | Path,
    dest: str | Path,
    trust: TrustLike | None,
    now: datetime | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Manifest:
    """Verify and extract into `dest` (created; must not exist or be empty) in one pass over one open file.

    Files are hashed while they are written, so a package changed after verification cannot slip
    through; on any failure `dest` is removed again. `trust=None` skips only the signature check (for
    development tools: never for installing on a device). manifest.json and manifest.sig are extracted
    too, so the directory can be re-verified later.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise VerificationError(f"extraction target {dest} exists and is not an empty directory")
    keys = load_trust(trust) if trust is not None else None
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with PackageReader(path, limits) as reader:
            manifest = check_package(reader, keys, now=now, dest=dest)
        _fsync_dir(dest)
        return manifest
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def check_package(
    reader: PackageReader,
    trust: dict[str, Any] | None,
    now: datetime | None = None,
    check_expiry: bool = True,
    dest: Path | None = None,
) -> Manifest:
    """The verification steps on an open reader (the zip directory was checked when it opened).

    `trust=None` skips the signature (used when (re)signing); `dest` extracts while hashing.
    """
    where = reader.path.name
    raw = reader.manifest_bytes()
    sig = reader.signature_bytes()
    if isinstance(trust, RootTrust):  # newer roots shipped in the package first, then no frozen root
        catch_up_from_package(trust, reader, where)
        if check_expiry:
            trust.check_fresh(now, where)
    if trust is not None:
        if sig is None:
            raise UnsignedPackageError(f"{where}: the package is not signed ({SIGNATURE} is missing)")
        verify_bytes(raw, sig, trust, where)
    manifest = parse_manifest(raw, where)
    if check_expiry:
        moment = now or datetime.now(timezone.utc)
        if manifest.expires_at <= moment:
            raise ExpiredPackageError(
                f"{where}: the manifest expired at {manifest.expires} (now {moment:%Y-%m-%dT%H:%M:%SZ})"
            )
    for name in manifest.files:
        if not safe_member_path(name) or name in RESERVED:
            raise UnsafePathError(f"{where}: manifest file path {name!r} is not a safe relative path")
    extra = sorted(set(reader.names) - set(manifest.files) - set(RESERVED))
    if extra:
        raise UnexpectedFileError(f"{where}: member {extra[0]!r} is not listed in the manifest")
    _check_declared_sizes(manifest, reader.limits, where)
    for name, entry in sorted(manifest.files.items()):
        _check_file(reader, name, entry.sha256, entry.size, dest)
    if dest is not None:
        (dest / MANIFEST).write_bytes(raw)
        if sig is not None:
            (dest / SIGNATURE).write_bytes(sig)
    return manifest


def _check_declared_sizes(manifest: Manifest, limits: Limits, where: str) -> None:
    total = 0
    for name, entry in manifest.files.items():
        if entry.size > limits.max_member_bytes:
            raise OversizeError(
                f"{where}: manifest declares {entry.size} bytes for {name!r}, more than the limit of {limits.max_member_bytes}"
            )
        total += entry.size
    if total > limits.max_total_bytes:
        raise OversizeError(
            f"{where}: manifest declares {total} bytes in all, more than the limit of {limits.max_total_bytes}"
        )


def _check_file(reader: PackageReader, name: str, sha256: str, size: int, dest: Path | None) -> None:
    where = reader.path.name
    info = reader.infos.get(name)
    if info is None:
        raise MissingFileError(f"{where}: file {name!r} listed in the manifest is missing from the package")
    if info.file_size != size:
        raise FileMismatchError(
            f"{where}: file {name!r} is {info.file_size} bytes, the manifest says {size}: it was changed"
        )
    digest, read = hashlib.sha256(), 0
    out = None
    if dest is not None:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        out = open(target, "xb")  # noqa: SIM115 - closed below; 'x' never follows or replaces a file
    try:
        for chunk in reader.stream(name, size):
            read += len(chunk)
            if read > size:
                raise FileMismatchError(
                    f"{where}: file {name!r} is longer than the {size} bytes the manifest says"
                )
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    if read != size or digest.hexdigest() != sha256:
        raise FileMismatchError(
            f"{where}: file {name!r} does not match its SHA-256 in the manifest: it was changed"
        )


def _fsync_dir(path: Path) -> None:
    for d in sorted({p.parent for p in path.rglob("*")} | {path}):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
