"""ONNX graph helpers shared by the static and dynamic quantizers: layer names, activation statistics
collected in onnxruntime, and what an optimized onnxruntime session really runs in int8."""

from __future__ import annotations

import ast
import fnmatch
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from .calibrate import TensorStats, collect

# compute ops whose int8 execution matters for speed and size
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")
_FLOAT_COMPUTE = {"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "NhwcFusedConv"}
_WEIGHT_SUFFIXES = (".weight", "_weight")


def session(path: str | Path, threads: int = 1, optimized_path: str | Path | None = None, level: str = "all"):
    """An onnxruntime CPU session (optionally writing the optimized graph it runs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    }[level]
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def initializer_names(model: onnx.ModelProto) -> set[str]:
    return {i.name for i in model.graph.initializer}


def layer_name(node: onnx.NodeProto, inits: set[str]) -> str:
    """The PyTorch module path of a node when it can be told (its weight's name, or the exporter's name
    scopes), else the node name."""
    for name in node.input[1:2] if node.op_type != "Gather" else node.input[:1]:
        if name in inits:
            for suffix in _WEIGHT_SUFFIXES:
                if suffix in name:
                    return name[: name.index(suffix)]
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            mods = [s for s in scopes[:-1] if s]
            if mods:
                return mods[-1]
    return node.name


def compute_layers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Layer name -> its compute nodes that carry a weight initializer (Conv, Gemm, MatMul, Gather)."""
    inits = initializer_names(model)
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        weight = node.input[0] if node.op_type == "Gather" else (node.input[1] if len(node.input) > 1 else "")
        if weight in inits:
            out.setdefault(layer_name(node, inits), []).append(node)
    return out


def match_layers(patterns: Iterable[str], layers: Iterable[str]) -> tuple[set[str], list[str]]:
    """(layers matched by any fnmatch pattern, patterns that matched nothing)."""
    layers = list(layers)
    matched, unmatched = set(), []
    for pat in patterns:
        hit = {x for x in layers if x == pat or fnmatch.fnmatchcase(x, pat)}
        matched |= hit
        if not hit:
            unmatched.append(pat)
    return matched, unmatched


def float_value_names(model: onnx.ModelProto) -> list[str]:
    """Names of float32 activations (graph inputs and node outputs; no initializers), in graph order."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    inits = initializer_names(model)
    names = [i.name for i in model.graph.input if i.name not in inits]
    names += [o for n in model.graph.node for o in n.output if o]
    return [n for n in dict.fromkeys(names) if types.get(n) == TensorProto.FLOAT]


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the named values."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    for name in names:
        if name not in existing:
            out.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return out


def collect_stats(
    model_path: str | Path,
    data: Mapping[str, np.ndarray],
    names: Sequence[str] | None = None,
    batch_size: int = 16,
    threads: int = 1,
    channels: Iterable[str] = (),
    samples: dict[str, list[np.ndarray]] | None = None,
    sample_rows: int = 8,
) -> dict[str, TensorStats]:
    """Two-pass activation statistics of `names` (default: every float activation) over `data`.

    `channels`: tensors whose per-channel |max| (last axis) is also kept. `samples`: when given, the
    first `sample_rows` batch rows of each `channels` tensor are stored into it (for SmoothQuant).
    """
    from .data import batches

    model = onnx.load(str(model_path))
    names = list(names) if names is not None else float_value_names(model)
    with tempfile.TemporaryDirectory(prefix="pf-calib-") as tmp:
        aug = Path(tmp) / "augmented.onnx"
        onnx.save(with_outputs(model, names), str(aug))
        sess = session(aug, threads=threads, level="basic")
        out_names = [o.name for o in sess.get_outputs()]
        wanted = set(names)
        channel_set = set(channels)

        def run() -> Iterable[dict[str, np.ndarray]]:
            for batch in batches(data, batch_size):
                values = sess.run(out_names, dict(batch))
                yield {n: v for n, v in zip(out_names, values, strict=True) if n in wanted}

        def first_pass() -> Iterable[dict[str, np.ndarray]]:
            taken = 0
            for values in run():
                if samples is not None and taken < sample_rows:
                    for n in channel_set:
                        if n in values:
                            samples.setdefault(n, []).append(values[n][: sample_rows - taken])
                    taken += len(next(iter(values.values())))
                yield values

        return collect(first_pass(), run(), channels=channel_set)


# ops that run in int8 (or only move data) in onnxruntime's CPU provider after QDQ fusion
_INT8_OR_NEUTRAL = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulInteger",
    "ConvInteger", "MatMulIntegerToFloat", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Shape",
    "Gather", "Slice", "Concat", "Cast", "Identity", "MaxPool", "NhwcMaxPool", "Constant", "ConstantOfShape",
    "Expand", "Split", "Pad", "ReorderInput", "ReorderOutput", "Range", "Size",
}  # fmt: skip


def optimized_model(path: str | Path, threads: int = 1) -> onnx.ModelProto:
    """The graph onnxruntime actually runs after its optimizations (QDQ fusion, constant folding)."""
    with tempfile.TemporaryDirectory(prefix="pf-opt-") as tmp:
        opt = Path(tmp) / "optimized.onnx"
        session(path, threads=threads, optimized_path=opt)
        return onnx.load(str(opt))


def analyze_runtime(path: str | Path, threads: int = 1) -> dict[str, Any]:
    """What onnxruntime runs: {"ops": histogram, "float_layers": weighted Conv/Gemm/MatMul still in float
    [{"name", "op"}], "float_ops": other ops computing in float [{"name", "op"}]}."""
    model = optimized_model(path, threads)
    inits = initializer_names(model)
    consts = inits | {o for n in model.graph.node if n.op_type in ("DequantizeLinear", "Cast", "Constant") for o in n.output}
    ops: dict[str, int] = {}
    float_layers, float_ops = [], []
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.op_type in _FLOAT_COMPUTE:
            if len(node.input) > 1 and node.input[1] in consts:
                float_layers.append({"name": _weight_layer(model, node, inits), "op": node.op_type})
            else:  # activation x activation (attention scores)
                float_ops.append({"name": layer_name(node, inits), "op": node.op_type})
        elif node.op_type not in _INT8_OR_NEUTRAL and not node.op_type.startswith("Q"):
            float_ops.append({"name": layer_name(node, inits), "op": node.op_type})
    return {"ops": dict(sorted(ops.items())), "float_layers": float_layers, "float_ops": float_ops}


def runtime_float_layers(path: str | Path, threads: int = 1) -> list[dict[str, Any]]:
    """Weighted compute layers onnxruntime still runs in float after its graph optimizations."""
    return analyze_runtime(path, threads)["float_layers"]


def _weight_layer(model: onnx.ModelProto, node: onnx.NodeProto, inits: set[str]) -> str:
    """Trace a (possibly dequantized / cast) weight input back to its initializer's layer name."""
    producers = {o: n for n in model.graph.node for o in n.output}
    name = node.input[1]
    for _ in range(4):
        if name in inits:
            break
        prod = producers.get(name)
        if prod is None or not prod.input:
            break
        name = prod.input[0]
    for suffix in _WEIGHT_SUFFIXES:
        if suffix in name:
            return name[: name.index(suffix)]
    return layer_name(node, inits)


def op_histogram(path: str | Path, optimized: bool = True, threads: int = 1) -> dict[str, int]:
    """Op-type counts of the graph onnxruntime runs (optimized) or of the file."""
    model = optimized_model(path, threads) if optimized else onnx.load(str(path))
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return dict(sorted(ops.items()))


def strip_debug_info(path: str | Path) -> Path:
    """Drop exporter debug metadata (per-node name scopes, stack traces, doc strings) and cached
    value_info from a model file: they are not needed to run it and cost bytes on the device."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]
    onnx.save(model, str(path))
    return Path(path)
