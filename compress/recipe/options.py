"""Typed parsing of TOML tables into dataclass configs, naming the field path of every problem.

The expected type of each field comes from the dataclass annotations (bool, int, float, str, list[...],
dict[str, ...], unions such as `float | None`); the value ranges are checked by the config's own
`validate()`, whose message is re-addressed to the recipe's field path.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from pocketfleet import PocketfleetError

from .errors import RecipeError

T = TypeVar("T")
Extra = Mapping[str, Any]  # recipe-only option name -> type hint


def check_type(value: Any, hint: Any, path: str) -> Any:
    """`value` if it has type `hint` (ints accepted and converted for floats), else RecipeError at `path`."""
    if hint is Any or hint is object:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        for arm in arms:
            try:
                return check_type(value, arm, path)
            except RecipeError:
                continue
        raise RecipeError(f"expected {describe(hint)}, got {_show(value)}", path)
    if origin is typing.Literal:
        if value in args:
            return value
        raise RecipeError(f"expected one of {list(args)}, got {_show(value)}", path)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple) or hint in (list, tuple):
        if isinstance(value, list):
            item = args[0] if args else Any
            return [check_type(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            item = args[1] if len(args) == 2 else Any
            return {k: check_type(v, item, f"{path}.{k}") for k, v in value.items()}
    else:  # pragma: no cover - a config field of a type this parser does not know
        raise TypeError(f"unsupported option type {hint!r} at {path}")
    raise RecipeError(f"expected {describe(hint)}, got {_show(value)}", path)


def describe(hint: Any) -> str:
    """English name of a type hint: "a number", "a list of strings", "a number or a string"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None))
    if origin is typing.Literal:
        return f"one of {list(args)}"
    if origin in (list, tuple):
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict:
        return f"a table of {_plural(args[1])}" if len(args) == 2 else "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _plural(hint: Any) -> str:
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(hint, describe(hint))


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return "an array of tables"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fields_of(cls: type) -> dict[str, Any]:
    """Field name -> resolved type hint of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def check_keys(table: Mapping[str, Any], known: typing.Iterable[str], path: str) -> None:
    """RecipeError naming the first key of `table` that is not in `known`."""
    allowed = list(known)
    for key in table:
        if key not in allowed:
            raise RecipeError(f"unknown key; known keys: {', '.join(sorted(allowed))}", _join(path, key))


def require_table(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecipeError(f"expected a table, got {_show(value)}", path)
    return value


def parse_config(
    cls: type[T],
    table: Mapping[str, Any],
    path: str,
    extra: Extra | None = None,
    excluded: Mapping[str, str] | None = None,
    ignore: typing.Iterable[str] = (),
) -> tuple[T, dict[str, Any]]:
    """(config of `cls` from `table`, values of the recipe-only `extra` options).

    `excluded` maps config fields a recipe may not set to the reason; keys in `ignore` (e.g. `type`) are
    skipped. Ranges are checked by `cls.validate()` when it exists; its error names `path.<field>`.
    """
    extra, excluded = dict(extra or {}), dict(excluded or {})
    hints = {k: v for k, v in fields_of(cls).items() if k not in excluded}
    values: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    skip = set(ignore)
    for key, value in table.items():
        if key in skip:
            continue
        field_path = _join(path, key)
        if key in excluded:
            raise RecipeError(excluded[key], field_path)
        if key in hints:
            values[key] = check_type(value, hints[key], field_path)
        elif key in extra:
            extras[key] = check_type(value, extra[key], field_path)
        else:
            known = sorted(set(hints) | set(extra) | skip)
            raise RecipeError(f"unknown key; known keys: {', '.join(known)}", field_path)
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        try:
            validate()
        except PocketfleetError as exc:
            raise config_error(str(exc), path, hints) from None
    return config, extras


# "PruneConfig.ratio must be ...", "quantize.mode must be ...", "SparsityConfig: schedule ... needs ..."
_FIELD_MESSAGE = re.compile(r"^\w+\.(?P<field>\w+)(?P<sub>\[[^\]]*\])?:?\s+(?P<rest>.*)$", re.S)
_CLASS_MESSAGE = re.compile(r"^[A-Z]\w*:\s+(?P<rest>.*)$", re.S)


def config_error(message: str, path: str, fields: Mapping[str, Any]) -> RecipeError:
    """A config's validation message re-addressed to the recipe field it is about."""
    m = _FIELD_MESSAGE.match(message)
    if m and m.group("field") in fields:
        return RecipeError(m.group("rest"), _join(path, m.group("field")) + (m.group("sub") or ""))
    m = _CLASS_MESSAGE.match(message)
    return RecipeError(m.group("rest") if m else message, path)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
