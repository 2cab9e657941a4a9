"""`pocketfleet demo`: the whole path on one machine, from a trained model to verified, running packages.

Stages: make digits-cnn; export it to ONNX and TFLite (fp32 as version 1, the compressed fp16 as
version 2) with parity checks; sign every package, verify it against the trusted key, run it in its
runtime; then start an agent, install version 1 and swap to version 2 while clients keep asking.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pocketfleet import PocketfleetError, add_json_flag, emit, table

# (format, dtype, version): per format, the fp32 package is version 1 and the compressed one version 2
EXPORTS = (("onnx", "fp32", 1), ("onnx", "fp16", 2), ("tflite", "fp32", 1), ("tflite", "fp16", 2))
COLUMNS = ["package", "version", "format", "dtype", "size_kb", "top1", "parity_agree", "max_abs_err", "p50_ms", "verified"]
SWAP_COLUMNS = ["model", "version", "requests", "p50_ms", "max_ms"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train, export, sign, verify and run a reference model end to end",
        description="Make digits-cnn, export ONNX and TFLite packages with parity checks, sign and "
        "verify them, run each in its runtime and print a table.",
    )
    p.add_argument("--workdir", type=Path, default=Path("pocketfleet-demo"), help="where to write models, keys, packages")
    p.add_argument("--model", default="digits-cnn", choices=["digits-cnn", "digits-mbnet"], help="reference workload")
    add_json_flag(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    result = run_demo(args.workdir, model=args.model)
    emit(result, args.json, _render)
    return 0


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run_demo(workdir: Path, model: str = "digits-cnn") -> dict[str, Any]:
    from compress.zoo import load_model_dir, make_model_dir
    from devices.timing import time_calls
    from edge_agent.runtimes import load_runtime
    from export import export_model, extract_package, generate_keys, verify_package

    started = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "models" / model
    if (model_dir / "model.json").exists():
        _say(f"reusing {model_dir}")
    else:
        _say(f"training {model} (seeded, about a minute on 2 cores)")
        make_model_dir(model, model_dir)
    lm = load_model_dir(model_dir)
    reference = lm.evaluate()

    keys = workdir / "keys"
    private, public = keys / "pocketfleet.key", keys / "pocketfleet.pub"
    if not private.exists():
        generate_keys(keys)

    rows: list[dict[str, Any]] = []
    eval_inputs = lm.workload.eval_inputs()
    one = {k: v[:1] for k, v in eval_inputs.items()}
    packages: dict[tuple[str, int], Path] = {}
    for fmt, dtype, version in EXPORTS:
        pkg = workdir / "packages" / f"{model}-{fmt}-{dtype}.pfpkg"
        _say(f"exporting {fmt}/{dtype} -> {pkg}")
        name = model if fmt == "onnx" else f"{model}-{fmt}"
        res = export_model(lm, format=fmt, dtype=dtype, out=pkg, name=name, version=version, key=private)
        packages[fmt, version] = pkg
        manifest = verify_package(pkg, trust=public)
        member = next(p for p in manifest.files if p.endswith(f".{fmt}"))
        unpacked = workdir / "unpacked" / pkg.stem
        shutil.rmtree(unpacked, ignore_errors=True)
        extract_package(pkg, unpacked, trust=public)
        runtime = load_runtime(unpacked / member, format=fmt)
        metric = lm.evaluate(predict=runtime.run)
        latency = time_calls(lambda rt=runtime: rt.run(one), min_seconds=0.5)
        parity = res.parity.outputs[0]
        rows.append(
            {
                "package": pkg.name,
                "version": version,
                "format": fmt,
                "dtype": dtype,
                "size_kb": round(pkg.stat().st_size / 1024, 1),
                "model_bytes": res.size_bytes,
                "top1": round(metric["value"], 4),
                "parity_agree": parity.agreement,
                "max_abs_err": float(f"{parity.max_abs:.3g}"),
                "p50_ms": round(latency.p50_ms, 4),
                "p90_ms": round(latency.p90_ms, 4),
                "verified": True,
                "key_id": res.key_id,
            }
        )
    if not rows:
        raise PocketfleetError("demo produced no packages")

    from edge_agent.demo import swap_under_load

    _say("starting an agent: install version 1, swap to version 2 under load")
    state = workdir / "agent-state"
    shutil.rmtree(state, ignore_errors=True)
    swap = swap_under_load(state, public, [packages["onnx", 1], packages["onnx", 2]])
    if swap["failures"]:
        raise PocketfleetError(f"{swap['failures']} requests failed during the swap: {swap['errors']}")
    return {
        "model": model,
        "model_dir": str(model_dir),
        "pytorch_top1": round(reference["value"], 4),
        "packages": rows,
        "agent_swap": swap,
        "workdir": str(workdir),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _render(result: dict[str, Any]) -> str:
    head = (
        f"pocketfleet demo: {result['model']} (PyTorch top-1 {result['pytorch_top1']:.4f}), "
        f"{len(result['packages'])} signed packages in {result['workdir']}/packages, {result['seconds']} s\n"
    )
    swap = result["agent_swap"]
    swaps = ", ".join(f"v{s['from']} -> v{s['to']} in {s['install_and_swap_s']} s" for s in swap["swaps"])
    return (
        head
        + table(result["packages"], COLUMNS)
        + f"\n\nagent hot swap under load ({swaps}; {swap['failures']} failed requests):\n"
        + table(swap["rows"], SWAP_COLUMNS)
    )
