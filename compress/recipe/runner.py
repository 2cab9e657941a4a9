"""Run a validated recipe: make or load the model, measure it, run the steps in order (measuring after
each), produce every target's artifact, time and estimate them, write DIR/report.json and DIR/report.png.

Output directory layout:
    DIR/model/            the zoo model made for the run (model.zoo recipes only)
    DIR/steps/*.onnx      fp32 ONNX snapshot of the baseline and of the model after every model step
    DIR/artifacts/        the targets' model files and their .pfpkg packages
    DIR/report.json, DIR/report.png
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pocketfleet import PocketfleetError

from .data import RecipeData
from .measure import clean_metric, file_costs, host_latencies, probe_inputs
from .schema import Recipe, Target, load_recipe
from .steps.base import Artifact, Failure, Step

if TYPE_CHECKING:
    from torch import nn

    from compress.prune import Sparsifier
    from compress.zoo import LoadedModel

REPORT_FILE, PLOT_FILE = "report.json", "report.png"
REPORT_FORMAT = "pocketfleet-compress-report/1"
MEASURED = ("metric", "size_bytes", "size_zstd_bytes", "macs", "params", "latency_ms")


class OutputDirError(PocketfleetError):
    """The output directory cannot be used."""


class Pipeline:
    """The state a recipe's steps work on: the current model (a LoadedModel whose module the steps
    replace or train), the model as it started, the data, and an active sparsifier."""

    def __init__(self, recipe: Recipe, model: LoadedModel, out: Path, progress: bool) -> None:
        self.recipe, self.model, self.out, self.progress = recipe, model, out, progress
        self.original = dataclasses.replace(model, module=copy.deepcopy(model.module).eval())
        self.data = RecipeData(recipe.data, model.workload)
        self.sparsifier: Sparsifier | None = None
        self.snapshot: Path | None = None  # fp32 ONNX file of the current model (written after every step)
        self.artifacts_dir = out / "artifacts"
        self.work_dir = Path(tempfile.mkdtemp(prefix="work-", dir=out))

    def set_module(self, module: nn.Module, config: dict[str, Any] | None = None) -> None:
        """Make `module` the current model (and `config` its architecture config, when it changed)."""
        changes: dict[str, Any] = {"module": module.eval()}
        if config is not None:
            changes["config"] = config
        self.model = dataclasses.replace(self.model, **changes)

    def finalize_sparsifier(self) -> None:
        if self.sparsifier is not None:
            self.sparsifier.finalize()
            self.sparsifier = None

    def val_score(self, module: nn.Module) -> float:
        """The workload metric of `module` on the validation split, as "higher is better"."""
        from compress.zoo import torch_predict

        wl = self.model.workload
        value = float(wl.evaluate(torch_predict(module, wl), split="val")["value"])
        return value if wl.metric.higher_is_better else -value

    def keep(self, path: Path) -> Path:
        """Move a file or package made in the work directory into DIR/artifacts."""
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        dest = self.artifacts_dir / Path(path).name
        if dest.is_dir():
            shutil.rmtree(dest)
        shutil.move(str(path), dest)
        return dest


def run_recipe(
    recipe: Recipe | str | Path, out_dir: str | Path, progress: bool = False, force: bool = False
) -> dict[str, Any]:
    """Run `recipe` (a Recipe or a recipe file) into `out_dir`; returns the report (also written as
    out_dir/report.json, with the plot out_dir/report.png). The recipe is fully validated before
    anything is written; `out_dir` must be empty or absent unless `force`. A target whose artifact
    cannot be made (e.g. parity out of bounds: no package is written) is listed under "failed" with
    the reason, and the other targets are still made."""
    from tqdm.auto import tqdm

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = _prepare_out(Path(out_dir), force)
    started = time.perf_counter()
    total = 3 + len(recipe.model_steps) + len(recipe.targets)
    bar = tqdm(total=total, desc="model", unit="stage", file=sys.stderr, disable=not progress, leave=False)
    if recipe.model.onnx is not None:
        bar.close()
        return _run_onnx(recipe, out, started)
    try:
        with _threads(recipe.run.threads):
            model = _load_model(recipe, out)
            bar.update()
            pipeline = Pipeline(recipe, model, out, progress)
            try:
                report = _run(pipeline, bar, started)
            finally:
                shutil.rmtree(pipeline.work_dir, ignore_errors=True)
    finally:
        bar.close()
    from .plot import write_plot
    from .report import write_report

    write_report(report, out / REPORT_FILE)
    write_plot(report, out / PLOT_FILE)
    return report


def _run_onnx(recipe: Recipe, out: Path, started: float) -> dict[str, Any]:
    """An existing ONNX file (`[model] onnx`): the file itself is the baseline, and every target (onnx/fp32,
    checked by load_recipe) is the file packaged with parity of the copy and sample outputs."""
    from export.metrics import resolve_metric
    from export.pipeline import package_artifact

    from .onnx_source import OnnxSource
    from .plot import write_plot
    from .report import write_report
    from .user_recipe import load_source

    file = Path(recipe.model.onnx or "")
    probe = OnnxSource.load(file)
    rows, labels = None, None
    for source in (recipe.data.eval, recipe.data.finetune, recipe.data.calibration):
        if source.file is not None or source.folder is not None:
            rows, labels = load_source(source, list(probe.input_specs))
            break
    metric = resolve_metric(recipe.model.metric) if recipe.model.metric else None
    src = OnnxSource.load(file, rows=rows, labels=labels, metric=metric, name=recipe.name)
    steps_dir, art_dir = out / "steps", out / "artifacts"
    steps_dir.mkdir(exist_ok=True)
    art_dir.mkdir(exist_ok=True)
    shutil.copyfile(file, steps_dir / "baseline.onnx")
    baseline = {"path": str(steps_dir / "baseline.onnx"), "format": "onnx", "dtype": "fp32",
                "metric": clean_metric(src.evaluate()), **file_costs(file), "latency_ms": None}
    artifacts, failed = [], []
    for i, t in enumerate(recipe.targets):
        model_file = art_dir / f"{t.name}.fp32.onnx"
        shutil.copyfile(file, model_file)
        try:
            res = package_artifact(model_file, src, "onnx", "fp32", art_dir / f"{t.name}.fp32.onnx.pfpkg", name=t.name,
                                   version=t.version, key=t.key, device=_device_name(t))
        except PocketfleetError as exc:
            failed.append({"target": i, "format": t.format, "dtype": t.dtype, "step": None, "error": str(exc)})
            continue
        artifacts.append({"target": i, "name": t.name, "version": t.version, "signed": t.key is not None,
                          "path": str(model_file), "package": str(res.package), "format": "onnx", "dtype": "fp32",
                          "mode": "export", "metric": clean_metric(res.metric), **file_costs(model_file),
                          "latency_ms": None, "parity": res.parity.to_dict(), "float_layers": [], "device": None,
                          "details": {}})  # fmt: skip
    _time_all([baseline, *artifacts], probe_inputs(src), recipe)
    report = {
        "format": REPORT_FORMAT, "recipe": str(recipe.file), "name": recipe.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"workload": recipe.name, "source": "onnx", "path": str(file), "params": baseline["params"]},
        "metric": {"name": src.metric_name, "higher_is_better": metric.higher_is_better if metric else True},
        "data": {"rows": len(next(iter(src.rows.values())))}, "baseline": baseline, "steps": [],
        "artifacts": artifacts, "failed": failed,
        "host": {"threads": recipe.run.threads, "latency_seconds": recipe.run.latency_seconds},
        "seconds": round(time.perf_counter() - started, 2), "config": recipe.to_dict(),
    }  # fmt: skip
    write_report(report, out / REPORT_FILE)
    write_plot(report, out / PLOT_FILE)
    return report


def _prepare_out(out: Path, force: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputDirError(
            f"--out {out} is not empty; choose a new directory or pass --force to write into it"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


class _threads:
    """torch intra-op threads for the run (evaluation, snapshots), restored afterwards."""

    def __init__(self, n: int) -> None:
        self.n, self.before = n, None

    def __enter__(self) -> None:
        import torch

        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self.before or 1)


def _load_model(recipe: Recipe, out: Path) -> LoadedModel:
    from compress.zoo import load_model_dir, make_model_dir

    spec = recipe.model
    if recipe.user is not None and recipe.user.model is not None:
        return recipe.user.model  # a factory model, built (and its data read) by the recipe check
    if spec.zoo is not None:
        path = make_model_dir(spec.zoo, out / "model", seed=spec.seed, progress=False)
    else:
        path = Path(spec.path or "")
    return load_model_dir(path)


def _run(p: Pipeline, bar: Any, started: float) -> dict[str, Any]:
    recipe, wl = p.recipe, p.model.workload
    steps_dir = p.out / "steps"
    steps_dir.mkdir(exist_ok=True)
    bar.set_description("baseline")
    baseline = _measure_model(p, steps_dir / "baseline.onnx")
    bar.update()
    rows = _model_steps(p, steps_dir, bar)
    made, failures, export_rows = _exports(p, bar)
    artifacts = [_artifact_row(p, a) for a in sorted(made, key=lambda a: a.target)]
    bar.set_description("latency")
    _time_all([baseline, *rows, *artifacts], probe_inputs(wl), recipe)
    bar.update()
    by_target = {a["target"]: a for a in artifacts}
    for step, seconds, produced in export_rows:  # an export step's row repeats its first artifact's numbers
        row = _step_row(step, seconds, {"artifacts": produced})
        first = by_target.get(produced[0]) if produced else {}
        row.update({k: first.get(k) for k in (*MEASURED, "path")})
        rows.append(row)
    return {
        "format": REPORT_FORMAT,
        "recipe": str(recipe.file),
        "name": recipe.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "workload": wl.name,
            "source": next(k for k in ("zoo", "path", "factory", "onnx") if getattr(recipe.model, k) is not None),
            "path": str(p.original.path),
            "params": int(sum(x.numel() for x in p.original.module.parameters())),
        },
        "metric": {"name": wl.metric.name, "higher_is_better": wl.metric.higher_is_better},
        "data": p.data.describe(),
        "baseline": baseline,
        "steps": rows,
        "artifacts": artifacts,
        "failed": [_failure_row(recipe, f) for f in sorted(failures, key=lambda f: f.target)],
        "host": {"threads": recipe.run.threads, "latency_seconds": recipe.run.latency_seconds},
        "seconds": round(time.perf_counter() - started, 2),
        "config": recipe.to_dict(),
    }


def _model_steps(p: Pipeline, steps_dir: Path, bar: Any) -> list[dict[str, Any]]:
    """Run the model steps in order, measuring the model after each."""
    rows = []
    for step in p.recipe.model_steps:
        bar.set_description(f"{step.ctx.path} {step.type}")
        if not step.trains:
            p.finalize_sparsifier()
        t0 = time.perf_counter()
        details = step.run(p)
        row = _step_row(step, time.perf_counter() - t0, details)
        row.update(_measure_model(p, steps_dir / f"{step.ctx.index:02d}-{step.type}.onnx"))
        rows.append(row)
        bar.update()
    p.finalize_sparsifier()
    return rows


def _exports(
    p: Pipeline, bar: Any
) -> tuple[list[Artifact], list[Failure], list[tuple[Step, float, list[int]]]]:
    """Every target's artifact: from the export step that claims it, else a plain fp32/fp16 export.
    A target that cannot be made is a Failure (the others are still made)."""
    recipe = p.recipe
    results: list[Artifact | Failure] = []
    export_rows = []
    for step in recipe.export_steps:
        claimed = [(i, t) for i, t in enumerate(recipe.targets) if step.claims(t)]
        bar.set_description(f"{step.ctx.path} {step.type}: {', '.join(t.label for _, t in claimed)}")
        t0 = time.perf_counter()
        produced = step.export(p, claimed)
        results += produced
        export_rows.append(
            (step, time.perf_counter() - t0, [a.target for a in produced if isinstance(a, Artifact)])
        )
        bar.update(len(claimed))
    for i, target in enumerate(recipe.targets):
        if recipe.producer(i) is None:
            bar.set_description(f"targets[{i}] {target.label}")
            try:
                results.append(_plain_export(p, i, target))
            except PocketfleetError as exc:  # e.g. parity out of bounds: no package written
                results.append(Failure(i, str(exc)))
            bar.update()
    made = [r for r in results if isinstance(r, Artifact)]
    return made, [r for r in results if isinstance(r, Failure)], export_rows


def _failure_row(recipe: Recipe, failure: Failure) -> dict[str, Any]:
    target = recipe.targets[failure.target]
    producer = recipe.producer(failure.target)
    return {
        "target": failure.target,
        "format": target.format,
        "dtype": target.dtype,
        "step": producer.ctx.path if producer is not None else None,
        "error": failure.error,
    }


def _step_row(step: Step, seconds: float, details: dict[str, Any]) -> dict[str, Any]:
    return {
        "index": step.ctx.index,
        "type": step.type,
        "kind": step.kind,
        "seconds": round(seconds, 2),
        "details": details,
    }


def _time_all(rows: list[dict[str, Any]], probe: dict[str, Any], recipe: Recipe) -> None:
    """Host latency of every row's file, measured together (round-robin) at the end of the run (a Core ML
    file off macOS: "not run on this host")."""
    from export.mlpackage import NOT_RUN, can_predict

    files = {str(i): Path(r["path"]) for i, r in enumerate(rows) if r["format"] != "coreml" or can_predict()}
    for i, r in enumerate(rows):
        if str(i) not in files:
            r["latency_ms"] = NOT_RUN
    for key, stats in host_latencies(files, probe, recipe.run).items():
        rows[int(key)]["latency_ms"] = stats


def _measure_model(p: Pipeline, path: Path) -> dict[str, Any]:
    """The current PyTorch model: workload metric (test split), and its fp32 ONNX snapshot's size and
    MACs (latency is measured later, with every other file of the run)."""
    from export.pipeline import convert

    convert(p.model, "onnx", "fp32", path)
    p.snapshot = path
    return {
        "path": str(path),
        "format": "onnx",
        "dtype": "fp32",
        "metric": clean_metric(p.model.evaluate()),
        **file_costs(path),
        "latency_ms": None,  # filled in by _time_all, with every other file of the run
    }


def _plain_export(p: Pipeline, index: int, target: Target) -> Artifact:
    """An fp32 / fp16 target of the final model, parity checked and packaged: the fp32 ONNX snapshot of
    the final model is reused as is (export.package_artifact); other files are converted
    (export.export_model)."""
    from export.pipeline import SUFFIX, export_model, package_artifact

    stem = f"{target.name}.{target.dtype}"
    p.artifacts_dir.mkdir(parents=True, exist_ok=True)
    model_file = p.artifacts_dir / f"{stem}{SUFFIX[target.format]}"
    package = p.artifacts_dir / f"{stem}.{target.format}.pfpkg"
    common = {
        "name": target.name,
        "version": target.version,
        "key": target.key,
        "device": _device_name(target),
    }
    if (target.format, target.dtype) == ("onnx", "fp32") and p.snapshot is not None:
        shutil.copyfile(p.snapshot, model_file)
        result = package_artifact(model_file, p.model, "onnx", "fp32", package, **common)
    else:
        result = export_model(
            p.model, target.format, target.dtype, out=package, model_out=model_file, **common
        )
    return Artifact(
        target=index, path=model_file, package=package, format=target.format, dtype=target.dtype,
        mode="export", metric=result.metric, parity=result.parity.to_dict(),
        details={"export_seconds": round(result.export_seconds, 2)},
    )  # fmt: skip


def _device_name(target: Target) -> str | None:
    return Path(target.device).stem if target.device and target.device.endswith(".toml") else target.device


def _artifact_row(p: Pipeline, a: Artifact) -> dict[str, Any]:
    target = p.recipe.targets[a.target]
    row: dict[str, Any] = {
        "target": a.target,
        "name": target.name,
        "version": target.version,
        "signed": target.key is not None,
        "path": str(a.path),
        "package": str(a.package) if a.package else None,
        "package_bytes": _size(a.package) if a.package else None,
        "format": a.format,
        "dtype": a.dtype,
        "mode": a.mode,
        "metric": clean_metric(a.metric),
        **file_costs(a.path),
        "latency_ms": None,
        "parity": a.parity,
        "float_layers": a.float_layers,
        "device": _estimate(a, target) if target.device else None,
        "details": a.details,
    }
    return row


def _size(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    )


def _estimate(a: Artifact, target: Target) -> dict[str, Any]:
    """The device profile's static estimate for the package (latency, RAM, storage, fits)."""
    from devices import estimate
    from devices.graph import GRAPH_FORMATS

    if a.format not in GRAPH_FORMATS.values():
        return {"device": target.device, "estimated_ms": None,
                "warnings": [f"no static estimate: devices cannot read {a.format} programs (host latency is measured)"]}  # fmt: skip

    e = estimate(a.package or a.path, target.device or "", measure=False)
    keys = (
        "device", "estimated_ms", "compute_ms", "memory_ms", "overhead_ms", "memory_level", "ram_needed_bytes",
        "ram_bytes", "fits_ram", "storage_needed_bytes", "storage_budget_bytes", "fits_storage",
        "format_supported", "dtypes_supported", "fits", "warnings",
    )  # fmt: skip
    d = e.to_dict()
    return {k: d[k] for k in keys}
