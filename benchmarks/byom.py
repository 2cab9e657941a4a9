"""Bring your own model: every step of pocketfleet on architectures this project did not write.

`transformers` model classes with small configs and random init (no download) and user-style modules from
examples/byom_models.py (examples/byom_zoo.py lists them). For each architecture, each step is one cell,
pass or fail with a one-line error:

    onnx_fp32 / tflite_fp32     export.export_model(module, ..., example_inputs=...) with parity in the runtime
    onnx_int8_static / _dynamic compress.quantize, output fidelity to the PyTorch fp32 outputs, next to
    tflite_int8_static/_dynamic onnxruntime's quantize_static / quantize_dynamic (best of per-tensor and
                                per-channel) and ai-edge-quantizer (static_wi8_ai8 / dynamic_wi8_afp32) on the
                                same calibration rows
    prune_export                compress.prune to half the channels, then ONNX export with parity

Fidelity = mean cosine similarity of every output to fp32 (the lowest over outputs); ours "wins" a cell when
its cosine is >= the best peer's - 1e-4. The models are random-init and the rows random (ids in the vocab,
standard-normal floats): fidelity, not accuracy, is what is measured.

    python benchmarks/byom.py --quick        # 5 architectures
    python benchmarks/byom.py                # all, writes benchmarks/results/byom.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pocketfleet import table  # noqa: E402

CALIB_ROWS, EVAL_ROWS = 32, 32
STEPS = ("onnx_fp32", "tflite_fp32", "onnx_int8_static", "onnx_int8_dynamic", "tflite_int8_static",
         "tflite_int8_dynamic", "prune_export")  # fmt: skip
INT8 = STEPS[2:6]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-300), 1.0)))


def fidelity(path: Path, reference: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> dict[str, Any]:
    """Cosine (lowest over outputs) and top-1 agreement (first output, when it is [batch, classes])."""
    from export.runtimes import load_runtime

    rt = load_runtime(path)
    out = {}
    for i in range(len(next(iter(rows.values())))):  # batch 1: static TFLite files have a fixed batch
        got = rt.run({k: v[i : i + 1] for k, v in rows.items()})
        for k, v in got.items():
            out.setdefault(k, []).append(v)
    got = {k: np.concatenate(v) for k, v in out.items()}
    names = list(reference)
    cos = min(cosine(got[n], reference[n]) for n in names)
    first = reference[names[0]]
    res: dict[str, Any] = {"cosine": round(cos, 5)}
    if first.ndim == 2 and first.shape[1] > 1:
        res["agreement"] = round(float((got[names[0]].argmax(1) == first.argmax(1)).mean()), 4)
    return res


class _Reader:
    def __init__(self, calib: dict[str, np.ndarray]) -> None:
        n = len(next(iter(calib.values())))
        self.items = iter([{k: v[i : i + 1] for k, v in calib.items()} for i in range(n)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def ort_peers(fp32: Path, calib: dict[str, np.ndarray], kind: str, work: Path) -> dict[str, Path]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static

    model = onnx.load(str(fp32))
    del model.graph.value_info[:]  # the quantizer re-infers shapes and trips on the exporter's stale entries
    src = work / f"peer-src-{kind}.onnx"
    onnx.save(model, str(src))
    out = {}
    for per_channel in (False, True):
        label = f"ort quantize_{kind} per-{'channel' if per_channel else 'tensor'}"
        path = work / f"peer-{kind}-{int(per_channel)}.onnx"
        try:
            if kind == "static":
                quantize_static(str(src), str(path), _Reader(calib), per_channel=per_channel)
            else:
                quantize_dynamic(str(src), str(path), weight_type=QuantType.QInt8, per_channel=per_channel)
            out[label] = path
        except Exception as exc:  # noqa: BLE001 - a peer failing is recorded, not fatal
            out[label] = exc  # type: ignore[assignment]
    return out


def aeq_peer(fp32: Path, calib: dict[str, np.ndarray], kind: str, work: Path) -> dict[str, Any]:
    from ai_edge_quantizer import quantizer, recipe

    label = f"ai-edge-quantizer {'static_wi8_ai8' if kind == 'static' else 'dynamic_wi8_afp32'}"
    try:
        q = quantizer.Quantizer(bytearray(fp32.read_bytes()))
        q.load_quantization_recipe(recipe.static_wi8_ai8() if kind == "static" else recipe.dynamic_wi8_afp32())
        qsvs = None
        if kind == "static":
            from compress.quantize.tflite_quant import _as_input_dtypes

            calib = _as_input_dtypes(fp32.read_bytes(), calib)  # int64 token ids -> the file's int32 input, as a user would
            rows = [{k: v[i : i + 1] for k, v in calib.items()} for i in range(len(next(iter(calib.values()))))]
            qsvs = q.calibrate({"serving_default": rows})
        result = q.quantize(qsvs)
        path = work / f"peer-aeq-{kind}.tflite"
        path.write_bytes(bytes(result.quantized_model))
        return {label: path}
    except Exception as exc:  # noqa: BLE001
        return {label: exc}


def run_arch(name: str, work: Path, steps: tuple[str, ...] = STEPS) -> dict[str, Any]:
    import torch

    from compress.prune import PruneConfig, plan_pruning
    from compress.quantize import QuantConfig, quantize
    from examples.byom_zoo import ARCHS, rows_like
    from export.pipeline import export_model

    cells: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    module, examples = ARCHS[name]()
    calib = rows_like(examples, CALIB_ROWS, 1)
    evalr = rows_like(examples, EVAL_ROWS, 2)
    params = int(sum(p.numel() for p in module.parameters()))
    names = list(examples)
    with torch.no_grad():
        out = module(*[torch.from_numpy(evalr[n]) for n in names])
    outs = out if isinstance(out, tuple) else (out,)
    out_names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
    reference = {n: t.numpy() for n, t in zip(out_names, outs, strict=True)}

    def cell(step: str, fn: Any) -> Any:
        if step not in steps:
            return None
        t0 = time.perf_counter()
        try:
            value = fn()
            cells[step] = {"pass": True, "seconds": round(time.perf_counter() - t0, 1), **(value or {})}
        except Exception as exc:  # noqa: BLE001 - every failure is a cell with its one-line error
            cells[step] = {"pass": False, "seconds": round(time.perf_counter() - t0, 1), "error": one_line(exc)}
            if os.environ.get("BYOM_TRACE"):
                traceback.print_exc()
        log(f"{name}: {step} {'pass' if cells[step]['pass'] else 'FAIL ' + cells[step]['error'][:160]}")
        return cells[step]

    fp32_files: dict[str, Path] = {}

    def export_fp32_quiet(fmt: str) -> None:
        with contextlib.suppress(Exception):  # the int8 cells then say the export failed
            export_fp32(fmt)

    def export_fp32(fmt: str) -> dict[str, Any]:
        path = work / f"{name}.fp32.{'onnx' if fmt == 'onnx' else 'tflite'}"
        res = export_model(module, fmt, "fp32", out=None, example_inputs=examples, input_names=names,
                           output_names=out_names, parity_inputs=evalr, model_out=path)
        if not res.parity.passed:
            raise RuntimeError(f"parity out of bounds: {res.parity.to_dict()}")
        fp32_files[fmt] = path
        return {"fidelity": fidelity(path, reference, evalr)}

    # an int8 step needs its fp32 file: asking for it runs that export too
    for fmt in ("onnx", "tflite"):
        if f"{fmt}_fp32" in steps:
            cell(f"{fmt}_fp32", lambda fmt=fmt: export_fp32(fmt))
        elif any(s.startswith(fmt + "_int8") for s in steps):
            export_fp32_quiet(fmt)

    for kind in ("static", "dynamic"):
        if not any(s.endswith(f"int8_{kind}") for s in steps):
            continue
        wanted = [f for f in ("onnx", "tflite") if f"{f}_int8_{kind}" in steps]
        formats = [f for f in wanted if f in fp32_files]
        if not formats:
            for fmt in wanted:
                cells[f"{fmt}_int8_{kind}"] = {"pass": False, "error": "no fp32 file to quantize (export failed)"}
            continue
        cfg = QuantConfig(mode=kind, formats=formats, calib_samples=CALIB_ROWS, parity_min_agreement=0.0,
                          parity_min_cosine=-1.0)
        t0 = time.perf_counter()
        by_fmt: dict[str, Any] = {}
        # one call for both formats; when it fails, one call per format (so that one format's failure is its own)
        for group in ([formats] if len(formats) == 1 else [formats, *[[f] for f in formats]]):
            try:
                result = quantize(module, dataclasses.replace(cfg, formats=group), calib, out_dir=work / f"q-{kind}",
                                  example_inputs=examples, input_names=names, output_names=out_names,
                                  latency_runs=0, name=name, fp32={f: fp32_files[f] for f in group})
                by_fmt.update({a.format: a for a in result.artifacts})
                if len(group) > 1:
                    break
            except Exception as exc:  # noqa: BLE001
                if len(group) == 1:
                    by_fmt[group[0]] = exc
                if os.environ.get("BYOM_TRACE"):
                    traceback.print_exc()
        seconds = round((time.perf_counter() - t0) / len(formats), 1)
        for fmt in ("onnx", "tflite"):
            step = f"{fmt}_int8_{kind}"
            if step not in steps:
                continue
            if fmt not in fp32_files:
                cells[step] = {"pass": False, "error": f"no fp32 {fmt} file to quantize (export failed)"}
                continue
            peers = (ort_peers if fmt == "onnx" else aeq_peer)(fp32_files[fmt], calib, kind, work)

            def measure(fmt: str = fmt, peers: dict[str, Any] = peers, by_fmt: dict[str, Any] = by_fmt,
                        seconds: float = seconds) -> dict[str, Any]:
                art = by_fmt[fmt]
                if isinstance(art, Exception):
                    raise art
                ours = fidelity(art.path, reference, evalr)
                scored = {}
                for label, p in peers.items():
                    try:
                        if isinstance(p, Exception):
                            raise p
                        scored[label] = fidelity(p, reference, evalr)
                    except Exception as exc:  # noqa: BLE001
                        scored[label] = {"error": one_line(exc)}
                ok = [v["cosine"] for v in scored.values() if "cosine" in v]
                best = max(ok) if ok else None
                return {"ours": ours, "float_layers": list(art.float_layers), "peers": scored,
                        "best_peer_cosine": best, "ours_ge_peer": best is None or ours["cosine"] >= best - 1e-4,
                        "quantize_seconds": seconds}  # fmt: skip

            cell(step, measure)

    def pruned() -> dict[str, Any]:
        """Half the channels of every prunable group. Submodules the tracer cannot follow are kept whole by
        compress.prune itself (recorded as `kept_whole`); when nothing shrinks, the pruner's own reasons for
        its frozen groups are the error."""
        ex = tuple(torch.from_numpy(examples[n]) for n in names)
        plan = plan_pruning(module, PruneConfig(ratio=0.5), ex)
        small = plan.apply()
        after = int(sum(p.numel() for p in small.parameters()))
        if after >= params:
            raise RuntimeError(f"nothing was pruned: {plan.why_frozen()}")
        res = export_model(small, "onnx", "fp32", out=None, example_inputs=examples, input_names=names,
                           output_names=out_names, parity_inputs=evalr)
        if not res.parity.passed:
            raise RuntimeError(f"parity of the pruned export out of bounds: {res.parity.to_dict()}")
        return {"params_before": params, "params_after": after, "params_ratio": round(after / params, 3),
                "macs_ratio": round(plan.macs_after / plan.macs_before, 3) if plan.macs_before else None,
                "kept_whole": plan.graph.leaves}

    cell("prune_export", pruned)
    return {"arch": name, "params": params, "inputs": {n: [list(a.shape[1:]), str(a.dtype)] for n, a in examples.items()},
            "cells": cells, "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    cells = [(r["arch"], s, c) for r in results for s, c in r["cells"].items()]
    passed = sum(c["pass"] for _, _, c in cells)
    int8 = [(a, s, c) for a, s, c in cells if s in INT8 and c["pass"] and c.get("best_peer_cosine") is not None]
    wins = sum(c["ours_ge_peer"] for _, _, c in int8)
    failures = [f"{a} {s}: {c['error']}" for a, s, c in cells if not c["pass"]]
    return {
        "architectures": len(results),
        "cells": len(cells),
        "passed": passed,
        "pass_rate": round(passed / max(len(cells), 1), 4),
        "int8_cells_compared": len(int8),
        "int8_ours_ge_peer": wins,
        "int8_win_rate": round(wins / max(len(int8), 1), 4),
        "goals": {
            "pass_rate >= 0.90": passed / max(len(cells), 1) >= 0.90,
            "int8 ours >= peer on >= 90%": wins / max(len(int8), 1) >= 0.90,
        },
        "failures": failures,
        "losses": [f"{a} {s}: ours {c['ours']['cosine']} < peer {c['best_peer_cosine']}" for a, s, c in int8
                   if not c["ours_ge_peer"]],
    }


def render(results: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    rows = []
    for r in results:
        row: dict[str, Any] = {"arch": r["arch"], "params": r["params"]}
        for s in STEPS:
            c = r["cells"].get(s, {})
            if not c:
                row[s] = "-"
            elif not c["pass"]:
                row[s] = "FAIL"
            elif s in INT8:
                peer = c.get("best_peer_cosine")
                row[s] = f"{c['ours']['cosine']:.4f}" + (f"/{peer:.4f}" if peer is not None else "")
            else:
                row[s] = "ok"
        rows.append(row)
    lines = ["int8 cells: ours cosine / best peer cosine to fp32 outputs", table(rows, ["arch", "params", *STEPS]), ""]
    lines.append(f"cells passed {summary['passed']}/{summary['cells']} ({summary['pass_rate']:.0%}); int8 ours >= peer "
                 f"{summary['int8_ours_ge_peer']}/{summary['int8_cells_compared']} ({summary['int8_win_rate']:.0%})")
    lines += [f"  FAIL {f}" for f in summary["failures"]]
    lines += [f"  LOSS {x}" for x in summary["losses"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from examples.byom_zoo import ARCHS, QUICK

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--archs", nargs="+", choices=sorted(ARCHS), help="these architectures only")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="these steps only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON to write (default benchmarks/results/byom.json; byom-quick.json with --quick)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    names = args.archs or (list(QUICK) if args.quick else list(ARCHS))
    out = args.out or ROOT / "benchmarks" / "results" / ("byom-quick.json" if args.quick else "byom.json")
    started = time.perf_counter()
    results = []
    for name in names:
        work = Path(tempfile.mkdtemp(prefix=f"pf-byom-{name}-"))
        try:
            results.append(run_arch(name, work, tuple(args.steps)))
        except Exception as exc:  # noqa: BLE001 - the architecture itself could not be built
            results.append({"arch": name, "params": 0, "cells": {s: {"pass": False, "error": one_line(exc)} for s in STEPS},
                            "seconds": 0.0})  # fmt: skip
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log(f"{name} done in {results[-1]['seconds']} s")
    summary = summarize(results)
    print(render(results, summary), flush=True)
    doc = {
        "benchmark": "byom",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
                 "note": "timings taken on a shared, loaded 2-core machine"},
        "calibration_rows": CALIB_ROWS, "eval_rows": EVAL_ROWS,
        "seconds": round(time.perf_counter() - started, 1),
        "summary": summary,
        "results": results,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
