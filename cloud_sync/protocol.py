"""The pocketfleet MQTT protocol (torch-free): topics, message schemas, size limits, binary chunk frames.

Every control message is a JSON object with a `schema` field naming its type and major version
("pf.status/1"). `encode` validates outgoing messages and `decode` validates incoming ones against the
same tables, so a message that leaves one side is exactly what the other side accepts. Bulk bytes
(artifact chunks and chunk indexes) travel as binary frames: a fixed 32-byte header, then the bytes.
The human description of all of this is docs/protocol.md; keep the two in step.
"""

from __future__ import annotations

import json
import math
import re
import struct
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cloud_sync.errors import ProtocolError

ROOT = "pf/v1"
PROTOCOL_VERSION = 1

# Size limits (bytes). A message above its limit is dropped and counted before it is parsed.
MAX_CONTROL_BYTES = 64 * 1024
MAX_OUTBOX_BYTES = 256 * 1024
MAX_CHUNK_BYTES = 1 << 20
MAX_INDEX_BYTES = 1 << 20
MAX_REQUEST_IDX = 64
MAX_ID_LEN = 64

# Device -> cloud and cloud -> device leaves under pf/v1/dev/<device>/.
DEVICE_PUBLISHES = ("status", "ota", "req", "telemetry", "fl/up")
DEVICE_RECEIVES = ("cmd", "chunk", "fl/down")

# always used with fullmatch: `$` alone would accept a trailing newline ("dev-a\n")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEX16_RE = re.compile(r"[0-9a-f]{16}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# every integer on the wire fits a signed 64-bit SQLite column; larger ones are refused as malformed
INT_MIN, INT_MAX = -(2**63), 2**63 - 1

OTA_STATES = (
    "accepted",  # update command validated, job created
    "downloading",  # fetching index / chunks (progress attached)
    "installed",  # verified, installed and health-checked by the store; probe attached when asked
    "failed",  # could not complete (error says why); the device keeps its previous version
    "refused",  # not attempted: replay/older version, unsigned rollback, oversized, expired command
    "rolled_back",  # reverted after a rollback command (or was never switched): active names the version
)


# ------------------------------------------------------------------------------------------------ topics


def valid_id(value: Any) -> bool:
    """Device ids, group names and worker ids: [A-Za-z0-9][A-Za-z0-9_.-]{0,63} (no MQTT wildcards or '/')."""
    return isinstance(value, str) and bool(_ID_RE.fullmatch(value))


def check_id(value: Any, what: str) -> str:
    if not valid_id(value):
        raise ProtocolError(f"{what} {value!r} must match {_ID_RE.pattern}")
    return value


def dev_topic(device: str, leaf: str) -> str:
    """pf/v1/dev/<device>/<leaf>."""
    return f"{ROOT}/dev/{check_id(device, 'device id')}/{leaf}"


def group_topic(group: str, leaf: str) -> str:
    """pf/v1/grp/<group>/<leaf> (cloud -> every device of a group; reserved for federated rounds)."""
    return f"{ROOT}/grp/{check_id(group, 'group')}/{leaf}"


def multicast_topic(group: str, release_id: str) -> str:
    """pf/v1/grp/<group>/ota/<release_id>: the chunks of a release the cloud sends once to every device of a
    group that is downloading it (devices may only read their group's topics; each chunk is still verified
    against the chunk index named in the device's own update command)."""
    return group_topic(group, f"ota/{check_hex16(release_id, 'release id')}")


def check_hex16(value: Any, what: str) -> str:
    if not _hex16(value):
        raise ProtocolError(f"{what} {value!r} must be 16 lowercase hex digits")
    return value


def is_multicast_topic(topic: Any, release_id: str) -> bool:
    """True for pf/v1/grp/<valid group>/ota/<release_id> (what a device accepts to subscribe to)."""
    if not isinstance(topic, str):
        return False
    parts = topic.split("/")
    return (len(parts) == 6 and f"{parts[0]}/{parts[1]}" == ROOT and parts[2] == "grp" and valid_id(parts[3])
            and parts[4] == "ota" and parts[5] == release_id)


def dev_filter(leaf: str, share: str | None = None) -> str:
    """The cloud's filter for a device leaf: pf/v1/dev/+/<leaf>, as an MQTT 5 shared subscription if asked."""
    base = f"{ROOT}/dev/+/{leaf}"
    return f"$share/{check_id(share, 'shared group')}/{base}" if share else base


def parse_dev_topic(topic: str) -> tuple[str, str]:
    """(device, leaf) of a pf/v1/dev/<device>/<leaf> topic; ProtocolError for anything else."""
    prefix = f"{ROOT}/dev/"
    if not topic.startswith(prefix):
        raise ProtocolError(f"topic {topic!r} is not under {prefix}")
    device, _, leaf = topic[len(prefix) :].partition("/")
    if not valid_id(device) or not leaf:
        raise ProtocolError(f"topic {topic!r} does not name a valid device and leaf")
    return device, leaf


# ----------------------------------------------------------------------------------------------- schemas


@dataclass(frozen=True)
class Field:
    """One field of a message: accepted JSON kinds, required or not, an optional check or sub-schema."""

    kinds: tuple[str, ...]
    required: bool = True
    check: Callable[[Any], bool] | None = None
    what: str = ""
    sub: Mapping[str, Field] | None = None


_KIND_TESTS: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool) and INT_MIN <= v <= INT_MAX,
    "num": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    and (isinstance(v, float) or INT_MIN <= v <= INT_MAX),
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
    "any": lambda v: True,
}


def _f(*kinds: str, required: bool = True, check: Callable[[Any], bool] | None = None, what: str = "",
       sub: Mapping[str, Field] | None = None) -> Field:
    return Field(tuple(kinds), required, check, what, sub)


def _nonneg(v: Any) -> bool:
    return v >= 0


def _hex16(v: Any) -> bool:
    return bool(_HEX16_RE.fullmatch(v))


def _hex64(v: Any) -> bool:
    return bool(_HEX64_RE.fullmatch(v))


def _short(v: Any) -> bool:
    return len(v) <= 512


_MODEL_REF = {"name": _f("str", check=lambda v: bool(_NAME_RE.fullmatch(v)), what="a model name"),
              "version": _f("int", check=_nonneg, what=">= 0")}
_CHUNKING = {
    "algo": _f("str", check=lambda v: v == "gear32", what="'gear32'"),
    "min": _f("int", check=lambda v: 64 <= v <= MAX_CHUNK_BYTES, what=f"in [64, {MAX_CHUNK_BYTES}]"),
    "avg": _f("int", check=lambda v: 256 <= v <= MAX_CHUNK_BYTES, what=f"in [256, {MAX_CHUNK_BYTES}]"),
    "max": _f("int", check=lambda v: 1024 <= v <= MAX_CHUNK_BYTES, what=f"in [1024, {MAX_CHUNK_BYTES}]"),
}
_RELEASE = {
    "release_id": _f("str", check=_hex16, what="16 lowercase hex digits"),
    **_MODEL_REF,
    "size": _f("int", check=lambda v: v > 0, what="> 0"),
    "sha256": _f("str", check=_hex64, what="64 lowercase hex digits"),
    "chunks": _f("int", check=lambda v: v > 0, what="> 0"),
    "index_sha256": _f("str", check=_hex64, what="64 lowercase hex digits"),
    "index_size": _f("int", check=lambda v: 0 < v <= MAX_INDEX_BYTES, what=f"in (0, {MAX_INDEX_BYTES}]"),
    "chunking": _f("dict", sub=_CHUNKING),
    "rollback_auth": _f("str", "null", required=False, check=lambda v: len(v) <= 4096, what="<= 4096 chars"),
}
_PROGRESS = {
    "have": _f("int", check=_nonneg), "total": _f("int", check=_nonneg),
    "bytes_rx": _f("int", check=_nonneg), "bytes_reused": _f("int", check=_nonneg),
    "refetched": _f("int", check=_nonneg, required=False),
}
_PROBE = {
    "requests": _f("int", check=_nonneg), "errors": _f("int", check=_nonneg),
    "p95_ms": _f("num", check=_nonneg), "golden": _f("num", "null", required=False),
    "golden_kind": _f("str", "null", required=False),
}
_COMMON = {"schema": _f("str")}

SCHEMAS: dict[str, dict[str, Field]] = {
    # device -> pf/v1/dev/<id>/status (retained; also the last will with online=false)
    "pf.status/1": {
        **_COMMON,
        "device": _f("str", check=valid_id, what="a device id"),
        "online": _f("bool"),
        "ts": _f("num"),
        "seq": _f("int", check=_nonneg),
        "conn": _f("str", required=False, check=_hex16, what="16 lowercase hex digits"),
        "group": _f("str", "null", required=False, check=valid_id, what="a group name"),
        "active": _f("dict", "null", required=False, sub=_MODEL_REF),
        "models": _f("dict", required=False, check=lambda v: len(v) <= 64 and all(
            _KIND_TESTS["int"](x) for x in v.values()), what="model name -> version"),
        "ota": _f("dict", "null", required=False),
        "agent": _f("str", "null", required=False, check=_short),
        "proto": _f("int", required=False),
        "reason": _f("str", "null", required=False, check=_short),
    },
    # cloud -> pf/v1/dev/<id>/cmd
    "pf.cmd.update/1": {
        **_COMMON,
        "cmd_id": _f("str", check=_hex16, what="16 lowercase hex digits"),
        "rollout_id": _f("str", check=_hex16, what="16 lowercase hex digits"),
        "phase": _f("str", check=lambda v: v in ("canary", "main"), what="'canary' or 'main'"),
        "issued": _f("num"),
        "expires": _f("num"),
        "release": _f("dict", sub=_RELEASE),
        "probe": _f("dict", "null", required=False),
        "multicast": _f("str", "null", required=False, check=lambda v: len(v) <= 256, what="<= 256 chars"),
    },
    "pf.cmd.rollback/1": {
        **_COMMON,
        "cmd_id": _f("str", check=_hex16, what="16 lowercase hex digits"),
        "rollout_id": _f("str", check=_hex16, what="16 lowercase hex digits"),
        "release_id": _f("str", check=_hex16, what="16 lowercase hex digits"),
        **_MODEL_REF,
        "issued": _f("num"),
        "expires": _f("num"),
    },
    # device -> pf/v1/dev/<id>/req
    "pf.chunk.request/1": {
        **_COMMON,
        "release_id": _f("str", check=_hex16, what="16 lowercase hex digits"),
        "index": _f("bool", required=False),
        "again": _f("bool", required=False),
        "mc": _f("bool", required=False),
        "idx": _f("list", check=lambda v: len(v) <= MAX_REQUEST_IDX
                  and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**32 for i in v),
                  what=f"a list of at most {MAX_REQUEST_IDX} chunk indexes"),
    },
    # device -> pf/v1/dev/<id>/ota
    "pf.ota.report/1": {
        **_COMMON,
        "device": _f("str", check=valid_id, what="a device id"),
        "seq": _f("int", check=_nonneg),
        "ts": _f("num"),
        "state": _f("str", check=lambda v: v in OTA_STATES, what=f"one of {list(OTA_STATES)}"),
        "rollout_id": _f("str", "null", check=_hex16, what="16 lowercase hex digits"),
        "release_id": _f("str", "null", check=_hex16, what="16 lowercase hex digits"),
        "active": _f("dict", "null", sub=_MODEL_REF),
        "progress": _f("dict", "null", required=False, sub=_PROGRESS),
        "probe": _f("dict", "null", required=False, sub=_PROBE),
        "error": _f("str", "null", required=False, check=lambda v: len(v) <= 2000, what="<= 2000 chars"),
    },
    # device -> pf/v1/dev/<id>/telemetry (and fl/up): one durable outbox record
    "pf.outbox/1": {
        **_COMMON,
        "device": _f("str", check=valid_id, what="a device id"),
        "id": _f("int", "str", check=lambda v: not isinstance(v, str) or 0 < len(v) <= 128, what="1..128 chars"),
        "kind": _f("str", check=lambda v: 0 < len(v) <= 64, what="1..64 chars"),
        "created": _f("num"),
        "body": _f("any"),
    },
}

_LIMITS = {"pf.outbox/1": MAX_OUTBOX_BYTES}


def _validate(obj: Mapping[str, Any], spec: Mapping[str, Field], where: str) -> None:
    for key, field in spec.items():
        if key not in obj:
            if field.required:
                raise ProtocolError(f"{where}: field {key!r} is missing")
            continue
        value = obj[key]
        if not any(_KIND_TESTS[k](value) for k in field.kinds):
            raise ProtocolError(f"{where}: field {key!r} must be {'/'.join(field.kinds)} (integers within signed "
                                f"64 bits), got {type(value).__name__} {_short_repr(value)}")
        if value is None:
            continue
        if field.check is not None and not field.check(value):
            raise ProtocolError(f"{where}: field {key!r} must be {field.what or 'valid'}, got {value!r:.80}")
        if field.sub is not None and isinstance(value, dict):
            _validate(value, field.sub, f"{where}.{key}")


def _short_repr(value: Any) -> str:
    if isinstance(value, int):
        return f"of {value.bit_length()} bits" if abs(value) > 2**64 else str(value)
    return f"{value!r:.40}"


def validate(msg: Mapping[str, Any]) -> str:
    """Check a decoded message against its schema; returns the schema name."""
    schema = msg.get("schema")
    spec = SCHEMAS.get(schema) if isinstance(schema, str) else None
    if spec is None:
        raise ProtocolError(f"unknown schema {schema!r} (known: {sorted(SCHEMAS)})")
    _validate(msg, spec, schema)
    return schema


def encode(schema: str, **fields: Any) -> bytes:
    """Serialize a control message (compact UTF-8 JSON), validating it first."""
    msg = {"schema": schema, **fields}
    validate(msg)
    raw = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode("utf-8")
    limit = _LIMITS.get(schema, MAX_CONTROL_BYTES)
    if len(raw) > limit:
        raise ProtocolError(f"{schema}: message is {len(raw)} bytes, above the {limit}-byte limit")
    return raw


def decode(payload: bytes, accept: tuple[str, ...]) -> dict[str, Any]:
    """Parse and validate an incoming control message whose schema must be one of `accept`."""
    limit = max(_LIMITS.get(s, MAX_CONTROL_BYTES) for s in accept)
    if len(payload) > limit:
        raise ProtocolError(f"message is {len(payload)} bytes, above the {limit}-byte limit")
    try:
        msg = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: also a 5000-digit integer
        raise ProtocolError(f"message is not UTF-8 JSON ({exc})") from exc
    if not isinstance(msg, dict):
        raise ProtocolError("message must be a JSON object")
    schema = validate(msg)
    if schema not in accept:
        raise ProtocolError(f"schema {schema!r} is not accepted on this topic (expected {list(accept)})")
    return msg


# ---------------------------------------------------------------------------------------- binary frames

FRAME_MAGIC = b"PFCK"
FRAME_VERSION = 1
FRAME_CHUNK = 0
FRAME_INDEX = 1
_HEADER = struct.Struct(">4sBBH8sIQI")  # magic, version, kind, reserved, release id, idx, offset, length
HEADER_BYTES = _HEADER.size  # 32
MAX_FRAME_BYTES = HEADER_BYTES + max(MAX_CHUNK_BYTES, MAX_INDEX_BYTES)


@dataclass(frozen=True)
class Frame:
    kind: int
    release_id: str
    idx: int
    offset: int
    data: bytes | memoryview


def encode_frame(kind: int, release_id: str, idx: int, offset: int, data: bytes) -> bytes:
    """A chunk (kind 0) or chunk-index (kind 1) frame: 32-byte header + data."""
    if not _hex16(release_id):
        raise ProtocolError(f"release id {release_id!r} must be 16 lowercase hex digits")
    limit = MAX_CHUNK_BYTES if kind == FRAME_CHUNK else MAX_INDEX_BYTES
    if len(data) > limit:
        raise ProtocolError(f"frame data is {len(data)} bytes, above the {limit}-byte limit")
    header = _HEADER.pack(FRAME_MAGIC, FRAME_VERSION, kind, 0, bytes.fromhex(release_id), idx, offset, len(data))
    return header + data


def decode_frame(payload: bytes) -> Frame:
    """Parse a frame; ProtocolError when the header is bad or the length does not match."""
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame is {len(payload)} bytes, above the {MAX_FRAME_BYTES}-byte limit")
    if len(payload) < HEADER_BYTES:
        raise ProtocolError(f"frame is {len(payload)} bytes, shorter than its {HEADER_BYTES}-byte header")
    magic, version, kind, _, rid, idx, offset, length = _HEADER.unpack_from(payload)
    if magic != FRAME_MAGIC or version != FRAME_VERSION:
        raise ProtocolError(f"frame has magic {magic!r} version {version}, expected {FRAME_MAGIC!r} v{FRAME_VERSION}")
    if kind not in (FRAME_CHUNK, FRAME_INDEX):
        raise ProtocolError(f"frame kind {kind} is unknown")
    if length != len(payload) - HEADER_BYTES:
        raise ProtocolError(f"frame header says {length} bytes, it carries {len(payload) - HEADER_BYTES}")
    return Frame(kind, rid.hex(), idx, offset, memoryview(payload)[HEADER_BYTES:])


# --------------------------------------------------------------------------------------------- counters


class Counters:
    """Thread-safe named counters (received, malformed, dropped, ...): every loss is counted somewhere.

    Calling the object (`cloud.counters()`) gives a snapshot dict, as `snapshot()` does.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._c[name] += n

    def get(self, name: str) -> int:
        with self._lock:
            return self._c[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)

    def __call__(self) -> dict[str, int]:
        return self.snapshot()
