"""Quantization benchmark: our modes vs fp32 vs onnxruntime.quantization, in one run.

    python benchmarks/quantization.py [--quick] [--threads 1] [--workloads digits-cnn digits-mbnet minilm-l6]

For each workload: the fp32 export; our static int8 (ONNX QDQ + full-integer TFLite), dynamic int8 (ONNX +
dynamic-range TFLite), QAT and fp16; and the peers onnxruntime.quantization `quantize_dynamic`
(per-tensor, per-channel) and `quantize_static` (QDQ, its defaults, the same calibration rows) applied to
the same fp32 ONNX file. Every model is scored with the workload metric on the test split at batch 1 (how
a device calls it; dynamic quantization depends on the batch), and timed at batch 1 in its own runtime
with the same thread count, all models of a workload interleaved round-robin. Ratios are to the fp32 file
of the same format. Prints a table per workload and writes benchmarks/results/quantization.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOALS = {
    "digits": {"max_drop": 0.005, "max_size_ratio": 0.30, "qat_within": 0.002},
    "minilm": {
        "cosine": 0.995,
        "cosine_min": 0.98,
        "top10": 0.90,
        "max_latency_ratio": 0.70,
        "max_size_ratio": 0.30,
    },
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_dir(name: str, zoo: Path) -> Path:
    from compress.zoo import make_model_dir

    path = zoo / name
    if not (path / "model.json").is_file():
        log(f"making {name} in {path}")
        make_model_dir(name, path, seed=0, progress=False)
    return path


def ours(lm: Any, name: str, modes: list[tuple[str, list[str], dict[str, Any]]], calib: dict, fp32: dict, work: Path,
         threads: int) -> list[dict[str, Any]]:  # fmt: skip
    from compress.quantize import QuantConfig, quantize

    rows = []
    for mode, formats, extra in modes:
        started = time.perf_counter()
        cfg = QuantConfig(mode=mode, formats=formats, threads=threads, **extra)
        result = quantize(lm, cfg, calib, out_dir=work / f"{name}-{mode}", latency_runs=0, fp32=fp32)
        seconds = time.perf_counter() - started
        log(f"{name}: ours {mode} {formats} in {seconds:.0f} s")
        for art in result.artifacts:
            rows.append({
                "contender": f"ours {mode}" + (f" ({extra['calibration']})" if "calibration" in extra else ""),
                "format": art.format, "dtype": art.dtype, "path": str(art.path), "metric": art.metric,
                "float_layers": art.float_layers, "parity": art.parity["passed"], "seconds": round(seconds, 1),
                "details": {k: v for k, v in art.details.items() if k in ("smooth_alpha", "smooth_search", "reduce_range", "max_drop")},
                "qat": result.details.get("qat"),
            })  # fmt: skip
    return rows


class _Reader:
    """onnxruntime CalibrationDataReader over the calibration rows, one row per call (batch 1)."""

    def __init__(self, calib: dict[str, np.ndarray], batch: int = 1) -> None:
        n = len(next(iter(calib.values())))
        self.items = iter([{k: v[i : i + batch] for k, v in calib.items()} for i in range(0, n, batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def peers(name: str, fp32: Path, calib: dict, work: Path, static: bool) -> list[dict[str, Any]]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static

    # the same fp32 graph without the exporter's cached value_info: onnxruntime's quantizer re-infers shapes
    # after rewriting Gemm and fails on the stale entries ("Inferred shape and existing shape differ")
    model = onnx.load(str(fp32))
    del model.graph.value_info[:]
    fp32 = work / f"{name}-peer-input.onnx"
    onnx.save(model, str(fp32))
    rows = []
    jobs = [
        ("ort quantize_dynamic per-tensor", lambda p: quantize_dynamic(fp32, p, weight_type=QuantType.QInt8, per_channel=False)),
        ("ort quantize_dynamic per-channel", lambda p: quantize_dynamic(fp32, p, weight_type=QuantType.QInt8, per_channel=True)),
    ]  # fmt: skip
    if static:
        jobs.append(
            ("ort quantize_static (QDQ, defaults)", lambda p: quantize_static(fp32, p, _Reader(calib)))
        )
        jobs.append((
            "ort quantize_static per-channel",
            lambda p: quantize_static(fp32, p, _Reader(calib), per_channel=True),
        ))  # fmt: skip
    for i, (label, run) in enumerate(jobs):
        path = work / f"{name}-peer{i}.onnx"
        started = time.perf_counter()
        run(str(path))
        rows.append({"contender": label, "format": "onnx", "dtype": "int8", "path": str(path),
                     "seconds": round(time.perf_counter() - started, 1)})  # fmt: skip
        log(f"{name}: {label} in {rows[-1]['seconds']} s")
    return rows


def score(lm: Any, path: str, threads: int) -> dict[str, Any]:
    from export.runtimes import load_runtime

    metric = lm.evaluate(predict=load_runtime(path, threads=threads).run, batch_size=1)
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in metric.items()}


def run_workload(name: str, args: argparse.Namespace, zoo: Path, work: Path) -> dict[str, Any]:
    from compress.quantize import fold_model, measure_latency
    from compress.zoo import load_model_dir
    from export.pipeline import convert

    started = time.perf_counter()
    lm = load_model_dir(model_dir(name, zoo))
    wl = lm.workload
    minilm = name == "minilm-l6"
    formats = ["onnx"] if minilm else ["onnx", "tflite"]
    calib = wl.calib_inputs(64 if args.quick else 128 if minilm else 256)
    folded, _ = fold_model(lm)
    fp32 = {
        fmt: convert(folded, fmt, "fp32", work / f"{name}.fp32{'.onnx' if fmt == 'onnx' else '.tflite'}")
        for fmt in formats
    }
    log(f"{name}: fp32 exported")
    if minilm:
        modes = [("dynamic", ["onnx"], {}), ("fp16", ["onnx"], {})]
        if not args.quick:
            modes.insert(1, ("dynamic", ["onnx"], {"per_token": False, "name_suffix": "per-tensor"}))
    else:
        modes = [
            ("static", formats, {"calibration": "mse"}),
            ("dynamic", formats, {}),
            ("fp16", formats, {}),
        ]
        if not args.quick:
            modes.insert(1, ("static", ["onnx"], {"calibration": "entropy"}))
            modes.insert(2, ("static", ["onnx"], {"calibration": "percentile"}))
            modes.insert(3, ("static", ["onnx"], {"calibration": "minmax"}))
            modes.append(("qat", formats, {"qat_epochs": 3}))
    rows = [{"contender": "fp32", "format": f, "dtype": "fp32", "path": str(p)} for f, p in fp32.items()]
    for mode, fmts, extra in modes:
        suffix = extra.pop("name_suffix", None)
        got = ours(lm, name, [(mode, fmts, extra)], calib, fp32, work / (suffix or ""), args.threads)
        for r in got:
            r["contender"] += f" {suffix}" if suffix else ""
        rows += got
    rows += peers(name, fp32["onnx"], calib, work, static=not (minilm and args.quick))
    for r in rows:
        if "metric" not in r:  # ours were scored by quantize() at eval_batch_size 1
            r["metric"] = score(lm, r["path"], args.threads)
        r["size_bytes"] = os.path.getsize(r["path"])
    log(f"{name}: scored {len(rows)} models")
    probe = {k: v[:1] for k, v in wl.eval_inputs().items()}
    names = {f"{i}": r["path"] for i, r in enumerate(rows)}
    lat = measure_latency(names, probe, threads=args.threads, runs=args.runs, warmup=5)
    base = {r["format"]: r for r in rows if r["contender"] == "fp32"}
    for i, r in enumerate(rows):
        b = base[r["format"]]
        r["latency_ms"] = {k: lat[str(i)][k] for k in ("p50", "p90", "runs")}
        r["size_ratio"] = r["size_bytes"] / b["size_bytes"]
        r["p50_ratio"] = lat[str(i)]["p50"] / lat[str(rows.index(b))]["p50"]
        r["p90_ratio"] = lat[str(i)]["p90"] / lat[str(rows.index(b))]["p90"]
        r["metric_delta"] = r["metric"]["value"] - b["metric"]["value"] if "metric" in b else None
    return {"workload": name, "metric": wl.metric.name, "threads": args.threads, "rows": rows,
            "goals": check_goals(name, rows), "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def check_goals(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    def row(contender: str, fmt: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["contender"] == contender and r["format"] == fmt), None)

    out: dict[str, Any] = {}
    if name == "minilm-l6":
        g = GOALS["minilm"]
        r = row("ours dynamic", "onnx")
        if r is None:
            return out
        m = r["metric"]
        peer = [x for x in rows if x["contender"].startswith("ort quantize_dynamic")]
        best = max(peer, key=lambda x: x["metric"]["value"]) if peer else None
        out = {
            "cosine>=0.995": m["cosine"] >= g["cosine"],
            "cosine_min>=0.98": m["cosine_min"] >= g["cosine_min"],
            "top10>=0.90": m["top10_agreement"] >= g["top10"],
            "p50<=0.70x fp32": r["p50_ratio"] <= g["max_latency_ratio"],
            "size<=0.30x fp32": r["size_ratio"] <= g["max_size_ratio"],
            "n>=500": m["n"] >= 500,
        }
        if best is not None:
            out["best peer"] = best["contender"]
            out["fidelity > best peer"] = (
                m["cosine"] > best["metric"]["cosine"] and m["cosine_min"] >= best["metric"]["cosine_min"]
            )
            out["p50 <= best peer p50 x1.05"] = r["latency_ms"]["p50"] <= best["latency_ms"]["p50"] * 1.05
        return out
    g = GOALS["digits"]
    for fmt in ("onnx", "tflite"):
        r = row("ours static (mse)", fmt)
        if r is not None:
            out[f"static {fmt} drop<=0.5pt"] = -r["metric_delta"] <= g["max_drop"] + 1e-9
            out[f"static {fmt} size<=0.30x"] = r["size_ratio"] <= g["max_size_ratio"]
        q = row("ours qat", fmt)
        if q is not None and r is not None and -r["metric_delta"] > 0.003:
            out[f"qat {fmt} within 0.2pt"] = -q["metric_delta"] <= g["qat_within"] + 1e-9
    return out


def render(result: dict[str, Any]) -> str:
    from pocketfleet import table

    minilm = result["metric"] == "cosine"
    rows = []
    for r in result["rows"]:
        m = r["metric"]
        row = {"contender": r["contender"], "fmt": r["format"], result["metric"]: round(m["value"], 5)}
        if minilm:
            row["cos_min"] = round(m["cosine_min"], 4)
            row["top10"] = round(m["top10_agreement"], 4)
        row.update({
            "size_kb": round(r["size_bytes"] / 1024, 1), "size_x": round(r["size_ratio"], 3),
            "p50_ms": round(r["latency_ms"]["p50"], 3), "p90_ms": round(r["latency_ms"]["p90"], 3),
            "p50_x": round(r["p50_ratio"], 3), "p90_x": round(r["p90_ratio"], 3),
            "float_layers": len(r.get("float_layers") or []),
        })  # fmt: skip
        rows.append(row)
    head = f"{result['workload']}  ({result['metric']}, batch 1, {result['threads']} thread(s), {result['seconds']} s)"
    goals = "  ".join(f"{k}: {v}" for k, v in result["goals"].items())
    return f"{head}\n{table(rows)}\ngoals: {goals}\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=["digits-cnn", "digits-mbnet", "minilm-l6"])
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer contenders (no QAT, one calibration method, no minilm static peer)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=None, help="latency runs per model (default 100, quick 30)")
    p.add_argument("--zoo", type=Path, default=None, help="reuse/make model directories here")
    p.add_argument("--work", type=Path, default=None, help="keep the quantized files here")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quantization.json")
    args = p.parse_args(argv)
    args.runs = args.runs or (30 if args.quick else 100)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work or Path(tempfile.mkdtemp(prefix="pf-qbench-"))
    zoo = args.zoo or work / "zoo"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = []
    for name in args.workloads:
        res = run_workload(name, args, zoo, work)
        print(render(res), flush=True)
        results.append(res)
    doc = {
        "benchmark": "quantization",
        "host": {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },  # fmt: skip
        "quick": args.quick,
        "threads": args.threads,
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    log(f"wrote {args.out} ({doc['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
