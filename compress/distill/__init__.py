"""Knowledge distillation: logit KD (temperature, alpha), feature KD through learned projections, and
plain fine-tuning (teacher=None) with the same schedule. See docs/pruning.md."""

import sys
import types
from typing import Any

from .config import DistillConfig, DistillError
from .trainer import Distiller, as_tensors, distill

__all__ = ["DistillConfig", "DistillError", "Distiller", "as_tensors", "distill"]


class _CallableModule(types.ModuleType):
    """`compress.distill(...)` calls `compress.distill.distill(...)` while `compress.distill` stays the package."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return distill(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
