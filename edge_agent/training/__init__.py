"""On-device training for federated learning (torch-free; torch only inside `finetune_torch`).

- `train_head` / `HeadTrainer`: a dense head over backbone features, trained in NumPy.
- `finetune_torch`: whole-model fine-tuning when torch is installed (lazy import).
- `load_dataset_dir` / `SampleStore`: the device's local labelled data.
"""

from __future__ import annotations

from .config import TrainConfig
from .dataset import LocalDataset, SampleStore, load_dataset_dir, save_dataset_file
from .errors import DatasetError, TrainingError
from .head import HEAD_SCHEMA, DenseLayer, Head, TrainResult, Weights, train_head
from .torch_finetune import finetune_torch, load_module_weights, module_weights, torch_available
from .trainer import HeadTrainer, compute_features

__all__ = [
    "HEAD_SCHEMA",
    "DatasetError",
    "DenseLayer",
    "Head",
    "HeadTrainer",
    "LocalDataset",
    "SampleStore",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "Weights",
    "compute_features",
    "finetune_torch",
    "load_dataset_dir",
    "load_module_weights",
    "module_weights",
    "save_dataset_file",
    "torch_available",
    "train_head",
]
