"""Model directories: `model.json` (metadata, JSON) + `weights.safetensors` (+ workload assets).
Nothing is pickled; loading validates every file and names the one that is wrong."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.evaluate import Predict
from export.specs import TensorSpec
from pocketfleet import PocketfleetError

from .base import Workload, torch_predict

if TYPE_CHECKING:
    import torch
    from torch import nn

MODEL_FORMAT = "pocketfleet-model/1"
META_FILE, WEIGHTS_FILE = "model.json", "weights.safetensors"
_RESERVED = ("format", "workload", "arch", "config")


class ModelDirError(PocketfleetError):
    """A model directory is missing a file or holds one that does not fit."""


def model_dir_error(path: Path, problem: str) -> ModelDirError:
    return ModelDirError(f"{path}: {problem}")


def require_file(model_dir: Path, name: str) -> Path:
    path = Path(model_dir) / name
    if not path.is_file():
        raise model_dir_error(path, "missing (not a pocketfleet model directory?)")
    return path


def save_model_dir(
    module: nn.Module,
    workload: Workload,
    config: dict[str, Any],
    out_dir: str | Path,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `module`'s weights and metadata to `out_dir` (created; existing files are overwritten).

    `config` must rebuild the module with `workload.build(config)`. `extra` adds model.json fields
    (it cannot change format, workload, arch or config).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clash = sorted(set(extra or {}) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra may not set {clash}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE))
    import torch

    meta: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "workload": workload.name,
        "arch": workload.arch,
        "config": config,
        "metrics": metrics or {},
        "metric": {"name": workload.metric.name, "higher_is_better": workload.metric.higher_is_better},
        "inputs": [s.to_dict() for s in workload.inputs],
        "outputs": [s.to_dict() for s in workload.outputs],
        "preprocessing": workload.preprocessing,
        "params": int(sum(p.numel() for p in module.parameters())),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "train_seconds": None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    meta.update(workload.save_assets(module, out))
    meta.update(extra or {})
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=_json_default) + "\n")
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


@dataclass
class LoadedModel:
    """A model directory loaded back: the module (eval mode) and the workload it belongs to.

    It satisfies export.source.ExportableModel (the properties below), so export and compress take it
    like any user's model."""

    module: nn.Module
    workload: Workload
    config: dict[str, Any]
    meta: dict[str, Any]
    path: Path

    @property
    def name(self) -> str:
        return self.workload.name

    @property
    def workload_name(self) -> str:
        return self.workload.name

    @property
    def input_specs(self) -> list[TensorSpec]:
        return self.workload.inputs

    @property
    def output_specs(self) -> list[TensorSpec]:
        return self.workload.outputs

    @property
    def preprocessing(self) -> str:
        return self.workload.preprocessing

    @property
    def metric_name(self) -> str:
        return self.workload.metric.name

    def sample_inputs(self, n: int = 4) -> dict[str, np.ndarray]:
        return self.workload.sample_inputs(n)

    def eval_inputs(self) -> dict[str, np.ndarray]:
        return self.workload.eval_inputs()

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the PyTorch module (no grad) on numpy inputs; outputs by output name."""
        return torch_predict(self.module, self.workload)(inputs)

    def evaluate(
        self, predict: Predict | None = None, batch_size: int = 32, split: str = "test"
    ) -> dict[str, Any]:
        """Score `predict` (default: this PyTorch module) with the workload metric."""
        return self.workload.evaluate(predict or self.predict, batch_size=batch_size, split=split)

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        """Real test inputs as tensors in the workload's input order (for tracing / export)."""
        import torch

        sample = self.workload.sample_inputs(batch)
        return tuple(torch.from_numpy(sample[s.name]) for s in self.workload.inputs)


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read and check a model directory's model.json (torch-free)."""
    meta_path = require_file(Path(path), META_FILE)
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise model_dir_error(meta_path, f"not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise model_dir_error(meta_path, f"format is {found!r}, expected {MODEL_FORMAT!r}")
    for key in ("workload", "config"):
        if key not in meta:
            raise model_dir_error(meta_path, f"has no {key!r} field")
    return meta


def load_model_dir(path: str | Path) -> LoadedModel:
    """Load a model directory written by `save_model_dir` / `make_model_dir`."""
    from safetensors.torch import load_file

    from .registry import get_workload

    root = Path(path)
    meta = read_meta(root)
    workload = get_workload(meta["workload"]).bind(root, meta)
    config = meta["config"]
    try:
        module = workload.build(config, pretrained=False)
    except (KeyError, TypeError, ValueError) as exc:
        raise model_dir_error(
            root / META_FILE, f"config does not build a {meta['workload']} model ({exc!r})"
        ) from None
    weights_path = require_file(root, WEIGHTS_FILE)
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise model_dir_error(weights_path, f"unreadable safetensors file ({exc})") from None
    _check_state(weights_path, module.state_dict(), tensors)
    module.load_state_dict(tensors, strict=True)
    module.eval()
    return LoadedModel(module=module, workload=workload, config=config, meta=meta, path=root)


def _check_state(path: Path, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise model_dir_error(
            path, f"tensors do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, ref in expected.items():
        if tuple(found[name].shape) != tuple(ref.shape):
            raise model_dir_error(
                path,
                f"tensor {name!r} has shape {list(found[name].shape)}, the config needs {list(ref.shape)}",
            )
