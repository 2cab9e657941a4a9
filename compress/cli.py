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
    _register_export(subparsers)
    _register_compress(subparsers)


# --- pocketfleet export -------------------------------------------------------------------------------


def _register_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a model directory to ONNX/TFLite/ExecuTorch/Core ML, check parity, write a signed package",
        description="Convert a model directory to ONNX or TFLite, check numeric parity of the exported file "
        "in its real runtime against PyTorch on the workload's evaluation data, and write a .pfpkg package "
        "(signed when --key is given). Fails without writing a package when parity is out of bounds.",
    )
    p.add_argument("model_dir", metavar="MODEL", nargs="?",
                   help="a model directory (see compress.zoo.make_model_dir) or an existing .onnx file; "
                   "omit it with --factory")
    p.add_argument("--factory", metavar="PKG.MOD:FN", help="your own model: a callable that returns an nn.Module")
    p.add_argument("--kwargs", metavar="JSON", default="{}", help="keyword arguments for --factory, as a JSON object")
    p.add_argument("--weights", metavar="FILE.safetensors", help="state dict to load into the --factory module")
    p.add_argument("--input", action="append", default=[], metavar="NAME:SHAPE[:DTYPE]",
                   help="a --factory model input, e.g. image:1x3x32x32 or ids:1x128:int64 (repeat per input; "
                   "axis 0 is the batch)")
    p.add_argument("--data", metavar="FILE", help=".npz (one array per input) or .npy rows to trace and check "
                   "parity on (default: seeded random rows of the --input shapes)")
    p.add_argument("--format", required=True, choices=["onnx", "tflite", "pte", "coreml"],
                   help="pte: ExecuTorch (XNNPACK); coreml: Core ML .mlpackage (parity needs macOS)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "int8", "pal4"],
                   help="onnx/tflite: fp32, fp16; pte: fp32, int8; coreml: fp32, fp16, int8, pal4")
    p.add_argument("--out", required=True, metavar="PKG", help="package path to write (.pfpkg)")
    p.add_argument("--name", help="model name in the manifest (default: the workload name)")
    p.add_argument("--version", type=int, default=1, help="integer model version (monotonic per name)")
    p.add_argument("--key", metavar="PRIVATE", help="Ed25519 private key to sign with (unsigned without it)")
    p.add_argument("--device", metavar="PROFILE", help="target device profile name recorded in the manifest")
    p.add_argument("--valid-days", type=int, default=365, help="days until the package expires (default 365)")
    p.add_argument("--trainable-head", action="store_true",
                   help="ONNX classifiers: ship the final Linear layer as a trainable head for on-device "
                   "(federated) training; the model also outputs its input as 'features'")
    add_json_flag(p)
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from compress.recipe.user_export import export_source
    from export.pipeline import export_model

    source = export_source(args)
    if hasattr(source, "path") and getattr(source, "module", None) is None:  # an existing ONNX file
        from compress.recipe.user_export import package_onnx

        emit(package_onnx(source, args).to_dict(), args.json, _render_export)
        return 0
    result = export_model(
        source,
        format=args.format,
        dtype=args.dtype,
        out=args.out,
        name=args.name,
        version=args.version,
        key=args.key,
        device=args.device,
        valid_days=args.valid_days,
        progress=True,
        trainable_head=args.trainable_head,
    )
    emit(result.to_dict(), args.json, _render_export)
    return 0


def _render_export(r: dict[str, Any]) -> str:
    lines = [
        f"package   {r['package']}  ({'signed ' + r['key_id'] if r['key_id'] else 'UNSIGNED'})",
        f"model     {r['name']} v{r['version']}  {r['format']}/{r['dtype']}  {r['size_bytes']} bytes  "
        f"export {r['export_seconds']:.1f}s",
        f"metric    {r['metric']['metric']} = {r['metric']['value']:.4f}"
        + (f"  (PyTorch {r['reference_metric']['value']:.4f})" if r.get("reference_metric") else ""),
        "parity:",
        table(r["parity"]["outputs"]),
    ]
    return "\n".join(lines)


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


# --- pocketfleet compress -----------------------------------------------------------------------------


def _register_compress(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compress",
        help="run a compression recipe: steps, artifacts, report.json and report.png",
        description="Run a TOML compression recipe (model, data, steps such as prune / sparsify / finetune / "
        "distill / quantize, and export targets) into DIR: artifacts and packages, DIR/report.json (metric, size, "
        "MACs and host latency of the baseline, after every step and of every artifact) and DIR/report.png. "
        "The recipe is checked completely before any work starts. Format: docs/recipes.md.",
    )
    p.add_argument("recipe", metavar="RECIPE.toml", help="the recipe file")
    p.add_argument("--out", metavar="DIR", help="output directory (must be empty or absent)")
    p.add_argument("--check", action="store_true", help="only validate the recipe and print its plan")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out directory")
    add_json_flag(p)
    p.set_defaults(func=_compress)


def _compress(args: argparse.Namespace) -> int:
    import sys

    from compress.recipe import load_recipe
    from compress.recipe.report import render, render_plan
    from pocketfleet import PocketfleetError

    recipe = load_recipe(args.recipe)  # every recipe error surfaces here, before any work
    if args.check:
        emit(recipe.to_dict(), args.json, render_plan)
        return 0
    if not args.out:
        raise PocketfleetError("compress needs --out DIR to run a recipe (or --check to only validate it)")
    from compress.recipe import run_recipe

    report = run_recipe(recipe, args.out, progress=sys.stderr.isatty(), force=args.force)
    emit(report, args.json, render)
    return 1 if report["failed"] else 0  # a target that could not be made (listed in the report)
