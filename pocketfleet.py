"""pocketfleet: the `pocketfleet` command and the error type shared by every package.

Each package contributes its subcommands through a `cli.register(subparsers)` function that only
builds argparse parsers; the handlers import their heavy dependencies (torch, onnxruntime, ...)
when they run, so `pocketfleet agent ...` works on a device with only the `agent` extra.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

__version__ = "0.1.0"

_CLI_MODULES = ("compress.cli", "export.cli", "devices.cli", "edge_agent.cli", "cloud_sync.cli")


class PocketfleetError(Exception):
    """An error the user can act on: printed as one line, never as a traceback."""

    exit_code = 2


def lazy_exports(
    package: str, exports: dict[str, str], modules: Sequence[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for a package `__init__` that re-exports names without importing
    their modules up front (so `import edge_agent` never pulls in onnxruntime, nor `compress` torch).

    `exports`: name -> module, absolute ("edge_agent.daemon") or relative to `package` ("modeldir"),
    optionally "module:attribute" when the exported name differs. `modules`: names that are submodules
    of `package`, returned as modules.
    """
    root = package.split(".")[0]

    def getattr_(name: str) -> Any:
        if name in modules:
            value = importlib.import_module(f"{package}.{name}")
        elif name in exports:
            module, _, attr = exports[name].partition(":")
            absolute = module == root or module.startswith(root + ".")
            value = getattr(importlib.import_module(module if absolute else f"{package}.{module}"), attr or name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def dir_() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports) | set(modules))

    return getattr_, dir_


def callable_package(package: str, fn: Callable[..., Any]) -> None:
    """Make `import pkg; pkg(...)` call `fn` while `pkg` stays the package (`compress.quantize(...)`)."""

    class _CallablePackage(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

    sys.modules[package].__class__ = _CallablePackage


def emit(result: Any, as_json: bool, render: Callable[[Any], str] | None = None) -> None:
    """Print a command's result: one JSON document with --json, else the human rendering."""
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        print(render(result) if render else json.dumps(result, indent=2, default=str))


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Render dict rows as a plain aligned text table."""
    if not rows:
        return "(none)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pocketfleet",
        description="Compress PyTorch models for edge devices, ship them as signed packages, "
        "serve them offline and sync a fleet over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"pocketfleet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _CLI_MODULES:
        importlib.import_module(name).register(subparsers)
    importlib.import_module("cloud_sync.demo").register(subparsers)  # the demo composes every package
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except PocketfleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        print(
            f"error: this command needs the Python package '{exc.name}', which is not installed; "
            "install the workstation extra with: pip install 'pocketfleet[all]'",
            file=sys.stderr,
        )
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
