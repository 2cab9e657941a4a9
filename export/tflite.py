"""PyTorch -> TFLite (LiteRT) with litert-torch; fp16 as weight-only float casting (ai-edge-quantizer).

The model is traced with named keyword inputs and returns a dict, so the LiteRT signature keeps the
workload's input and output names. Shapes are those of the example (batch fixed, usually 1): LiteRT
models here are static, and `export.runtimes` runs larger batches in chunks. 64-bit integer inputs
become int32 (LiteRT's default); the runtime converts int64 ids losslessly.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from export._quiet import quiet
from export.errors import ExportError

if TYPE_CHECKING:
    import torch


def _named(
    module: torch.nn.Module, input_names: Sequence[str], output_names: Sequence[str]
) -> torch.nn.Module:
    import torch

    class Named(torch.nn.Module):
        """Keyword inputs in the workload's order -> dict of named outputs (names reach the signature)."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
            from export.source import _flatten_outputs

            out = self.inner(*(inputs[n] for n in input_names))
            outs = [t for _, t in _flatten_outputs(out, type(module).__name__)]  # tensors, tuples, ModelOutput
            return dict(zip(output_names, outs, strict=True))

    return Named().eval()


def export_tflite(
    module: torch.nn.Module,
    output_names: Sequence[str],
    example: Mapping[str, torch.Tensor],
    path: str | Path,
    dtype: str = "fp32",
) -> Path:
    """Convert `module(**example)` (example keys are the input names, in order) and write `path`."""
    path = Path(path)
    if dtype not in ("fp32", "fp16"):
        raise ExportError(f"TFLite export supports dtype fp32 or fp16, got {dtype!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _named(module, list(example), output_names)
    with quiet() as log:
        import litert_torch  # its import prints torchao/pytree chatter

        with contextlib.suppress(AttributeError):
            litert_torch.progress.config.show_progress = False
        try:
            edge_model = litert_torch.convert(wrapped, sample_kwargs=dict(example))
            edge_model.export(str(path))
        except Exception as exc:
            from export.diagnose import explain

            hint = explain(exc, module, tuple(example.values()), "litert-torch (TFLite)", list(example))
            raise ExportError(hint or _conversion_error(path, exc, log.text)) from exc
    if dtype == "fp16":
        path.write_bytes(weights_to_fp16(path.read_bytes()))
    return path


def weights_to_fp16(model: bytes) -> bytes:
    """Weight-only fp16 (float casting) of FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D, EMBEDDING_LOOKUP."""
    from ai_edge_quantizer import qtyping, quantizer
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    with quiet() as log:
        try:
            q = quantizer.Quantizer(bytearray(model))
            q.add_weight_only_config(
                regex=".*",
                operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                num_bits=16,
                algorithm_key=AlgorithmName.FLOAT_CASTING,
            )
            result = q.quantize()
        except Exception as exc:
            raise ExportError(
                f"fp16 float casting failed: {type(exc).__name__}: {exc}\n{log.tail()}"
            ) from exc
    return bytes(result.quantized_model)


_OP_RE = re.compile(
    r"(aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?|torch\.ops\.[A-Za-z0-9_.]+|tfl\.[A-Za-z0-9_]+)"
)


def _conversion_error(path: Path, exc: Exception, log: str) -> str:
    """Name the failing op when the error or log mentions one."""
    text = f"{exc}\n{log}"
    ops = sorted(set(_OP_RE.findall(text)))
    head = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
    where = f" (ops mentioned: {', '.join(ops[:8])})" if ops else ""
    return f"litert-torch could not convert the model for {path.name}{where}: {type(exc).__name__}: {head}"
