"""`pocketfleet demo`: the whole path on one machine, from a trained model to a fleet and back.

Stages: make digits-cnn; export it to ONNX and TFLite as fp32 (version 1) and fp16 (version 2), and
quantize it to int8 (version 3: ONNX QDQ and full-integer TFLite), each with parity checks; sign every
package, verify it against the trusted key, run it in its runtime; start an agent, install version 1
and swap to the int8 version while clients keep asking; then the fleet stage (pocketfleet.demo.fleet_stage):
embedded broker, cloud and several agents, a canary rollout, federated rounds on the agents' local data,
and the federated head rolled out as a release.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pocketfleet import PocketfleetError, add_json_flag, emit, table

# (format, dtype, version): per format, fp32 is version 1, fp16 version 2 and int8 (compress.quantize) 3
EXPORTS = (("onnx", "fp32", 1), ("onnx", "fp16", 2), ("onnx", "int8", 3),
           ("tflite", "fp32", 1), ("tflite", "fp16", 2), ("tflite", "int8", 3))
COLUMNS = ["package", "version", "format", "dtype", "size_kb", "top1", "parity_agree", "max_abs_err", "p50_ms", "verified"]
SWAP_COLUMNS = ["model", "version", "requests", "p50_ms", "max_ms"]
ROUND_COLUMNS = ["round", "devices", "test_top1", "bytes_up"]
DEVICE_COLUMNS = ["device", "model", "version", "test_top1"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train, export, sign, verify and run a reference model end to end",
        description="Make digits-cnn, export ONNX and TFLite packages with parity checks, sign and "
        "verify them, run each in its runtime and print a table.",
    )
    p.add_argument("--workdir", type=Path, default=Path("pocketfleet-demo"), help="where to write models, keys, packages")
    p.add_argument("--model", default="digits-cnn", choices=["digits-cnn", "digits-mbnet"], help="reference workload")
    p.add_argument("--devices", type=int, default=4, help="agents in the fleet stage (0 skips the stage)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds in the fleet stage")
    add_json_flag(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.devices < 0 or args.rounds < 1:
        raise PocketfleetError("--devices must be >= 0 and --rounds >= 1")
    result = run_demo(args.workdir, model=args.model, devices=args.devices, rounds=args.rounds)
    emit(result, args.json, _render)
    return 0


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run_demo(workdir: Path, model: str = "digits-cnn", devices: int = 4, rounds: int = 3) -> dict[str, Any]:
    from compress.zoo import load_model_dir, make_model_dir
    from export import export_model, extract_package, generate_keys, verify_package
    from export.runtimes import load_runtime
    from pocketfleet.timing import time_calls

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
        _say(f"{'quantizing' if dtype == 'int8' else 'exporting'} {fmt}/{dtype} -> {pkg}")
        name = model if fmt == "onnx" else f"{model}-{fmt}"
        if dtype == "int8":
            _quantize(lm, fmt, pkg, name, version, private, workdir / "int8")
        else:
            export_model(lm, format=fmt, dtype=dtype, out=pkg, name=name, version=version, key=private)
        packages[fmt, version] = pkg
        manifest = verify_package(pkg, trust=public)
        member = next(p for p in manifest.files if p.endswith(f".{fmt}"))
        unpacked = workdir / "unpacked" / pkg.stem
        shutil.rmtree(unpacked, ignore_errors=True)
        extract_package(pkg, unpacked, trust=public)
        runtime = load_runtime(unpacked / member, format=fmt)
        metric = lm.evaluate(predict=runtime.run)
        latency = time_calls(lambda rt=runtime: rt.run(one), min_seconds=0.5)
        parity = manifest.report["parity"]["outputs"][0]  # measured at export, signed with the manifest
        rows.append(
            {
                "package": pkg.name,
                "version": version,
                "format": fmt,
                "dtype": dtype,
                "size_kb": round(pkg.stat().st_size / 1024, 1),
                "model_bytes": manifest.files[member].size,
                "top1": round(metric["value"], 4),
                "parity_agree": parity["agreement"],
                "max_abs_err": float(f"{parity['max_abs']:.3g}"),
                "p50_ms": round(latency.p50_ms, 4),
                "p90_ms": round(latency.p90_ms, 4),
                "verified": True,
            }
        )
    if not rows:
        raise PocketfleetError("demo produced no packages")

    from pocketfleet.sim.swap import swap_under_load

    _say("starting an agent: install version 1 (fp32), swap to version 3 (int8) under load")
    state = workdir / "agent-state"
    shutil.rmtree(state, ignore_errors=True)
    swap = swap_under_load(state, public, [packages["onnx", 1], packages["onnx", 3]])
    if swap["failures"]:
        raise PocketfleetError(f"{swap['failures']} requests failed during the swap: {swap['errors']}")
    fleet = None
    if devices:
        from pocketfleet.demo.fleet_stage import run_fleet_stage

        _say(f"fleet stage: {devices} agents, canary rollout, {rounds} federated rounds, head rollout")
        heads = [_head_package(lm, workdir, v, dtype, private) for v, dtype in ((1, "fp32"), (2, "fp16"))]
        fleet = run_fleet_stage(workdir / "fleet", keys, *heads, devices=devices, rounds=rounds, say=_say)
    return {
        "model": model,
        "model_dir": str(model_dir),
        "pytorch_top1": round(reference["value"], 4),
        "packages": rows,
        "agent_swap": swap,
        "fleet": fleet,
        "workdir": str(workdir),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _quantize(lm: Any, fmt: str, pkg: Path, name: str, version: int, key: Path, work: Path) -> None:
    """Static int8 (per-channel weights, MSE calibration on train rows) through compress.quantize."""
    from compress import QuantConfig, quantize

    result = quantize(lm, QuantConfig(formats=[fmt]), out_dir=work / fmt, key=key, name=name, version=version,
                      latency_runs=0)
    (art,) = result.artifacts
    shutil.copyfile(art.package, pkg)


def _head_package(lm: Any, workdir: Path, version: int, dtype: str, key: Path) -> Path:
    """An ONNX package whose classifier is a trainable head (served from its own weights member), with
    the golden labels of its samples for the rollout gate."""
    from export import export_model

    labels = lm.workload.data("test")[1][:4]
    out = workdir / "packages" / f"{lm.workload.name}-head-{dtype}.pfpkg"
    export_model(lm, format="onnx", dtype=dtype, out=out, name=f"{lm.workload.name}-head", version=version,
                 key=key, trainable_head=True, extra={"golden": {"labels": [int(v) for v in labels]}})
    return out


def _render(result: dict[str, Any]) -> str:
    head = (
        f"pocketfleet demo: {result['model']} (PyTorch top-1 {result['pytorch_top1']:.4f}), "
        f"{len(result['packages'])} signed packages in {result['workdir']}/packages, {result['seconds']} s\n"
    )
    swap = result["agent_swap"]
    swaps = ", ".join(f"v{s['from']} -> v{s['to']} in {s['install_and_swap_s']} s" for s in swap["swaps"])
    text = (
        head
        + table(result["packages"], COLUMNS)
        + f"\n\nagent hot swap under load ({swaps}; {swap['failures']} failed requests):\n"
        + table(swap["rows"], SWAP_COLUMNS)
    )
    fleet = result.get("fleet")
    if fleet:
        fl, canary, final = fleet["federated"], fleet["canary_rollout"], fleet["head_rollout"]
        text += (
            f"\n\nfleet: {len(fleet['devices'])} agents on the embedded broker; canary rollout of v2 "
            f"{canary['state']}\n\nfederated rounds (head retrained from scratch on the agents' local data; "
            f"the shipped head scored {fl['served_head_top1']:.4f}):\n" + table(fl["rounds"], ROUND_COLUMNS)
            + f"\n\nfederated head released as v{max(final['versions'].values())}: rollout {final['state']}, "
            f"{final['bytes']['received']} bytes received over MQTT, {final['bytes']['reused']} reused from the "
            "previous version on the devices; what each agent serves now:\n" + table(fleet["device_rows"], DEVICE_COLUMNS)
        )
    return text
