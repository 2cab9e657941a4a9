"""`DistillConfig`: how a student learns from a teacher (or, without a teacher, from labels alone)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pocketfleet import PocketfleetError
from pocketfleet.config import config_from_dict

OUTPUT_LOSSES = ("auto", "kl", "mse", "cosine")


class DistillError(PocketfleetError):
    """A distillation config or data set that cannot be used."""


@dataclass
class DistillConfig:
    """Knowledge distillation (Hinton et al.) with optional feature distillation.

    loss = alpha * output_loss(student, teacher) + (1 - alpha) * CE(student, labels)
           + feature_weight * sum over `features` of MSE(projection(student hidden), teacher hidden)

    output_loss: "kl" (softened logits, temperature T, scaled by T^2), "cosine" (1 - cos, embeddings),
      "mse", or "auto" (kl when the data has labels, else cosine). Without labels alpha is taken as 1.
    features: {student module: teacher module}; each pair gets a learned projection (1x1 conv for
      [N,C,H,W] maps, linear for [..., C] states; identity-initialised when widths match), dropped after
      training. Padding positions are left out when the inputs carry an `attention_mask`.
    teacher=None: plain supervised fine-tuning with the same schedule (the no-KD baseline).
    shift: random translation of 4-D image inputs by up to this many pixels (the digits augmentation).
    keep_best: with an evaluate function, keep the weights of the epoch it scores best.
    mask_input: the input holding the attention mask; each batch is cut to its longest row, and with
      bucket=True rows of similar length are batched together (much less padding for sentences).
    cache_teacher: compute the teacher's outputs once per (then fixed) batch instead of every epoch;
      needs shift=0. Costs memory: all teacher outputs and feature maps of one epoch.
    freeze: student parameters (names or fnmatch patterns, e.g. "word_embeddings.*") left untrained.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    temperature: float = 4.0
    alpha: float = 0.7
    output_loss: str = "auto"
    features: dict[str, str] = field(default_factory=dict)
    feature_weight: float = 1.0
    label_smoothing: float = 0.0
    shift: int = 0
    seed: int = 0
    threads: int = 1
    keep_best: bool = True
    mask_input: str = "attention_mask"
    bucket: bool = True
    cache_teacher: bool = False
    freeze: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DistillConfig:
        return config_from_dict(cls, data, "DistillConfig", DistillError)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> DistillConfig:
        for name in ("epochs", "batch_size", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DistillError(f"DistillConfig.{name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise DistillError(f"DistillConfig.alpha must be in [0, 1], got {self.alpha!r}")
        if self.temperature <= 0:
            raise DistillError(f"DistillConfig.temperature must be > 0, got {self.temperature!r}")
        if self.lr <= 0:
            raise DistillError(f"DistillConfig.lr must be > 0, got {self.lr!r}")
        if self.output_loss not in OUTPUT_LOSSES:
            raise DistillError(
                f"DistillConfig.output_loss must be one of {OUTPUT_LOSSES}, got {self.output_loss!r}"
            )
        if not isinstance(self.features, dict):
            raise DistillError(
                f"DistillConfig.features must be a table {{student layer: teacher layer}}, got {self.features!r}"
            )
        if self.feature_weight < 0 or self.warmup_epochs < 0 or self.shift < 0:
            raise DistillError("DistillConfig.feature_weight, warmup_epochs and shift must be >= 0")
        return self
