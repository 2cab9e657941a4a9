"""The `pocketfleet` command (the composition root: nothing imports this module).

Each package contributes its subcommands through a `cli.register(subparsers)` function that only
builds argparse parsers; the handlers import their heavy dependencies (torch, onnxruntime, ...)
when they run, so `pocketfleet agent ...` works on a device with only the `agent` extra.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pocketfleet import PocketfleetError, __version__

_CLI_MODULES = ("compress.cli", "export.cli", "devices.cli", "edge_agent.cli", "cloud_sync.cli")


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
    importlib.import_module("pocketfleet.demo").register(subparsers)  # the demo composes every package
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
