"""PyTorch -> ONNX with the dynamo exporter (opset 18), named inputs/outputs and named dynamic dims.

fp16 is weight-only storage: every float32 initializer of 16+ elements (that fits the fp16 range) is stored
as float16 and a Cast back to float32 is inserted in front of its users, so inputs, outputs and
compute stay float32 (onnxruntime folds the casts when it loads the model). The file is about half the
size; accuracy changes only by the rounding of the weights.
"""

from __future__ import annotations

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
) -> Path:
    """Export `module(*example)` to `path`; dims given as strings in the specs become dynamic."""
    import onnx
    import torch

    path = Path(path)
    names = [s.name for s in inputs]
    # positional: torch.export keys a dict by the forward's argument names, which need not be ours
    dynamic = tuple(
        {axis: torch.export.Dim.DYNAMIC for axis, d in enumerate(s.shape) if isinstance(d, str)} or None
        for s in inputs
    )
    with quiet() as log:
        try:
            program = torch.onnx.export(
                module.eval(),
                tuple(example),
                input_names=names,
                dynamic_shapes=dynamic,
                dynamo=True,
                opset_version=opset,
                verbose=False,
                optimize=True,
            )
        except Exception as exc:
            from export.diagnose import explain

            hint = explain(exc, module, example, "the ONNX exporter", names)
            if hint is not None:
                raise ExportError(hint) from exc
            raise ExportError(
                f"torch.onnx.export failed for {path.name}: {type(exc).__name__}: {_summary(exc)[:500]}"
                + (f"\n{log.tail()}" if log.text else "")
            ) from exc
    model = program.model_proto
    _name_outputs(model, [s.name for s in outputs])
    _name_dims(model, inputs)
    if dtype == "fp16":
        weights_to_fp16(model)
    elif dtype != "fp32":
        raise ExportError(f"ONNX export supports dtype fp32 or fp16, got {dtype!r}")
    model.producer_name = "pocketfleet"
    model.doc_string = f"exported by pocketfleet (weights {dtype})"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name} fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    return path


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
