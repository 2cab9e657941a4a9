"""Every target format x dtype on the zoo models and one user model: size, p50/p95 at 1 and 2 threads, cold
start to the first answer, RSS, parity against PyTorch. One run, latency interleaved across all files of a model.

    python benchmarks/targets.py [--models digits-cnn digits-mbnet minilm-l6 byom-resnet] [--runs 300]
                                 [--formats onnx tflite pte coreml] [--json benchmarks/results/targets.json]
    python benchmarks/targets.py --quick   # digits-cnn, ONNX + TFLite, 1 thread, 100 runs: a smoke run

Models: the zoo workloads (digits-cnn, digits-mbnet, minilm-l6: the pretrained all-MiniLM-L6-v2) and
`byom-resnet`, the bring-your-own-model example's user model (examples/byom_end_to_end.py: a transformers
ResNet on the digits upsampled to 32x32, random init here: latency and parity do not need training).
Files: ONNX fp32/fp16 and int8 (compress.quantize: static, dynamic for minilm-l6 as its recipe), TFLite
fp32/fp16 and int8 (full-integer; dynamic-range for minilm-l6), ExecuTorch (.pte) fp32 and int8 (XNNPACK
quantizer), Core ML fp32/fp16/int8/pal4 (.mlpackage; on a host that is not macOS only size and the host
checks: latency, RSS and parity are "not run on this host"). A file that fails to convert is a row with
its one-line error, not the end of the run.

Latency: for each thread count a fresh worker process loads every file of the model with that many threads
(ExecuTorch has one thread pool per process) and runs batch-1 real test inputs round-robin, in blocks of
consecutive calls per file (export.latency: each file warm, as a device runs its one model), `--runs` calls
each after a warm-up, so that load from other processes hits every file alike; p50/p95 of the per-call times.
Cold start: a fresh process imports the runtime, loads the file and answers one input; wall time from
process start, and its VmRSS after that answer. Parity: the workload's evaluation split against the PyTorch
module (max abs error, top-1 agreement / cosine). On a loaded machine quote medians only, with that caveat.
The probe is the first test row of every input.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNTIME_FORMATS = ("onnx", "tflite", "pte")
COLD = """
import sys, time, json
t0 = float(sys.argv[2])
import numpy as np
from export.runtimes import load_runtime
rt = load_runtime(sys.argv[1], threads=1)
probe = np.load(sys.argv[3])
x = {s.name: probe[s.name] for s in rt.inputs}
rt.run(x)
took = time.time() - t0
rss = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS'))
print(json.dumps({"cold_start_ms": took * 1e3, "rss_mb": rss / 1024}))
"""


DTYPES = {
    "onnx": ("fp32", "fp16", "int8"),
    "tflite": ("fp32", "fp16", "int8"),
    "pte": ("fp32", "int8"),
    "coreml": ("fp32", "fp16", "int8", "pal4"),
}
QUANT_MODE = {"minilm-l6": "dynamic"}  # as examples/minilm-int8-onnx.toml; the others static
USER_MODELS = ("byom-resnet",)


def load_subject(name: str, work: Path) -> tuple[Any, Any]:
    """(ExportableModel, calibration rows or None) for a zoo workload or the BYOM example's user model."""
    if name in USER_MODELS:
        return _byom_resnet()
    from compress.zoo import load_model_dir, make_model_dir

    model_dir = work / name / "model"
    if not (model_dir / "model.json").exists():
        make_model_dir(name, model_dir, seed=0, progress=False)
    return load_model_dir(model_dir), None


def _byom_resnet() -> tuple[Any, Any]:
    import importlib.util

    import torch
    from sklearn.datasets import load_digits

    from export.source import UserModel

    spec = importlib.util.spec_from_file_location("byom_end_to_end", ROOT / "examples" / "byom_end_to_end.py")
    example = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(example)  # type: ignore[union-attr]
    x, y = load_digits(return_X_y=True)
    x = torch.nn.functional.interpolate(torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16, size=32,
                                        mode="bilinear").numpy()  # fmt: skip
    torch.manual_seed(0)
    model = UserModel.wrap(example.Net(), x[:8], input_names=["image"], output_names=["logits"],
                           eval_data=(x[-200:], y[-200:]), metric="top1", name="byom-resnet")  # fmt: skip
    return model, x[:256]


def build_files(
    model: Any, calib: Any, work: Path, formats: list[str]
) -> dict[str, tuple[str, str, Path | str]]:
    """{label: (format, dtype, file or the one-line error that stopped it)} for every format x dtype."""
    from compress import QuantConfig, quantize
    from export.pipeline import SUFFIX, convert

    work.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[str, str, Path | str]] = {}
    mode = QUANT_MODE.get(model.name, "static")
    for fmt in formats:
        for dtype in DTYPES[fmt]:
            path = work / f"{fmt}-{dtype}{SUFFIX[fmt]}"
            if fmt in ("onnx", "tflite") and dtype == "int8":
                path = work / "int8" / f"{model.name}.{mode}.int8{SUFFIX[fmt]}"
            elif not path.exists():  # kept from an earlier run with the same --work
                files[f"{fmt}/{dtype}"] = (
                    fmt,
                    dtype,
                    _attempt(lambda p=path, f=fmt, d=dtype: convert(model, f, d, p)),
                )
                continue
            files[f"{fmt}/{dtype}"] = (fmt, dtype, path)
    wanted = [f for f in ("onnx", "tflite") if f in formats]
    if wanted and not all(Path(files[f"{f}/int8"][2]).exists() for f in wanted):
        cfg = QuantConfig(mode=mode, formats=wanted)
        err = _attempt(
            lambda: quantize(model, cfg, calib, out_dir=work / "int8", latency_runs=0, name=model.name)
        )
        for f in wanted:
            if not Path(files[f"{f}/int8"][2]).exists():
                files[f"{f}/int8"] = (f, "int8", err if isinstance(err, str) else "int8 file not written")
    return files


def _attempt(fn: Any) -> Any:
    """fn() or, when it raises, its one-line error (a format that cannot take this model is a row, not a crash)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - every converter raises its own types
        return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


def worker(paths: list[str], threads: int, runs: int, probe: str) -> dict[str, Any]:
    """Interleaved latency of `paths` at `threads` (run in its own process): export.latency's measurement,
    blocks of WARM_BLOCK consecutive calls per file and turn, `runs` calls each."""
    from export.latency import measure_latency

    x = dict(np.load(probe))
    stats = measure_latency({p: p for p in paths}, x, threads=threads, runs=runs, warmup=20)
    return {p: {"p50": s["p50"], "p95": s["p95"], "runs": s["runs"]} for p, s in stats.items()}


def _subprocess_json(args: list[str]) -> Any:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-1500:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_model(
    name: str, work: Path, runs: int, threads: list[int], formats: list[str]
) -> list[dict[str, Any]]:
    from export.coreml import NOT_RUN, can_predict, inspect_mlpackage
    from export.parity import ParityBounds, Recorded, check_parity
    from export.runtimes import load_runtime

    model, calib = load_subject(name, work)
    files = build_files(model, calib, work / name, formats)
    inputs = model.eval_inputs()
    probe = work / name / "probe.npz"
    np.savez(probe, **{k: np.ascontiguousarray(v[:1]) for k, v in inputs.items()})
    reference = Recorded(model.predict)
    for label, (fmt, dtype, path) in files.items():  # a file its runtime refuses is a row with the error
        if isinstance(path, Path) and fmt in RUNTIME_FORMATS:
            files[label] = (fmt, dtype, _attempt(lambda p=path: load_runtime(p) and p))
    built = {label: v for label, v in files.items() if isinstance(v[2], Path)}
    runnable = [label for label, (fmt, _, _) in built.items() if fmt in RUNTIME_FORMATS or can_predict()]
    latency = {}
    for t in threads:
        paths = [str(files[label][2]) for label in runnable]
        got = _subprocess_json([__file__, "--worker", str(t), str(runs), str(probe), *paths]) if paths else {}
        latency[t] = {label: got[str(files[label][2])] for label in runnable}
    rows = []
    for label, (fmt, dtype, path) in files.items():
        row: dict[str, Any] = {"model": name, "format": fmt, "dtype": dtype}
        if not isinstance(path, Path):
            rows.append({**row, "error": path, "size_bytes": None, "parity": "not built"})
            continue
        row["size_bytes"] = path.stat().st_size
        if label not in runnable:
            info = inspect_mlpackage(path)
            row.update(latency=NOT_RUN, cold_start_ms=NOT_RUN, rss_mb=NOT_RUN, parity=NOT_RUN,
                       weight_bytes=info["weight_bytes"], compression_ratio=info.get("compression_ratio"))  # fmt: skip
            rows.append(row)
            continue
        for t in threads:
            row[f"p50_ms_t{t}"] = round(latency[t][label]["p50"], 5)
            row[f"p95_ms_t{t}"] = round(latency[t][label]["p95"], 5)
        cold = _subprocess_json(["-c", COLD, str(path), repr(time.time()), str(probe)])
        row["cold_start_ms"], row["rss_mb"] = round(cold["cold_start_ms"], 1), round(cold["rss_mb"], 1)
        rt = load_runtime(path, threads=1)
        bounds = ParityBounds.for_dtype(dtype)
        report = check_parity(
            reference, rt.run, inputs, bounds, metric=model.metric_name, raise_on_failure=False
        )
        out = report.outputs[0]
        row["parity"] = {"passed": report.passed, "max_abs": round(out.max_abs, 6),
                         **({"agreement": out.agreement} if out.agreement is not None else {}),
                         **({"min_cosine": round(out.min_cosine, 6)} if out.min_cosine is not None else {})}  # fmt: skip
        del rt
        rows.append(row)
    base = {r["format"]: r for r in rows if r["dtype"] == "fp32"}
    for r in rows:
        fp32 = base.get(r["format"])
        if fp32 and isinstance(r.get("p50_ms_t1"), float) and isinstance(fp32.get("p50_ms_t1"), float):
            r["p50_vs_fp32_t1"] = round(r["p50_ms_t1"] / fp32["p50_ms_t1"], 3)
    return rows


def table(rows: list[dict[str, Any]], threads: list[int]) -> str:
    cols = ["model", "format", "dtype", "size_kb", *[f"p50 t{t}" for t in threads], *[f"p95 t{t}" for t in threads],
            "x fp32", "cold ms", "RSS MB", "parity"]  # fmt: skip
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        p = r["parity"]
        parity = (
            p
            if isinstance(p, str)
            else (f"agree {p['agreement']:.3f}" if "agreement" in p else f"cos {p.get('min_cosine')}")
        )
        if r.get("error"):
            lines.append(" | ".join([r["model"], r["format"], r["dtype"], "-", f"not built: {r['error']}"]))
            continue
        cells = [r["model"], r["format"], r["dtype"], f"{r['size_bytes'] / 1024:.0f}",
                 *[_ms(r.get(f"p50_ms_t{t}")) for t in threads], *[_ms(r.get(f"p95_ms_t{t}")) for t in threads],
                 str(r.get("p50_vs_fp32_t1", "")), str(r.get("cold_start_ms")), str(r.get("rss_mb")), parity]  # fmt: skip
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def _ms(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "not run"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        threads, runs, probe, *paths = argv[1:]
        print(json.dumps(worker(paths, int(threads), int(runs), probe)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["digits-cnn", "digits-mbnet", "minilm-l6", *USER_MODELS])
    ap.add_argument("--formats", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--quick", action="store_true", help="digits-cnn, ONNX + TFLite, 1 thread, 100 runs")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "targets.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.formats, args.threads, args.runs = ["digits-cnn"], ["onnx", "tflite"], [1], 100
    work = args.work or Path(tempfile.mkdtemp(prefix="pf-targets-"))
    rows = []
    for name in args.models:
        rows += measure_model(name, work, args.runs, args.threads, args.formats)
    print(table(rows, args.threads))
    import os

    from devices.probe import cpu_summary

    doc = {"rows": rows, "runs": args.runs, "threads": args.threads, "models": args.models, "formats": args.formats,
           "host": {**cpu_summary(), "loadavg_1m": os.getloadavg()[0]}, "note": "latency measured round-robin; quote medians"}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
