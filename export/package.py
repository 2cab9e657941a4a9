"""Build, sign, open and inspect `.pfpkg` model packages (torch-free). Format: docs/package-format.md.

A package is a zip whose members are all STORED (uncompressed) so that byte-level chunking for OTA sees
the raw model bytes. Members: manifest.json (canonical JSON, signed), manifest.sig, the model file(s),
samples.safetensors. Verification lives in export/verify.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from export.errors import (
    FileMismatchError,
    MalformedManifestError,
    MalformedPackageError,
    MissingFileError,
    NotAPackageError,
    OversizeError,
    PackageError,
    UnsafePathError,
)
from export.manifest import (
    DEFAULT_VALID_DAYS,
    FORMAT_VERSION,
    MANIFEST,
    RESERVED,
    SAMPLES,
    SIGNATURE,
    Manifest,
    default_expiry,
    iso,
    parse_iso,
    safe_member_path,
    utc_now,
)
from export.samples import Samples
from export.signing import canonical_json, sign_bytes
from export.specs import TensorSpec

CHUNK = 1 << 20
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: same inputs give the same package bytes

Source = str | Path | bytes
Content = Source | Iterator[bytes]


@dataclass(frozen=True)
class Limits:
    """Bounds applied before anything is read (zip bomb and resource guards)."""

    max_members: int = 64
    max_member_bytes: int = 2 << 30
    max_total_bytes: int = 4 << 30
    max_manifest_bytes: int = 1 << 20
    max_signature_bytes: int = 4096


DEFAULT_LIMITS = Limits()


class PackageReader:
    """An open package: checks the zip directory on open, reads members with bounded size.

    Nothing read here is trusted; `manifest` is unverified (use export.verify.verify_package).
    """

    def __init__(self, path: str | Path, limits: Limits = DEFAULT_LIMITS) -> None:
        self.path = Path(path)
        self.limits = limits
        where = self.path.name
        try:
            self._fh: IO[bytes] = open(self.path, "rb")  # noqa: SIM115 - kept open for the reader's life
        except OSError as exc:
            raise NotAPackageError(f"{self.path}: cannot open ({exc.strerror or exc})") from exc
        try:
            self.zip = zipfile.ZipFile(self._fh)
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as exc:  # NotImplemented:
            self._fh.close()  # a central directory naming a zip "version needed" above 6.3
            raise NotAPackageError(f"{where} is not a model package (not a zip archive: {exc})") from exc
        try:
            self.infos = self._check_directory()
        except Exception:
            self.close()
            raise

    def _check_directory(self) -> dict[str, zipfile.ZipInfo]:
        where, limits = self.path.name, self.limits
        infos = self.zip.infolist()
        if len(infos) > limits.max_members:
            raise OversizeError(f"{where}: {len(infos)} members, more than the limit of {limits.max_members}")
        out: dict[str, zipfile.ZipInfo] = {}
        total = 0
        for info in infos:
            name = info.filename
            if not safe_member_path(name):
                raise UnsafePathError(f"{where}: member path {name!r} is not a safe relative path")
            if name in out:
                raise MalformedPackageError(f"{where}: member {name!r} appears twice")
            if info.flag_bits & 0x1:
                raise MalformedPackageError(f"{where}: member {name!r} is marked encrypted; package members are not")
            if info.compress_type != zipfile.ZIP_STORED:
                raise MalformedPackageError(
                    f"{where}: member {name!r} is compressed; package members must be stored"
                )
            size = max(info.file_size, info.compress_size)
            if size > limits.max_member_bytes:
                raise OversizeError(
                    f"{where}: member {name!r} declares {size} bytes, more than the limit of {limits.max_member_bytes}"
                )
            total += size
            out[name] = info
        if total > limits.max_total_bytes:
            raise OversizeError(
                f"{where}: members declare {total} bytes, more than the limit of {limits.max_total_bytes}"
            )
        return out

    def __enter__(self) -> PackageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.zip.close()
        self._fh.close()

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def stream(self, name: str, limit: int) -> Iterator[bytes]:
        """Yield the member's bytes in chunks, never more than `limit` (+1 to detect overflow)."""
        info = self.infos.get(name)
        if info is None:
            raise MissingFileError(f"{self.path.name}: member {name!r} is missing")
        if info.file_size > limit:
            raise OversizeError(f"{self.path.name}: member {name!r} is {info.file_size} bytes, limit {limit}")
        read = 0
        try:
            with self.zip.open(info) as fh:
                while read <= limit:
                    chunk = fh.read(min(CHUNK, limit + 1 - read))
                    if not chunk:
                        return
                    read += len(chunk)
                    yield chunk
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError, ValueError) as exc:
            raise FileMismatchError(f"{self.path.name}: member {name!r} is damaged ({exc})") from exc

    def read(self, name: str, limit: int) -> bytes:
        data = b"".join(self.stream(name, limit))
        if len(data) > limit:
            raise OversizeError(
                f"{self.path.name}: member {name!r} is larger than the limit of {limit} bytes"
            )
        return data

    def manifest_bytes(self) -> bytes:
        if MANIFEST not in self.infos:
            raise MissingFileError(f"{self.path.name}: {MANIFEST} is missing")
        return self.read(MANIFEST, self.limits.max_manifest_bytes)

    def signature_bytes(self) -> bytes | None:
        if SIGNATURE not in self.infos:
            return None
        return self.read(SIGNATURE, self.limits.max_signature_bytes)

    @property
    def manifest(self) -> Manifest:
        """The manifest as written, NOT verified."""
        return parse_manifest(self.manifest_bytes(), self.path.name)


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """Parse manifest.json bytes, which must be canonical JSON (the bytes that were signed)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError as exc:
        raise MalformedManifestError(f"{where}: {MANIFEST} is nested too deeply") from exc
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: also an integer of thousands of digits
        raise MalformedManifestError(f"{where}: {MANIFEST} is not valid JSON ({exc})") from exc
    try:
        canonical = canonical_json(data)
    except (ValueError, RecursionError) as exc:
        raise MalformedManifestError(f"{where}: {MANIFEST} holds a value JSON cannot carry ({exc})") from exc
    if canonical != raw:
        raise MalformedManifestError(
            f"{where}: {MANIFEST} is not in canonical form (sorted keys, compact, UTF-8)"
        )
    return Manifest.from_dict(data, where=f"{where}: {MANIFEST}")


def open_package(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> PackageReader:
    """Open a package for reading (directory checks only; use verify_package before trusting it)."""
    return PackageReader(path, limits)


def read_manifest(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> Manifest:
    """The package's manifest WITHOUT verification (for display; never for deciding to install)."""
    with PackageReader(path, limits) as reader:
        return reader.manifest


# ---------------------------------------------------------------------------------------------- building


def _sources(model_files: Mapping[str, Source] | Sequence[str | Path] | str | Path) -> dict[str, Source]:
    if isinstance(model_files, (str, Path)):
        model_files = [model_files]
    if isinstance(model_files, Mapping):
        return dict(model_files)
    return {Path(p).name: p for p in model_files}


def _hash_source(src: Source) -> tuple[str, int]:
    if isinstance(src, bytes):
        return hashlib.sha256(src).hexdigest(), len(src)
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _spec_dicts(specs: Sequence[TensorSpec | dict[str, Any]]) -> list[dict[str, Any]]:
    return [s.to_dict() if isinstance(s, TensorSpec) else TensorSpec.from_dict(s).to_dict() for s in specs]


def _write_member(zf: zipfile.ZipFile, name: str, src: Content, size: int | None) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    if size is None:
        size = (
            len(src)
            if isinstance(src, bytes)
            else os.path.getsize(src)
            if isinstance(src, (str, Path))
            else None
        )
    with zf.open(info, "w", force_zip64=size is None or size >= zipfile.ZIP64_LIMIT) as out:
        if isinstance(src, bytes):
            out.write(src)
        elif isinstance(src, (str, Path)):
            with open(src, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    out.write(chunk)
        else:
            for chunk in src:
                out.write(chunk)


def _write_zip(
    out_path: Path, members: Sequence[tuple[str, Content]], sizes: Mapping[str, int] | None = None
) -> None:
    """Write members STORED, in order, to a temp file then rename over out_path (atomic)."""
    from pocketfleet.fs import atomic_file

    with atomic_file(out_path) as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, src in members:
            _write_member(zf, name, src, (sizes or {}).get(name))


def build_package(
    model_files: Mapping[str, Source] | Sequence[str | Path] | str | Path,
    manifest_fields: Mapping[str, Any],
    samples: Samples | None,
    out_path: str | Path,
    key: Any = None,
    valid_days: int | None = None,
    now: datetime | None = None,
) -> Manifest:
    """Write a package from ready model file(s); signs it when `key` (path or Ed25519 key) is given.

    `manifest_fields` carries name, version, format, dtype, inputs, outputs and optionally model (entry
    file; default: the first model file), device, workload, preprocessing, report, trainable_head, extra,
    created, expires. `files`, `samples` and `format_version` are filled in here.
    """
    out_path = Path(out_path)
    sources = _sources(model_files)
    if not sources:
        raise PackageError("build_package needs at least one model file")
    for name, src in sources.items():
        if not safe_member_path(name) or name in RESERVED or name == SAMPLES:
            raise PackageError(f"model file name {name!r} is not allowed in a package (plain relative path)")
        if not isinstance(src, bytes) and not Path(src).is_file():
            raise PackageError(f"model file {src} does not exist")
    members: list[tuple[str, Source]] = list(sources.items())
    fields = dict(manifest_fields)
    if samples is not None:
        members.append((SAMPLES, samples.to_bytes()))
        fields["samples"] = samples.manifest_entry(SAMPLES)
    created = parse_iso(fields["created"]) if fields.get("created") else (now or utc_now())
    expires = fields.get("expires") or iso(default_expiry(created, valid_days or DEFAULT_VALID_DAYS))
    files = {}
    for name, src in members:
        sha, size = _hash_source(src)
        files[name] = {"sha256": sha, "size": size}
    fields.update(
        format_version=FORMAT_VERSION,
        created=iso(created),
        expires=expires,
        model=fields.get("model") or next(iter(sources)),
        inputs=_spec_dicts(fields.get("inputs", [])),
        outputs=_spec_dicts(fields.get("outputs", [])),
        files=files,
    )
    for opt in ("device", "workload", "preprocessing", "samples", "trainable_head"):
        fields.setdefault(opt, None)
    fields.setdefault("report", {})
    fields.setdefault("extra", {})
    try:
        manifest_raw = canonical_json(fields)
        manifest = Manifest.from_dict(json.loads(manifest_raw), where=f"{out_path.name}: {MANIFEST}")
    except (MalformedManifestError, ValueError, TypeError) as exc:
        raise PackageError(f"cannot build {out_path.name}: {exc}") from exc
    head: list[tuple[str, Source]] = [(MANIFEST, manifest_raw)]
    if key is not None:
        head.append((SIGNATURE, sign_bytes(manifest_raw, key)))
    _write_zip(out_path, head + members)
    return manifest


def sign_package(path: str | Path, key: Any, out_path: str | Path | None = None) -> Manifest:
    """(Re)sign a package: check its files against the manifest, then write manifest.sig."""
    from export.verify import check_package

    path = Path(path)
    out = Path(out_path) if out_path else path
    with PackageReader(path) as reader:
        manifest = check_package(reader, trust=None)  # structure and hashes; signature is being replaced
        raw = reader.manifest_bytes()
        members: list[tuple[str, Content]] = [(MANIFEST, raw), (SIGNATURE, sign_bytes(raw, key))]
        members += [
            (name, reader.stream(name, manifest.files[name].size))
            for name in reader.names
            if name not in RESERVED
        ]
        _write_zip(out, members, sizes={n: e.size for n, e in manifest.files.items()})
    return manifest


def inspect_package(path: str | Path, trust: Any = None) -> dict[str, Any]:
    """A description of a package: members, signature key id, manifest (verified only if `trust`)."""
    from export.signing import parse_signature
    from export.verify import verify_package

    path = Path(path)
    with PackageReader(path) as reader:
        sig_raw = reader.signature_bytes()
        info: dict[str, Any] = {
            "path": str(path),
            "size_bytes": path.stat().st_size,
            "members": [{"name": n, "size": i.file_size} for n, i in reader.infos.items()],
            "signed": sig_raw is not None,
            "key_id": parse_signature(sig_raw, path.name)["key_id"] if sig_raw else None,
            "manifest": reader.manifest.to_dict(),
        }
    if trust is not None:
        try:
            verify_package(path, trust)
            info["verified"], info["error"] = True, None
        except Exception as exc:  # report any rejection in the description
            info["verified"], info["error"] = False, f"{type(exc).__name__}: {exc}"
    else:
        info["verified"] = None
    return info
