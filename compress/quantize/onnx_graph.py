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
_FLOAT_COMPUTE = {
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "FusedConv",
    "FusedGemm",
    "FusedMatMul",
    "NhwcFusedConv",
}
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
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    }
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
    """The graph onnxruntime runs after its precision-relevant optimizations (QDQ fusion, constant
    folding). Level "extended" on purpose: "all" adds CPU-specific layout rewrites (NCHWc on AVX-512
    hosts) that rename nodes and weights without changing what runs in int8."""
    with tempfile.TemporaryDirectory(prefix="pf-opt-") as tmp:
        opt = Path(tmp) / "optimized.onnx"
        session(path, threads=threads, optimized_path=opt, level="extended")
        return onnx.load(str(opt))


def analyze_runtime(path: str | Path, threads: int = 1) -> dict[str, Any]:
    """What onnxruntime runs: {"ops": histogram, "float_layers": weighted Conv/Gemm/MatMul still in float
    [{"name", "op"}], "float_ops": other ops computing in float [{"name", "op"}]}."""
    model = optimized_model(path, threads)
    source = onnx.load(str(path), load_external_data=False)
    source_inits = initializer_names(source)
    names = {n.name: layer_name(n, source_inits) for n in source.graph.node if n.name}  # scopes survive here
    inits = initializer_names(model)

    def name_of(node: onnx.NodeProto) -> str:  # the source file still has the exporter's name scopes
        return names.get(node.name) or layer_name(node, inits)

    consts = inits | {
        o for n in model.graph.node if n.op_type in ("DequantizeLinear", "Cast", "Constant") for o in n.output
    }
    ops: dict[str, int] = {}
    float_layers, float_ops = [], []
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.op_type in _FLOAT_COMPUTE:
            if len(node.input) > 1 and node.input[1] in consts:
                float_layers.append({"name": _weight_layer(model, node, inits), "op": node.op_type})
            else:  # activation x activation (attention scores)
                float_ops.append({"name": name_of(node), "op": node.op_type})
        elif node.op_type not in _INT8_OR_NEUTRAL and not node.op_type.startswith("Q"):
            float_ops.append({"name": name_of(node), "op": node.op_type})
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


def compact(path: str | Path) -> Path:
    """Make a model file smaller without changing what runs: drop exporter debug metadata (name scopes,
    stack traces, doc strings) and cached value_info, drop all-zero zero-points of DequantizeLinear on
    stored Conv weights and biases (0 is the default; onnxruntime fuses Gemm only with them), compute QDQ bias scales (= input scale x weight scale) in the graph
    instead of storing them (onnxruntime folds the Mul when it loads), and give stored tensors, values
    and nodes short names (graph inputs and outputs keep theirs)."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del graph.value_info[:]
    new_nodes = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            zero_zp = (
                len(node.input) > 2
                and node.input[2] in inits
                and not numpy_helper.to_array(inits[node.input[2]]).any()
            )
            conv_only = all(
                u.op_type == "Conv" for u in consumers.get(node.output[0], [None]) if u is not None
            )
            if zero_zp and conv_only and not any(a.name == "output_dtype" for a in node.attribute):
                del node.input[2:]
            if inits[node.input[0]].data_type == TensorProto.INT32:
                mul = _bias_scale_mul(node, graph, inits, producers)
                if mul is not None:
                    new_nodes.append(mul)
    if new_nodes:
        nodes = new_nodes + list(graph.node)  # initializer-only Muls: valid at the front of the graph
        del graph.node[:]
        graph.node.extend(nodes)
    _drop_unused(graph)
    _shorten_names(graph)
    onnx.save(model, str(path))
    return Path(path)


def _bias_scale_mul(
    dq: onnx.NodeProto, graph: onnx.GraphProto, inits: dict, producers: dict
) -> onnx.NodeProto | None:
    """A Mul(x_scale, w_scale) that reproduces the stored bias scale bit for bit, or None."""
    from onnx import numpy_helper

    users = [n for n in graph.node if dq.output[0] in n.input]
    if len(users) != 1 or users[0].op_type != "Conv":  # (onnxruntime does not fuse Gemm this way)
        return None
    consumer = users[0]
    x_dq, w_dq = producers.get(consumer.input[0]), producers.get(consumer.input[1])
    if (
        x_dq is None
        or w_dq is None
        or x_dq.op_type != "DequantizeLinear"
        or w_dq.op_type != "DequantizeLinear"
    ):
        return None
    x_scale, w_scale, b_scale = x_dq.input[1], w_dq.input[1], dq.input[1]
    if not all(n in inits for n in (x_scale, w_scale, b_scale)):
        return None
    want = numpy_helper.to_array(inits[b_scale])
    got = numpy_helper.to_array(inits[x_scale]).astype(np.float32) * numpy_helper.to_array(
        inits[w_scale]
    ).astype(np.float32)
    if got.shape != want.shape or not np.array_equal(got.astype(np.float32), want):
        return None
    computed = f"{b_scale}__computed"
    dq.input[1] = computed
    return helper.make_node("Mul", [x_scale, w_scale], [computed], name=f"{dq.name}__scale")


def _drop_unused(graph: onnx.GraphProto) -> None:
    used = {x for n in graph.node for x in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _shorten_names(graph: onnx.GraphProto) -> None:
    fixed = {i.name for i in graph.input} | {o.name for o in graph.output} | {""}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in fixed:
            return name
        if name not in names:
            names[name] = f"t{len(names)}"
        return names[name]

    for init in graph.initializer:
        init.name = short(init.name)
    for i, node in enumerate(graph.node):
        node.input[:] = [short(x) for x in node.input]
        node.output[:] = [short(x) for x in node.output]
        node.name = f"n{i}"
