"""Reading step configurations (QuantConfig, PruneConfig, DistillConfig, ...) from plain dicts."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], data: dict[str, Any] | None, what: str, error: type[Exception]) -> T:
    """`cls(**data)` after refusing unknown keys (`error`, naming them and the known ones), then validated."""
    data = dict(data or {})
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(f"{what}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    obj = cls(**data)
    obj.validate()  # type: ignore[attr-defined]
    return obj
