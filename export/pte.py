"""PyTorch -> ExecuTorch (.pte) through torch.export and the XNNPACK backend; int8 through PT2E.

    export_pte(module, ["image"], ["logits"], (x,), "model.pte")                        # fp32
    export_pte(module, ["image"], ["logits"], (x,), "model.pte", dtype="int8",
               calib={"image": rows})                                                  # int8

fp32: `torch.export.export` -> `to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])`
-> `.to_executorch()`. int8: the exported graph goes through `prepare_pt2e` with the XNNPACK quantizer
(symmetric int8 weights per output channel, int8 activations, static ranges), the calibration rows are
run through it one at a time, `convert_pt2e` folds the observers into quantize/dequantize pairs, and
the XNNPACK partitioner lowers those patterns to its int8 kernels.

Shapes are those of the example (batch fixed, usually 1), as for TFLite: `export.runtime_pte` runs larger
batches in chunks. The workload's input and output names travel inside the program as a constant method
(`pf_io`, the UTF-8 bytes of a JSON document), so a bare `.pte` still tells its runtime what its tensors
are called. torch and executorch are imported inside the call.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export._quiet import quiet
from export.errors import ExportError
from export.runtime_pte import IO_METHOD  # the constant method holding the tensor names (torch-free module)

if TYPE_CHECKING:
    import torch

DTYPES = ("fp32", "int8")
MAX_CALIB_ROWS = 256


def calibration_rows(source: Any, n: int) -> dict[str, np.ndarray]:
    """Calibration rows of an ExportableModel: its `calib_inputs(n)` (a zoo model: the train split) when it
    has one, else `sample_inputs(n)`."""
    for owner in (source, getattr(source, "workload", None)):
        calib = getattr(owner, "calib_inputs", None)
        if callable(calib):
            return calib(n)
    return source.sample_inputs(n)


def io_names_method(input_names: Sequence[str], output_names: Sequence[str]) -> dict[str, list[int]]:
    """The constant method that carries the tensor names (ExecuTorch constants are numbers, not text)."""
    doc = json.dumps({"inputs": list(input_names), "outputs": list(output_names)}, separators=(",", ":"))
    return {IO_METHOD: list(doc.encode("utf-8"))}


def export_pte(
    module: torch.nn.Module,
    input_names: Sequence[str],
    output_names: Sequence[str],
    example: Sequence[torch.Tensor],
    path: str | Path,
    dtype: str = "fp32",
    calib: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Export `module(*example)` to an XNNPACK-lowered `.pte`; int8 needs `calib` ({input name: rows})."""
    import torch

    path = Path(path)
    if dtype not in DTYPES:
        raise ExportError(f"ExecuTorch export supports dtype {list(DTYPES)}, got {dtype!r}")
    if dtype == "int8" and not calib:
        raise ExportError("ExecuTorch int8 export needs calibration data (calib={input name: rows})")
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as exc:
        raise ExportError(f"ExecuTorch export needs the executorch package (pip install 'pocketfleet[pte]'): {exc}") from exc
    example = tuple(example)
    module = module.eval()
    with quiet() as log:
        try:
            with torch.no_grad():
                program = torch.export.export(module, example)
                if dtype == "int8":
                    batch = int(example[0].shape[0]) if example and example[0].ndim else 1
                    quantized = _quantized(program, input_names, calib or {}, batch)
                    program = torch.export.export(quantized, example)
                lowered = to_edge_transform_and_lower(
                    program,
                    partitioner=[XnnpackPartitioner()],
                    constant_methods=io_names_method(input_names, output_names),
                )
                buffer = lowered.to_executorch().buffer
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(log.failure(f"ExecuTorch could not export {path.name} ({dtype})", exc)) from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer)
    return path


def _quantized(
    program: torch.export.ExportedProgram,
    input_names: Sequence[str],
    calib: Mapping[str, np.ndarray],
    batch: int = 1,
) -> torch.nn.Module:
    """PT2E int8 with the XNNPACK quantizer, calibrated on `calib` in batches of the traced batch.

    Static (int8 activations with calibrated ranges) for models with float inputs only. A model with an
    integer input (token ids: a transformer) gets dynamic int8 activations on its linear layers, as
    ExecuTorch recommends for transformers: the attention mask's large negative fill and softmax outputs
    share one static range badly (MiniLM static: cosine to fp32 0.36; dynamic: see docs/targets.md)."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    missing = [n for n in input_names if n not in calib]
    if missing:
        raise ExportError(f"calibration data has no input {missing[0]!r} (it has {sorted(calib)})")
    dynamic = any(np.issubdtype(np.asarray(calib[n]).dtype, np.integer) for n in input_names)
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    quantizer = XNNPACKQuantizer().set_global(config)
    prepared = prepare_pt2e(program.module(), quantizer)
    rows = min(MAX_CALIB_ROWS, min(len(calib[n]) for n in input_names))
    if rows < batch:
        raise ExportError(f"calibration data has {rows} rows, fewer than the traced batch {batch}")
    for i in range(0, rows - batch + 1, batch):  # the graph is traced at the example's (static) batch
        prepared(*(torch.from_numpy(np.ascontiguousarray(calib[n][i : i + batch])) for n in input_names))
    return convert_pt2e(prepared)
