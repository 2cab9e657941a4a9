"""BatchNorm folding: conv/linear followed by BatchNorm becomes one layer with adjusted weight and bias."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, list[str]]:
    """Fold every BatchNorm that directly follows a conv/linear inside an nn.Sequential (the layout of
    conv-BN-act blocks). Returns (model in eval mode, names of the BatchNorms folded); a folded BN is
    replaced by nn.Identity so the module tree keeps its names."""
    from torch import nn

    bns = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    foldable = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    folded: list[str] = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (_, layer), (bn_name, bn) in zip(children, children[1:], strict=False):
            if isinstance(layer, foldable) and isinstance(bn, bns) and bn.track_running_stats:
                _fold_into(layer, bn)
                setattr(parent, bn_name, nn.Identity())
                folded.append(f"{parent_name}.{bn_name}" if parent_name else bn_name)
    return model, folded


def _fold_into(layer: nn.Module, bn: nn.Module) -> None:
    import torch
    from torch import nn

    if getattr(layer, "transposed", False):  # pragma: no cover
        raise ValueError("transposed convolutions are not folded")
    with torch.no_grad():
        std = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.affine else torch.ones_like(std)
        beta = bn.bias if bn.affine else torch.zeros_like(std)
        factor = gamma / std
        layer.weight.mul_(factor.reshape(-1, *([1] * (layer.weight.dim() - 1))))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        layer.bias = nn.Parameter(((bias - bn.running_mean) * factor + beta).detach().clone())
