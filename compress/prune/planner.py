"""Turn a PruneConfig and channel scores into the units every group keeps."""

from __future__ import annotations

import math
from collections.abc import Callable
from fnmatch import fnmatchcase

import numpy as np

from .config import PruneConfig
from .errors import PruneError
from .graph import DependencyGraph, Group


def kept_count(group: Group, ratio: float, round_to: int, strict: bool = True) -> int:
    """Units kept when pruning `ratio` of `group` (channel counts rounded to a multiple of round_to).
    A plan leaving no unit is an error when `strict`, else one unit stays (searches, global ranking)."""
    keep = group.size - math.floor(group.size * ratio + 0.5)
    if not strict:
        keep = max(keep, 1)
    if keep >= 1 and round_to > 1 and group.unit == 1 and group.size > round_to:
        keep = min(group.size, max(round_to, math.floor(keep / round_to + 0.5) * round_to))
    if keep < 1:
        raise PruneError(
            f"pruning {ratio:.3g} of the {group.size} {'heads' if group.unit > 1 else 'channels'} of layer "
            f"{group.name!r} leaves none; lower its ratio (or round_to) or add it to PruneConfig.ignore"
        )
    return keep


def resolve_ratios(graph: DependencyGraph, ratios: dict[str, float]) -> dict[int, float]:
    """Per-layer ratios by group root; every pattern must name a prunable layer."""
    groups = graph.groups()
    out: dict[int, float] = {}
    for pattern, ratio in ratios.items():
        hit = [g for g in groups if any(fnmatchcase(o, pattern) for o in g.owners)]
        if not hit:
            names = ", ".join(g.name for g in graph.prunable()) or "(none)"
            raise PruneError(
                f"PruneConfig.ratios[{pattern!r}]: no layer of the model matches; prunable layers: {names}"
            )
        frozen = [g for g in hit if g.frozen is not None]
        if frozen and ratio > 0:
            g = frozen[0]
            raise PruneError(
                f"PruneConfig.ratios[{pattern!r}]: layer {g.name!r} cannot be pruned: {g.frozen}"
            )
        for g in hit:
            out[g.root] = ratio
    return out


def plan_keep(
    graph: DependencyGraph, scores: dict[int, np.ndarray], cfg: PruneConfig
) -> dict[int, np.ndarray]:
    """Indices (sorted) of the units each prunable group keeps."""
    groups = {g.root: g for g in graph.prunable()}
    fixed = resolve_ratios(graph, cfg.ratios)
    free = [r for r in groups if r not in fixed]

    searching = cfg.target_macs is not None

    def counts_uniform(r: float) -> dict[int, int]:
        counts = {root: kept_count(groups[root], fixed[root], cfg.round_to) for root in fixed}
        counts.update(
            {root: kept_count(groups[root], r, cfg.round_to, strict=not searching) for root in free}
        )
        return counts

    def counts_global(fraction: float) -> dict[int, int]:
        counts = {root: kept_count(groups[root], fixed[root], cfg.round_to) for root in fixed}
        pool = np.concatenate([scores[r] for r in free]) if free else np.zeros(0)
        n_remove = math.floor(len(pool) * fraction + 0.5)
        threshold = np.sort(pool)[n_remove - 1] if n_remove > 0 else -np.inf
        for root in free:
            share = float((scores[root] <= threshold).mean()) if n_remove > 0 else 0.0
            counts[root] = kept_count(groups[root], min(share, cfg.max_ratio), cfg.round_to, strict=False)
        return counts

    counter: Callable[[float], dict[int, int]] = counts_global if cfg.global_ranking else counts_uniform
    if cfg.target_macs is None:
        counts = counter(cfg.ratio)
    else:
        counts = _search(graph, counter, float(cfg.target_macs), cfg.max_ratio)
    return {root: np.sort(np.argsort(-scores[root], kind="stable")[:n]) for root, n in counts.items()}


def _search(
    graph: DependencyGraph, counter: Callable[[float], dict[int, int]], target: float, high: float
) -> dict[int, int]:
    """The smallest ratio whose plan keeps at most `target` of the MACs (bisection; MACs fall as it grows)."""
    base = graph.macs()
    goal = target * base
    best = counter(high)
    if graph.macs(best) > goal * (1 + 1e-9):
        raise PruneError(
            f"PruneConfig.target_macs={target:g} is out of reach: pruning every prunable layer by "
            f"max_ratio={high:g} still keeps {graph.macs(best) / base:.3f} of the MACs"
        )
    lo, hi = 0.0, high
    for _ in range(40):
        mid = (lo + hi) / 2
        counts = counter(mid)
        if graph.macs(counts) <= goal:
            hi, best = mid, counts
        else:
            lo = mid
    return best
