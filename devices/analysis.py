"""Static cost analysis of a model: MACs per op, parameter bytes, peak activation memory, op count.

    a = analyze_model("model.onnx", seq_len=128)
    a.macs, a.params_bytes, a.peak_activation_bytes, a.op_count, a.ops[i].macs

MACs are counted for the ops that multiply-accumulate (Conv incl. grouped/depthwise, ConvTranspose,
Gemm/MatMul, FullyConnected, BatchMatMul and their int8 forms); the rest are element-wise ops (one
arithmetic op per element, counted apart) or pure data movement / views. Ops a runtime folds or fuses are
marked so (`kind`) and cost nothing per op:
  - folded: every input constant (weights transformed at load time, DequantizeLinear of int8 weights),
  - fused: an activation, BatchNormalization or constant bias add/mul right after a conv / matmul whose
    output feeds only it (onnxruntime and LiteRT/XNNPACK both fuse these); QuantizeLinear/DequantizeLinear
    between quantized ops (onnxruntime's QDQ fusion).
Peak activation memory is a liveness sweep over the execution order: at each op the bytes of every
intermediate tensor produced and not yet consumed for the last time (graph inputs and outputs included);
the maximum over ops. It is conservative: no in-place reuse or view aliasing is assumed, except that the
intermediate of a fused pair is never materialized.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devices.graph import Graph, Node, Tensor, read_graph

# op kinds
COMPUTE, ELEMENTWISE, MOVEMENT, VIEW, FUSED, FOLDED = (
    "compute",
    "elementwise",
    "movement",
    "view",
    "fused",
    "folded",
)

_VIEW_OPS = {
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Shape", "Size",
    "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "SHAPE",
}  # fmt: skip
_MOVEMENT_OPS = {
    "Transpose", "Concat", "Slice", "Gather", "GatherElements", "GatherND", "Split", "Pad", "Expand", "Tile",
    "ScatterND", "ScatterElements", "DepthToSpace", "SpaceToDepth", "Cast", "CastLike",
    "TRANSPOSE", "CONCATENATION", "SLICE", "STRIDED_SLICE", "GATHER", "GATHER_ND", "SPLIT", "SPLIT_V", "PAD",
    "PADV2", "PACK", "UNPACK", "TILE", "BROADCAST_TO", "DEPTH_TO_SPACE", "SPACE_TO_DEPTH", "CAST",
}  # fmt: skip
_PRODUCERS = {
    "Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedMatMul", "QLinearConv", "QLinearMatMul",
    "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D",
}  # fmt: skip
_ACTIVATIONS = {
    "Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
    "RELU", "RELU6", "RELU_N1_TO_1", "RELU_0_TO_1",
}  # fmt: skip
_AFFINE_FOLLOWERS = {"BatchNormalization", "Add", "Mul", "Sub", "Div"}  # fused only with constant operands
_QDQ = {"QuantizeLinear", "DequantizeLinear", "QUANTIZE", "DEQUANTIZE"}
_INT8_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
_POOL_OPS = {
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "LpPool",
    "MAX_POOL_2D",
    "AVERAGE_POOL_2D",
}


@dataclass
class OpCost:
    """One op of the model with its static costs (batch 1)."""

    index: int
    name: str
    op_type: str
    kind: str  # compute | elementwise | movement | view | fused | folded
    dtype: str  # "fp32" | "fp16" | "int8": the arithmetic the runtime uses for this op
    macs: int
    elementwise: int  # non-MAC arithmetic, one per element touched
    bytes_moved: int  # activation + weight bytes read, output bytes written
    weight_bytes: int  # the part of bytes_moved that is constant data (weights, tables)
    output_shapes: list[list[int] | None]

    @property
    def executed(self) -> bool:
        """Whether the runtime dispatches this op as its own kernel (pays per-op overhead)."""
        return self.kind not in (FUSED, FOLDED)


@dataclass
class ModelAnalysis:
    """Totals and per-op costs of one model at batch 1 (and `seq_len` for sequence inputs)."""

    path: str
    format: str
    seq_len: int
    macs: int
    elementwise: int
    params_bytes: int
    params_count: int
    peak_activation_bytes: int
    op_count: int  # ops the runtime dispatches (not fused or folded)
    node_count: int  # ops in the file
    dtypes: dict[str, int]  # dtype -> MACs
    inputs: list[dict[str, Any]]
    ops: list[OpCost] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self, include_ops: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not include_ops:
            out.pop("ops")
        return out

    def by_op_type(self) -> dict[str, dict[str, int]]:
        """MACs and counts summed per op type."""
        out: dict[str, dict[str, int]] = {}
        for op in self.ops:
            row = out.setdefault(op.op_type, {"count": 0, "macs": 0})
            row["count"] += 1
            row["macs"] += op.macs
        return out


def analyze_model(path: str | Path, format: str | None = None, seq_len: int = 128) -> ModelAnalysis:
    """Analyse an .onnx or .tflite file: total MACs, parameter bytes, peak activation bytes, per-op list."""
    return analyze_graph(read_graph(path, format, seq_len), str(path), seq_len)


def count_macs(path: str | Path, format: str | None = None, seq_len: int = 128) -> int:
    """Total multiply-accumulates of one inference at batch 1."""
    return analyze_model(path, format, seq_len).macs


def analyze_graph(g: Graph, path: str = "", seq_len: int = 128) -> ModelAnalysis:
    kinds = _classify(g)
    producer = {o: n for n in g.nodes for o in n.outputs}
    ops: list[OpCost] = []
    warnings = list(g.warnings)
    for i, node in enumerate(g.nodes):
        kind = kinds[i]
        macs = _macs(node, g, warnings) if kind in (COMPUTE, FUSED) and node.op_type not in _QDQ else 0
        ins = [t for t in (g.tensor(n) for n in node.inputs) if t is not None]
        outs = [t for t in (g.tensor(n) for n in node.outputs) if t is not None]
        const_bytes = sum(t.nbytes for t in ins if t.const)
        act_in = sum(t.nbytes for t in ins if not t.const)
        out_bytes = sum(t.nbytes for t in outs)
        elementwise = 0
        if kind in (FUSED, FOLDED, VIEW):
            moved = weight = 0
        elif node.op_type in ("Gather", "GATHER") and ins and ins[0].const:
            weight = out_bytes  # an embedding lookup reads only the rows it returns
            moved = weight + out_bytes + sum(t.nbytes for t in ins[1:])
        else:
            weight = const_bytes
            moved = act_in + const_bytes + out_bytes
            if kind == ELEMENTWISE:
                elementwise = _elementwise(node, ins, outs)
        ops.append(
            OpCost(
                index=i,
                name=node.name,
                op_type=node.op_type,
                kind=kind,
                dtype=_op_dtype(node, g, producer),
                macs=int(macs),
                elementwise=int(elementwise),
                bytes_moved=int(moved),
                weight_bytes=int(weight),
                output_shapes=[list(t.shape) if t.shape is not None else None for t in outs],
            )
        )
    unknown = [
        n for n in g.nodes for o in n.outputs if o and (g.tensor(o) is None or g.tensor(o).shape is None)
    ]
    if unknown:
        warnings.append(f"{len(unknown)} op outputs have unknown shapes; their costs count as 0")
    used = {x for n in g.nodes for x in n.inputs} | set(g.outputs)
    derived = _folded_outputs(g, kinds)
    params = [t for key, t in g.tensors.items() if t.const and key in used and key not in derived]
    dtypes: dict[str, int] = {}
    for op in ops:
        if op.macs:
            dtypes[op.dtype] = dtypes.get(op.dtype, 0) + op.macs
    return ModelAnalysis(
        path=path,
        format=g.format,
        seq_len=seq_len,
        macs=sum(o.macs for o in ops),
        elementwise=sum(o.elementwise for o in ops),
        params_bytes=sum(t.nbytes for t in params),
        params_count=sum(t.elements for t in params),
        peak_activation_bytes=_peak_activation_bytes(g, kinds),
        op_count=sum(1 for o in ops if o.executed),
        node_count=len(ops),
        dtypes=dtypes,
        inputs=[_io(g.tensors[n]) for n in g.inputs if n in g.tensors],
        ops=ops,
        warnings=warnings,
    )


def _io(t: Tensor) -> dict[str, Any]:
    return {"name": t.name, "shape": list(t.shape) if t.shape is not None else None, "dtype": t.dtype}


def _folded_outputs(g: Graph, kinds: list[str]) -> set[str]:
    """Outputs of folded ops are computed at load time from other constants (not stored weights),
    except the values of Constant nodes, which are stored in the file."""
    return {
        o
        for n, k in zip(g.nodes, kinds, strict=True)
        if k == FOLDED and n.op_type != "Constant"
        for o in n.outputs
    }


# ---------------------------------------------------------------------------------------------- classification


def _classify(g: Graph) -> list[str]:
    """Kind of every node; marks folded nodes' outputs constant in `g`."""
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(g.nodes):
        for name in n.inputs:
            if name:
                consumers.setdefault(name, []).append(i)
    kinds: list[str] = []
    fusable_heads: set[str] = set()  # tensors that a following activation may fuse into
    for n in g.nodes:
        ins = [g.tensor(name) for name in n.inputs if name]
        if n.op_type == "Constant" or (ins and all(t is not None and t.const for t in ins)):
            for o in n.outputs:
                t = g.tensor(o)
                if t is not None:
                    t.const = True
            kinds.append(FOLDED)
            continue
        data_in = n.inputs[0] if n.inputs else ""
        single_use = len(consumers.get(data_in, [])) == 1 and data_in not in g.outputs
        if single_use and data_in in fusable_heads and _fusable(n, g):
            kinds.append(FUSED)
            fusable_heads.update(n.outputs)
            continue
        if n.op_type in _QDQ:
            boundary = data_in in g.inputs or any(o in g.outputs for o in n.outputs)
            kinds.append(ELEMENTWISE if boundary else FUSED)
            continue
        if n.op_type in _PRODUCERS:
            fusable_heads.update(n.outputs)
        kinds.append(_base_kind(n))
    return kinds


def _fusable(n: Node, g: Graph) -> bool:
    if n.op_type in _ACTIVATIONS:
        return all(t is None or t.const for t in (g.tensor(x) for x in n.inputs[1:] if x))
    if n.op_type in _AFFINE_FOLLOWERS:
        others = [g.tensor(x) for x in n.inputs[1:] if x]
        return bool(others) and all(t is not None and t.const for t in others)
    return False


def _base_kind(n: Node) -> str:
    if n.op_type in _VIEW_OPS:
        return VIEW
    if n.op_type in _MOVEMENT_OPS:
        return MOVEMENT
    if n.op_type in _PRODUCERS or n.op_type in _INT8_OPS or n.op_type in ("BatchMatMul", "BATCH_MATMUL"):
        return COMPUTE
    return ELEMENTWISE


# ---------------------------------------------------------------------------------------------- MACs


def _shape(g: Graph, name: str) -> tuple[int, ...] | None:
    t = g.tensor(name)
    return t.shape if t is not None else None


def _macs(n: Node, g: Graph, warnings: list[str]) -> int:
    """Multiply-accumulates of one op (0 for ops that do none)."""
    op = n.op_type
    out = _shape(g, n.outputs[0]) if n.outputs else None
    if out is None:
        return 0
    out_elems = math.prod(out)

    def inp(i: int) -> tuple[int, ...] | None:
        return _shape(g, n.inputs[i]) if i < len(n.inputs) and n.inputs[i] else None

    if op in ("Conv", "FusedConv", "ConvInteger", "QLinearConv", "CONV_2D"):
        w = inp(3 if op == "QLinearConv" else 1)  # ONNX [O, I/g, k...]; TFLite [O, kh, kw, I]
        return out_elems * math.prod(w[1:]) if w else 0
    if op == "DEPTHWISE_CONV_2D":
        w = inp(1)  # [1, kh, kw, O]
        return out_elems * w[1] * w[2] if w else 0
    if op == "CONV_3D":
        w = inp(1)  # [kd, kh, kw, I, O]
        return out_elems * math.prod(w[:4]) if w else 0
    if op == "ConvTranspose":
        x, w = inp(0), inp(1)  # W [C_in, C_out/g, k...]: every input element feeds C_out/g * k outputs
        return math.prod(x) * math.prod(w[1:]) if x and w else 0
    if op == "TRANSPOSE_CONV":
        w, x = inp(1), inp(2)  # W [O, kh, kw, I]
        return math.prod(x) * math.prod(w[:3]) if x and w else 0
    if op == "Gemm":
        a = inp(0)
        if not a:
            return 0
        k = a[0] if n.attrs.get("transA", 0) else a[-1]
        return out_elems * k
    if op in ("MatMul", "MatMulInteger", "FusedMatMul", "QLinearMatMul"):
        a = inp(0)
        if not a:
            return 0
        k = a[-1]
        if op == "FusedMatMul" and n.attrs.get("transA", 0) and len(a) >= 2:
            k = a[-2]
        return out_elems * k
    if op == "FULLY_CONNECTED":
        w = inp(1)  # [O, K]
        return out_elems * w[-1] if w else 0
    if op in ("BatchMatMul", "BATCH_MATMUL"):
        a = inp(0)
        if not a or len(a) < 2:
            return 0
        m = out[-2] if len(out) >= 2 else 1
        k = a[-1] if a[-2] == m else a[-2]  # adj_x is not exposed; the shapes tell
        return out_elems * k
    if op in _PRODUCERS:
        warnings.append(f"MACs of {op} are not modelled")
    return 0


def _elementwise(n: Node, ins: list[Tensor], outs: list[Tensor]) -> int:
    act = [t for t in ins if not t.const]
    in_elems = max((t.elements for t in act), default=0)
    out_elems = max((t.elements for t in outs), default=0)
    if n.op_type in _POOL_OPS:
        return in_elems
    return max(in_elems, out_elems)


def _op_dtype(n: Node, g: Graph, producer: dict[str, Node]) -> str:
    if n.op_type in _INT8_OPS:
        return "int8"
    names = [x for x in n.inputs if x]
    if names and (n.op_type in _PRODUCERS or n.op_type in ("BatchMatMul", "BATCH_MATMUL")):
        data = producer.get(names[0])
        if data is not None and data.op_type == "DequantizeLinear":
            return "int8"  # QDQ graph: onnxruntime runs it as an int8 kernel
        if len(names) > 1:
            weight, wprod = g.tensor(names[1]), producer.get(names[1])
            if weight is not None and weight.const and _dtype_class(weight.dtype) == "int8":
                return "int8"  # dynamic-range (hybrid) kernel: int8 weights, activations quantized on the fly
            if wprod is not None and wprod.op_type == "DequantizeLinear":
                src = g.tensor(wprod.inputs[0])
                if src is not None and _dtype_class(src.dtype) == "int8":
                    return "int8"
    for x in names:
        t = g.tensor(x)
        if t is not None and not t.const:
            return _dtype_class(t.dtype)
    return "fp32"


def _dtype_class(dtype: str) -> str:
    if dtype in ("int8", "uint8"):
        return "int8"
    if dtype in ("float16", "bfloat16"):
        return "fp16"
    return "fp32"


# ---------------------------------------------------------------------------------------------- memory


def _peak_activation_bytes(g: Graph, kinds: list[str]) -> int:
    """Max over execution steps of the bytes of all live non-constant tensors."""
    steps = [i for i, k in enumerate(kinds) if k != FOLDED]
    if not steps:
        return sum(g.tensors[n].nbytes for n in g.inputs if n in g.tensors)
    order = {node_index: step for step, node_index in enumerate(steps)}
    last = len(steps) - 1
    virtual: set[str] = set()
    consumers: dict[str, list[int]] = {}
    for i in steps:
        for name in g.nodes[i].inputs:
            if name:
                consumers.setdefault(name, []).append(i)
    for i in steps:
        n = g.nodes[i]
        if kinds[i] == FUSED and n.op_type in _QDQ:
            virtual.update(n.outputs)
        for o in n.outputs:
            users = consumers.get(o, [])
            if (
                users
                and o not in g.outputs
                and all(kinds[u] == FUSED and g.nodes[u].inputs[0] == o for u in users)
            ):
                virtual.add(o)
    born: dict[str, int] = {name: 0 for name in g.inputs}
    for i in steps:
        n = g.nodes[i]
        # a fused op writes the buffer its producer would have written: born with the producer
        start = born.get(n.inputs[0], order[i]) if n.inputs and n.inputs[0] in virtual else order[i]
        for o in n.outputs:
            born.setdefault(o, start)
    delta = [0] * (len(steps) + 1)
    for name, start in born.items():
        t = g.tensor(name)
        if t is None or t.const or name in virtual:
            continue
        uses = [order[u] for u in consumers.get(name, [])]
        end = last if name in g.outputs else max(uses, default=start)
        delta[start] += t.nbytes
        delta[end + 1] -= t.nbytes
    peak = live = 0
    for d in delta[:-1]:
        live += d
        peak = max(peak, live)
    return peak
