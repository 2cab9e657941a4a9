"""Full-model fine-tuning when torch is installed on the device (imported lazily, inside the functions).

Weights cross the boundary as a name -> float32 NumPy dict of the module's floating-point state
(parameters and buffers such as BatchNorm statistics), so codecs and aggregators never see torch.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .config import TrainConfig
from .dataset import LocalDataset
from .errors import TrainingError
from .head import TrainResult, Weights


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def module_weights(module: Any) -> Weights:
    """The module's floating-point state (params + buffers) as float32 NumPy arrays."""
    return {
        k: v.detach().cpu().float().numpy().copy()
        for k, v in module.state_dict().items()
        if v.is_floating_point()
    }


def load_module_weights(module: Any, weights: Mapping[str, np.ndarray]) -> None:
    """Copy `weights` into the module's matching floating-point state (shapes must match)."""
    import torch

    state = module.state_dict()
    for k, v in weights.items():
        if k not in state:
            raise TrainingError(f"torch weights: the model has no tensor {k!r}")
        if tuple(state[k].shape) != tuple(v.shape):
            raise TrainingError(f"torch weights: {k!r} has shape {tuple(v.shape)}, model expects {tuple(state[k].shape)}")
        state[k].copy_(torch.from_numpy(np.asarray(v)).to(state[k].dtype))


def finetune_torch(
    module: Any,
    dataset: LocalDataset,
    config: TrainConfig,
    weights: Mapping[str, np.ndarray] | None = None,
    input_names: Sequence[str] | None = None,
    threads: int = 1,
) -> TrainResult:
    """Fine-tune the whole `module` (torch.nn.Module) on `dataset` with SGD+momentum and FedProx's mu.

    `weights` (the global model) are loaded first when given; the result holds the new floating state.
    """
    try:
        import torch
    except ImportError as exc:
        raise TrainingError("full-model fine-tuning needs torch on the device; use head training") from exc

    if weights is not None:
        load_module_weights(module, weights)
    names = list(input_names or sorted(dataset.arrays))
    xs = [torch.from_numpy(np.ascontiguousarray(dataset.arrays[n])) for n in names]
    y = torch.from_numpy(dataset.labels.astype(np.int64))
    params = [p for p in module.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(config.seed)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    start, steps, losses = time.perf_counter(), 0, []
    # dropout draws from torch's global RNG: seed it (in a fork, so the caller's RNG is untouched) or
    # the same weights, data and seed train to a different model every call
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            module.train()
            for _ in range(config.epochs):
                order = torch.randperm(len(y), generator=gen)
                for i in range(0, len(order), config.batch_size):
                    idx = order[i : i + config.batch_size]
                    out = module(*[x[idx] for x in xs])
                    loss = loss_fn(out, y[idx])
                    losses.append(loss.item())
                    if config.mu:
                        prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                        loss = loss + 0.5 * config.mu * prox
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
                    if config.max_steps and steps >= config.max_steps:
                        break
                if config.max_steps and steps >= config.max_steps:
                    break
            module.eval()
            with torch.no_grad():
                acc = float((module(*xs).argmax(1) == y).float().mean())
        finally:
            torch.set_num_threads(before)
    metrics = {"loss_first": losses[0], "loss_last": losses[-1], "train_accuracy": acc,
               "train_seconds": time.perf_counter() - start}
    return TrainResult(module_weights(module), len(y), steps, metrics)
