"""Re-verify an installed (extracted) package directory: the same checks as export.verify_package, on the
files as they lie in a device's model store (signature over manifest.json, then every file's size and
SHA-256). Used by the agent at start-up and before it serves a version.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from export.errors import FileMismatchError, MissingFileError, UnsignedPackageError
from export.manifest import MANIFEST, SIGNATURE, Manifest
from export.package import parse_manifest
from export.signing import Trust, verify_bytes

CHUNK = 1 << 20


def verify_installed(directory: str | Path, trust: Trust) -> Manifest:
    """Signature of manifest.json against `trust`, then the size and SHA-256 of every listed file.

    Expiry is not checked here: it guards installs (no freeze); an installed model keeps serving.
    """
    directory = Path(directory)
    where = str(directory)
    try:
        raw = (directory / MANIFEST).read_bytes()
    except OSError as exc:
        raise MissingFileError(f"{where}: {MANIFEST} cannot be read ({exc.strerror or exc})") from exc
    try:
        sig = (directory / SIGNATURE).read_bytes()
    except OSError as exc:
        raise UnsignedPackageError(f"{where}: {SIGNATURE} cannot be read ({exc.strerror or exc})") from exc
    verify_bytes(raw, sig, trust, where)
    manifest = parse_manifest(raw, where)
    for name, entry in sorted(manifest.files.items()):
        _check_file(directory / name, entry.sha256, entry.size, where)
    return manifest


def _check_file(path: Path, sha256: str, size: int, where: str) -> None:
    digest, read = hashlib.sha256(), 0
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                read += len(chunk)
                if read > size:
                    break
                digest.update(chunk)
    except OSError as exc:
        raise MissingFileError(f"{where}: file {path.name!r} cannot be read ({exc.strerror or exc})") from exc
    if read != size:
        raise FileMismatchError(f"{where}: file {path.name!r} has {read}+ bytes, the manifest says {size}")
    if digest.hexdigest() != sha256:
        raise FileMismatchError(f"{where}: file {path.name!r} does not match its SHA-256 in the manifest")
