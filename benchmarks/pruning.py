"""Structured and unstructured pruning of digits-mbnet: ours (uniform, global, sensitivity plan) against
Torch-Pruning at the same MACs budget, criterion (L2 group magnitude), round_to and KD fine-tuning, in
one run; then sparsity (magnitude with a polynomial schedule, 2:4) with honest zstd storage numbers.

    python benchmarks/pruning.py                         # full run (about 15-25 minutes on 2 busy cores)
    python benchmarks/pruning.py --quick                 # 2 fine-tuning epochs, for a smoke test
    python benchmarks/pruning.py --model-dir DIR         # use an existing digits-mbnet model directory

Every model is exported to ONNX through `export.export_model` (parity against PyTorch on the whole test
split), scored in onnxruntime on the test split, and timed against the dense model in interleaved
onnxruntime runs (batch 1, same thread count, same session options). MACs are counted on the PyTorch
graph (compress.prune.count_macs) and on the ONNX file (devices.analysis.count_macs). Fine-tuning picks
the epoch with the best validation top-1; the test split is only used for the reported numbers.

Writes benchmarks/results/pruning.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from compress.distill import DistillConfig, Distiller  # noqa: E402
from compress.prune import (  # noqa: E402
    PruneConfig,
    Sparsifier,
    SparsityConfig,
    check_onnx_nm,
    count_macs,
    count_params,
    layer_sensitivity,
    plan_from_sensitivity,
    plan_pruning,
    storage_sizes,
)
from compress.zoo import LoadedModel, load_model_dir, make_model_dir  # noqa: E402
from devices.analysis import count_macs as onnx_macs  # noqa: E402
from pocketfleet import table  # noqa: E402
from pocketfleet.timing import summarize  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
CACHE = Path.home() / ".cache" / "pocketfleet" / "bench"


@dataclass
class Setup:
    budget: float = 0.5  # fraction of the dense MACs kept
    extra_budgets: list[float] = field(default_factory=lambda: [0.35])  # automatic vs uniform also here
    importance: str = "l2"
    round_to: int = 8
    sensitivity_ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    finetune: dict[str, Any] = field(
        default_factory=lambda: {
            "epochs": 20,
            "lr": 2e-3,
            "alpha": 0.7,
            "temperature": 4.0,
            "shift": 1,
            "batch_size": 64,
        }
    )
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.75])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # fine-tuning seeds of the main comparison
    threads: int = 1  # torch threads for pruning / fine-tuning
    latency_threads: list[int] = field(default_factory=lambda: [1, 2])
    latency_runs: int = 2000


class Bench:
    def __init__(self, lm: LoadedModel, setup: Setup, work: Path) -> None:
        self.lm, self.setup, self.work = lm, setup, work
        self.wl = lm.workload
        self.example = lm.example_inputs(2)
        x_val, y_val = self.wl.data("val")
        self.x_val, self.y_val = torch.from_numpy(x_val["image"]), torch.from_numpy(y_val)
        x_train, y_train = self.wl.data("train")
        self.train = (x_train, y_train)
        xt, yt = torch.from_numpy(x_train["image"]), torch.from_numpy(y_train)
        self.batches = [(xt[i : i + 128], yt[i : i + 128]) for i in range(0, len(xt), 128)]
        self.dense_macs = count_macs(lm.module, self.example)
        self.dense_path: Path | None = None
        self.models: dict[str, tuple[nn.Module, Path]] = {}  # every measured model and its ONNX file

    def val_top1(self, model: nn.Module) -> float:
        with torch.no_grad():
            return float((model.eval()(self.x_val).argmax(1) == self.y_val).float().mean())

    def test_top1(self, model: nn.Module) -> float:
        return float(self.lm.evaluate(predict=_predict(model.eval(), self.wl))["value"])

    def finetune(
        self,
        model: nn.Module,
        teacher: nn.Module | None,
        hooks: list | None = None,
        keep_best: bool = True,
        seed: int = 0,
    ) -> dict[str, Any]:
        cfg = DistillConfig(**self.setup.finetune, threads=self.setup.threads, keep_best=keep_best, seed=seed)
        evaluate = self.val_top1 if keep_best else None
        report = Distiller(model, teacher, cfg).fit(
            self.train, evaluate=evaluate, step_hooks=hooks or [], progress=sys.stderr.isatty()
        )
        return {
            "seconds": report["seconds"],
            "best_epoch": report["best_epoch"],
            "val_top1": report["best_metric"],
        }

    def export(self, name: str, model: nn.Module) -> dict[str, Any]:
        """ONNX export with parity, onnxruntime test top-1, sizes, MACs from the file."""
        from export import export_model

        path = self.work / (re.sub(r"[^\w.@-]+", "_", name) + ".onnx")
        result = export_model(_as_loaded(self.lm, model), "onnx", out=None, model_out=path)
        sizes = storage_sizes(path)
        return {
            "onnx_path": path,
            "onnx_bytes": sizes["bytes"],
            "onnx_zstd_bytes": sizes["zstd_bytes"],
            "ort_test_top1": float(result.metric["value"]),
            "parity_max_abs": max(o["max_abs"] for o in result.parity.to_dict()["outputs"]),
            "onnx_macs": onnx_macs(path),
        }

    def latency(self, path: Path) -> dict[str, Any]:
        """p50 of `path` and of the dense model in interleaved onnxruntime runs, per thread count."""
        assert self.dense_path is not None
        out = {}
        image = self.wl.data("test")[0]["image"][:1]
        for threads in self.setup.latency_threads:
            stats = interleaved([self.dense_path, path], {"image": image}, threads, self.setup.latency_runs)
            out[f"t{threads}"] = {
                "dense_p50_ms": stats[0].p50_ms,
                "p50_ms": stats[1].p50_ms,
                "ratio": stats[1].p50_ms / stats[0].p50_ms,
            }
        return out

    def row(
        self,
        name: str,
        model: nn.Module,
        before: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        exported = self.export(name, model)
        macs = count_macs(model, self.example)
        row = {
            "name": name,
            "macs": macs,
            "macs_ratio": macs / self.dense_macs,
            "params": count_params(model),
            "test_top1": self.test_top1(model),
            **{k: v for k, v in exported.items() if k != "onnx_path"},
            **(before or {}),
            **(extra or {}),
        }
        self.models[name] = (model, exported["onnx_path"])
        if self.dense_path is None:
            self.dense_path = exported["onnx_path"]
        else:
            row["latency"] = self.latency(exported["onnx_path"])
        return row


def interleaved(paths: list[Path], feeds: dict[str, np.ndarray], threads: int, runs: int) -> list[Any]:
    """Alternate single runs of every model (rotating the order) so that machine load hits all alike."""
    import onnxruntime as ort

    sessions = []
    for p in paths:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        sessions.append(ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]))
    for s in sessions:
        for _ in range(50):
            s.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for i in range(runs):
        for k in range(len(sessions)):
            j = (i + k) % len(sessions)
            start = time.perf_counter()
            sessions[j].run(None, feeds)
            times[j].append(time.perf_counter() - start)
    return [summarize(t) for t in times]


def _predict(model: nn.Module, workload: Any) -> Any:
    from compress.zoo import torch_predict

    return torch_predict(model, workload)


def _as_loaded(lm: LoadedModel, module: nn.Module) -> LoadedModel:
    return LoadedModel(
        module=module.eval(), workload=lm.workload, config=lm.config, meta=lm.meta, path=lm.path
    )


# --- Torch-Pruning (the peer) ---------------------------------------------------------------------


def tp_prune(
    model: nn.Module, example: tuple, ratio: float, global_pruning: bool, round_to: int
) -> nn.Module:
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    pruner = tp.pruner.MetaPruner(
        m,
        example[0],
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        global_pruning=global_pruning,
        max_pruning_ratio=0.9,
        ignored_layers=[m.classifier],
        round_to=round_to,
    )
    pruner.step()
    return m


def tp_at_budget(
    model: nn.Module, example: tuple, budget: float, global_pruning: bool, round_to: int
) -> tuple[nn.Module, float]:
    """Torch-Pruning with the smallest pruning_ratio whose model keeps <= budget of our MACs count."""
    dense = count_macs(model, example)
    lo, hi, best = 0.0, 0.9, None
    for _ in range(14):
        mid = (lo + hi) / 2
        try:
            m = tp_prune(model, example, mid, global_pruning, round_to)
        except Exception:  # noqa: BLE001 - a ratio Torch-Pruning cannot realise: prune less
            hi = mid
            continue
        if count_macs(m, example) <= budget * dense:
            hi, best = mid, (m, mid)
        else:
            lo = mid
    if best is None:
        raise RuntimeError(f"Torch-Pruning cannot reach {budget} of the MACs")
    return best


# --- the run --------------------------------------------------------------------------------------


def structured(b: Bench, log: dict[str, Any]) -> list[dict[str, Any]]:
    s, dense, ex = b.setup, b.lm.module, b.example
    t0 = time.perf_counter()
    sens = layer_sensitivity(
        dense, ex, b.val_top1, s.sensitivity_ratios, s.importance, s.round_to, data=b.batches
    )
    log["sensitivity"] = {"seconds": round(time.perf_counter() - t0, 2), **sens.to_dict()}
    rows = []
    for budget in [s.budget, *s.extra_budgets]:
        candidates: dict[str, Any] = {}
        plans = {
            "ours-uniform": PruneConfig(target_macs=budget, importance=s.importance, round_to=s.round_to),
            "ours-sensitivity": plan_from_sensitivity(sens, dense, ex, budget, round_to=s.round_to),
        }
        if budget == s.budget:
            plans["ours-global"] = PruneConfig(
                target_macs=budget, importance=s.importance, round_to=s.round_to, global_ranking=True
            )
        for name, cfg in plans.items():
            t = time.perf_counter()
            plan = plan_pruning(dense, cfg, ex)
            candidates[name] = (
                plan.apply(b.batches),
                {"prune_seconds": round(time.perf_counter() - t, 2), "ratios": cfg.ratios or None},
            )
        if budget == s.budget:
            for name, glob in (("torch-pruning-uniform", False), ("torch-pruning-global", True)):
                t = time.perf_counter()
                model, ratio = tp_at_budget(dense, ex, budget, glob, s.round_to)
                candidates[name] = (
                    model,
                    {"prune_seconds": round(time.perf_counter() - t, 2), "tp_pruning_ratio": round(ratio, 4)},
                )
        for name, (model, info) in candidates.items():
            before = {"val_top1_pruned": b.val_top1(model), "test_top1_pruned": b.test_top1(model)}
            if budget == s.budget and len(s.seeds) > 1:  # the same pruned model fine-tuned with other seeds
                tops = []
                for seed in s.seeds[1:]:
                    other = copy.deepcopy(model)
                    b.finetune(other, dense, seed=seed)
                    tops.append(b.test_top1(other))
                info["other_seeds_test_top1"] = tops
            ft = b.finetune(model, dense, seed=s.seeds[0])
            rows.append(
                b.row(
                    f"{name}@{budget:g}",
                    model,
                    before,
                    {**info, "budget": budget, "finetune": ft, "kd": True},
                )
            )
            _progress(rows[-1])
        if budget == s.budget:  # the same plan fine-tuned without KD: what distillation adds
            model = plan_pruning(dense, plans["ours-sensitivity"], ex).apply(b.batches)
            ft = b.finetune(model, None)
            rows.append(
                b.row(
                    f"ours-sensitivity@{budget:g} (no KD)",
                    model,
                    None,
                    {"budget": budget, "finetune": ft, "kd": False},
                )
            )
            _progress(rows[-1])
    return rows


def sparse(b: Bench) -> list[dict[str, Any]]:
    s, dense = b.setup, b.lm.module
    steps = s.finetune["epochs"] * math.ceil(len(b.train[1]) / s.finetune["batch_size"])
    rows = []
    configs = {
        f"magnitude-global-{sp:g}": SparsityConfig(
            sparsity=sp,
            scope="global",
            schedule="polynomial",
            begin_step=0,
            end_step=int(0.7 * steps),
            frequency=10,
        )
        for sp in s.sparsities
    }
    configs["2:4"] = SparsityConfig(pattern="2:4")
    for name, cfg in configs.items():
        model = copy.deepcopy(dense)
        sp = Sparsifier(model, cfg)
        if cfg.pattern:
            sp.update(0.5)
            sp.apply()
        before = {"test_top1_pruned": b.test_top1(model)} if cfg.pattern else {}
        ft = b.finetune(
            model.train(), dense, hooks=[sp.step], keep_best=False
        )  # keep the final, fully sparse weights
        model = sp.finalize().eval()
        row = b.row(
            name,
            model,
            before,
            {"finetune": ft, "sparsity": sp.report()["sparsity"], "dense_layers": sorted(sp.skipped)},
        )
        if cfg.pattern:
            nm = check_onnx_nm(b.models[name][1], 2, 4)
            row["nm_check"] = {
                "ok": nm["ok"],
                "checked_layers": len(nm["layers"]),
                "dense_layers": len(nm["dense"]),
            }
        rows.append(row)
        _progress(row)
    return rows


def int8(b: Bench, names: list[str]) -> dict[str, Any]:
    """Static int8 (compress.quantize: ONNX QDQ and full-integer TFLite, per-channel, accuracy-aware with
    max_drop=0.01 so that layers int8 would hurt most stay float) of the named measured models, with
    package sizes against the fp32 dense package."""
    try:
        from compress.quantize import QuantConfig, quantize
    except ImportError as exc:
        return {"status": f"skipped: compress.quantize is not importable ({exc})"}
    out: dict[str, Any] = {"status": "ok", "models": {}}
    for i, name in enumerate(names):
        model, _ = b.models[name]
        try:
            result = quantize(
                _as_loaded(b.lm, model),
                QuantConfig(
                    mode="static", formats=["onnx", "tflite"], max_drop=0.01, threads=b.setup.threads
                ),
                out_dir=b.work / f"int8-{i}",
                name=f"digits-mbnet-{i}",
            )
        except Exception as exc:  # noqa: BLE001 - report the peer module's failure, keep the benchmark
            out["models"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        out["models"][name] = [
            {
                "format": a.format,
                "test_top1": a.metric.get("value"),
                "model_bytes": a.size_bytes,
                "package_bytes": a.package.stat().st_size if a.package else None,
                "package_zstd_bytes": storage_sizes(a.package)["zstd_bytes"] if a.package else None,
                "float_layers": a.float_layers,
            }
            for a in result.artifacts
        ]
    return out


def packages(b: Bench, names: list[str]) -> dict[str, Any]:
    """Unsigned .pfpkg packages (fp32 ONNX, parity-checked again) with their raw and zstd sizes."""
    from export import package_artifact

    out = {}
    for i, name in enumerate(names):
        model, path = b.models[name]
        pkg = b.work / f"package{i}.pfpkg"
        package_artifact(path, _as_loaded(b.lm, model), "onnx", "fp32", pkg, name="digits-mbnet")
        out[name] = storage_sizes(pkg)
    return out


def _progress(row: dict[str, Any]) -> None:
    print(
        f"  {row['name']}: test top-1 {row['test_top1']:.4f}, MACs x{row['macs_ratio']:.3f}",
        file=sys.stderr,
        flush=True,
    )


def render(result: dict[str, Any]) -> str:
    dense = result["dense"]
    lines = [
        f"dense digits-mbnet: test top-1 {dense['test_top1']:.4f}, MACs {dense['macs']:.0f}, params {dense['params']}, ONNX {dense['onnx_bytes']} B"
    ]
    rows = []
    for r in result["structured"]:
        lat = r.get("latency", {})
        rows.append(
            {
                "model": r["name"],
                "MACs x": round(r["macs_ratio"], 3),
                "onnx MACs x": round(r["onnx_macs"] / dense["onnx_macs"], 3),
                "params": r["params"],
                "top1 pruned": r.get("test_top1_pruned", ""),
                "top1 FT": round(r["test_top1"], 4),
                "drop pt": round(100 * (dense["test_top1"] - r["test_top1"]), 2),
                "mean top1 (seeds)": _seed_mean(r),
                "val FT": round(r["finetune"]["val_top1"], 4),
                "onnx x": round(r["onnx_bytes"] / dense["onnx_bytes"], 3),
                "p50 x (1t)": round(lat.get("t1", {}).get("ratio", float("nan")), 3),
                "p50 x (2t)": round(lat.get("t2", {}).get("ratio", float("nan")), 3),
            }
        )
    lines += ["", "structured pruning + fine-tuning (same KD schedule for every row)", table(rows)]
    rows = []
    for r in result["sparse"]:
        lat = r.get("latency", {})
        rows.append(
            {
                "model": r["name"],
                "sparsity": round(r["sparsity"], 3),
                "top1 FT": round(r["test_top1"], 4),
                "drop pt": round(100 * (dense["test_top1"] - r["test_top1"]), 2),
                "onnx x": round(r["onnx_bytes"] / dense["onnx_bytes"], 3),
                "zstd x (vs dense zstd)": round(r["onnx_zstd_bytes"] / dense["onnx_zstd_bytes"], 3),
                "p50 x (1t)": round(lat.get("t1", {}).get("ratio", float("nan")), 3),
                "2:4 check": r.get("nm_check", {}).get("ok", ""),
            }
        )
    lines += [
        "",
        "unstructured / 2:4 sparsity (fp32 ONNX; onnxruntime has no sparse kernels: expect p50 x ~1.0)",
        table(rows),
    ]
    pk = result.get("packages", {})
    if pk:
        lines += ["", "packages (.pfpkg, fp32 ONNX)", table([{"package": k, **v} for k, v in pk.items()])]
    q = result["int8"]
    if q.get("status") != "ok":
        lines += ["", f"int8: {q.get('status')}"]
    else:
        dense_pkg = pk["dense"]["bytes"]
        rows = []
        for name, arts in q["models"].items():
            for a in arts if isinstance(arts, list) else [{"format": "error", "test_top1": arts["error"]}]:
                rows.append(
                    {
                        "model": name,
                        "format": a["format"],
                        "test top1": a.get("test_top1"),
                        "drop pt": round(100 * (dense["test_top1"] - a["test_top1"]), 2)
                        if isinstance(a.get("test_top1"), float)
                        else "",
                        "package B": a.get("package_bytes", ""),
                        "x fp32 dense pkg": round(a["package_bytes"] / dense_pkg, 3)
                        if a.get("package_bytes")
                        else "",
                        "float layers": len(a.get("float_layers", [])),
                    }
                )
        lines += [
            "",
            "int8 (compress.quantize static, per-channel; packages vs the fp32 dense package)",
            table(rows),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir", type=Path, help="digits-mbnet model directory (made and cached if absent)"
    )
    parser.add_argument("--quick", action="store_true", help="2 fine-tuning epochs, one budget, one sparsity")
    parser.add_argument("--out", type=Path, default=OUT / "pruning.json")
    args = parser.parse_args(argv)
    setup = Setup()
    if args.quick:
        setup.finetune["epochs"], setup.extra_budgets, setup.sparsities, setup.latency_runs = (
            2,
            [],
            [0.5],
            300,
        )
    model_dir = args.model_dir or CACHE / "digits-mbnet"
    if not (model_dir / "model.json").exists():
        print(f"making digits-mbnet in {model_dir} ...", file=sys.stderr)
        make_model_dir("digits-mbnet", model_dir, progress=sys.stderr.isatty())
    torch.set_num_threads(setup.threads)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pf-bench-pruning-"))
    try:
        lm = load_model_dir(model_dir)
        b = Bench(lm, setup, work)
        result: dict[str, Any] = {
            "setup": asdict(setup),
            "model_dir": str(model_dir),
            "torch_threads": setup.threads,
        }
        result["dense"] = b.row("dense", lm.module)
        log: dict[str, Any] = {}
        result["structured"] = structured(b, log)
        result["sensitivity"] = log["sensitivity"]
        _save(args.out, {**result, "partial": True})
        result["sparse"] = sparse(b)
        _save(args.out, {**result, "partial": True})
        best = f"ours-sensitivity@{setup.budget:g}"
        result["packages"] = packages(b, ["dense", best])
        result["int8"] = int8(b, ["dense", best, *(f"ours-sensitivity@{x:g}" for x in setup.extra_budgets)])
        result["peer"] = {"torch_pruning": _version("torch-pruning")}
        result["seconds"] = round(time.perf_counter() - started, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _save(args.out, result)
    print(render(result))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


def _seed_mean(row: dict[str, Any]) -> str:
    others = row.get("other_seeds_test_top1")
    if not others:
        return ""
    tops = [row["test_top1"], *others]
    return f"{np.mean(tops):.4f} +- {np.std(tops):.4f} (n={len(tops)})"


def _save(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_json) + "\n")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _json(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
