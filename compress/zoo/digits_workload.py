"""What the two digits workloads share: data, top-1 evaluation, training and the model directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.evaluate import Predict, pick_output, run_batched, top1_accuracy
from export.specs import MetricSpec, TensorSpec

from .base import Workload
from .digits_data import digits_split

if TYPE_CHECKING:
    from .digits_train import TrainConfig


class DigitsWorkload(Workload):
    metric = MetricSpec("top1", higher_is_better=True)
    inputs = [TensorSpec("image", ("batch", 1, 8, 8), "float32")]
    outputs = [TensorSpec("logits", ("batch", 10), "float32")]
    preprocessing = (
        "8x8 grayscale digit, pixel values 0..16 divided by 16 -> float32 [batch,1,8,8] in [0,1]; "
        "output: logits for classes 0-9 (argmax = predicted digit)"
    )

    def data(self, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        images, labels = digits_split(split)
        return {"image": images}, labels

    def evaluate(self, predict: Predict, batch_size: int = 32, split: str = "test") -> dict[str, Any]:
        inputs, labels = self.data(split)
        logits = pick_output(run_batched(predict, inputs, batch_size), "logits")
        return top1_accuracy(logits, labels)

    def train_config(self) -> TrainConfig:
        from .digits_train import TrainConfig

        return TrainConfig()

    def make(self, out_dir: str | Path, seed: int = 0, progress: bool = True) -> Path:
        import torch

        from .base import torch_predict
        from .digits_train import train_classifier
        from .modeldir import save_model_dir

        start = time.perf_counter()
        config = self.default_config()
        torch.manual_seed(seed)
        model, report = train_classifier(
            self.build(config), self.train_config(), seed=seed, progress=progress
        )
        metrics = self.evaluate(torch_predict(model, self), batch_size=256)
        extra = {
            "train_seconds": report.pop("train_seconds"),
            "make_seconds": round(time.perf_counter() - start, 2),
        }
        return save_model_dir(
            model, self, config, out_dir, metrics=metrics, extra={**extra, "training": report}
        )
