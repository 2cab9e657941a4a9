"""TFLite int8: full-integer (int8 weights, activations, input and output) and dynamic-range, made from
the fp32 .tflite with ai-edge-quantizer, our calibration ranges and our float-layer choices.

For full-integer models the activation ranges (min/max per tensor) that ai-edge-quantizer would
estimate with a running average are replaced by ours (minmax / percentile / entropy / mse over
histograms gathered by running the fp32 model in LiteRT). Its output has int8 input and output tensors;
their scale and zero-point are what `export.runtimes` reads and what the package manifest records.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from export._quiet import quiet

from .calibrate import TensorStats, collect, compute_range
from .errors import QuantizeError

SIGNATURE = "serving_default"
COMPUTE_OPS = (
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "FULLY_CONNECTED",
    "BATCH_MATMUL",
    "EMBEDDING_LOOKUP",
    "TRANSPOSE_CONV",
)


def module_path(tensor_name: str) -> str:
    """'Named/pkg.DigitsCNN_inner/torch...Sequential_features/torch...Conv2d_0;1' -> 'features.0'."""
    first = tensor_name.split(";")[0]
    attrs = []
    for seg in first.split("/")[1:]:
        leaf = seg.rsplit(".", 1)[-1]
        if "_" in leaf:
            attrs.append(leaf.split("_", 1)[1])
    if attrs and attrs[0] == "inner":  # export.tflite's wrapper module
        attrs = attrs[1:]
    return ".".join(attrs) or first


def _interpreter(model: bytes, preserve: bool = False) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model, experimental_preserve_all_tensors=preserve)
    it.allocate_tensors()
    return it


def compute_layers(model: bytes) -> list[dict[str, Any]]:
    """Compute ops with a constant weight: [{"layer", "op", "output" (scope name), "float" (bool)}]."""
    it = _interpreter(model)
    details = it.get_tensor_details()
    out = []
    for op in it._get_ops_details():
        if op["op_name"] not in COMPUTE_OPS or len(op["inputs"]) < 2:
            continue
        w_index = op["inputs"][1] if op["op_name"] != "EMBEDDING_LOOKUP" else op["inputs"][1]
        if w_index < 0:
            continue
        weight, x = details[w_index], details[op["inputs"][0]]
        out.append(
            {
                "layer": module_path(weight["name"]),
                "op": op["op_name"],
                "output": details[op["outputs"][0]]["name"],
                "weight_dtype": np.dtype(weight["dtype"]).name,
                "input_dtype": np.dtype(x["dtype"]).name,
            }
        )
    return out


def float_layers_of(model: bytes) -> list[dict[str, Any]]:
    """Compute layers of a (quantized) model that run in float: float weights, or float activations in a
    full-integer model. Dynamic-range ops (int8 weights, float activations) count as int8."""
    return [
        {"name": c["layer"], "op": c["op"]}
        for c in compute_layers(model)
        if c["weight_dtype"] not in ("int8", "int4", "uint8")
    ]


def _recipe(kind: str, float_outputs: Iterable[str]) -> list[dict[str, Any]]:
    from ai_edge_quantizer import recipe

    base = recipe.static_wi8_ai8() if kind == "static" else recipe.dynamic_wi8_afp32()
    entries = [dict(e) for e in base]
    # ai-edge-quantizer matches regexes against an op's scope: its output tensor names joined by ";" + ";"
    for name in float_outputs:
        entries.append({"regex": f"^{re.escape(name)};$", "operation": "*", "algorithm_key": "no_quantize"})
    return entries


def _float_outputs(model: bytes, float_layers: Iterable[str], only_layers: Iterable[str] | None) -> list[str]:
    keep = set(float_layers)
    only = None if only_layers is None else set(only_layers)
    return [
        c["output"]
        for c in compute_layers(model)
        if c["layer"] in keep or (only is not None and c["layer"] not in only)
    ]


def tflite_stats(
    model: bytes, data: Mapping[str, np.ndarray], names: Iterable[str]
) -> dict[str, TensorStats]:
    """Two-pass statistics of the named tensors, running the fp32 model one row at a time."""
    it = _interpreter(model, preserve=True)
    index = {d["name"]: d["index"] for d in it.get_tensor_details()}
    runner_inputs = it.get_signature_runner(SIGNATURE).get_input_details()
    wanted = [n for n in names if n in index]
    rows = len(next(iter(data.values())))

    def run() -> Iterable[dict[str, np.ndarray]]:
        for r in range(rows):
            for key, det in runner_inputs.items():
                it.set_tensor(det["index"], np.ascontiguousarray(data[key][r : r + 1], dtype=det["dtype"]))
            it.invoke()
            yield {n: it.get_tensor(index[n]) for n in wanted}

    return collect(run(), run())


def quantize_tflite(
    fp32_model: bytes | str | Path,
    out_path: str | Path,
    kind: str,
    data: Mapping[str, np.ndarray] | None = None,
    method: str = "mse",
    percentile: float = 99.99,
    float_layers: Iterable[str] = (),
    only_layers: Iterable[str] | None = None,
    stats: Mapping[str, TensorStats] | None = None,
) -> tuple[Path, dict[str, TensorStats] | None]:
    """Write a full-integer ("static") or dynamic-range ("dynamic") int8 .tflite.

    Returns (path, the activation statistics used: pass them back as `stats` to re-quantize with other
    float layers without calibrating again)."""
    from ai_edge_quantizer import quantizer

    model = fp32_model if isinstance(fp32_model, bytes) else Path(fp32_model).read_bytes()
    if kind not in ("static", "dynamic"):
        raise QuantizeError(f"TFLite quantization kind must be 'static' or 'dynamic', got {kind!r}")
    with quiet() as log:
        try:
            q = quantizer.Quantizer(bytearray(model))
            q.load_quantization_recipe(_recipe(kind, _float_outputs(model, float_layers, only_layers)))
            qsvs = None
            if kind == "static":
                if data is None:
                    raise QuantizeError("full-integer TFLite quantization needs calibration data")
                data = _as_input_dtypes(model, data)  # e.g. int64 token ids for an int32 TFLite input
                first = {k: v[:1] for k, v in data.items()}
                template = q.calibrate({SIGNATURE: [first]}, num_threads=1)
                if stats is None:
                    stats = tflite_stats(model, data, template)
                io = _io_names(model)
                qsvs = {}
                for name, qsv in template.items():
                    s = stats.get(name)
                    if s is None:
                        qsvs[name] = qsv
                        continue
                    lo, hi = compute_range(s, "minmax" if name in io else method, percentile)
                    qsvs[name] = {
                        **qsv,
                        "min": np.full_like(qsv["min"], lo),
                        "max": np.full_like(qsv["max"], hi),
                    }
            result = q.quantize(qsvs, enable_progress_report=False)
        except QuantizeError:
            raise
        except Exception as exc:
            raise QuantizeError(log.failure(f"ai-edge-quantizer could not quantize the model ({kind})", exc, 300)) from exc
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(bytes(result.quantized_model))
    return out_path, dict(stats) if stats is not None else None


def _as_input_dtypes(model: bytes, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Calibration rows cast to the dtypes of the TFLite signature's inputs (litert-torch turns int64
    inputs into int32; integer values must fit, else a QuantizeError names the input)."""
    details = _interpreter(model).get_signature_runner(SIGNATURE).get_input_details()
    out = {}
    for name, rows in data.items():
        want = np.dtype(details[name]["dtype"]) if name in details else rows.dtype
        if want.kind in "iu" and rows.dtype.kind in "iu" and rows.size:
            info = np.iinfo(want)
            if rows.min() < info.min or rows.max() > info.max:
                raise QuantizeError(f"calibration input {name!r} has values outside {want.name}, the TFLite input's dtype")
        out[name] = np.ascontiguousarray(rows, dtype=want)
    return out


def _io_names(model: bytes) -> set[str]:
    it = _interpreter(model)
    return {d["name"] for d in (*it.get_input_details(), *it.get_output_details())}


_NEUTRAL = {"QUANTIZE", "DEQUANTIZE", "RESHAPE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS", "GATHER", "SLICE",
            "STRIDED_SLICE", "CONCATENATION", "CAST", "SHAPE", "PACK", "UNPACK", "SPLIT", "PAD"}  # fmt: skip


def analyze_tflite(model: bytes) -> dict[str, Any]:
    """{"ops": histogram, "float_layers": compute ops with float weights, "float_ops": ops that compute
    on float32 activations (in a full-integer model: the ones that fell back to float)}."""
    it = _interpreter(model)
    details = it.get_tensor_details()
    ops: dict[str, int] = {}
    float_ops = []
    for op in it._get_ops_details():
        name = op["op_name"]
        if name == "DELEGATE":
            continue
        ops[name] = ops.get(name, 0) + 1
        ins = [details[i] for i in op["inputs"] if i >= 0]
        if name not in _NEUTRAL and any(np.dtype(d["dtype"]) == np.float32 for d in ins):
            float_ops.append({"name": module_path(details[op["outputs"][0]]["name"]), "op": name})
    return {"ops": dict(sorted(ops.items())), "float_layers": float_layers_of(model), "float_ops": float_ops}


def compact_tflite(path: str | Path) -> Path:
    """Drop the converter's long tensor names (debug info; each can be hundreds of characters) from a
    .tflite file; input/output tensors keep theirs, and the signature keeps the workload's names."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    path = Path(path)
    buf = path.read_bytes()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(buf, 0))
    _inline_buffers(model, buf)
    for graph in model.subgraphs:
        keep = set(graph.inputs) | set(graph.outputs)
        for i, tensor in enumerate(graph.tensors):
            if i not in keep:
                tensor.name = b""
    builder = flatbuffers.Builder(len(buf))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    return path


def _inline_buffers(model: Any, buf: bytes) -> None:
    """Buffers stored by offset after the flatbuffer (ai-edge-quantizer writes its quantized weights so)
    moved into the flatbuffer: repacking keeps only the flatbuffer, so their offsets would point past
    its end ("Constant buffer N specified an out of range offset" when LiteRT loads it)."""
    for buffer in model.buffers:
        if buffer.offset > 1:  # 0 and 1 mean "no data here" in the schema
            end = buffer.offset + buffer.size
            if end > len(buf):
                raise QuantizeError(f"TFLite buffer at offset {buffer.offset} runs past the file's end")
            buffer.data = np.frombuffer(buf, np.uint8, buffer.size, buffer.offset).copy()
            buffer.offset, buffer.size = 0, 0
