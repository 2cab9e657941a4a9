"""`prune` (structured channel / head removal) and `sparsify` (magnitude or N:M zeros) steps."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from compress.prune.config import PruneConfig, SparsityConfig

from .base import Step, register_step

PLANS = ("uniform", "sensitivity")

if TYPE_CHECKING:
    from ..runner import Pipeline
    from ..schema import Recipe


@register_step
class PruneStep(Step):
    """compress.prune.prune with a PruneConfig; BatchNorm statistics are recalibrated (and Taylor scores
    computed) on batches of the fine-tuning data.

    Recipe-only options: `plan = "sensitivity"` measures every group's sensitivity (metric on the
    validation split at `sensitivity_ratios`) and picks per-layer ratios meeting `target_macs`
    (compress.prune.plan_from_sensitivity); `target_latency` with `device` sets target_macs from the
    device profile's latency estimate of the current model (compress.prune.macs_target_for_latency)."""

    type = "prune"
    config_cls = PruneConfig
    extra = {"plan": str, "sensitivity_ratios": list[float], "target_latency": float, "device": str}

    def check(self) -> None:
        cfg, opts = self.config, self.options
        plan = opts.setdefault("plan", "uniform")
        if plan not in PLANS:
            raise self.error(f"expected one of {list(PLANS)}, got {plan!r}", "plan")
        if cfg.importance == "taylor":
            if plan == "sensitivity":
                raise self.error('plan = "sensitivity" supports l1, l2, bn_scale or random', "importance")
            if not self.ctx.labelled():
                raise self.error(
                    "'taylor' needs labelled fine-tuning data, which this model has not", "importance"
                )
        ratios = opts.setdefault("sensitivity_ratios", [0.25, 0.5, 0.75])
        for i, r in enumerate(ratios):
            if not 0.0 < r < 1.0:
                raise self.error(f"expected a number in (0, 1), got {r!r}", f"sensitivity_ratios[{i}]")
        if not ratios:
            raise self.error("give at least one ratio", "sensitivity_ratios")
        latency = opts.get("target_latency")
        if latency is not None:
            if not 0.0 < latency <= 1.0:
                raise self.error(
                    f"expected a fraction of the current latency in (0, 1], got {latency!r}", "target_latency"
                )
            if cfg.target_macs is not None:
                raise self.error("give target_macs or target_latency, not both", "target_latency")
            if "device" not in opts:
                raise self.error(
                    'target_latency needs device = "<profile>" (whose estimate sets the budget)', "device"
                )
        if "device" in opts:
            from devices.profile import profile_names

            if latency is None:
                raise self.error("device is only used with target_latency", "device")
            if opts["device"] not in profile_names():
                raise self.error(
                    f"unknown device {opts['device']!r}; known devices: {', '.join(profile_names())}",
                    "device",
                )
        if plan == "sensitivity" and cfg.target_macs is None and latency is None:
            raise self.error('plan = "sensitivity" needs a budget: target_macs or target_latency', "plan")

    def run(self, pipeline: Pipeline) -> dict[str, Any]:
        from compress.prune import plan_pruning

        lm, cfg, details = pipeline.model, self.config, {}
        x = lm.example_inputs(2)
        batches = pipeline.data.batches(limit=max(16, cfg.taylor_batches))
        if "target_latency" in self.options:
            from compress.prune import macs_target_for_latency

            budget = macs_target_for_latency(
                pipeline.snapshot, self.options["device"], self.options["target_latency"]
            )
            details["latency_budget"] = {"device": self.options["device"], **budget}
            cfg = dataclasses.replace(cfg, target_macs=budget["target_macs"])
        if self.options["plan"] == "sensitivity":
            from compress.prune import layer_sensitivity, plan_from_sensitivity

            sens = layer_sensitivity(
                lm.module, x, pipeline.val_score, self.options["sensitivity_ratios"], cfg.importance, cfg.round_to,
                cfg.ignore, data=batches, progress=pipeline.progress,
            )  # fmt: skip
            planned = plan_from_sensitivity(
                sens, lm.module, x, cfg.target_macs, max_ratio=cfg.max_ratio, round_to=cfg.round_to, ignore=cfg.ignore
            )  # fmt: skip
            cfg = dataclasses.replace(cfg, ratios=planned.ratios, ratio=0.0, target_macs=None)
            details["sensitivity"] = {"baseline": sens.baseline, "ratios": sens.ratios, "metric": sens.metric}
            details["ratios"] = planned.ratios
        plan = plan_pruning(lm.module, cfg, x, batches)
        pipeline.set_module(plan.apply(batches))
        summary = plan.summary()
        changed = [g for g in summary["groups"] if g["kept"] != g["units"]]
        details.update(
            {"macs_ratio": round(summary["macs_ratio"], 4), "groups_pruned": len(changed), "groups": changed}
        )
        return details


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
