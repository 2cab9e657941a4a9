"""`prune` (structured channel / head removal) and `sparsify` (magnitude or N:M zeros) steps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compress.prune.config import PruneConfig, SparsityConfig

from .base import Step, register_step

if TYPE_CHECKING:
    from ..runner import Pipeline
    from ..schema import Recipe


@register_step
class PruneStep(Step):
    """compress.prune.prune with a PruneConfig; BatchNorm statistics are recalibrated (and Taylor scores
    computed) on batches of the fine-tuning data."""

    type = "prune"
    config_cls = PruneConfig

    def check(self) -> None:
        if self.config.importance == "taylor" and not self.ctx.labelled():
            raise self.error(
                "'taylor' needs labelled fine-tuning data, which this model has not", "importance"
            )

    def run(self, pipeline: Pipeline) -> dict[str, Any]:
        from compress.prune import plan_pruning

        lm = pipeline.model
        batches = pipeline.data.batches(limit=max(16, self.config.taylor_batches))
        plan = plan_pruning(lm.module, self.config, lm.example_inputs(2), batches)
        pipeline.set_module(plan.apply(batches))
        summary = plan.summary()
        changed = [g for g in summary["groups"] if g["kept"] != g["units"]]
        return {
            "macs_ratio": round(summary["macs_ratio"], 4),
            "groups_pruned": len(changed),
            "groups": changed,
        }


@register_step
class SparsifyStep(Step):
    """compress.prune.Sparsifier with a SparsityConfig. One-shot masks are applied at once; scheduled
    ones (iterative / polynomial) move during the next finetune / distill steps. The masks stay applied
    through those steps and are baked in before any other step."""

    type = "sparsify"
    config_cls = SparsityConfig

    def check_recipe(self, recipe: Recipe) -> None:
        if self.config.schedule == "oneshot":
            return
        after = recipe.steps[self.ctx.index + 1 :]
        if not after or not after[0].trains:
            raise self.error(
                f"schedule {self.config.schedule!r} moves the masks during fine-tuning: put a finetune or "
                'distill step right after this step (or use schedule = "oneshot")',
                "schedule",
            )

    def run(self, pipeline: Pipeline) -> dict[str, Any]:
        from compress.prune import Sparsifier

        sparsifier = Sparsifier(pipeline.model.module, self.config)
        if self.config.schedule == "oneshot":
            sparsifier.update(sparsifier.config.sparsity)
            sparsifier.apply()
        pipeline.sparsifier = sparsifier
        report = sparsifier.report()
        return {"sparsity": round(report["sparsity"], 4), "skipped": report["skipped"]}
