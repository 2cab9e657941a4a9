"""`finetune` (labels only) and `distill` (from a teacher) steps, both through compress.distill."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.distill.config import DistillConfig

from .base import Step, register_step

if TYPE_CHECKING:
    from torch import nn

    from ..runner import Pipeline
    from ..schema import Recipe

_TEACHER_ONLY = ("temperature", "alpha", "output_loss", "features", "feature_weight", "cache_teacher")
TEACHERS = ("original", "previous")


def _train(step: Step, pipeline: Pipeline, teacher: nn.Module | None) -> dict[str, Any]:
    """Train pipeline.model's module in place with `step.config`; the training report (no history rows)."""
    from compress.distill import Distiller

    sparsifier = pipeline.sparsifier
    hooks = [sparsifier.step] if sparsifier is not None else []
    scheduled = sparsifier is not None and sparsifier.config.schedule != "oneshot"
    # keep_best would bring back an epoch of lower sparsity under a schedule: the last epoch is kept then
    evaluate = pipeline.val_score if step.config.keep_best and not scheduled else None
    report = Distiller(pipeline.model.module, teacher, step.config).fit(
        pipeline.data.finetune(), evaluate, hooks, progress=pipeline.progress
    )
    out = {k: report[k] for k in ("epochs", "steps", "best_epoch", "best_metric", "seconds", "output_loss")}
    out["val_history"] = [row.get("metric") for row in report["history"]]
    if sparsifier is not None:
        out["sparsity"] = round(sparsifier.report()["sparsity"], 4)
        if scheduled:
            out["keep_best"] = "off: a sparsity schedule is running"
    return out


@register_step
class FinetuneStep(Step):
    """Supervised fine-tuning on the labels of the fine-tuning data (DistillConfig without a teacher);
    with keep_best the epoch scoring best on the validation split is kept."""

    type = "finetune"
    trains = True
    config_cls = DistillConfig
    excluded = {k: "only a distill step (which has a teacher) takes this key" for k in _TEACHER_ONLY}

    def check(self) -> None:
        if not self.ctx.labelled():
            raise self.error(
                f"the fine-tuning data of {self.ctx.workload} has no labels; use a distill step (the teacher's "
                "outputs are the targets) or give [data.finetune] file with a 'labels' array"
            )

    def run(self, pipeline: Pipeline) -> dict[str, Any]:
        return _train(self, pipeline, None)


@register_step
class DistillStep(Step):
    """Knowledge distillation (DistillConfig). teacher: "original" (the model before any step, the
    default), "previous" (the model before this step) or a model directory. student_config: train a
    new student of this architecture (keys override the model's config) instead of the current model;
    student_pretrained initialises it from published weights where the workload has them (minilm: the
    teacher's layers)."""

    type = "distill"
    trains = True
    config_cls = DistillConfig
    extra = {"teacher": str, "student_config": dict[str, Any], "student_pretrained": bool}

    def check(self) -> None:
        teacher = self.options.get("teacher", "original")
        if teacher not in TEACHERS:
            from compress.zoo import read_meta
            from pocketfleet import PocketfleetError

            path = Path(teacher).expanduser()
            path = path if path.is_absolute() else self.ctx.recipe_dir / path
            if not path.is_dir():
                raise self.error(
                    f"expected {' or '.join(repr(t) for t in TEACHERS)} or a model directory, got {teacher!r}",
                    "teacher",
                )
            try:
                meta = read_meta(path)
            except PocketfleetError as exc:
                raise self.error(str(exc), "teacher") from None
            if meta["workload"] != self.ctx.workload:
                raise self.error(
                    f"{path} is a {meta['workload']} model; the recipe's model is {self.ctx.workload}",
                    "teacher",
                )
            self.options["teacher"] = str(path)
        student = self.options.get("student_config")
        if student is not None:
            from compress.zoo import get_workload

            known = get_workload(self.ctx.workload).default_config()
            for key in student:
                if key not in known:
                    raise self.error(
                        f"unknown key for a {self.ctx.workload} config; known keys: {', '.join(sorted(known))}",
                        f"student_config.{key}",
                    )

    def check_recipe(self, recipe: Recipe) -> None:
        if "student_config" not in self.options:
            return
        for step in reversed(recipe.steps[: self.ctx.index]):
            if step.type == "sparsify":
                raise self.error(
                    f"a new student drops the sparsity masks of {step.ctx.path}; sparsify after this step",
                    "student_config",
                )
            if not step.trains:
                break

    def run(self, pipeline: Pipeline) -> dict[str, Any]:
        teacher = self._teacher(pipeline)
        details: dict[str, Any] = {"teacher": self.options.get("teacher", "original")}
        student_config = self.options.get("student_config")
        if student_config is not None:
            lm = pipeline.model
            config = {**lm.config, **student_config}
            module = lm.workload.build(config, pretrained=self.options.get("student_pretrained", False))
            pipeline.set_module(module, config=config)
            details["student_config"] = config
        details.update(_train(self, pipeline, teacher))
        return details

    def _teacher(self, pipeline: Pipeline) -> nn.Module:
        teacher = self.options.get("teacher", "original")
        if teacher == "original":
            return pipeline.original.module
        if teacher == "previous":
            return copy.deepcopy(pipeline.model.module).eval()
        from compress.zoo import load_model_dir

        return load_model_dir(teacher).module

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.setdefault("teacher", "original")
        return out
