"""PyTorch -> TFLite (LiteRT) with litert-torch; fp16 as weight-only float casting (ai-edge-quantizer).

The model is traced with named keyword inputs and returns a dict, so the LiteRT signature keeps the
workload's input and output names. Shapes are those of the example (batch fixed, usually 1): LiteRT
models here are static, and `export.runtimes` runs larger batches in chunks. 64-bit integer inputs
become int32 (LiteRT's default); the runtime converts int64 ids losslessly.

litert-torch's passes turn `nn.Linear` on a 4-D channels-last tensor (ConvNeXt's pointwise layers, [N, H, W, C])
into a `tfl.batch_matmul` its own verifier rejects ("invalid output rank, expected 3 but got 4") when H = W = 1
and an activation and a scale follow (ConvNeXt's last stage at 32x32 input); a reshape to 2-D or 3-D around
the linear is fused back into the same op. The converter is therefore given a copy of the module (weights
shared) whose linear layers run inputs of more than 3 dimensions as a 1x1 convolution, the same arithmetic;
parity is still checked against the user's own module.
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


def flat_linears(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` (parameters and buffers shared, not copied) whose nn.Linear layers run an input of
    more than 3 dimensions [..., H, W, C] as the same arithmetic in a 1x1 convolution (NHWC in TFLite, so the
    permutes cancel); `module` itself is left as it is."""
    import copy

    import torch

    if not any(isinstance(m, torch.nn.Linear) for m in module.modules()):
        return module
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}
    twin = copy.deepcopy(module, memo=shared)
    for m in twin.modules():
        if isinstance(m, torch.nn.Linear):
            m.forward = _channels_last_linear.__get__(m)  # type: ignore[method-assign]
    return twin


def _channels_last_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    if x.dim() <= 3:
        return F.linear(x, self.weight, self.bias)
    lead = x.shape[:-1]
    x4 = x if x.dim() == 4 else x.reshape(-1, x.shape[-3], x.shape[-2], x.shape[-1])
    y = F.conv2d(x4.permute(0, 3, 1, 2), self.weight[:, :, None, None], self.bias).permute(0, 2, 3, 1)
    return y if x.dim() == 4 else y.reshape(*lead, y.shape[-1])


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
    wrapped = _named(flat_linears(module), list(example), output_names)
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
