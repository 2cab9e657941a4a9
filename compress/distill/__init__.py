"""Knowledge distillation: logit KD (temperature, alpha), feature KD through learned projections, and
plain fine-tuning (teacher=None) with the same schedule. See docs/pruning.md."""

from pocketfleet import callable_package

from .config import DistillConfig, DistillError
from .trainer import Distiller, as_tensors, distill, make_evaluate

__all__ = ["DistillConfig", "DistillError", "Distiller", "as_tensors", "distill", "make_evaluate"]


callable_package(__name__, distill)
