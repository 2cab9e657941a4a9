"""Physically remove channels: slice weights, biases and running statistics, fix layer attributes.

Also `fit_to_state_dict`, which resizes a freshly built model to the shapes of a pruned state dict
(the way a pruned model is loaded back from safetensors without pickling its structure).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .graph import DependencyGraph
from .trace import is_attention


def _slice(module: nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
    t = getattr(module, name, None)
    if t is None or t.shape[dim] == len(index):
        return
    new = t.detach().index_select(dim, index).clone()
    if isinstance(t, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        module._buffers[name] = new


def _linear(m: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    if rows is not None:
        _slice(m, "weight", 0, rows)
        _slice(m, "bias", 0, rows)
    if cols is not None:
        _slice(m, "weight", 1, cols)
    m.out_features, m.in_features = m.weight.shape


def apply_keep(graph: DependencyGraph, keep: dict[int, Any], model: nn.Module | None = None) -> nn.Module:
    """Prune `model` (default `graph.model`, else a copy of it) in place: group root r keeps units
    keep[r]. Returns the model."""
    model = graph.model if model is None else model

    def out_idx(space: int | None) -> torch.Tensor | None:
        return None if space is None else graph.unit_index(space, keep.get(graph.find(space)))

    for use in graph.uses.values():
        inp = None if use.inp is None else graph.index(use.inp, keep)
        if use.kind == "param":  # a parameter combined with the channels (a class token): slice it
            assert inp is not None and use.inp is not None
            owner, _, name = use.name.rpartition(".")
            _slice(model.get_submodule(owner), name, use.inp.cdim, inp)
            continue
        m = model.get_submodule(use.name)
        if use.kind == "conv":
            assert isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)
            rows = out_idx(use.out)
            assert rows is not None
            _slice(m, "weight", 0, rows)
            _slice(m, "bias", 0, rows)
            if inp is not None:
                _slice(m, "weight", 1, inp)
            m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        elif use.kind == "dwconv":
            assert inp is not None and isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)
            _slice(m, "weight", 0, inp)
            _slice(m, "bias", 0, inp)
            m.in_channels = m.out_channels = m.groups = len(inp)
        elif use.kind == "linear":
            assert isinstance(m, nn.Linear)
            _linear(m, out_idx(use.out), inp)
        elif use.kind == "norm":
            assert inp is not None
            for name in ("weight", "bias", "running_mean", "running_var"):
                _slice(m, name, 0, inp)
            if isinstance(m, nn.LayerNorm):
                m.normalized_shape = (len(inp),)
            else:
                m.num_features = len(inp)  # type: ignore[assignment]
        elif use.kind == "embedding":
            assert isinstance(m, nn.Embedding)
            idx = out_idx(use.out)
            assert idx is not None
            _slice(m, "weight", 1, idx)
            m.embedding_dim = m.weight.shape[1]
        elif use.kind == "rnn":
            assert isinstance(m, nn.GRU | nn.LSTM)
            units = out_idx(use.out)
            assert units is not None
            _rnn(m, units, inp)
        elif use.kind == "attention":
            heads = out_idx(use.heads)
            for proj in ("query", "key", "value"):
                _linear(getattr(m, proj), heads, inp)
            _linear(m.out, out_idx(use.out), heads)
            m.num_heads = m.query.out_features // m.head_dim
    return model


def rnn_params(m: nn.GRU | nn.LSTM) -> list[tuple[int, str]]:
    """(layer, suffix) of every layer and direction: weight_ih_l{layer}{suffix} and friends."""
    return [
        (layer, sfx) for layer in range(m.num_layers) for sfx in ("", "_reverse")[: 1 + int(m.bidirectional)]
    ]


def _rnn(m: nn.GRU | nn.LSTM, units: torch.Tensor, inp: torch.Tensor | None) -> None:
    """Keep hidden `units` in every layer and direction: each gate's rows of weight_ih / weight_hh and the
    biases, the columns of weight_hh, the next layer's input columns; `inp`: columns of weight_ih_l0."""
    if m.proj_size:  # frozen by the graph: nothing to remove
        return
    size, gates = m.hidden_size, 4 if isinstance(m, nn.LSTM) else 3
    rows = torch.cat([g * size + units for g in range(gates)])
    below = torch.cat([d * size + units for d in range(1 + int(m.bidirectional))])
    for layer, sfx in rnn_params(m):
        for name in (f"weight_ih_l{layer}{sfx}", f"weight_hh_l{layer}{sfx}", f"bias_ih_l{layer}{sfx}",
                     f"bias_hh_l{layer}{sfx}"):  # fmt: skip
            _slice(m, name, 0, rows)
        _slice(m, f"weight_hh_l{layer}{sfx}", 1, units)
        cols = below if layer else inp
        if cols is not None:
            _slice(m, f"weight_ih_l{layer}{sfx}", 1, cols)
    _fit_rnn(m)


def _fit_rnn(m: nn.RNNBase) -> None:
    m.hidden_size, m.input_size = m.weight_hh_l0.shape[1], m.weight_ih_l0.shape[1]
    m._init_flat_weights()  # the fused kernels read the weights through this list


def fit_to_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Resize `model` (built from its unpruned config) to the tensor shapes in a pruned `state` dict,
    then load it strictly. Returns the model."""
    for mod_name, m in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            new = state.get(prefix + name)
            if new is None or t is None or tuple(new.shape) == tuple(t.shape):
                continue
            if isinstance(t, nn.Parameter):
                setattr(
                    m, name, nn.Parameter(torch.empty_like(new, dtype=t.dtype), requires_grad=t.requires_grad)
                )
            else:
                m._buffers[name] = torch.empty_like(new, dtype=t.dtype)
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            m.out_channels = m.weight.shape[0]
            m.groups = m.out_channels if depthwise else m.groups
            m.in_channels = m.weight.shape[1] * m.groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d) and m.weight is not None:
            m.num_features = m.weight.shape[0]
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, nn.Embedding):
            m.embedding_dim = m.weight.shape[1]
        elif isinstance(m, nn.GRU | nn.LSTM) and not m.proj_size:
            _fit_rnn(m)
    for m in model.modules():
        if is_attention(m):
            m.num_heads = m.query.weight.shape[0] // m.head_dim  # type: ignore[operator]
    model.load_state_dict(state, strict=True)
    return model
