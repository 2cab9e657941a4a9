"""FL control messages (JSON, `schema` field) and their checks, plus the task payload format.

announce  cloud -> group   {"schema": "pf.fl.announce/1", task, round, attempt, model_version, state,
                            checkin_deadline, deadline}         state: "checkin" | "training" | "finished"
checkin   device -> cloud  {"schema": "pf.fl.checkin/1", task, round, attempt, device, num_samples}
task      cloud -> device  safetensors global weights; header {"schema": "pf.fl.task/1", task, round,
                            attempt, model_version, deadline, config}
update    device -> cloud  safetensors update (codecs.py), header schema "pf.fl.update/1"
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from .errors import MalformedUpdateError

ANNOUNCE = "pf.fl.announce/1"
CHECKIN = "pf.fl.checkin/1"
TASK = "pf.fl.task/1"
MAX_CONTROL_BYTES = 64 * 1024
ROUND_STATES = ("checkin", "training", "finished", "failed")


MAX_INT = 2**63 - 1  # what the round store's SQLite INTEGER columns hold


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_INT


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _name(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 64 and all(c.isalnum() or c in "._-" for c in v)


_FIELDS: dict[str, dict[str, Any]] = {
    ANNOUNCE: {"task": _name, "round": _int, "attempt": _int, "model_version": _int,
               "state": lambda v: v in ROUND_STATES, "checkin_deadline": _num, "deadline": _num},
    CHECKIN: {"task": _name, "round": _int, "attempt": _int, "device": _name, "num_samples": _int},
    TASK: {"task": _name, "round": _int, "attempt": _int, "model_version": _int, "deadline": _num,
           "config": lambda v: isinstance(v, dict)},
}


def check(msg: Any, schema: str) -> dict[str, Any]:
    """Validate a decoded message against `schema`; MalformedUpdateError names the bad field."""
    if not isinstance(msg, dict):
        raise MalformedUpdateError(f"{schema}: message must be a JSON object")
    if msg.get("schema") != schema:
        raise MalformedUpdateError(f"expected schema {schema!r}, got {msg.get('schema')!r}")
    for key, test in _FIELDS[schema].items():
        if key not in msg or not test(msg[key]):
            raise MalformedUpdateError(f"{schema}: field {key!r} is missing or invalid ({msg.get(key)!r:.60})")
    return msg


def encode(schema: str, **fields: Any) -> bytes:
    msg = check({"schema": schema, **fields}, schema)
    raw = json.dumps(msg, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    if len(raw) > MAX_CONTROL_BYTES:
        raise MalformedUpdateError(f"{schema}: {len(raw)} bytes, above {MAX_CONTROL_BYTES}")
    return raw


def decode(payload: bytes, schema: str) -> dict[str, Any]:
    if len(payload) > MAX_CONTROL_BYTES:
        raise MalformedUpdateError(f"{schema}: {len(payload)} bytes, above {MAX_CONTROL_BYTES}")
    try:
        msg = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: also a 5000-digit integer
        raise MalformedUpdateError(f"{schema}: not UTF-8 JSON ({exc})") from exc
    return check(msg, schema)


def message(schema: str, **fields: Any) -> dict[str, Any]:
    return check({"schema": schema, **fields}, schema)


def key(msg: Mapping[str, Any]) -> tuple[str, int, int]:
    return str(msg["task"]), int(msg["round"]), int(msg["attempt"])
