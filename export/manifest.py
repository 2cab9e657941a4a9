"""The package manifest: fields, validation and time helpers (torch-free). See docs/package-format.md."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from export.errors import MalformedManifestError
from export.specs import TensorSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SAMPLES = "samples.safetensors"
RESERVED = (MANIFEST, SIGNATURE)
FORMATS = ("onnx", "tflite", "pte", "coreml")
DEFAULT_VALID_DAYS = 365

# always used with fullmatch: `$` alone would accept a trailing newline ("model.onnx\n")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_PART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
MAX_INT = 2**63 - 1  # versions and sizes fit a signed 64-bit integer (SQLite, the cloud registry)


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def iso(ts: datetime) -> str:
    """ISO 8601 UTC with a Z suffix, whole seconds."""
    return ts.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime:
    """Parse an ISO 8601 time; a time without zone is rejected (must be UTC, 'Z' or an offset)."""
    ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if ts.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    try:
        return ts.astimezone(timezone.utc)
    except OverflowError as exc:  # 9999-12-31T23:59:59-23:59 is past year 9999 in UTC
        raise ValueError(f"{text!r} is out of the representable range") from exc


def default_expiry(created: datetime, days: int = DEFAULT_VALID_DAYS) -> datetime:
    return created + timedelta(days=days)


def safe_member_path(name: str) -> bool:
    """True for a relative POSIX path of plain parts ([A-Za-z0-9._-], no '.', '..', '\\', ':', '/x')."""
    if not name or len(name) > 255 or name.startswith("/") or name.endswith("/"):
        return False
    parts = name.split("/")
    return all(_PART_RE.fullmatch(p) and p not in (".", "..") for p in parts)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass
class Manifest:
    """A parsed manifest.json. `raw` keeps the exact dict that was signed."""

    name: str
    version: int
    created: str
    expires: str
    format: str
    dtype: str
    model: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    files: dict[str, FileEntry]
    device: str | None = None
    workload: str | None = None
    preprocessing: Any = None
    report: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, Any] | None = None
    trainable_head: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def expires_at(self) -> datetime:
        return parse_iso(self.expires)

    @property
    def created_at(self) -> datetime:
        return parse_iso(self.created)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "expires": self.expires,
            "format": self.format,
            "dtype": self.dtype,
            "device": self.device,
            "workload": self.workload,
            "model": self.model,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "preprocessing": self.preprocessing,
            "report": self.report,
            "files": {p: {"sha256": e.sha256, "size": e.size} for p, e in sorted(self.files.items())},
            "samples": self.samples,
            "trainable_head": self.trainable_head,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST) -> Manifest:
        """Validate and parse; raises MalformedManifestError naming the field."""
        check = _Checker(data, where)
        fv = check.int_("format_version", minimum=1)
        if fv != FORMAT_VERSION:
            raise MalformedManifestError(
                f"{where}: format_version {fv} is not supported (this reads {FORMAT_VERSION})"
            )
        name = check.str_("name")
        if not _NAME_RE.fullmatch(name):
            raise MalformedManifestError(f"{where}: name {name!r} must match {_NAME_RE.pattern}")
        files = check.files()
        model = check.str_("model")
        if model not in files:
            raise MalformedManifestError(f"{where}: model file {model!r} is not listed in files")
        fmt = check.str_("format")
        if fmt not in FORMATS:
            raise MalformedManifestError(f"{where}: format {fmt!r} must be one of {list(FORMATS)}")
        samples = check.optional_dict("samples")
        if samples is not None and samples.get("path") not in files:
            raise MalformedManifestError(
                f"{where}: samples.path {samples.get('path')!r} is not listed in files"
            )
        return cls(
            format_version=fv,
            name=name,
            version=check.int_("version", minimum=0),
            created=check.time("created"),
            expires=check.time("expires"),
            format=fmt,
            dtype=check.str_("dtype"),
            model=model,
            inputs=check.specs("inputs"),
            outputs=check.specs("outputs"),
            files=files,
            device=check.optional_str("device"),
            workload=check.optional_str("workload"),
            preprocessing=data.get("preprocessing"),
            report=check.optional_dict("report") or {},
            samples=samples,
            trainable_head=check.optional_dict("trainable_head"),
            extra=check.optional_dict("extra") or {},
            raw=data,
        )


class _Checker:
    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise MalformedManifestError(f"{where}: manifest must be a JSON object")
        self.data, self.where = data, where

    def _fail(self, key: str, what: str) -> MalformedManifestError:
        return MalformedManifestError(f"{self.where}: field {key!r} {what}")

    def _get(self, key: str) -> Any:
        if key not in self.data:
            raise self._fail(key, "is missing")
        return self.data[key]

    def str_(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str) or not value:
            raise self._fail(key, "must be a non-empty string")
        return value

    def int_(self, key: str, minimum: int) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_INT:
            raise self._fail(key, f"must be an integer in [{minimum}, 2**63), got {str(value)[:40]}")
        return value

    def time(self, key: str) -> str:
        value = self.str_(key)
        try:
            parse_iso(value)
        except ValueError as exc:
            raise self._fail(key, f"is not an ISO 8601 UTC time ({exc})") from exc
        return value

    def optional_str(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, str):
            raise self._fail(key, "must be a string or null")
        return value

    def optional_dict(self, key: str) -> dict[str, Any] | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, dict):
            raise self._fail(key, "must be an object or null")
        return value

    def specs(self, key: str) -> list[TensorSpec]:
        value = self._get(key)
        if not isinstance(value, list) or not value:
            raise self._fail(key, "must be a non-empty list of tensor specs")
        try:
            return [TensorSpec.from_dict(v) for v in value]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # AttributeError: a spec that is not an object
            raise self._fail(key, f"holds an invalid tensor spec ({exc!r})") from exc

    def files(self) -> dict[str, FileEntry]:
        value = self._get("files")
        if not isinstance(value, dict) or not value:
            raise self._fail("files", "must be a non-empty object of path -> {sha256, size}")
        out = {}
        for path, entry in value.items():
            if not isinstance(entry, dict):
                raise self._fail("files", f"entry {path!r} must be an object")
            sha, size = entry.get("sha256"), entry.get("size")
            if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
                raise self._fail("files", f"entry {path!r} needs a lowercase hex sha256")
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_INT:
                raise self._fail("files", f"entry {path!r} needs an integer size >= 0")
            out[path] = FileEntry(sha, size)
        return out
