"""Quantization-aware training: fake-quant fine-tuning of a BatchNorm-folded model.

Every Conv/Linear is wrapped so that its input goes through a uint8 fake quantizer (range from our
calibration of the folded model, fixed during training) and its weight through a per-channel symmetric
int8 fake quantizer (scale recomputed from the current weight every step); gradients pass straight
through. Training uses the model's training rows (a workload's train split; the user's eval_data, else the
calibration rows): cross-entropy on integer labels, otherwise 1 - cosine to the fp32 model's outputs. The weights of the epoch with the best fake-quant
metric on the validation split are kept; unwrapping gives an ordinary float model, which is then
converted exactly like a PTQ model (calibrated again, so the ranges fit the trained weights).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from export.source import first_tensor

from .calibrate import collect, compute_range
from .config import QuantConfig
from .errors import QuantizeError


class FakeQuant(nn.Module):
    """A Conv2d/Linear with fake-quantized input activation and weight."""

    def __init__(self, layer: nn.Module, lo: float, hi: float, per_channel: bool = True) -> None:
        super().__init__()
        self.layer = layer
        self.per_channel = per_channel
        scale = max((hi - lo) / 255.0, 1e-8)
        self.register_buffer("act_scale", torch.tensor(scale))
        self.register_buffer("act_zp", torch.tensor(int(round(-lo / scale)), dtype=torch.int32))

    def quant_weight(self) -> torch.Tensor:
        w = self.layer.weight
        if self.per_channel:
            amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
            scale = torch.clamp(amax / 127.0, min=1e-8)
            zp = torch.zeros(w.shape[0], dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -127, 127)
        scale = float(torch.clamp(w.detach().abs().max() / 127.0, min=1e-8))
        return torch.fake_quantize_per_tensor_affine(w, scale, 0, -127, 127)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_tensor_affine(x, float(self.act_scale), int(self.act_zp), 0, 255)
        w = self.quant_weight()
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, w, layer.bias)
        return layer._conv_forward(x, w, layer.bias)  # type: ignore[attr-defined]


def _targets(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear)) and n]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def input_ranges(
    model: nn.Module, calib: Mapping[str, np.ndarray], order: list[str], cfg: QuantConfig
) -> dict[str, tuple[float, float]]:
    """Our calibrated input range of every Conv/Linear (two passes with forward hooks)."""
    names = _targets(model)
    captured: dict[str, np.ndarray] = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda m, inp, out, n=n: captured.__setitem__(n, inp[0].detach().numpy())
        )
        for n in names
    ]
    try:

        def run() -> Any:
            rows = len(next(iter(calib.values())))
            for start in range(0, rows, 64):
                args = [torch.from_numpy(np.ascontiguousarray(calib[k][start : start + 64])) for k in order]
                captured.clear()
                with torch.no_grad():
                    model(*args)
                yield dict(captured)

        stats = collect(run(), run())
    finally:
        for h in hooks:
            h.remove()
    return {n: compute_range(s, cfg.calibration, cfg.percentile) for n, s in stats.items()}


def wrap(model: nn.Module, ranges: Mapping[str, tuple[float, float]], per_channel: bool = True) -> nn.Module:
    model = copy.deepcopy(model)
    for name in _targets(model):
        if name in ranges:
            _set(model, name, FakeQuant(model.get_submodule(name), *ranges[name], per_channel=per_channel))
    return model


def unwrap(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuant):
            _set(model, name, module.layer)
    return model


def qat_finetune(
    model: Any, cfg: QuantConfig, calib: Mapping[str, np.ndarray], progress: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune `model.module` (a QuantModel, already BN-folded) with fake quantization; returns
    (float module, report). The kept epoch is the one `model.scorer` rates best."""
    from tqdm.auto import tqdm

    from compress.zoo.digits_train import torch_threads

    from .source import _torch_predict

    order = [s.name for s in model.input_specs]
    inputs, labels = model.train_data if model.train_data is not None else (dict(calib), None)
    if labels is not None and labels.dtype.kind not in "iu":
        labels = None  # float targets: follow the fp32 model's outputs instead
    teacher = model.module.eval()
    scorer = model.scorer
    report: dict[str, Any] = {"epochs": cfg.qat_epochs, "lr": cfg.qat_lr, "val": []}
    with torch_threads(cfg.threads):
        torch.manual_seed(0)
        ranges = input_ranges(teacher, calib, order, cfg)
        student = wrap(teacher, ranges, cfg.per_channel)
        fake_quant = _torch_predict(student, model.input_specs, model.output_specs)

        def predict(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            student.eval()
            return fake_quant(batch)

        best_score = scorer.score_predict(predict)
        report["val"].append(best_score)
        best_state = copy.deepcopy(student.state_dict())
        rows = len(next(iter(inputs.values())))
        steps = max(1, cfg.qat_epochs * math.ceil(rows / cfg.qat_batch_size))
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.qat_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        gen = torch.Generator().manual_seed(0)
        for _ in tqdm(range(cfg.qat_epochs), desc="qat", unit="epoch", disable=not progress, leave=False):
            student.train()
            for mod in student.modules():  # keep BatchNorms that could not be folded in eval mode
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.eval()
            order_idx = torch.randperm(rows, generator=gen).numpy()
            for start in range(0, rows, cfg.qat_batch_size):
                idx = order_idx[start : start + cfg.qat_batch_size]
                args = [torch.from_numpy(np.ascontiguousarray(inputs[k][idx])) for k in order]
                out = _first(student(*args))
                if labels is not None:
                    loss = F.cross_entropy(out, torch.from_numpy(labels[idx]).long())
                else:
                    with torch.no_grad():
                        ref = _first(teacher(*args))
                    loss = (1.0 - F.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            score = scorer.score_predict(predict)
            report["val"].append(score)
            better = score > best_score if scorer.higher_is_better else score < best_score
            if better:
                best_score, best_state = score, copy.deepcopy(student.state_dict())
        student.load_state_dict(best_state)
    report["best_val"] = best_score
    return unwrap(student).eval(), report


def _first(out: Any) -> torch.Tensor:
    tensor = first_tensor(out)
    if tensor is None:
        raise QuantizeError(f"the model returns a {type(out).__name__}, not a tensor (or a tuple / dict of tensors)")
    return tensor
