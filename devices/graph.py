"""Read an ONNX or TFLite model into one neutral graph: ops in execution order and static tensor shapes.

Dynamic dimensions are fixed before shape inference: the leading (batch) dimension to 1, any other
dynamic dimension (sequence) to `seq_len`. ONNX shapes come from onnx shape inference (with data
propagation); where that leaves a shape unknown, the model is run once in onnxruntime on dummy inputs
to read the missing shapes. TFLite shapes come from the LiteRT interpreter itself (no torch, no TF).
`onnx` and LiteRT are imported only when a model of that format is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pocketfleet import PocketfleetError


class ModelReadError(PocketfleetError):
    """A model file could not be read or analysed."""


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...] | None  # None: unknown
    dtype: str  # numpy dtype name
    const: bool = False  # weights / constants (an initializer, a Constant node, a TFLite buffer)

    @property
    def elements(self) -> int:
        return math.prod(self.shape) if self.shape is not None else 0

    @property
    def nbytes(self) -> int:
        try:
            itemsize = np.dtype(self.dtype).itemsize
        except TypeError:
            itemsize = 4
        return self.elements * itemsize


@dataclass
class Node:
    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    format: str  # "onnx" | "tflite"
    nodes: list[Node]  # execution (topological) order
    tensors: dict[str, Tensor]
    inputs: list[str]
    outputs: list[str]
    warnings: list[str] = field(default_factory=list)

    def tensor(self, name: str) -> Tensor | None:
        return self.tensors.get(name) if name else None


GRAPH_FORMATS = {".onnx": "onnx", ".tflite": "tflite"}  # what devices reads; .pte / Core ML are timed, not read


def read_graph(path: str | Path, format: str | None = None, seq_len: int = 128) -> Graph:
    """Read `path` (.onnx or .tflite, or `format`) with dynamic dims fixed to batch 1 / `seq_len`."""
    path = Path(path)
    fmt = format or GRAPH_FORMATS.get(path.suffix.lower())
    if fmt not in GRAPH_FORMATS.values():
        raise ModelReadError(f"cannot tell the model format of {path.name}: use a .onnx or .tflite file")
    if not path.is_file():
        raise ModelReadError(f"model file not found: {path}")
    if seq_len < 1:
        raise ModelReadError(f"seq_len must be >= 1, got {seq_len}")
    return _read_onnx(path, seq_len) if fmt == "onnx" else _read_tflite(path, seq_len)


def _dynamic_value(axis: int, dim_name: str, seq_len: int) -> int:
    name = dim_name.lower()
    if "batch" in name or (axis == 0 and not any(k in name for k in ("seq", "len", "token"))):
        return 1
    return seq_len


# ---------------------------------------------------------------------------------------------- ONNX


def _read_onnx(path: Path, seq_len: int) -> Graph:
    import onnx
    from onnx import helper, shape_inference

    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ModelReadError(f"cannot read ONNX model {path}: {str(exc).splitlines()[0][:200]}") from exc
    graph = model.graph
    warnings: list[str] = []
    init_names = {t.name for t in graph.initializer}
    input_names = [i.name for i in graph.input if i.name not in init_names]
    for inp in graph.input:
        if inp.name in init_names:
            continue
        for axis, dim in enumerate(inp.type.tensor_type.shape.dim):
            if not (dim.HasField("dim_value") and dim.dim_value > 0):
                label = dim.dim_param
                dim.Clear()
                dim.dim_value = _dynamic_value(axis, label, seq_len)
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # shape inference is best effort; the runtime fallback fills the gaps
        warnings.append(f"onnx shape inference failed ({str(exc).splitlines()[0][:120]}); using onnxruntime")
        inferred = model

    tensors: dict[str, Tensor] = {}

    def elem_dtype(elem_type: int) -> str:
        try:
            return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
        except Exception:
            return "float32"

    for t in graph.initializer:
        tensors[t.name] = Tensor(t.name, tuple(int(d) for d in t.dims), elem_dtype(t.data_type), const=True)
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if vi.name in tensors or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        shape: tuple[int, ...] | None = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            shape = tuple(dims) if all(d >= 0 for d in dims) else None
        tensors[vi.name] = Tensor(vi.name, shape, elem_dtype(tt.elem_type) if tt.elem_type else "float32")

    nodes = []
    for i, n in enumerate(graph.node):
        attrs = {
            a.name: helper.get_attribute_value(a) for a in n.attribute if a.type != onnx.AttributeProto.GRAPH
        }
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            warnings.append(f"{n.op_type} node {n.name or i} has a subgraph; its contents are not counted")
        if n.op_type == "Constant" and "value" in attrs:
            value = attrs["value"]
            for out in n.output:
                tensors[out] = Tensor(
                    out, tuple(int(d) for d in value.dims), elem_dtype(value.data_type), const=True
                )
        nodes.append(Node(n.name or f"{n.op_type}_{i}", n.op_type, list(n.input), list(n.output), attrs))

    unknown = [o for n in nodes for o in n.outputs if o and (o not in tensors or tensors[o].shape is None)]
    if unknown:
        _fill_shapes_with_onnxruntime(inferred, input_names, unknown, tensors, seq_len, warnings)
    outputs = [o.name for o in graph.output]
    return Graph("onnx", nodes, tensors, input_names, outputs, warnings)


def _fill_shapes_with_onnxruntime(
    model: Any,
    input_names: list[str],
    missing: list[str],
    tensors: dict[str, Tensor],
    seq_len: int,
    warnings: list[str],
) -> None:
    """Run the model once on dummy inputs with every missing tensor exposed as an output."""
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in model.graph.output}
    for name in missing:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    feeds = {}
    for inp in model.graph.input:
        if inp.name not in input_names:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.dim_value > 0 else 1 for d in tt.shape.dim]
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        feeds[inp.name] = np.ones(shape, dtype)  # dense: data-dependent shapes (NonZero) at their largest
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        values = session.run(names, feeds)
    except Exception as exc:
        warnings.append(
            f"shapes of {len(missing)} tensors unknown (onnxruntime dry run failed: {str(exc).splitlines()[0][:120]})"
        )
        return
    for name, value in zip(names, values, strict=True):
        if name in missing or name not in tensors:
            tensors[name] = Tensor(name, tuple(int(d) for d in np.shape(value)), np.asarray(value).dtype.name)
    warnings.append(f"shapes of {len(missing)} tensors read from an onnxruntime run on all-ones inputs")


# ---------------------------------------------------------------------------------------------- TFLite


def _read_tflite(path: Path, seq_len: int) -> Graph:
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter, OpResolverType  # type: ignore[no-redef]
        except ImportError as exc:
            raise ModelReadError("analysing .tflite models needs LiteRT: pip install ai-edge-litert") from exc
    try:
        # No default delegate: XNNPACK would replace the graph by one DELEGATE op.
        it = Interpreter(
            model_path=str(path),
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        for d in it.get_input_details():
            sig = [int(s) for s in d.get("shape_signature", d["shape"])]
            if any(s < 0 for s in sig):
                it.resize_tensor_input(
                    d["index"], [_dynamic_value(a, "", seq_len) if s < 0 else s for a, s in enumerate(sig)]
                )
        it.allocate_tensors()
        ops = it._get_ops_details()
        details = it.get_tensor_details()
    except Exception as exc:
        raise ModelReadError(f"LiteRT cannot read {path}: {str(exc).splitlines()[0][:200]}") from exc

    produced = {int(o) for op in ops for o in op["outputs"] if o >= 0}
    graph_inputs = [str(d["index"]) for d in it.get_input_details()]
    graph_outputs = [str(d["index"]) for d in it.get_output_details()]
    tensors = {}
    for d in details:
        idx = d["index"]
        const = idx not in produced and str(idx) not in graph_inputs
        tensors[str(idx)] = Tensor(
            name=d["name"] or str(idx),
            shape=tuple(int(s) for s in d["shape"]),
            dtype=np.dtype(d["dtype"]).name,
            const=const,
        )
    nodes = [
        Node(
            name=f"{op['op_name']}_{op['index']}",
            op_type=op["op_name"],
            inputs=[str(int(i)) if i >= 0 else "" for i in op["inputs"]],
            outputs=[str(int(o)) for o in op["outputs"] if o >= 0],
        )
        for op in ops
    ]
    return Graph("tflite", nodes, tensors, graph_inputs, graph_outputs, [])
