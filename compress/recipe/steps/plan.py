"""`latency_plan` step: compress.plan on the final model for the [[targets]] of one device: searches
pruning level x float layers x format (ONNX QDQ / QOperator, TFLite, ExecuTorch) x threads, judged by latency on the device (measured on `host`, estimated elsewhere), and ships the
smallest model meeting max_drop and the latency budget (never one slower than fp32)."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any

from compress.plan.config import PlanConfig

from .base import Artifact, Failure, Step, register_step

if TYPE_CHECKING:
    from ..runner import Pipeline
    from ..schema import Recipe, Target


@register_step
class LatencyPlanStep(Step):
    """PlanConfig options. Claims the [[targets]] whose `device` is this step's `device`; their format
    is the one searched unless `formats` lists more, and the artifact is whatever the plan picked (its
    report row gives the format and dtype). The plan's table and plot: DIR/plan-<target>/plan.{md,png,json}."""

    type = "latency_plan"
    kind = "export"
    config_cls = PlanConfig

    def check(self) -> None:
        device = self.config.device
        if device != "host":
            from devices.profile import profile_names

            if device not in profile_names():
                raise self.error(f"unknown device {device!r}; known devices: host, {', '.join(profile_names())}",
                                 "device")  # fmt: skip

    def claims(self, target: Target) -> bool:
        return target.device == self.config.device

    def check_recipe(self, recipe: Recipe) -> None:
        if not any(self.claims(t) for t in recipe.targets):
            raise self.error(f'no [[targets]] entry has device = "{self.config.device}" for this plan', "device")

    def export(self, pipeline: Pipeline, targets: list[tuple[int, Target]]) -> list[Artifact | Failure]:
        from compress.plan.search import run_plan
        from compress.recipe.measure import probe_inputs

        cfg = self.config
        threads = cfg.threads or [pipeline.recipe.run.threads]
        results: list[Artifact | Failure] = []
        plans: dict[tuple[str, ...], Any] = {}
        for index, target in targets:
            formats = tuple(cfg.formats or [target.format])
            if formats not in plans:
                plans[formats] = run_plan(
                    pipeline.model, cfg, formats, pipeline.data.calibration(), pipeline.data.batches(limit=16),
                    pipeline.val_score, probe_inputs(pipeline.model.workload),
                    pipeline.work_dir / f"plan-{index}", pipeline.out / f"plan-{index}", threads,
                    name=target.name or "plan", progress=pipeline.progress,
                    train_data=pipeline.data.finetune() if cfg.recover_epochs else None,
                )  # fmt: skip
            plan = plans[formats]
            summary = {"report": plan.files, "picked": plan.report["picked"], "why_none": plan.report["why_none"],
                       "int8_dropped": plan.report["int8_dropped"], "front": plan.report["front"],
                       "references": plan.report["references"], "note": plan.report["note"]}  # fmt: skip
            if plan.pick is None:
                results.append(Failure(index, "latency_plan: no candidate meets the budgets: "
                                              + "; ".join(plan.report["why_none"])))  # fmt: skip
                continue
            results.append(self._package(pipeline, index, target, plan.pick, summary))
        return results

    def _package(self, pipeline: Pipeline, index: int, target: Target, pick: Any, summary: dict[str, Any]) -> Artifact:
        from export.pipeline import SUFFIX, package_artifact

        pipeline.artifacts_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{target.name}.plan.{pick.dtype}"
        model_file = pipeline.artifacts_dir / f"{stem}{SUFFIX[pick.format]}"
        shutil.copyfile(pick.path, model_file)
        device = None if self.config.device == "host" else self.config.device
        result = package_artifact(
            model_file, pick.module, pick.format, pick.dtype, pipeline.artifacts_dir / f"{stem}.{pick.format}.pfpkg",
            name=target.name, version=target.version, key=target.key, device=device,
            extra_report={"latency_plan": {k: summary[k] for k in ("picked", "note")}},
        )  # fmt: skip
        return Artifact(
            target=index, path=model_file, package=result.package, format=pick.format, dtype=pick.dtype,
            mode="latency_plan", metric=result.metric, parity=result.parity.to_dict(),
            float_layers=list(pick.float_layers), details={"plan": summary, "threads": pick.threads},
        )  # fmt: skip
