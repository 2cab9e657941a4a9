"""Typed loading of TOML into dataclass configs, naming the file and field path of every problem.

One parser for every config of the project (agent, cloud, MQTT, recipes, device profiles, the step
configs of compress): the expected type of each field comes from the dataclass annotations (bool, int,
float, str, list[...], dict[str, ...], unions such as `float | None`, Literal); value ranges are checked by
the config's own `validate()` (or `check()`), whose message is re-addressed to the field path.

    cfg = from_table(AgentConfig, load_toml("agent.toml"), file="agent.toml", base=Path("/etc/pf"))
    # ConfigError: agent.toml: max_batch: expected an integer, got '32'
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pocketfleet.errors import PocketfleetError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

T = TypeVar("T")
Extra = Mapping[str, Any]  # recipe-only option name -> type hint
_BIG = 2**63  # TOML integers are 64-bit; a larger number from JSON or Python is refused


class ConfigError(PocketfleetError):
    """A config that cannot be used: `{file}: {path}: {problem}` (e.g. `r.toml: steps[1].ratio: ...`)."""

    def __init__(self, problem: str, path: str = "", file: str | Path | None = None) -> None:
        self.problem, self.path, self.file = problem, path, str(file) if file is not None else None
        where = ": ".join(p for p in (self.file, path) if p)
        super().__init__(f"{where}: {problem}" if where else problem)

    def at(self, file: str | Path | None = None, prefix: str = "") -> ConfigError:
        """The same problem (same class) addressed to `prefix.path` in `file`."""
        return type(self)(self.problem, _join(prefix, self.path), file if file is not None else self.file)


def load_toml(path: str | Path, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """Parse a TOML file; an unreadable file or bad TOML is one `error` naming the file."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"cannot read config: {exc.strerror or exc}", file=path) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(f"not valid TOML ({exc})", file=path) from None


def loads_toml(text: str, file: str | Path | None = None, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"not valid TOML ({exc})", file=file) from None


def check_type(value: Any, hint: Any, path: str) -> Any:
    """`value` if it has type `hint` (ints accepted and converted for floats), else ConfigError at `path`."""
    if hint is Any or hint is object:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        for arm in arms:
            try:
                return check_type(value, arm, path)
            except ConfigError:
                continue
        raise ConfigError(f"expected {describe(hint)}, got {_show(value)}", path)
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"expected one of {list(args)}, got {_show(value)}", path)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if -_BIG <= value < _BIG:
                return value
            raise ConfigError(f"expected an integer of at most 64 bits, got {_show(value)}", path)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple) or hint in (list, tuple):
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            return [check_type(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            key, item = args if len(args) == 2 else (Any, Any)
            allowed = typing.get_args(key) if typing.get_origin(key) is typing.Literal else None
            for k in value:
                if allowed is not None and k not in allowed:
                    raise ConfigError(f"unknown key; known keys: {', '.join(map(str, allowed))}", _join(path, k))
            return {k: check_type(v, item, f"{path}.{k}") for k, v in value.items()}
    else:  # pragma: no cover - a config field of a type this parser does not know
        raise TypeError(f"unsupported option type {hint!r} at {path}")
    raise ConfigError(f"expected {describe(hint)}, got {_show(value)}", path)


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
            raise ConfigError(f"unknown key; known keys: {', '.join(sorted(allowed))}", _join(path, key))


def require_table(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"expected a table, got {_show(value)}", path)
    return value


def parse_config(
    cls: type[T],
    table: Mapping[str, Any],
    path: str,
    extra: Extra | None = None,
    excluded: Mapping[str, str] | None = None,
    ignore: typing.Iterable[str] = (),
) -> tuple[T, dict[str, Any]]:
    """(config of `cls` from `table`, values of the caller-only `extra` options).

    `excluded` maps config fields a caller may not set to the reason; keys in `ignore` (e.g. `type`) are
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
            raise ConfigError(excluded[key], field_path)
        if key in hints:
            values[key] = check_type(value, hints[key], field_path)
        elif key in extra:
            extras[key] = check_type(value, extra[key], field_path)
        else:
            known = sorted(set(hints) | set(extra) | skip)
            raise ConfigError(f"unknown key; known keys: {', '.join(known)}", field_path)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f.name
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.init and name not in values:
            raise ConfigError("missing; this field is required", _join(path, name))
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


def config_error(message: str, path: str, fields: Mapping[str, Any]) -> ConfigError:
    """A config's validation message re-addressed to the recipe field it is about."""
    m = _FIELD_MESSAGE.match(message)
    if m and m.group("field") in fields:
        return ConfigError(m.group("rest"), _join(path, m.group("field")) + (m.group("sub") or ""))
    m = _CLASS_MESSAGE.match(message)
    return ConfigError(m.group("rest") if m else message, path)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def from_table(
    cls: type[T],
    table: Mapping[str, Any] | None,
    path: str = "",
    *,
    file: str | Path | None = None,
    base: Path | None = None,
    path_fields: Iterable[str] = (),
    error: type[ConfigError] = ConfigError,
) -> T:
    """A dataclass `cls` from one TOML table: unknown keys, wrong types and failed checks are one `error`
    naming `file` and the field path. String fields in `path_fields` are file paths resolved against `base`
    (the config file's folder) when relative."""
    try:
        config, _ = parse_config(cls, require_table(table or {}, path), path)
    except ConfigError as exc:
        raise error(exc.problem, exc.path, file) from None
    if base is not None:
        for name in path_fields:
            value = getattr(config, name, None)
            if isinstance(value, str) and value:
                resolved = Path(value).expanduser()
                setattr(config, name, str(resolved if resolved.is_absolute() else base / resolved))
    return config


def config_from_dict(cls: type[T], data: Mapping[str, Any] | None, what: str, error: type[Exception]) -> T:
    """`cls(**data)` for a Python-API config dict (values already typed by the caller): unknown keys are one
    `error` naming them and the known ones; then the config's own `validate()`."""
    data = dict(data or {})
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(f"{what}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    obj = cls(**data)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj
