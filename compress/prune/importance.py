"""Channel importance per group: magnitude (L1/L2), BatchNorm scale, first-order Taylor, random.

A group's score for unit i combines every weight slice that unit i owns across the group (producer
rows, consumer columns, norm scales): each slice's scores are divided by their mean (so layers of
different scale weigh alike), then averaged. Scores of different groups are therefore comparable,
which global ranking relies on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import PruneError
from .graph import DependencyGraph, Layout, Use
from .surgery import rnn_params
from .trace import evaluating


@dataclass
class Slice:
    """Weight `param` of `module`: along `dim`, unit i of space `space` owns positions index[i]."""

    module: str
    param: str
    dim: int
    space: int
    index: torch.Tensor  # [units, positions per unit]
    is_norm: bool = False


def _out_slices(graph: DependencyGraph, module: str, param: str, dim: int, space: int) -> list[Slice]:
    sp = graph.space(space)
    return [Slice(module, param, dim, space, graph.unit_index(space).reshape(sp.size, sp.unit))]


def _in_slices(
    graph: DependencyGraph, module: str, param: str, dim: int, lay: Layout | None, norm: bool = False
) -> list[Slice]:
    if lay is None:
        return []
    out, offset = [], 0
    for s in lay.spaces:
        sp = graph.space(s)
        chans = graph.unit_index(s).reshape(sp.size, sp.unit) + offset
        pos = (chans[:, :, None] * lay.expand + torch.arange(lay.expand)).reshape(sp.size, -1)
        out.append(Slice(module, param, dim, s, pos, norm))
        offset += sp.size * sp.unit
    return out


def weight_slices(graph: DependencyGraph) -> list[Slice]:
    """Every weight slice owned by a channel unit (biases and running stats are not scored)."""
    slices: list[Slice] = []
    for use in graph.uses.values():
        n = use.name
        if use.kind == "conv" or use.kind == "linear":
            assert use.out is not None
            slices += _out_slices(graph, n, "weight", 0, use.out) + _in_slices(graph, n, "weight", 1, use.inp)
        elif use.kind == "dwconv":
            slices += _in_slices(graph, n, "weight", 0, use.inp)
        elif use.kind == "norm":
            slices += _in_slices(graph, n, "weight", 0, use.inp, norm=True)
        elif use.kind == "embedding":
            assert use.out is not None
            slices += _out_slices(graph, n, "weight", 1, use.out)
        elif use.kind == "rnn":
            assert use.out is not None
            slices += _rnn_slices(graph, use)
        elif use.kind == "attention":
            assert use.heads is not None and use.out is not None
            for proj in ("query", "key", "value"):
                slices += _out_slices(graph, f"{n}.{proj}", "weight", 0, use.heads)
                slices += _in_slices(graph, f"{n}.{proj}", "weight", 1, use.inp)
            slices += _out_slices(graph, f"{n}.out", "weight", 1, use.heads)
            slices += _out_slices(graph, f"{n}.out", "weight", 0, use.out)
    return slices


def _rnn_slices(graph: DependencyGraph, use: Use) -> list[Slice]:
    """Hidden unit i of a GRU / LSTM owns row i of every gate, column i of weight_hh and, above layer 0,
    input column i of every direction; the input features own the columns of weight_ih_l0."""
    m = graph.model.get_submodule(use.name)
    assert isinstance(m, nn.GRU | nn.LSTM) and use.out is not None
    size, gates = m.hidden_size, 4 if isinstance(m, nn.LSTM) else 3
    u = torch.arange(size)
    rows = torch.stack([g * size + u for g in range(gates)], 1)
    below = torch.stack([d * size + u for d in range(1 + int(m.bidirectional))], 1)
    out: list[Slice] = []
    for layer, sfx in rnn_params(m):
        ih, hh = f"weight_ih_l{layer}{sfx}", f"weight_hh_l{layer}{sfx}"
        out += [Slice(use.name, ih, 0, use.out, rows), Slice(use.name, hh, 0, use.out, rows),
                Slice(use.name, hh, 1, use.out, u[:, None])]  # fmt: skip
        if layer:
            out.append(Slice(use.name, ih, 1, use.out, below))
        else:
            out += _in_slices(graph, use.name, ih, 1, use.inp)
    return out


def group_scores(
    graph: DependencyGraph,
    kind: str,
    grads: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> dict[int, np.ndarray]:
    """Score of every unit of every prunable group, keyed by group root (higher = more important)."""
    roots = {g.root: g for g in graph.prunable()}
    parts: dict[int, list[torch.Tensor]] = {r: [] for r in roots}
    fallback: dict[int, list[torch.Tensor]] = {r: [] for r in roots}
    for sl in weight_slices(graph):
        root = graph.find(sl.space)
        if root not in roots:
            continue
        w = graph.model.get_submodule(sl.module).get_parameter(sl.param).detach()
        rows = _gather(w, sl)
        if kind == "taylor":
            if grads is None or f"{sl.module}.{sl.param}" not in grads:
                raise PruneError(f"taylor importance has no gradient for {sl.module}.{sl.param}")
            score = (rows * _gather(grads[f"{sl.module}.{sl.param}"], sl)).sum(1).abs()
        elif kind == "l1" or (kind == "bn_scale" and sl.is_norm):
            score = rows.abs().sum(1)
        else:
            score = rows.pow(2).sum(1).sqrt()
        score = score / score.mean().clamp(min=1e-12)
        if kind == "bn_scale":
            (parts if sl.is_norm else fallback)[root].append(score)
        else:
            parts[root].append(score)
    rng = np.random.default_rng(seed)
    out: dict[int, np.ndarray] = {}
    for root, group in roots.items():
        chosen = parts[root] or fallback[root]  # bn_scale on a group without BatchNorm: magnitude
        if kind == "random":
            out[root] = rng.random(group.size)
        elif chosen:
            out[root] = torch.stack(chosen).mean(0).double().numpy()
        else:
            out[root] = np.ones(group.size)
    return out


def _gather(t: torch.Tensor, sl: Slice) -> torch.Tensor:
    moved = t.movedim(sl.dim, 0)
    return moved[sl.index.reshape(-1)].reshape(sl.index.shape[0], -1).double()


def taylor_grads(
    model: nn.Module,
    data: Iterable[Any],
    batches: int,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Gradients of the loss summed over `batches` batches of `data` ((inputs, targets) pairs; inputs a
    tensor or tuple of tensors). Default loss: cross-entropy for integer targets, else MSE."""
    model.zero_grad(set_to_none=True)
    count = 0
    with evaluating(model):  # BatchNorm uses running stats: the importance of the deployed function
        for count, (inputs, targets) in enumerate(data, start=1):
            args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
            out = model(*args)
            if loss_fn is not None:
                loss = loss_fn(out, targets)
            elif not torch.is_floating_point(targets):
                loss = nn.functional.cross_entropy(out, targets)
            else:
                loss = nn.functional.mse_loss(out, targets)
            loss.backward()
            if count >= batches:
                break
    if count == 0:
        raise PruneError("taylor importance needs data: pass data=[(inputs, targets), ...] to prune()")
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads
