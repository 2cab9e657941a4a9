"""Per-layer pruning sensitivity, and per-layer ratios chosen from it under a MACs budget.

    sens = layer_sensitivity(model, example_inputs, evaluate, ratios=(0.25, 0.5, 0.75))
    cfg = plan_from_sensitivity(sens, model, example_inputs, target_macs=0.5)
    small = prune(model, cfg, example_inputs)

`evaluate(module) -> float` scores a model (higher is better), usually on a validation split; or give the
user's `eval_data=(inputs, labels)` (or a DataLoader of batches) and `metric=` ("top1", "cosine", "mse",
"module:function" or a callable; mse is negated so higher stays better), or eval_data without labels to
score fidelity to the unpruned model's outputs. The plan
is greedy: starting from the unpruned model it repeatedly raises, by `step`, the ratio of the group
whose predicted metric loss per MAC saved is smallest (losses interpolated from the measured table and
assumed additive across groups) until the budget is met.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .api import ExampleInputs, as_inputs, recalibrate_bn
from .config import PruneConfig, check_ratio
from .errors import PruneError
from .graph import DependencyGraph
from .importance import group_scores
from .planner import kept_count
from .surgery import apply_keep


@dataclass
class Sensitivity:
    """metric[layer][i]: the metric with only `layer`'s group pruned by ratios[i]."""

    baseline: float
    ratios: list[float]
    metric: dict[str, list[float]] = field(default_factory=dict)
    actual: dict[str, list[float]] = field(default_factory=dict)  # fraction really removed (after rounding)
    macs_share: dict[str, float] = field(default_factory=dict)  # MACs saved by pruning the group at 0.5
    importance: str = "l2"

    def drop(self, layer: str, ratio: float) -> float:
        """Predicted metric loss of pruning `layer` by `ratio` (piecewise linear, extrapolated)."""
        xs = [0.0, *self.actual.get(layer, self.ratios)]
        ys = [0.0, *(self.baseline - v for v in self.metric[layer])]
        xs, ys = (
            [x for i, x in enumerate(xs) if i == 0 or x > xs[i - 1]],
            [y for i, y in enumerate(ys) if i == 0 or xs[i] > xs[i - 1]],
        )
        ys = list(np.maximum.accumulate(np.maximum(ys, 0.0)))  # more pruning never predicted to help
        if ratio <= xs[-1]:
            return float(np.interp(ratio, xs, ys))
        if len(xs) < 2:
            return 0.0
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return float(ys[-1] + slope * (ratio - xs[-1]))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"layer": name, **{f"r={r:g}": v for r, v in zip(self.ratios, vals, strict=True)}}
            for name, vals in self.metric.items()
        ]


def _pruned_copy(
    graph: DependencyGraph, base: nn.Module, scores: dict[int, np.ndarray], counts: dict[int, int]
) -> nn.Module:
    keep = {root: np.sort(np.argsort(-scores[root], kind="stable")[:n]) for root, n in counts.items()}
    return apply_keep(graph, keep, copy.deepcopy(base))


def layer_sensitivity(
    model: nn.Module,
    example_inputs: ExampleInputs,
    evaluate: Callable[[nn.Module], float] | None = None,
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    importance: str = "l2",
    round_to: int = 1,
    ignore: Sequence[str] = (),
    data: Sequence[Any] | None = None,
    progress: bool = False,
    *,
    eval_data: Any = None,
    metric: Any = None,
) -> Sensitivity:
    """Prune each prunable group alone at each ratio and evaluate (len(groups) x len(ratios) runs).
    With `data` ((inputs, targets) batches) each pruned copy gets its BatchNorm statistics re-estimated
    first, as `prune` does. `evaluate` or `eval_data` (+ `metric`) says how a copy is scored."""
    from tqdm.auto import tqdm

    if evaluate is None:
        if eval_data is None:
            raise PruneError("layer_sensitivity needs evaluate=(module -> float) or eval_data=(inputs, labels)")
        from compress.distill.trainer import make_evaluate

        evaluate = make_evaluate(eval_data, metric, teacher=copy.deepcopy(model).eval())

    ratios = sorted(check_ratio(r, "sensitivity ratio") for r in ratios)
    if not ratios or ratios[0] <= 0:
        raise PruneError("sensitivity ratios must be > 0 (the baseline is measured anyway)")
    if importance == "taylor":
        raise PruneError("layer_sensitivity supports importance l1, l2, bn_scale or random")
    base = copy.deepcopy(model).eval()
    graph = DependencyGraph.build(copy.deepcopy(base), as_inputs(example_inputs), ignore)
    scores = group_scores(graph, importance)
    groups = graph.prunable()
    sens = Sensitivity(baseline=float(evaluate(base)), ratios=list(ratios), importance=importance)
    total = graph.macs()
    bar = tqdm(total=len(groups) * len(ratios), desc="sensitivity", disable=not progress, leave=False)
    for g in groups:
        sens.metric[g.name], sens.actual[g.name] = [], []
        half = {g.root: kept_count(g, 0.5, round_to, strict=False)}
        sens.macs_share[g.name] = (total - graph.macs(half)) / total
        for r in ratios:
            counts = {g.root: kept_count(g, r, round_to, strict=False)}
            sens.actual[g.name].append(1.0 - counts[g.root] / g.size)
            pruned = _pruned_copy(graph, base, scores, counts)
            if data is not None:
                recalibrate_bn(pruned, data)
            sens.metric[g.name].append(float(evaluate(pruned.eval())))
            bar.update(1)
    bar.close()
    return sens


def plan_from_sensitivity(
    sens: Sensitivity,
    model: nn.Module,
    example_inputs: ExampleInputs,
    target_macs: float,
    step: float = 0.05,
    max_ratio: float = 0.8,
    round_to: int = 1,
    ignore: Sequence[str] = (),
    cost: Callable[[DependencyGraph, dict[int, int]], float] | None = None,
) -> PruneConfig:
    """Per-layer ratios (a PruneConfig) keeping at most `target_macs` of the MACs (or of `cost`, a function
    of the graph and the kept units per group root, e.g. a latency estimate)."""
    if not 0 < target_macs <= 1:
        raise PruneError(f"target_macs must be a fraction in (0, 1], got {target_macs!r}")
    graph = DependencyGraph.build(copy.deepcopy(model).eval(), as_inputs(example_inputs), ignore)
    groups = {g.name: g for g in graph.prunable() if g.name in sens.metric}
    missing = [g.name for g in graph.prunable() if g.name not in sens.metric]
    if missing:
        raise PruneError(f"the sensitivity table has no rows for layers {missing}; measure it on this model")
    measure = cost or (lambda gr, counts: gr.macs(counts))
    ratios = dict.fromkeys(groups, 0.0)

    def counts_for(r: dict[str, float]) -> dict[int, int]:
        return {g.root: kept_count(g, r[name], round_to, strict=False) for name, g in groups.items()}

    def removed(name: str, r: float) -> float:  # the fraction really removed after rounding
        return 1.0 - kept_count(groups[name], r, round_to, strict=False) / groups[name].size

    goal = target_macs * measure(graph, {})
    current = measure(graph, counts_for(ratios))
    while current > goal:
        best: tuple[float, str, float] | None = None
        for name in groups:
            nxt, saved = ratios[name], 0.0
            while saved <= 0 and nxt < max_ratio:  # the next ratio that changes the (rounded) width
                nxt = round(min(max_ratio, nxt + step), 6)
                saved = current - measure(graph, counts_for({**ratios, name: nxt}))
            if saved <= 0:
                continue
            loss = max(
                0.0, sens.drop(name, removed(name, nxt)) - sens.drop(name, removed(name, ratios[name]))
            )
            key = (loss + 1e-9) / saved
            if best is None or key < best[0]:
                best = (key, name, nxt)
        if best is None:
            raise PruneError(
                f"target_macs={target_macs:g} is out of reach with max_ratio={max_ratio:g}: the plan keeps "
                f"{current / measure(graph, {}):.3f}"
            )
        ratios[best[1]] = best[2]
        current = measure(graph, counts_for(ratios))
    # a greedy step can overshoot the budget (rounded widths move in jumps): give back what still fits,
    # the most sensitive groups first
    changed = True
    while changed:
        changed = False
        order = sorted(ratios, key=lambda n: -sens.drop(n, removed(n, ratios[n])))
        for name in order:
            lower = ratios[name]
            while lower > 0:
                lower = round(max(0.0, lower - step), 6)
                trial = {**ratios, name: lower}
                if counts_for(trial) != counts_for(ratios):
                    break
            if lower < ratios[name] and measure(graph, counts_for(trial)) <= goal:
                ratios[name], changed = lower, True
    return PruneConfig(
        ratios={name: r for name, r in ratios.items() if r > 0},
        importance=sens.importance,
        round_to=round_to,
        ignore=list(ignore),
    )


def macs_target_for_latency(model_file: str | Path, device: str, latency_fraction: float) -> dict[str, float]:
    """The MACs fraction that meets `latency_fraction` of the dense model's latency estimated by the
    device profile (devices.estimate_cost on the exported dense file). Channel pruning removes compute and
    memory traffic in proportion to MACs but not the per-op / per-invoke overhead, so:
    target_macs = (latency_fraction * estimated - overhead) / (estimated - overhead)."""
    from devices import analyze_model, estimate_cost, load_profile

    if not 0 < latency_fraction <= 1:
        raise PruneError(f"latency_fraction must be in (0, 1], got {latency_fraction!r}")
    path = Path(model_file)
    est = estimate_cost(analyze_model(path), load_profile(device), path.stat().st_size)
    variable = est.estimated_ms - est.overhead_ms
    target = (latency_fraction * est.estimated_ms - est.overhead_ms) / variable if variable > 0 else 0.0
    if target <= 0:
        raise PruneError(
            f"{device}: {latency_fraction:g} x {est.estimated_ms:.4g} ms is below the fixed overhead of "
            f"{est.overhead_ms:.4g} ms that pruning cannot remove"
        )
    return {
        "target_macs": min(1.0, target),
        "estimated_ms": est.estimated_ms,
        "overhead_ms": est.overhead_ms,
        "target_ms": latency_fraction * est.estimated_ms,
    }
