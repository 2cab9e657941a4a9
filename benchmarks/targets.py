"""Every target format x dtype on the zoo models: size, p50/p95 at 1 and 2 threads, cold start to the first
answer, RSS, parity against PyTorch. One run, latency interleaved across all files of a model.

    python benchmarks/targets.py [--models digits-cnn digits-mbnet] [--runs 300] [--json benchmarks/results/targets.json]

Files: ONNX fp32/fp16 and static int8 (compress.quantize), TFLite fp32/fp16 and full-integer int8, ExecuTorch
(.pte) fp32 and int8 (XNNPACK quantizer), Core ML fp32/fp16/int8/pal4 (.mlpackage; on a host that is not
macOS only size and the host checks: latency, RSS and parity are "not run on this host").

Latency: for each thread count a fresh worker process loads every file of the model with that many threads
(ExecuTorch has one thread pool per process) and runs batch-1 real test inputs round-robin `--runs` times
after a warm-up, so that load from other processes hits every file alike; p50/p95 of the per-call times.
Cold start: a fresh process imports the runtime, loads the file and answers one input; wall time from
process start, and its VmRSS after that answer. Parity: the workload's evaluation split against the PyTorch
module (max abs error, top-1 agreement / cosine). On a loaded machine quote medians only, with that caveat.
Models with one input (the digits workloads); the probe is the first test row.
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
x = {s.name: np.load(sys.argv[3]) for s in rt.inputs[:1]}
rt.run(x)
took = time.time() - t0
rss = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS'))
print(json.dumps({"cold_start_ms": took * 1e3, "rss_mb": rss / 1024}))
"""


def build_files(model_dir: Path, work: Path) -> dict[str, tuple[str, str, Path]]:
    """{label: (format, dtype, file)} for every format x dtype of one model."""
    from compress import QuantConfig, quantize
    from compress.zoo import load_model_dir
    from export.pipeline import SUFFIX, convert

    lm = load_model_dir(model_dir)
    files: dict[str, tuple[str, str, Path]] = {}
    for fmt, dtypes in {"onnx": ("fp32", "fp16"), "tflite": ("fp32", "fp16"), "pte": ("fp32", "int8"),
                        "coreml": ("fp32", "fp16", "int8", "pal4")}.items():  # fmt: skip
        for dtype in dtypes:
            path = work / f"{fmt}-{dtype}{SUFFIX[fmt]}"
            if not path.exists():  # kept from an earlier run with the same --work
                convert(lm, fmt, dtype, path)
            files[f"{fmt}/{dtype}"] = (fmt, dtype, path)
    done = {fmt: work / "int8" / f"{lm.name}.static.int8{SUFFIX[fmt]}" for fmt in ("onnx", "tflite")}
    if not all(p.exists() for p in done.values()):
        quantize(lm, QuantConfig(mode="static"), out_dir=work / "int8", latency_runs=0)
    for fmt, p in done.items():
        files[f"{fmt}/int8"] = (fmt, "int8", p)
    return files


def worker(paths: list[str], threads: int, runs: int, probe: str) -> dict[str, Any]:
    """Interleaved latency of `paths` at `threads` (run in its own process)."""
    from export.runtimes import load_runtime

    x = np.load(probe)
    rts = [load_runtime(p, threads=threads) for p in paths]
    feeds = [{rt.inputs[0].name: x} for rt in rts]
    for rt, feed in zip(rts, feeds, strict=True):
        for _ in range(20):
            rt.run(feed)
    times: list[list[float]] = [[] for _ in rts]
    for _ in range(runs):
        for i, (rt, feed) in enumerate(zip(rts, feeds, strict=True)):
            start = time.perf_counter()
            rt.run(feed)
            times[i].append((time.perf_counter() - start) * 1e3)
    return {p: {"p50": float(np.percentile(t, 50)), "p95": float(np.percentile(t, 95)), "runs": runs}
            for p, t in zip(paths, times, strict=True)}  # fmt: skip


def _subprocess_json(args: list[str]) -> Any:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-1500:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_model(name: str, work: Path, runs: int, threads: list[int]) -> list[dict[str, Any]]:
    from compress.zoo import load_model_dir, make_model_dir
    from export.coreml import NOT_RUN, can_predict, inspect_mlpackage
    from export.parity import ParityBounds, Recorded, check_parity
    from export.runtimes import load_runtime

    model_dir = work / name / "model"
    if not (model_dir / "model.json").exists():
        make_model_dir(name, model_dir, seed=0, progress=False)
    files = build_files(model_dir, work / name)
    lm = load_model_dir(model_dir)
    wl = lm.workload
    probe = work / name / "probe.npy"
    np.save(probe, np.ascontiguousarray(wl.eval_inputs()[wl.inputs[0].name][:1]))
    reference = Recorded(lm.predict)
    runnable = [label for label, (fmt, _, _) in files.items() if fmt in RUNTIME_FORMATS or can_predict()]
    latency = {}
    for t in threads:
        paths = [str(files[label][2]) for label in runnable]
        got = _subprocess_json([__file__, "--worker", str(t), str(runs), str(probe), *paths])
        latency[t] = {label: got[str(files[label][2])] for label in runnable}
    rows = []
    for label, (fmt, dtype, path) in files.items():
        row: dict[str, Any] = {"model": name, "format": fmt, "dtype": dtype, "size_bytes": path.stat().st_size}
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
        report = check_parity(reference, rt.run, wl.eval_inputs(), ParityBounds.for_dtype(dtype), metric=wl.metric.name,
                              raise_on_failure=False)  # fmt: skip
        out = report.outputs[0]
        row["parity"] = {"passed": report.passed, "max_abs": round(out.max_abs, 6),
                         **({"agreement": out.agreement} if out.agreement is not None else {}),
                         **({"min_cosine": round(out.min_cosine, 6)} if out.min_cosine is not None else {})}  # fmt: skip
        del rt
        rows.append(row)
    base = {r["format"]: r for r in rows if r["dtype"] == "fp32"}
    for r in rows:
        fp32 = base.get(r["format"])
        if fp32 and isinstance(r.get("p50_ms_t1"), float):
            r["p50_vs_fp32_t1"] = round(r["p50_ms_t1"] / fp32["p50_ms_t1"], 3)
    return rows


def table(rows: list[dict[str, Any]], threads: list[int]) -> str:
    cols = ["model", "format", "dtype", "size_kb", *[f"p50 t{t}" for t in threads], *[f"p95 t{t}" for t in threads],
            "x fp32", "cold ms", "RSS MB", "parity"]  # fmt: skip
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        p = r["parity"]
        parity = p if isinstance(p, str) else (f"agree {p['agreement']:.3f}" if "agreement" in p else f"cos {p.get('min_cosine')}")
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
    ap.add_argument("--models", nargs="+", default=["digits-cnn", "digits-mbnet"])
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "targets.json")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="pf-targets-"))
    rows = []
    for name in args.models:
        rows += measure_model(name, work, args.runs, args.threads)
    print(table(rows, args.threads))
    import os

    doc = {"rows": rows, "runs": args.runs, "threads": args.threads, "host": {"cpus": os.cpu_count(),
           "loadavg_1m": os.getloadavg()[0]}, "note": "latency measured round-robin; quote medians"}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
