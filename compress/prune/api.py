"""`prune(model, PruneConfig(...), example_inputs)`: a smaller ordinary nn.Module with channels removed."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import PruneConfig
from .errors import PruneError
from .graph import DependencyGraph, Group
from .importance import group_scores, taylor_grads
from .planner import plan_keep
from .surgery import apply_keep
from .trace import evaluating

ExampleInputs = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]


def as_inputs(example_inputs: ExampleInputs) -> tuple[torch.Tensor, ...]:
    """A tuple of tensors from a tensor, an array or a sequence of them."""
    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    out = tuple(torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x for x in items)
    if not out or not all(isinstance(x, torch.Tensor) for x in out):
        raise PruneError("example_inputs must be a tensor (or array) or a tuple of them, one per model input")
    return out


@dataclass
class PrunePlan:
    """What `prune` will do: the kept units of every group, and MACs before / after (per sample)."""

    graph: DependencyGraph
    config: PruneConfig
    keep: dict[int, np.ndarray]
    example_inputs: tuple[torch.Tensor, ...]

    @property
    def macs_before(self) -> float:
        return self.graph.macs()

    @property
    def macs_after(self) -> float:
        return self.graph.macs({r: len(k) for r, k in self.keep.items()})

    def apply(self, data: Iterable[Any] | None = None) -> nn.Module:
        """The pruned model (the plan works on its own copy; the caller's model is untouched). With
        `data` and config.recalibrate_bn its BatchNorm statistics are re-estimated on the batches."""
        model = apply_keep(self.graph, self.keep, copy.deepcopy(self.graph.model))  # the plan stays reusable
        try:
            with torch.no_grad(), evaluating(model):
                model(*self.example_inputs)
        except Exception as exc:  # a coupling the graph missed: say so rather than hand back a broken model
            raise PruneError(
                f"the pruned model fails on the example inputs ({type(exc).__name__}: {exc}); add the layer "
                "named in the error to PruneConfig.ignore"
            ) from None
        if data is not None and self.config.recalibrate_bn:
            recalibrate_bn(model, data)
        return model

    def frozen(self) -> dict[str, str]:
        """Why each frozen group is never pruned: {group name: reason naming the node or module}."""
        return {g.name: g.frozen for g in self.graph.groups() if g.frozen is not None}

    def why_frozen(self, limit: int = 4) -> str:
        """One line: the distinct reasons groups are frozen (most frequent first), and the modules kept
        whole by the tracer."""
        counts: dict[str, int] = {}
        for reason in self.frozen().values():
            counts[reason] = counts.get(reason, 0) + 1
        top = sorted(counts, key=lambda r: -counts[r])[:limit]
        text = "; ".join(f"{r} ({counts[r]} group{'s' if counts[r] > 1 else ''})" for r in top) or "no groups"
        if len(counts) > limit:
            text += f"; and {len(counts) - limit} more reasons"
        if self.graph.leaves:
            text += "; kept whole: " + ", ".join(
                f"{n} ({r})" for n, r in list(self.graph.leaves.items())[:limit]
            )
        return text

    def summary(self) -> dict[str, Any]:
        groups: list[Group] = self.graph.groups()
        rows = []
        for g in groups:
            kept = len(self.keep[g.root]) if g.root in self.keep else g.size
            rows.append({"layer": g.name, "units": g.size, "kept": kept, "unit": g.unit, "frozen": g.frozen})
        return {
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_ratio": self.macs_after / self.macs_before if self.macs_before else 1.0,
            "groups": rows,
            "kept_whole": dict(self.graph.leaves),
            "config": self.config.to_dict(),
        }


def plan_pruning(
    model: nn.Module,
    config: PruneConfig | dict[str, Any],
    example_inputs: ExampleInputs,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
) -> PrunePlan:
    """Trace a copy of `model`, score its channel groups and decide what every group keeps.

    data: (inputs, targets) batches (inputs a tensor or tuple of tensors; targets may be None unless
    importance="taylor"); loss_fn: the loss for "taylor" (default cross-entropy / MSE).
    """
    cfg = PruneConfig.from_dict(config) if isinstance(config, dict) else config.validate()
    inputs = as_inputs(example_inputs)
    work = copy.deepcopy(model)
    graph = DependencyGraph.build(work, inputs, cfg.ignore)
    grads = None
    if cfg.importance == "taylor":
        if data is None:
            raise PruneError("PruneConfig.importance='taylor' needs data=[(inputs, targets), ...] batches")
        grads = taylor_grads(work, data, cfg.taylor_batches, loss_fn)
    scores = group_scores(graph, cfg.importance, grads)
    keep = plan_keep(graph, scores, cfg)
    return PrunePlan(graph=graph, config=cfg, keep=keep, example_inputs=inputs)


def prune(
    model: nn.Module,
    config: PruneConfig | dict[str, Any],
    example_inputs: ExampleInputs,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
) -> nn.Module:
    """Structured pruning: a copy of `model` with whole channels / heads removed, an ordinary nn.Module
    of the same classes (smaller layers), ready for fine-tuning and export.

    data: (inputs, targets) batches, used by importance="taylor" and to recalibrate BatchNorm statistics
    of the pruned model (config.recalibrate_bn)."""
    batches = list(data) if data is not None else None
    return plan_pruning(model, config, example_inputs, batches, loss_fn).apply(batches)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Iterable[Any]) -> nn.Module:
    """Re-estimate every BatchNorm's running mean / variance as the plain average over `data`
    ((inputs, targets) batches; inputs a tensor or tuple of tensors); weights are unchanged. Returns the
    model in eval mode."""
    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        return model.eval()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    try:
        for batch in data:
            inputs = batch[0]
            model(*(inputs if isinstance(inputs, (tuple, list)) else (inputs,)))
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum
        model.eval()
    return model


def count_macs(model: nn.Module, example_inputs: ExampleInputs, ignore: Sequence[str] = ()) -> float:
    """Multiply-accumulates of one forward pass per sample (conv, linear, attention, matmul)."""
    return DependencyGraph.build(model, as_inputs(example_inputs), ignore).macs()


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))
