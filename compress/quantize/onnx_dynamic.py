"""Dynamic int8 ONNX: int8 weights, activations quantized by onnxruntime at run time.

Our rewrite of the fp32 graph (no onnxruntime quantizer involved):
- MatMul / Gemm by a weight -> com.microsoft DynamicQuantizeMatMul with per-output-column symmetric int8
  weights, the following bias Add folded in (one fused u8s8 kernel in onnxruntime); or, `per_token`,
  activations quantized per row (symmetric, one scale per token, computed in the graph) into u8s8
  MatMulIntegerToFloat, then scaled per token: an outlier token no longer coarsens every other token;
- Conv by a weight -> DynamicQuantizeLinear + ConvInteger with per-output-channel int8 weights and the
  scales applied after (onnxruntime has no fused per-channel dynamic conv);
- Gather from an embedding table -> Gather over int8 rows + Gather of per-row scales (the table itself
  is stored in int8, so a 30522x384 vocabulary shrinks 4x);
- SmoothQuant (optional): for activations with outlier channels, x/s feeds the layer and s is folded into
  the weight rows; s = a^alpha / w^(1-alpha) from calibrated per-channel |max| a. alpha is fixed, or
  ("auto") the one whose whole quantized model is closest to fp32 on calibration data (measured end to
  end in onnxruntime: layer-local error is a poor guide, since most rows of a padded batch do not count).
  Activations shared by several layers (q, k, v) share one scale and one Mul.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .calibrate import symmetric_weight_scales
from .onnx_graph import compute_layers, initializer_names

MIN_GATHER_ELEMENTS = 4096  # smaller lookup tables (token types) stay float: they do not matter
ALPHAS = (0.6, 0.7, 0.8, 0.9, 1.0)
MS_DOMAIN = "com.microsoft"


def _q_int8(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8)


class _Rewriter:
    def __init__(self, model: onnx.ModelProto, weight_bits: int = 8) -> None:
        self.model = model
        self.bits = weight_bits  # 7 = "reduce range": no int16 overflow in u8s8 kernels without VNNI
        self.inits = {i.name: i for i in model.graph.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in model.graph.output}
        self.new_inits: list[onnx.TensorProto] = []
        self.dropped: set[str] = set()  # initializers replaced
        self.removed: set[int] = set()  # id() of nodes folded away (bias Adds)
        self.replaced: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> its replacement nodes

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def add_init(self, array: np.ndarray, name: str) -> str:
        self.new_inits.append(numpy_helper.from_array(array, name))
        return name

    def bias_add(self, node: onnx.NodeProto, n_out: int) -> tuple[onnx.NodeProto, str] | None:
        """The Add that adds a [N] initializer to the node's only output, when there is one."""
        out = node.output[0]
        users = self.consumers.get(out, [])
        if out in self.graph_outputs or len(users) != 1 or users[0].op_type != "Add":
            return None
        add = users[0]
        other = add.input[1] if add.input[0] == out else add.input[0]
        if other in self.inits and self.array(other).shape == (n_out,):
            return add, other
        return None

    def matmul(
        self,
        node: onnx.NodeProto,
        per_channel: bool,
        smooth: np.ndarray | None,
        x: str,
        shared: tuple[str, str, str] | None = None,
        token: Token | None = None,
    ) -> None:
        """DynamicQuantizeMatMul; with `shared` = (x_q, x_scale, x_zp) from one DynamicQuantizeLinear
        feeding several layers (q, k, v), MatMulIntegerToFloat on the already quantized input; with
        `token` from `_token_quantize`, MatMulIntegerToFloat on per-token 8-bit activations."""
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            w = self.array(node.input[1]).astype(np.float32)
            w = w.T if attrs.get("transB", 0) else w
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        else:
            w = self.array(node.input[1]).astype(np.float32)
            bias = None
        if smooth is not None:
            w = w * smooth[:, None]
        base = node.input[1]
        scale = symmetric_weight_scales(w, axis=1 if per_channel else None, bits=self.bits)
        q = _q_int8(w, scale if per_channel else scale.reshape(()))  # within +-(2^(bits-1) - 1)
        zp = np.zeros(scale.shape, np.int8)
        w_q = self.add_init(q, f"{base}__int8")
        w_s = self.add_init(scale, f"{base}__scale")
        w_zp = self.add_init(zp, f"{base}__zp")
        outputs = list(node.output)
        folded = None if bias else self.bias_add(node, w.shape[1])
        if folded is not None:
            add, bias = folded
            outputs = list(add.output)
            self.removed.add(id(add))
        self.dropped.add(node.input[1])
        if token is not None:
            sums = None
            if token[4] is not None:  # the weight as the kernel sees it, summed over its input axis
                sums = (q.astype(np.float32) * scale).sum(axis=0).astype(np.float32)
                sums = self.add_init(sums, f"{base}__colsum")
            self.replaced[id(node)] = _token_matmul(node.name, token, (w_q, w_s, w_zp), bias, outputs, sums)
            return
        if shared is None:
            inputs, op = [x, w_q, w_s, w_zp] + ([bias] if bias else []), "DynamicQuantizeMatMul"
        else:
            xq, xs, xzp = shared
            inputs, op = [xq, w_q, xs, w_s, xzp, w_zp] + ([bias] if bias else []), "MatMulIntegerToFloat"
        self.replaced[id(node)] = [
            helper.make_node(op, inputs, outputs, name=f"{node.name}__dyn", domain=MS_DOMAIN)
        ]

    def conv(self, node: onnx.NodeProto, per_channel: bool) -> None:
        w = self.array(node.input[1]).astype(np.float32)
        base, name, x, out = node.input[1], node.name, node.input[0], node.output[0]
        scale = symmetric_weight_scales(w, axis=0 if per_channel else None, bits=self.bits)
        shape = (-1,) + (1,) * (w.ndim - 1)
        q = _q_int8(w, scale.reshape(shape) if per_channel else scale.reshape(()))
        attrs = [a for a in node.attribute]
        nodes = [
            helper.make_node("DynamicQuantizeLinear", [x], [f"{out}__xq", f"{out}__xs", f"{out}__xzp"], name=f"{name}__dql"),
            helper.make_node("ConvInteger", [f"{out}__xq", self.add_init(q, f"{base}__int8"), f"{out}__xzp"], [f"{out}__acc"], name=f"{name}__convint"),
            helper.make_node("Cast", [f"{out}__acc"], [f"{out}__accf"], to=TensorProto.FLOAT, name=f"{name}__cast"),
            helper.make_node("Mul", [f"{out}__xs", self.add_init(scale.reshape(1, *shape[1:]) if not per_channel else scale.reshape(1, -1, *shape[2:]), f"{base}__scale")], [f"{out}__s"], name=f"{name}__scale"),
            helper.make_node("Mul", [f"{out}__accf", f"{out}__s"], [out if len(node.input) < 3 else f"{out}__nobias"], name=f"{name}__dequant"),
        ]  # fmt: skip
        nodes[1].attribute.extend(attrs)
        if len(node.input) > 2 and node.input[2]:
            b = self.array(node.input[2]).astype(np.float32).reshape(1, -1, *([1] * (w.ndim - 2)))
            nodes.append(
                helper.make_node(
                    "Add",
                    [f"{out}__nobias", self.add_init(b, f"{node.input[2]}__4d")],
                    [out],
                    name=f"{name}__bias",
                )
            )
            self.dropped.add(node.input[2])
        self.dropped.add(base)
        self.replaced[id(node)] = nodes

    def gather(self, node: onnx.NodeProto) -> bool:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        table = self.array(node.input[0])
        if (
            attrs.get("axis", 0) != 0
            or table.ndim != 2
            or table.size < MIN_GATHER_ELEMENTS
            or table.dtype != np.float32
        ):
            return False
        base, out, ids = node.input[0], node.output[0], node.input[1]
        scale = symmetric_weight_scales(table, axis=0)[:, None]
        q = _q_int8(table, scale)
        self.replaced[id(node)] = [
            helper.make_node(
                "Gather", [self.add_init(q, f"{base}__int8"), ids], [f"{out}__q"], name=f"{node.name}__q"
            ),
            helper.make_node(
                "Gather", [self.add_init(scale, f"{base}__scale"), ids], [f"{out}__s"], name=f"{node.name}__s"
            ),
            helper.make_node(
                "Cast", [f"{out}__q"], [f"{out}__f"], to=TensorProto.FLOAT, name=f"{node.name}__cast"
            ),
            helper.make_node("Mul", [f"{out}__f", f"{out}__s"], [out], name=f"{node.name}__dequant"),
        ]
        self.dropped.add(base)
        return True

    def finish(self, smooth_nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
        graph = self.model.graph
        nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            if id(node) in self.removed:
                continue
            nodes.extend(self.replaced.get(id(node), [node]))
        still_used = {x for n in nodes for x in n.input}
        keep = [i for i in graph.initializer if i.name not in self.dropped or i.name in still_used]
        del graph.initializer[:]
        graph.initializer.extend(keep + self.new_inits)
        del graph.node[:]
        graph.node.extend(smooth_nodes + nodes)
        if not any(o.domain == MS_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        return _toposort(self.model)


# per-token activation: (x_q, x_scale, x_zero_point, one, x_min or None)
Token = tuple[str, str, str, str, str | None]


def _token_quantize(rw: _Rewriter, x: str, asymmetric: bool = False) -> tuple[Token, list[onnx.NodeProto]]:
    """8-bit activations per token (per row of the last axis), as uint8 (the fast u8s8 kernels).

    asymmetric: x_q = round((x - min) / s), s = (max - min) / 255: the row's whole range gets all 256 levels
    (after GELU or ReLU most of a symmetric range would be empty), and min is added back after the MatMul as
    min * (column sums of the dequantized weight). Else symmetric: x_q = round(x / s) + 128, s = max|x| / 127."""
    n = f"{x}__tok"
    axes = rw.add_init(np.array([-1], np.int64), f"{n}_axes")
    eps = rw.add_init(np.array(1e-8, np.float32), f"{n}_eps")
    one = rw.add_init(np.array(1.0, np.float32), f"{n}_one")
    if asymmetric:
        levels = rw.add_init(np.array(255.0, np.float32), f"{n}_levels")
        zp = rw.add_init(np.array(0, np.uint8), f"{n}_q_zp")
        nodes = [
            helper.make_node("ReduceMin", [x, axes], [f"{n}_min"], keepdims=1, name=f"{n}_min"),
            helper.make_node("ReduceMax", [x, axes], [f"{n}_max"], keepdims=1, name=f"{n}_max"),
            helper.make_node("Sub", [f"{n}_max", f"{n}_min"], [f"{n}_range"], name=f"{n}_range"),
            helper.make_node("Max", [f"{n}_range", eps], [f"{n}_rangee"], name=f"{n}_rangee"),
            helper.make_node("Div", [f"{n}_rangee", levels], [f"{n}_scale"], name=f"{n}_scale"),
            helper.make_node("Sub", [x, f"{n}_min"], [f"{n}_shift"], name=f"{n}_shift"),
            helper.make_node("Div", [f"{n}_shift", f"{n}_scale"], [f"{n}_div"], name=f"{n}_div"),
            # round half to even, saturate, as uint8, in one op
            helper.make_node("QuantizeLinear", [f"{n}_div", one, zp], [f"{n}_q"], name=f"{n}_q"),
        ]
        return (f"{n}_q", f"{n}_scale", zp, one, f"{n}_min"), nodes
    q_max = rw.add_init(np.array(127.0, np.float32), f"{n}_qmax")
    zp = rw.add_init(np.array(128, np.uint8), f"{n}_q_zp")
    nodes = [
        helper.make_node("Abs", [x], [f"{n}_abs"], name=f"{n}_abs"),
        helper.make_node("ReduceMax", [f"{n}_abs", axes], [f"{n}_max"], keepdims=1, name=f"{n}_max"),
        helper.make_node("Max", [f"{n}_max", eps], [f"{n}_maxe"], name=f"{n}_maxe"),
        helper.make_node("Div", [f"{n}_maxe", q_max], [f"{n}_scale"], name=f"{n}_scale"),
        helper.make_node("Div", [x, f"{n}_scale"], [f"{n}_div"], name=f"{n}_div"),
        # round half to even, + 128, saturate, as uint8, in one op
        helper.make_node("QuantizeLinear", [f"{n}_div", one, zp], [f"{n}_q"], name=f"{n}_q"),
    ]
    return (f"{n}_q", f"{n}_scale", zp, one, None), nodes


def _token_matmul(name: str, token: Token, weight: tuple[str, str, str], bias: str | None,
                  outputs: list[str], col_sums: str | None = None) -> list[onnx.NodeProto]:
    """u8s8 MatMulIntegerToFloat scaled per column (w_scale), then per token (x_scale), then + x_min *
    col_sums (asymmetric tokens), then + bias."""
    (xq, xs, xzp, one, xmin), (wq, ws, wzp), n = token, weight, f"{name}__tok"
    steps = [f"{n}_scaled"] + ([f"{n}_shifted"] if xmin is not None else [])
    if bias is None:
        steps[-1] = outputs[0]
    nodes = [
        helper.make_node("MatMulIntegerToFloat", [xq, wq, one, ws, xzp, wzp], [f"{n}_cols"],
                         name=f"{n}_mm", domain=MS_DOMAIN),
        helper.make_node("Mul", [f"{n}_cols", xs], [steps[0]], name=f"{n}_xs"),
    ]
    if xmin is not None:
        assert col_sums is not None
        nodes += [
            helper.make_node("Mul", [xmin, col_sums], [f"{n}_offset"], name=f"{n}_offset"),
            helper.make_node("Add", [steps[0], f"{n}_offset"], [steps[1]], name=f"{n}_shift"),
        ]
    if bias is not None:
        nodes.append(helper.make_node("Add", [steps[-1], bias], outputs, name=f"{n}_bias"))
    return nodes


def _toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(x in ready for x in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input near node {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def quantize_onnx_dynamic(
    fp32_path: str | Path,
    out_path: str | Path,
    float_layers: Iterable[str] = (),
    only_layers: Iterable[str] | None = None,
    per_channel: bool = True,
    smooth: Mapping[str, np.ndarray] | None = None,
    fuse_gelu_ops: bool = True,
    reduce_range: bool | None = None,
    per_token: bool = False,
    token_asymmetric: bool = False,
) -> tuple[Path, list[str]]:
    """Write the dynamic int8 model; returns (path, layers that stayed float because no int8 rewrite
    applies to them). `smooth`: activation name -> per-channel SmoothQuant scale s (x/s, s*W).
    `reduce_range`: 7-bit weights (see config.QuantConfig.reduce_range); None: 7-bit where this host's u8s8
    kernels could saturate (x86 without VNNI: uint8 activations use their whole range, 255 * 127 * 2 > 32767
    in int16 pair sums, 255 * 63 * 2 is not), else 8-bit. `token_asymmetric`: per-token activations over
    each row's [min, max] (else symmetric around 0). `fuse_gelu_ops`: replace the exporter's erf-GELU subgraph by onnxruntime's fused Gelu kernel."""
    model = onnx.load(str(fp32_path))
    layers = compute_layers(model)
    skip = set(float_layers)
    chosen = set(layers) - skip if only_layers is None else set(only_layers) - skip
    if reduce_range is None:
        from .onnx_static import int16_overflow_risk

        reduce_range = int16_overflow_risk()
    rw = _Rewriter(model, weight_bits=7 if reduce_range else 8)
    smooth = dict(smooth or {})
    extra_nodes: list[onnx.NodeProto] = []
    unsupported: list[str] = []
    matmuls: dict[str, list[onnx.NodeProto]] = {}  # input activation -> MatMul/Gemm nodes quantized
    for layer in sorted(chosen):
        for node in layers.get(layer, []):
            if node.op_type == "Gather":
                if not rw.gather(node):
                    unsupported.append(layer)
            elif node.op_type == "Conv":
                rw.conv(node, per_channel)
            elif node.op_type in ("MatMul", "Gemm") and _plain_matmul(node, rw):
                matmuls.setdefault(node.input[0], []).append(node)
            else:
                unsupported.append(layer)
    for x, nodes in matmuls.items():
        s = smooth.get(x)
        src = x
        if s is not None:
            inv = rw.add_init((1.0 / s).astype(np.float32), f"{x}__smooth_inv")
            src = f"{x}__smoothed"
            extra_nodes.append(helper.make_node("Mul", [x, inv], [src], name=f"{x}__smooth"))
        shared, token = None, None
        if per_token:
            token, token_nodes = _token_quantize(rw, src, token_asymmetric)
            extra_nodes += token_nodes
        elif len(nodes) > 1:  # quantize the shared input once
            shared = (f"{src}__q", f"{src}__qscale", f"{src}__qzp")
            extra_nodes.append(
                helper.make_node("DynamicQuantizeLinear", [src], list(shared), name=f"{src}__dql")
            )
        for node in nodes:
            rw.matmul(node, per_channel, s, src, shared, token)
    if fuse_gelu_ops:
        extra_nodes += fuse_gelu(rw)
    out = rw.finish(extra_nodes)  # finish() sorts the graph, so new nodes may be listed first
    out_path = Path(out_path)
    onnx.save(out, str(out_path))
    return out_path, sorted(set(unsupported))


def _scalar(rw: _Rewriter, name: str) -> float | None:
    if name in rw.inits:
        a = rw.array(name)
        return float(a.reshape(-1)[0]) if a.size == 1 else None
    return None


def fuse_gelu(rw: _Rewriter) -> list[onnx.NodeProto]:
    """x * 0.5 * (1 + erf(x / sqrt(2))) (any order of the two Muls) -> com.microsoft Gelu(x)."""
    producers = {o: n for n in rw.model.graph.node for o in n.output}
    fused = []
    for erf in [n for n in rw.model.graph.node if n.op_type == "Erf"]:
        div = producers.get(erf.input[0])
        if div is None or div.op_type not in ("Div", "Mul") or len(rw.consumers.get(erf.output[0], [])) != 1:
            continue
        c = _scalar(rw, div.input[1])
        if c is None or not (abs(c - 2**0.5) < 1e-4 if div.op_type == "Div" else abs(c - 2**-0.5) < 1e-4):
            continue
        x = div.input[0]
        add = rw.consumers[erf.output[0]][0]
        if (
            add.op_type != "Add"
            or _scalar(rw, add.input[1] if add.input[0] == erf.output[0] else add.input[0]) != 1.0
        ):
            continue
        chain, value, seen_x, seen_half = [], add.output[0], False, False
        for _ in range(2):
            users = rw.consumers.get(value, [])
            if len(users) != 1 or users[0].op_type != "Mul":
                break
            mul = users[0]
            other = mul.input[1] if mul.input[0] == value else mul.input[0]
            if other == x and not seen_x:
                seen_x = True
            elif _scalar(rw, other) == 0.5 and not seen_half:
                seen_half = True
            else:
                break
            chain.append(mul)
            value = mul.output[0]
        if not (seen_x and seen_half) or len(rw.consumers.get(div.output[0], [])) != 1:
            continue
        for n in (div, erf, add, *chain):
            rw.removed.add(id(n))
        fused.append(helper.make_node("Gelu", [x], [value], name=f"{erf.name}__gelu", domain=MS_DOMAIN))
    return fused


def _plain_matmul(node: onnx.NodeProto, rw: _Rewriter) -> bool:
    w = rw.inits.get(node.input[1])
    if w is None or len(w.dims) != 2 or w.data_type != TensorProto.FLOAT:
        return False
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return False
    return True


# ----------------------------------------------------------------------------------------- SmoothQuant


def smooth_groups(model: onnx.ModelProto, layers: Iterable[str]) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Activation name -> [(layer, weight [K, N])] of the MatMul layers (3-D activations) it feeds."""
    inits = initializer_names(model)
    arrays = {i.name: i for i in model.graph.initializer}
    wanted = set(layers)
    out: dict[str, list[tuple[str, np.ndarray]]] = {}
    for layer, nodes in compute_layers(model).items():
        if layer not in wanted:
            continue
        for node in nodes:
            if node.op_type == "MatMul" and node.input[1] in inits:
                w = numpy_helper.to_array(arrays[node.input[1]]).astype(np.float32)
                if w.ndim == 2:
                    out.setdefault(node.input[0], []).append((layer, w))
    return out


def smooth_scale(act_absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """SmoothQuant: s_k = max|x_k|^alpha / max|W_k,:|^(1-alpha) over every layer the activation feeds."""
    w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    s = np.power(np.maximum(act_absmax, 1e-5), alpha) / np.power(np.maximum(w_absmax, 1e-5), 1.0 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def smooth_scales(
    groups: Mapping[str, list[tuple[str, np.ndarray]]], channel_absmax: Mapping[str, np.ndarray], alpha: float
) -> dict[str, np.ndarray]:
    """The SmoothQuant scale of every activation that feeds MatMul layers, for one migration strength."""
    return {
        act: smooth_scale(channel_absmax[act], [w for _, w in consumers], alpha)
        for act, consumers in groups.items()
        if act in channel_absmax
    }
