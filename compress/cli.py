"""`pocketfleet` subcommands contributed by the compress package.

Parsers only; handlers import torch and the zoo when they run. Add further groups (e.g. `compress`)
as their own `_register_*` function called from `register`.
"""

from __future__ import annotations

import argparse
from typing import Any

from pocketfleet import add_json_flag, emit, table


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands (parsers only; handlers import lazily)."""
    _register_zoo(subparsers)


# --- pocketfleet zoo ----------------------------------------------------------------------------------


def _register_zoo(subparsers: argparse._SubParsersAction) -> None:
    zoo = subparsers.add_parser(
        "zoo",
        help="reference workloads: list them, make their reference models",
        description="Reference workloads (real data, real models) used to measure compression.",
    )
    zoo_sub = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    zoo.set_defaults(func=lambda args: _print_help(zoo))

    p = zoo_sub.add_parser("list", help="list the workloads", description="List the reference workloads.")
    add_json_flag(p)
    p.set_defaults(func=_zoo_list)

    p = zoo_sub.add_parser(
        "make",
        help="train (or load) a workload's reference model into a model directory",
        description="Create a model directory (model.json + weights.safetensors) for a workload: "
        "digits models are trained here; minilm-l6 is loaded from the bundled pretrained weights.",
    )
    p.add_argument("name", metavar="NAME", help="workload name (see `pocketfleet zoo list`)")
    p.add_argument("--out", required=True, metavar="DIR", help="model directory to write")
    p.add_argument("--seed", type=int, default=0, help="random seed for training (default 0)")
    add_json_flag(p)
    p.set_defaults(func=_zoo_make)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _zoo_list(args: argparse.Namespace) -> int:
    from compress.zoo import list_workloads

    rows = [w.describe() for w in list_workloads()]

    def render(rows: list[dict[str, Any]]) -> str:
        return table(rows, ["name", "metric", "params", "description"])

    emit(rows, args.json, render)
    return 0


def _zoo_make(args: argparse.Namespace) -> int:
    import sys

    from compress.zoo import get_workload, read_meta

    workload = get_workload(args.name)  # fails fast on an unknown name
    out = workload.make(args.out, seed=args.seed, progress=sys.stderr.isatty())
    meta = read_meta(out)
    metrics = meta["metrics"]
    result = {
        "workload": meta["workload"],
        "dir": str(out),
        "metric": metrics.get("metric"),
        "value": metrics.get("value"),
        "metrics": metrics,
        "params": meta["params"],
        "train_seconds": meta["train_seconds"],
        "make_seconds": meta.get("make_seconds"),
    }

    def render(r: dict[str, Any]) -> str:
        return (
            f"{r['workload']}: {r['metric']} = {r['value']:.4f}, {r['params']:,} params, "
            f"trained in {r['train_seconds']:.1f} s (made in {r['make_seconds']:.1f} s) -> {r['dir']}"
        )

    emit(result, args.json, render)
    return 0
