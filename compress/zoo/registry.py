"""The known workloads by name, and `make_model_dir`."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from pocketfleet import PocketfleetError

from .base import Workload
from .digits_cnn import DigitsCNNWorkload
from .digits_mbnet import DigitsMobileNetWorkload
from .minilm_l6 import MiniLMWorkload

_WORKLOADS: dict[str, type[Workload]] = {
    cls.name: cls for cls in (DigitsCNNWorkload, DigitsMobileNetWorkload, MiniLMWorkload)
}


class UnknownWorkloadError(PocketfleetError):
    pass


@cache
def get_workload(name: str) -> Workload:
    """The workload called `name` (one shared instance, so its data caches are reused)."""
    if name not in _WORKLOADS:
        raise UnknownWorkloadError(f"unknown workload {name!r}; known workloads: {', '.join(_WORKLOADS)}")
    return _WORKLOADS[name]()


def list_workloads() -> list[Workload]:
    return [get_workload(name) for name in _WORKLOADS]


def make_model_dir(name: str, out_dir: str | Path, seed: int = 0, progress: bool = True) -> Path:
    """Create workload `name`'s reference model (trained, or loaded when pretrained) in `out_dir`."""
    return get_workload(name).make(out_dir, seed=seed, progress=progress)
