"""Unstructured magnitude sparsity and N:M (e.g. 2:4) patterns, with schedules over fine-tuning steps.

    sp = Sparsifier(model, SparsityConfig(sparsity=0.75, schedule="polynomial", end_step=500))
    for batch in data:
        loss.backward(); opt.step(); sp.step()   # updates masks on schedule, keeps pruned weights at 0
    model = sp.finalize()                         # masks baked in: plain zeros, no hooks left

Zeros do not make a dense runtime faster and do not shrink a file by themselves: see
`compress.prune.storage` for what they cost compressed on disk.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from .config import SparsityConfig
from .errors import PruneError
from .trace import matches

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def sparsity_at(cfg: SparsityConfig, step: int) -> float:
    """Target sparsity after `step` optimizer steps under the schedule (0 before begin_step)."""
    if step < cfg.begin_step:
        return 0.0
    if cfg.schedule == "oneshot":
        return cfg.sparsity
    span = cfg.end_step - cfg.begin_step
    if cfg.schedule == "iterative":  # equal increments at begin, begin + span/k, ...; final before end_step
        k = min(cfg.iterations, 1 + math.floor((step - cfg.begin_step) * cfg.iterations / span))
        return cfg.sparsity * k / cfg.iterations
    elapsed = min(step - cfg.begin_step, span)
    if elapsed < span:
        elapsed = elapsed // cfg.frequency * cfg.frequency  # masks move every `frequency` steps
    progress = elapsed / span
    return cfg.sparsity + (cfg.initial_sparsity - cfg.sparsity) * (1.0 - progress) ** cfg.power


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest-magnitude weights in every m consecutive input channels (dim 1), per output
    channel and kernel position. weight.shape[1] must be a multiple of m."""
    moved = weight.detach().movedim(1, -1)  # [O, kh, kw, I]
    groups = moved.abs().reshape(-1, m)
    top = groups.topk(n, dim=1).indices
    mask = torch.zeros_like(groups).scatter_(1, top, 1.0)
    return mask.reshape(moved.shape).movedim(-1, 1).contiguous()


class Sparsifier:
    """Masks for the Conv/Linear weights of `model` (changed in place), driven by a SparsityConfig."""

    def __init__(self, model: nn.Module, config: SparsityConfig | dict[str, Any]) -> None:
        self.config = SparsityConfig.from_dict(config) if isinstance(config, dict) else config.validate()
        self.model = model
        self.layers: dict[str, nn.Module] = {
            name: m
            for name, m in model.named_modules()
            if isinstance(m, _WEIGHTED)
            and not matches(name, self.config.ignore)
            and m.weight.numel() >= self.config.min_params
        }
        if not self.layers:
            raise PruneError(
                "SparsityConfig selects no Conv/Linear layer of the model (check ignore / min_params)"
            )
        self.masks: dict[str, torch.Tensor] = {}
        self.skipped: dict[str, str] = {}  # layer -> why it stays dense
        self.steps = 0
        self.current = 0.0

    def step(self) -> None:
        """Call after every optimizer step: update masks when the schedule moves, then re-apply them."""
        target = sparsity_at(self.config, self.steps)
        due = self.steps >= self.config.begin_step and (target != self.current or not self.masks)
        if due and (target > 0 or self.config.nm() is not None):
            self.update(target)
        self.apply()
        self.steps += 1

    def update(self, sparsity: float) -> None:
        """Recompute the masks by weight magnitude for `sparsity` (or the N:M pattern)."""
        nm = self.config.nm()
        if nm is not None:
            n, m = nm
            for name, layer in self.layers.items():
                w = layer.weight
                if w.dim() < 2 or w.shape[1] % m:
                    self.skipped[name] = (
                        f"input width {w.shape[1] if w.dim() > 1 else 1} is not a multiple of {m}"
                    )
                    continue
                self.masks[name] = nm_mask(w, n, m)
        elif self.config.scope == "global":
            flat = torch.cat(
                [
                    (layer.weight.detach() * self._mask(name)).abs().reshape(-1)
                    for name, layer in self.layers.items()
                ]
            )
            k = int(round(sparsity * flat.numel()))
            order = flat.argsort(stable=True)
            keep = torch.ones_like(flat)
            keep[order[:k]] = 0.0
            offset = 0
            for name, layer in self.layers.items():
                size = layer.weight.numel()
                self.masks[name] = keep[offset : offset + size].reshape(layer.weight.shape)
                offset += size
        else:
            for name, layer in self.layers.items():
                w = (layer.weight.detach() * self._mask(name)).abs().reshape(-1)
                k = int(round(sparsity * w.numel()))
                keep = torch.ones_like(w)
                keep[w.argsort(stable=True)[:k]] = 0.0
                self.masks[name] = keep.reshape(layer.weight.shape)
        self.current = sparsity

    def _mask(self, name: str) -> torch.Tensor | float:
        return self.masks.get(name, 1.0)

    @torch.no_grad()
    def apply(self) -> None:
        for name, mask in self.masks.items():
            self.layers[name].weight.mul_(mask)

    def finalize(self) -> nn.Module:
        """Bake the masks into the weights (zeros) and return the model; the sparsifier is spent."""
        self.apply()
        self.masks = {}
        return self.model

    def report(self) -> dict[str, Any]:
        """Zero fraction per layer and over all selected layers."""
        rows, zeros, total = [], 0, 0
        for name, layer in self.layers.items():
            w = layer.weight.detach()
            z = int((w == 0).sum())
            rows.append(
                {"layer": name, "params": w.numel(), "sparsity": z / w.numel(), "dense": name in self.skipped}
            )
            zeros, total = zeros + z, total + w.numel()
        return {"sparsity": zeros / total, "layers": rows, "skipped": dict(self.skipped)}


def sparsify(model: nn.Module, config: SparsityConfig | dict[str, Any]) -> nn.Module:
    """One-shot magnitude sparsity (or N:M) on a copy of `model`: the final target at once."""
    sp = Sparsifier(copy.deepcopy(model), config)
    sp.update(sp.config.sparsity)
    return sp.finalize()
