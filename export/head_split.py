"""Trainable heads in ONNX files: expose a classifier's final dense layer for on-device (federated) training.

`split_head(onnx_path, output)` finds the Gemm (a PyTorch Linear) that computes `output`, adds the
Linear's input to the file as a second output `features`, and returns the layer's weights in PyTorch
layout. The package then carries those weights as `head.safetensors` and declares them in the manifest's
`trainable_head` entry (`Head` below: the schema, shared by the exporter, the agent and the FL release);
the agent computes `output` from `features` with the
package's head weights, so a head-only release (cloud_sync.fl.release) changes what the device answers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.errors import ExportError
from export.head import FEATURES, HEAD_FILE, DenseLayer, Head


def split_head(path: str | Path, output: str) -> dict[str, np.ndarray]:
    """Add the `features` output to the ONNX file at `path` (rewritten in place); returns
    {weight name: [out, in] float32, bias name: [out] float32} of the dense layer behind `output`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = Path(path)
    model = onnx.load(str(path))
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}

    def through_casts(name: str) -> str:
        while name in producer and producer[name].op_type in ("Cast", "Identity"):
            name = producer[name].input[0]
        return name

    gemm = producer.get(through_casts(output))
    if gemm is None or gemm.op_type != "Gemm" or len(gemm.input) < 2:
        found = "a graph input" if gemm is None else f"a {gemm.op_type} node"
        raise ExportError(f"trainable head: output {output!r} comes from {found}, not from a final Linear layer "
                          "(Gemm); only classifiers that end in nn.Linear can declare a trainable head")
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise ExportError(f"trainable head: the Gemm behind {output!r} is not a plain Linear layer ({attrs})")

    def tensor(name: str) -> tuple[str, np.ndarray]:
        source = through_casts(name)
        if source not in inits:
            raise ExportError(f"trainable head: {name!r} of the final layer is not a stored weight")
        return source.removesuffix("__fp16"), numpy_helper.to_array(inits[source]).astype(np.float32)

    w_name, w = tensor(gemm.input[1])
    weights = {w_name: w if attrs.get("transB", 0) else w.T.copy()}
    if len(gemm.input) > 2 and gemm.input[2]:
        b_name, b = tensor(gemm.input[2])
        weights[b_name] = b.reshape(-1)
    features = gemm.input[0]
    graph.node.append(helper.make_node("Cast", [features], [FEATURES], to=TensorProto.FLOAT, name="features_output"))
    graph.output.append(helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", w.shape[1 if attrs.get("transB", 0) else 0]]))
    onnx.save(model, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"trainable head: {path.name} fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    return weights


def head_manifest(weights: dict[str, np.ndarray], output: str) -> dict[str, object]:
    """The manifest `trainable_head` entry for one dense layer (weight first, then the optional bias)."""
    names = list(weights)
    layer = DenseLayer(names[0], names[1] if len(names) > 1 else None)
    return Head([layer], features=FEATURES, weights_file=HEAD_FILE, output=output).to_manifest()
