"""Tensor and metric descriptions shared by workloads, exporters, packages and runtimes (torch-free)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Quantization:
    """Affine int8/uint8 quantization of a tensor: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int


@dataclass(frozen=True)
class TensorSpec:
    """A named model input or output. Dynamic dimensions are strings ("batch", "sequence")."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # numpy dtype name: "float32", "float16", "int64", "int8", ...
    quantization: Quantization | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"] = list(self.shape)
        if self.quantization is None:
            out.pop("quantization")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        quant = data.get("quantization")
        return cls(
            name=str(data["name"]),
            shape=tuple(data["shape"]),
            dtype=str(data["dtype"]),
            quantization=Quantization(**quant) if quant else None,
        )


@dataclass(frozen=True)
class MetricSpec:
    """The workload metric a compressed model is judged by."""

    name: str
    higher_is_better: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
