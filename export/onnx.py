"""PyTorch -> ONNX with the dynamo exporter (opset 18), named inputs/outputs and named dynamic dims.

fp16 is weight-only storage: every float32 initializer of 16+ elements (that fits the fp16 range) is stored
as float16 and a Cast back to float32 is inserted in front of its users, so inputs, outputs and
compute stay float32 (onnxruntime folds the casts when it loads the model). The file is about half the
size; accuracy changes only by the rounding of the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export._quiet import quiet
from export.errors import ExportError
from export.specs import TensorSpec

if TYPE_CHECKING:
    import onnx
    import torch

OPSET = 18
FP16_MIN_ELEMENTS = 16
FP16_MAX = 65504.0


def export_onnx(
    module: torch.nn.Module,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    example: Sequence[torch.Tensor],
    path: str | Path,
    dtype: str = "fp32",
    opset: int = OPSET,
    allow_fixed_batch: bool = False,
) -> Path:
    """Export `module(*example)` to `path`; dims given as strings in the specs become dynamic.

    When the dynamo exporter fails on a model with dynamic dims (a reshape that torch's decompositions turn
    into an invalid view, a dimension the model code fixes), the file is made another way, in this order:
    the TorchScript exporter with the same dynamic axes (kept only if it runs at another batch size and
    matches the module there), then, with `allow_fixed_batch`, the dynamo exporter at a fixed batch
    (FIXED_BATCHES, the first that traces; export_model allows it, a quantizer needs a batch-free file).
    A dynamo export with a dynamic batch is checked the same way (a trace can specialize on the example's
    batch and still name the dim dynamic). A fixed batch is recorded in the file (metadata
    `pocketfleet.fixed_batch`, and the inputs' leading dims), warned about, and reported by export_model;
    runtimes run other batches in chunks of it. When nothing works the first, actionable error is raised."""
    import onnx

    if dtype not in ("fp32", "fp16"):
        raise ExportError(f"ONNX export supports dtype fp32 or fp16, got {dtype!r}")
    path = Path(path)
    batch_dynamic = all(s.shape and isinstance(s.shape[0], str) for s in inputs)
    try:
        model, how = _dynamo(module, inputs, example, path, opset), {}
        if batch_dynamic:
            _check_other_batch(model, module, inputs, example, "dynamo")
    except _Failed as first:
        if not batch_dynamic or first.no_conversion:
            raise ExportError(first.message) from first.__cause__
        batches = FIXED_BATCHES if allow_fixed_batch else ()
        model, how = _fallback(module, inputs, outputs, example, path, opset, batches, first.message)
        if model is None:
            tried = f" and a fixed batch of {list(batches)}" if batches else ""
            message = f"{first.message} (the TorchScript exporter{tried} failed too)"
            raise ExportError(message) from first.__cause__
    _name_outputs(model, [s.name for s in outputs])
    _name_dims(model, inputs)
    if dtype == "fp16":
        weights_to_fp16(model)
    model.producer_name = "pocketfleet"
    model.doc_string = f"exported by pocketfleet (weights {dtype})"
    for key, value in how.items():
        model.metadata_props.add(key=f"pocketfleet.{key}", value=str(value))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name} fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    return path


# the last-resort export batches, tried in order (2: the dynamic export's example batch)
FIXED_BATCHES = (1, 2)


class _Failed(Exception):
    def __init__(self, message: str, no_conversion: bool = False) -> None:
        super().__init__(message)
        self.message, self.no_conversion = message, no_conversion


def _dynamo(module: torch.nn.Module, inputs: Sequence[TensorSpec], example: Sequence[torch.Tensor], path: Path,
            opset: int) -> onnx.ModelProto:  # fmt: skip
    import torch

    names = [s.name for s in inputs]
    # positional: torch.export keys a dict by the forward's argument names, which need not be ours
    dynamic = tuple(
        {axis: torch.export.Dim.DYNAMIC for axis, d in enumerate(s.shape) if isinstance(d, str)} or None
        for s in inputs
    )
    with quiet() as log:
        try:
            program = torch.onnx.export(
                module.eval(), tuple(example), input_names=names, dynamic_shapes=dynamic, dynamo=True,
                opset_version=opset, verbose=False, optimize=True,
            )  # fmt: skip
        except Exception as exc:
            from export.diagnose import explain

            hint = explain(exc, module, example, "the ONNX exporter", names)
            message = hint or (
                f"torch.onnx.export failed for {path.name}: {type(exc).__name__}: {_summary(exc)[:500]}"
                + (f"\n{log.tail()}" if log.text else "")
            )
            raise _Failed(message, no_conversion=bool(hint and "cannot convert op" in hint)) from exc
    return program.model_proto


def _fallback(module: torch.nn.Module, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
              example: Sequence[torch.Tensor], path: Path, opset: int,
              batches: Sequence[int], reason: str) -> tuple[onnx.ModelProto | None, dict[str, Any]]:  # fmt: skip
    """The TorchScript exporter with dynamic axes, else dynamo at the first of `batches` that traces;
    (None, {}) when all fail."""
    import warnings

    with contextlib.suppress(_Failed):
        return _torchscript(module, inputs, outputs, example, opset), {"exporter": "torchscript"}
    for batch in batches:
        rows = [t[:batch] if t.shape[0] >= batch else t.repeat_interleave(batch, 0)[:batch] for t in example]
        fixed = [TensorSpec(s.name, (batch, *s.shape[1:]), s.dtype) for s in inputs]
        try:
            model = _dynamo(module, fixed, rows, path, opset)
        except _Failed:
            continue
        warnings.warn(
            f"{type(module).__name__} does not export to ONNX with a dynamic batch ({reason.splitlines()[0][:300]}); "
            f"exported at a fixed batch of {batch} instead: other batch sizes run in chunks of {batch}",
            UserWarning,
            stacklevel=3,
        )
        return model, {"exporter": "dynamo", "fixed_batch": batch}
    return None, {}


def _torchscript(module: torch.nn.Module, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 example: Sequence[torch.Tensor], opset: int) -> onnx.ModelProto:  # fmt: skip
    """torch.onnx's TorchScript exporter with our dynamic axes; a trace can bake a size in, so the file must
    also run at another batch size and match the module there."""
    import io

    import onnx
    import torch

    from export.source import _flatten_outputs

    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(t for _, t in _flatten_outputs(self.inner(*args), type(module).__name__))

    axes = {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in (*inputs, *outputs)}
    buffer = io.BytesIO()
    with quiet():
        try:
            torch.onnx.export(
                Flat().eval(), tuple(example), buffer, dynamo=False, input_names=[s.name for s in inputs],
                output_names=[s.name for s in outputs], dynamic_axes={k: v for k, v in axes.items() if v},
                opset_version=opset,
            )  # fmt: skip
        except Exception as exc:
            raise _Failed(f"TorchScript exporter: {type(exc).__name__}: {_summary(exc)[:300]}") from exc
    model = onnx.load_from_string(buffer.getvalue())
    _check_other_batch(model, module, inputs, example, "TorchScript")
    return model


def _check_other_batch(model: onnx.ModelProto, module: torch.nn.Module, inputs: Sequence[TensorSpec],
                       example: Sequence[torch.Tensor], exporter: str) -> None:  # fmt: skip
    """Run `model` in onnxruntime at one row more than the example and compare it with the module."""
    import onnxruntime as ort
    import torch

    from export.source import _flatten_outputs

    n = int(example[0].shape[0]) + 1
    rows = [t.repeat_interleave(2, 0)[:n] if t.dim() else t for t in example]
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {s.name: r.numpy() for s, r in zip(inputs, rows, strict=True)})
        with torch.no_grad():
            want = [t.numpy() for _, t in _flatten_outputs(module(*rows), type(module).__name__)]
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types
        first = str(exc).splitlines()[0][:200]
        raise _Failed(_one_size(module, f"its {exporter} export does not run at batch {n}: {first}")) from exc
    for g, w in zip(got, want, strict=True):
        atol = 1e-4 * (1 + float(np.abs(w).max(initial=0)))
        if g.shape != w.shape or not np.allclose(g, w, rtol=1e-3, atol=atol):
            raise _Failed(_one_size(module, f"its {exporter} export differs from the module at batch {n}"))


def _one_size(module: torch.nn.Module, what: str) -> str:
    return (f"{type(module).__name__} only traces at one input size: {what} (the model code fixes the batch: "
            f"a loop over it, a constant in a reshape/view, a branch on it); make it follow the input's shape")  # fmt: skip


def _summary(exc: BaseException) -> str:
    """The informative line of an exporter error (torch.onnx's first lines are boilerplate)."""
    lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
    for i, line in enumerate(lines):
        if line.startswith("## Exception summary") and i + 1 < len(lines):
            return lines[i + 1]
    return lines[0] if lines else ""


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.name == old:
            vi.name = new
    for init in graph.initializer:
        if init.name == old:
            init.name = new


def _name_outputs(model: onnx.ModelProto, names: list[str]) -> None:
    """Give graph outputs the workload's names, moving aside internal values that already use them."""
    graph = model.graph
    if len(graph.output) != len(names):
        raise ExportError(
            f"the model has {len(graph.output)} outputs but the workload names {len(names)}: {names}"
        )
    used = {x for n in graph.node for x in (*n.input, *n.output)} | {i.name for i in graph.initializer}
    current = [o.name for o in graph.output]
    for name in names:
        if name in used and name not in current:
            _rename_value(graph, name, f"{name}__internal")
    for old, new in zip(current, names, strict=True):
        if old != new:
            _rename_value(graph, old, new)


def _name_dims(model: onnx.ModelProto, inputs: Sequence[TensorSpec]) -> None:
    """Replace the exporter's symbolic dim names (s0, s1, ...) by the workload's ("batch", "sequence")."""
    mapping: dict[str, str] = {}
    graph_inputs = {i.name: i for i in model.graph.input}
    for spec in inputs:
        dims = graph_inputs[spec.name].type.tensor_type.shape.dim
        for dim, want in zip(dims, spec.shape, strict=True):
            if isinstance(want, str) and dim.dim_param:
                mapping[dim.dim_param] = want
    for vi in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param in mapping:
                dim.dim_param = mapping[dim.dim_param]


def weights_to_fp16(model: onnx.ModelProto, min_elements: int = FP16_MIN_ELEMENTS) -> int:
    """Store float32 initializers as float16 behind a Cast to float32; returns how many were converted."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    casts, converted = [], 0
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(init)
        if array.size < min_elements or not np.all(np.abs(array) <= FP16_MAX):
            continue
        name = init.name
        half = numpy_helper.from_array(array.astype(np.float16), f"{name}__fp16")
        init.CopyFrom(half)
        casts.append(
            helper.make_node("Cast", [half.name], [name], to=TensorProto.FLOAT, name=f"{name}__cast")
        )
        converted += 1
    nodes = casts + list(graph.node)  # initializers exist before any node: still topologically sorted
    del graph.node[:]
    graph.node.extend(nodes)
    return converted


def onnx_summary(path: str | Path) -> dict[str, Any]:
    """Op histogram and opset of an ONNX file (for reports)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "nodes": len(model.graph.node),
        "ops": ops,
    }
