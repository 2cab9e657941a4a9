"""BatchNorm folding: conv/linear followed by BatchNorm becomes one layer with adjusted weight and bias."""

from __future__ import annotations

import copy

import torch
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, list[str]]:
    """Fold every BatchNorm that directly follows a conv/linear inside an nn.Sequential (the layout of
    conv-BN-act blocks). Returns (model in eval mode, names of the BatchNorms folded); a folded BN is
    replaced by nn.Identity so the module tree keeps its names."""
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    folded: list[str] = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (_, layer), (bn_name, bn) in zip(children, children[1:], strict=False):
            if isinstance(layer, _FOLDABLE) and isinstance(bn, _BN) and bn.track_running_stats:
                _fold_into(layer, bn)
                setattr(parent, bn_name, nn.Identity())
                folded.append(f"{parent_name}.{bn_name}" if parent_name else bn_name)
    return model, folded


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    factor = gamma / std
    weight = layer.weight
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and layer.transposed:  # pragma: no cover
        raise ValueError("transposed convolutions are not folded")
    weight.mul_(factor.reshape(-1, *([1] * (weight.dim() - 1))))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * factor + beta
    layer.bias = nn.Parameter(new_bias.detach().clone())
