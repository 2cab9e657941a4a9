"""Channel dependency graph of a traced model: which layers' channels must be removed together.

Every layer that creates channels (conv, linear, embedding, attention heads) opens a *space* of channels.
Each fx node's output tensor gets a `Layout`: the tensor dimension holding channels and the spaces laid
out along it (several after a concatenation; `expand` > 1 after flattening C x H x W). Ops that pass
channels through (BatchNorm, depthwise conv, activations, pooling) keep the layout; element-wise ops
(residual adds) unify the spaces of their operands; a concat lays spaces side by side. Unified spaces
form a *group*: pruning channel i of a group removes output i of every producer, slice i of every
BatchNorm / depthwise conv, and the matching input columns of every consumer.

A space is *frozen* (never pruned) when it reaches the model output, an ignored layer, or an op whose
channel semantics are not understood; the reason names the node.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .trace import evaluating, is_attention, matches, shape_of, trace

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)  # fmt: skip
_POINTWISE = {
    "add", "sub", "mul", "truediv", "div", "iadd", "isub", "imul", "itruediv", "add_", "sub_", "mul_",
    "div_", "relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
    "hardtanh", "sqrt", "rsqrt", "exp", "abs", "neg", "clamp", "clamp_", "clip", "dropout", "contiguous",
    "clone", "float", "to", "type_as", "detach", "pow", "leaky_relu", "elu", "softplus", "mish", "erf",
}  # fmt: skip
_PARAM_VIEWS = {"expand", "expand_as", "to", "type_as", "contiguous", "clone", "float"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "std", "var"}
_SHAPE_OPS = {"flatten", "reshape", "view", "unsqueeze", "squeeze"}
_POOL_FUNCS = {
    "avg_pool2d",
    "max_pool2d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "avg_pool1d",
    "max_pool1d",
    "interpolate",
    "upsample",
}


@dataclass
class Space:
    """Channels created by one layer (or heads of one attention block)."""

    size: int  # pruning units: channels, or heads
    unit: int = 1  # tensor channels per pruning unit (head_dim for heads)
    owner: str = ""  # the layer that creates it
    frozen: str | None = None  # why it cannot be pruned


@dataclass(frozen=True)
class Layout:
    """Where a tensor keeps its channels: dimension `cdim` holds `spaces` one after the other, each
    channel repeated over `expand` consecutive positions (after flattening C x H x W)."""

    cdim: int
    spaces: tuple[int, ...]
    expand: int = 1

    def at(self, cdim: int) -> Layout:
        return Layout(cdim, self.spaces, self.expand)


@dataclass
class Use:
    """How one module touches channel spaces."""

    name: str
    kind: str  # conv | dwconv | linear | norm | embedding | attention | rnn | param
    inp: Layout | None = None  # layout of the input channels it reads (None: not prunable)
    out: int | None = None  # space it creates
    heads: int | None = None  # attention: the head space


@dataclass
class MacTerm:
    """MACs of one op at batch 1: `base` times the kept fraction of each factor (a tuple of spaces)."""

    base: float
    factors: tuple[tuple[int, ...], ...] = ()


@dataclass
class Group:
    """Spaces unified by the graph: pruning unit i removes channel i from every layer listed."""

    root: int
    size: int
    unit: int
    owners: list[str]  # layers whose output channels (or heads) these are: producers, BN, depthwise
    consumers: list[str]  # layers reading them as input channels
    frozen: str | None

    @property
    def name(self) -> str:
        return self.owners[0] if self.owners else f"group{self.root}"


@dataclass
class DependencyGraph:
    """The analysed model. Build it with `DependencyGraph.build(model, example_inputs, ignore)`."""

    model: nn.Module
    gm: fx.GraphModule
    ignore: list[str]
    spaces: list[Space] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    uses: dict[str, Use] = field(default_factory=dict)
    terms: list[MacTerm] = field(default_factory=list)
    layouts: dict[fx.Node, Any] = field(default_factory=dict)  # Layout, None, or a tuple of them
    batch: int = 1
    leaves: dict[str, str] = field(default_factory=dict)  # modules kept whole by the tracer: reason

    @classmethod
    def build(
        cls, model: nn.Module, example_inputs: Sequence[torch.Tensor], ignore: Sequence[str] = ()
    ) -> DependencyGraph:
        traced = trace(model, example_inputs, ignore)
        graph = cls(model=model, gm=traced.gm, ignore=list(ignore), leaves=traced.leaves)
        graph._analyze()
        whole = [*ignore, *traced.leaves]
        if whole:
            graph._add_macs(_hooked_macs(model, example_inputs, whole))
        return graph

    # --- union-find over spaces -------------------------------------------------------------------

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def space(self, s: int) -> Space:
        return self.spaces[self.find(s)]

    def _new_space(self, size: int, owner: str, unit: int = 1) -> int:
        self.spaces.append(Space(size=size, unit=unit, owner=owner))
        self.parent.append(len(self.parent))
        return len(self.spaces) - 1

    def _union(self, a: int, b: int, node: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        sa, sb = self.spaces[ra], self.spaces[rb]
        if sa.size != sb.size or sa.unit != sb.unit:
            reason = f"node {node.name!r} joins {sa.size} and {sb.size} channels"
            sa.frozen, sb.frozen = sa.frozen or reason, sb.frozen or reason
            return
        self.parent[rb] = ra
        sa.frozen = sa.frozen or sb.frozen

    def _freeze(self, layouts: Iterable[Any], reason: str) -> None:
        for lay in layouts:
            if isinstance(lay, tuple):  # the layouts of a tuple output (an RNN's (output, h_n))
                self._freeze(lay, reason)
            elif lay is not None:
                for s in lay.spaces:
                    root = self.spaces[self.find(s)]
                    root.frozen = root.frozen or reason

    def channels(self, lay: Layout) -> int:
        return sum(self.space(s).size * self.space(s).unit for s in lay.spaces)

    # --- analysis ---------------------------------------------------------------------------------

    def _analyze(self) -> None:
        modules = dict(self.gm.named_modules())
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        first = shape_of(placeholders[0]) if placeholders else None
        self.batch = first[0] if first else 1
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.layouts[node] = None
            elif node.op == "output":
                self._freeze(self._arg_layouts(node.args), "it reaches the model output")
            elif node.op == "call_module":
                self.layouts[node] = self._module(node, modules[node.target])
            else:
                self.layouts[node] = self._function(node)

    def _lay(self, arg: Any) -> Layout | None:
        return self.layouts.get(arg) if isinstance(arg, fx.Node) else None

    def _arg_layouts(self, args: Any) -> list[Layout | None]:
        found: list[Layout | None] = []
        fx.node.map_arg(args, lambda n: found.append(self.layouts.get(n)) or n)
        return found

    def _opaque(self, node: fx.Node, why: str) -> None:
        """Freeze every channel space flowing into `node`."""
        self._freeze(self._arg_layouts((node.args, node.kwargs)), f"node {node.name!r} {why}")

    def _channel_last(
        self, node: fx.Node, lay: Layout | None, shape: tuple[int, ...] | None
    ) -> Layout | None:
        """`lay` if its channels are the last dimension of `shape`, else frozen and None."""
        if lay is None or shape is None:
            return None
        if lay.cdim != len(shape) - 1:
            self._freeze([lay], f"node {node.name!r} reads a dimension other than the channels")
            return None
        return lay

    def _add_macs(self, base: float, *factors: Layout | int | None) -> None:
        tup = tuple((f,) if isinstance(f, int) else f.spaces for f in factors if f is not None)
        self.terms.append(MacTerm(base / self.batch, tup))

    def _register(self, use: Use, node: fx.Node) -> None:
        prev = self.uses.get(use.name)
        if prev is None:
            self.uses[use.name] = use
            return
        # a module called more than once: its channels must be the same spaces at every call
        a, b = prev.inp, use.inp
        if a is not None and b is not None and len(a.spaces) == len(b.spaces) and a.expand == b.expand:
            for x, y in zip(a.spaces, b.spaces, strict=True):
                self._union(x, y, node)
        else:
            self._freeze([a, b], f"layer {use.name!r} is called with different inputs")
        if prev.out is not None and use.out is not None:
            self._union(prev.out, use.out, node)
        if prev.heads is not None and use.heads is not None:
            self._union(prev.heads, use.heads, node)

    def _module(self, node: fx.Node, m: nn.Module) -> Layout | None:
        name = str(node.target)
        x = node.args[0] if node.args else None
        lay, shape_in, shape_out = self._lay(x), shape_of(x), shape_of(node)
        if matches(name, self.ignore):
            self._opaque(node, f"is ignored layer {name!r}")
            return None
        if name in self.leaves:
            self._opaque(node, f"is layer {name!r} ({type(m).__name__}), kept whole: {self.leaves[name]}")
            return None
        if isinstance(lay, tuple):
            self._opaque(node, f"(layer {name!r}) takes a tuple of channel tensors")
            return None
        if isinstance(m, (nn.GRU, nn.LSTM)):
            return self._rnn(node, m, lay, shape_in)
        if isinstance(m, _CONVS):
            if lay is not None and lay.cdim != 1:
                self._freeze([lay], f"node {node.name!r} convolves a non-channel dimension")
                lay = None
            k = math.prod(m.kernel_size)
            base = math.prod(shape_out) * (m.in_channels // m.groups) * k if shape_out else 0
            if m.groups == 1:
                out = self._new_space(m.out_channels, name)
                self._register(Use(name, "conv", inp=lay, out=out), node)
                self._add_macs(base, lay, out)
                return Layout(1, (out,))
            if m.groups == m.in_channels == m.out_channels and lay is not None:
                self._register(Use(name, "dwconv", inp=lay), node)
                self._add_macs(base, lay)
                return lay
            self._freeze([lay], f"grouped conv {name!r} (groups={m.groups}) keeps its channels")
            self._add_macs(base)
            return None
        if isinstance(m, nn.Linear):
            lay = self._channel_last(node, lay, shape_in)
            out = self._new_space(m.out_features, name)
            self._register(Use(name, "linear", inp=lay, out=out), node)
            self._add_macs(math.prod(shape_out) * m.in_features if shape_out else 0, lay, out)
            return Layout(len(shape_out) - 1 if shape_out else 1, (out,))
        if isinstance(m, _BATCHNORMS):
            if lay is None or lay.cdim != 1:
                self._freeze([lay], f"BatchNorm {name!r} normalises a non-channel dimension")
                return None
            self._register(Use(name, "norm", inp=lay), node)
            return lay
        if isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1 or m.weight is None:
                self._opaque(node, f"(LayerNorm over {tuple(m.normalized_shape)}) keeps its channels")
                return None
            lay = self._channel_last(node, lay, shape_in)
            if lay is not None:
                self._register(Use(name, "norm", inp=lay), node)
            return lay
        if isinstance(m, nn.Embedding):
            out = self._new_space(m.embedding_dim, name)
            self._register(Use(name, "embedding", out=out), node)
            return Layout(len(shape_out) - 1 if shape_out else 1, (out,))
        if is_attention(m):
            return self._attention(node, m, lay, shape_in, shape_out)
        if isinstance(m, _POINTWISE_MODULES):
            return lay
        if isinstance(m, _POOLS):
            if lay is not None and lay.cdim != 1:
                self._freeze([lay], f"pooling {name!r} pools the channel dimension")
                return None
            return lay
        if isinstance(m, nn.Flatten):
            return self._reshape(node, lay, shape_in, shape_out, literal=None)
        self._opaque(node, f"is layer {name!r} ({type(m).__name__}), which pruning does not know")
        return None

    def _attention(
        self, node: fx.Node, m: nn.Module, lay: Layout | None, shape_in: Any, shape_out: Any
    ) -> Layout | None:
        name = str(node.target)
        self._freeze(self._arg_layouts((node.args[1:], node.kwargs)), f"attention {name!r} mask")
        lay = self._channel_last(node, lay, shape_in)
        heads = self._new_space(m.num_heads, name, unit=m.head_dim)
        out = self._new_space(m.out.out_features, name + ".out")
        self._register(Use(name, "attention", inp=lay, out=out, heads=heads), node)
        if shape_in is not None and shape_out is not None:
            tokens = math.prod(shape_in[:-1])
            inner, hidden = m.num_heads * m.head_dim, m.query.in_features
            seq = shape_in[-2] if len(shape_in) >= 3 else 1
            self._add_macs(3 * tokens * hidden * inner, lay, heads)  # q, k, v projections
            self._add_macs(2 * tokens * seq * inner, heads)  # scores and weighted values
            self._add_macs(tokens * inner * m.out.out_features, heads, out)  # output projection
        return Layout(len(shape_out) - 1 if shape_out else 2, (out,))

    def _rnn(self, node: fx.Node, m: nn.GRU | nn.LSTM, lay: Layout | None, shape_in: Any) -> Any:
        """GRU / LSTM: the hidden units of every layer and direction are one space (nn.GRU has one
        hidden_size, and h_n stacks all layers along its last dimension); the input features are the
        columns of weight_ih_l0. Output: (output [.., directions * hidden], h_n [or (h_n, c_n)])."""
        name = str(node.target)
        kind = type(m).__name__
        if shape_in is None:
            self._opaque(node, f"({kind} {name!r}) reads a packed or non-tensor sequence")
            return None
        lay = self._channel_last(node, lay, shape_in)
        hidden = self._new_space(m.hidden_size, name)
        frozen = None
        if m.proj_size:
            frozen = f"{kind} {name!r} has proj_size={m.proj_size}, which pruning does not resize"
        elif any(shape_of(a) is not None for a in _flat(node.args[1:], node.kwargs)):
            frozen = f"{kind} {name!r} is given an initial state of fixed width"
        if frozen:
            self._freeze([lay, Layout(0, (hidden,))], frozen)
        self._register(Use(name, "rnn", inp=lay, out=hidden), node)
        dirs, gates, size = 1 + int(m.bidirectional), 4 if isinstance(m, nn.LSTM) else 3, m.hidden_size
        tokens = math.prod(shape_in[:-1])
        self._add_macs(dirs * tokens * gates * size * m.input_size, lay, hidden)  # layer 0 input
        for layer in range(m.num_layers):
            if layer:
                self._add_macs(dirs * tokens * gates * size * dirs * size, hidden, hidden)
            self._add_macs(dirs * tokens * gates * size * size, hidden, hidden)  # recurrent
        cdim = len(shape_in) - 1
        out, state = Layout(cdim, (hidden,) * dirs), Layout(cdim, (hidden,))
        return (out, (state, state)) if isinstance(m, nn.LSTM) else (out, state)

    def _function(self, node: fx.Node) -> Layout | None:
        target = node.target
        fname = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        nested = [a for a in _flat(node.args, node.kwargs) if isinstance(self._lay(a), tuple)]
        if nested:
            index = node.args[1] if len(node.args) > 1 else None
            if target is operator.getitem and node.args[0] is nested[0] and isinstance(index, int):
                return self._lay(nested[0])[index]
            self._opaque(node, f"({fname}) takes a tuple of channel tensors")
            return None
        tensors = [a for a in _flat(node.args, node.kwargs) if shape_of(a) is not None]
        laid = [a for a in tensors if self._lay(a) is not None]
        shape_out = shape_of(node)
        if not laid:
            return None  # nothing prunable flows in (shapes, masks, constants)
        if shape_out is None:
            if fname in ("getattr", "size", "dim") or target is getattr:
                return None  # x.shape, x.size(1): dynamic values, recomputed after pruning
            self._opaque(node, f"({fname}) turns channels into a non-tensor value")
            return None
        x = node.args[0] if node.args else None
        lay, shape_in = self._lay(x), shape_of(x)
        if fname in _POINTWISE or target in (operator.add, operator.mul, operator.sub, operator.truediv):
            return self._pointwise(node, tensors, shape_out)
        if fname in _REDUCTIONS and lay is not None and shape_in is not None:
            return self._reduce(node, lay, shape_in)
        if fname in _SHAPE_OPS and lay is not None:
            literal = node.args[1:] if fname in ("reshape", "view") else None
            if literal is not None and len(literal) == 1 and isinstance(literal[0], (tuple, list)):
                literal = tuple(literal[0])
            return self._reshape(node, lay, shape_in, shape_out, literal)
        if fname in ("permute", "transpose", "t") and lay is not None and shape_in is not None:
            return self._permute(node, fname, lay, len(shape_in))
        if fname in ("cat", "concat", "concatenate"):
            return self._cat(node)
        if target is operator.getitem and lay is not None and shape_in is not None:
            return self._index(node, lay, shape_in)
        if fname == "pad" and lay is not None and shape_in is not None:
            pad = node.kwargs.get("pad", node.args[1] if len(node.args) > 1 else None)
            at = 2 * (len(shape_in) - 1 - lay.cdim)  # pad lists (before, after) pairs from the last dimension
            if isinstance(pad, (tuple, list)) and (len(pad) <= at or all(p == 0 for p in pad[at : at + 2])):
                return lay  # the channel dimension is not padded
            self._opaque(node, "(pad) pads the channel dimension")
            return None
        if fname in ("matmul", "bmm", "mm") and shape_in is not None:  # counted, channels pinned
            self._add_macs(math.prod(shape_out) * shape_in[-1])
            self._opaque(node, f"({fname}) multiplies by another activation")
            return None
        if fname in ("softmax", "log_softmax") and lay is not None and shape_in is not None:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            if dim is None or int(dim) % len(shape_in) == lay.cdim:
                self._opaque(node, f"({fname}) normalises over the channels")
                return None
            return lay
        if fname in _POOL_FUNCS and lay is not None:
            if lay.cdim != 1:
                self._opaque(node, f"({fname}) pools the channel dimension")
                return None
            return lay
        self._opaque(node, f"({fname}) is an op whose channel semantics pruning does not know")
        return None

    def _pointwise(self, node: fx.Node, tensors: list[fx.Node], shape_out: tuple[int, ...]) -> Layout | None:
        nd = len(shape_out)
        laid: list[Layout] = []
        for a in tensors:
            lay, shape = self._lay(a), shape_of(a)
            assert shape is not None
            if lay is not None:
                laid.append(lay.at(lay.cdim + nd - len(shape)))
        cdim = laid[0].cdim
        if any(lay.cdim != cdim or lay.expand != laid[0].expand for lay in laid):
            self._freeze(laid, f"node {node.name!r} combines tensors with channels on different axes")
            return None
        for a in tensors:  # an operand without a layout but with a full channel axis pins the channels
            shape = shape_of(a)
            assert shape is not None
            pos = cdim - (nd - len(shape))
            full = self._lay(a) is None and 0 <= pos < len(shape) and shape[pos] > 1 and shape_out[cdim] > 1
            if full and not self._param_operand(node, a, pos, laid[0]):
                self._freeze(laid, f"node {node.name!r} combines the channels with a fixed tensor {a.name!r}")
        first = laid[0]
        for lay in laid[1:]:
            if len(lay.spaces) != len(first.spaces):
                self._freeze(laid, f"node {node.name!r} adds differently concatenated channels")
                return None
            for s, t in zip(first.spaces, lay.spaces, strict=True):
                self._union(s, t, node)
        return first.at(cdim)

    def _param_operand(self, node: fx.Node, a: fx.Node, pos: int, lay: Layout) -> bool:
        """A parameter of the model (a class token, position embeddings), possibly expanded, added to or
        concatenated with the channels: it is sliced along with them. False when `a` is anything else."""
        src = a
        while src.op == "call_method" and src.target in _PARAM_VIEWS and isinstance(src.args[0], fx.Node):
            src = src.args[0]
        shape, own = shape_of(a), shape_of(src)
        if src.op != "get_attr" or shape is None or own is None or lay.expand != 1:
            return False
        value = self.model
        for part in str(src.target).split("."):
            value = getattr(value, part, None)
        dim = pos - (len(shape) - len(own))
        if not isinstance(value, nn.Parameter) or dim < 0 or own[dim] != self.channels(lay):
            return False
        self._register(Use(str(src.target), "param", inp=Layout(dim, lay.spaces)), node)
        return True

    def _index(self, node: fx.Node, lay: Layout, shape_in: tuple[int, ...]) -> Layout | None:
        """x[...] with ints, slices, None and Ellipsis: the channels pass when their axis is kept whole."""
        raw = node.args[1]
        items = list(raw) if isinstance(raw, tuple) else [raw]
        if any(shape_of(i) is not None or isinstance(i, (list, torch.Tensor)) for i in items):
            self._opaque(node, "indexes with a tensor")
            return None
        consumed = sum(i is not None and i is not Ellipsis for i in items)
        dim = out = 0
        for item in items:
            if item is Ellipsis:
                if dim <= lay.cdim < dim + len(shape_in) - consumed:
                    return lay.at(out + lay.cdim - dim)
                dim, out = dim + len(shape_in) - consumed, out + len(shape_in) - consumed
            elif item is None:
                out += 1
            elif isinstance(item, slice):
                if dim == lay.cdim:
                    whole = (
                        item.start in (None, 0)
                        and item.step in (None, 1)
                        and (item.stop is None or (isinstance(item.stop, int) and item.stop >= shape_in[dim]))
                    )
                    if not whole:
                        self._opaque(node, "slices the channel axis")
                        return None
                    return lay.at(out)
                dim, out = dim + 1, out + 1
            else:  # an int (or an int computed from shapes) removes its dimension
                if dim == lay.cdim:
                    self._opaque(node, "picks one channel")
                    return None
                dim += 1
        return lay.at(out + lay.cdim - dim)

    def _reduce(self, node: fx.Node, lay: Layout, shape_in: tuple[int, ...]) -> Layout | None:
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        keepdim = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
        if dims is None:
            self._opaque(node, "reduces over every dimension")
            return None
        dims = [int(d) % len(shape_in) for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
        if lay.cdim in dims:
            self._opaque(node, "reduces over the channels")
            return None
        return lay if keepdim else lay.at(lay.cdim - sum(d < lay.cdim for d in dims))

    def _reshape(
        self, node: fx.Node, lay: Layout | None, shape_in: Any, shape_out: Any, literal: tuple | None
    ) -> Layout | None:
        if lay is None or shape_in is None or shape_out is None:
            return None
        c = lay.cdim
        before = math.prod(shape_in[:c])
        for d in range(len(shape_out)):
            if math.prod(shape_out[:d]) != before:
                continue
            merged = shape_in[c]
            for j in range(c + 1, len(shape_in) + 1):
                if merged == shape_out[d]:
                    if (
                        literal is not None
                        and d < len(literal)
                        and isinstance(literal[d], int)
                        and literal[d] != -1
                    ):
                        self._opaque(node, f"reshapes to a fixed size {literal[d]} on the channel axis")
                        return None
                    return Layout(d, lay.spaces, lay.expand * (merged // shape_in[c]))
                if j < len(shape_in):
                    merged *= shape_in[j]
        self._opaque(node, "splits the channel axis")
        return None

    def _permute(self, node: fx.Node, fname: str, lay: Layout, nd: int) -> Layout:
        args = list(node.args[1:])
        if fname == "t":
            order = [1, 0]
        elif fname == "transpose":
            a = int(node.kwargs.get("dim0", args[0] if args else 0)) % nd
            b = int(node.kwargs.get("dim1", args[1] if len(args) > 1 else 1)) % nd
            order = list(range(nd))
            order[a], order[b] = order[b], order[a]
        else:
            dims = node.kwargs.get(
                "dims", args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            )
            order = [int(d) % nd for d in dims]
        return lay.at(order.index(lay.cdim))

    def _cat(self, node: fx.Node) -> Layout | None:
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        shape_out = shape_of(node)
        if not isinstance(parts, (list, tuple)) or shape_out is None:
            self._opaque(node, "concatenates an unknown list")
            return None
        dim = int(dim) % len(shape_out)
        lays = [self._lay(p) for p in parts]
        if all(lay is None or lay.cdim != dim for lay in lays):  # along another axis: like an add
            return self._pointwise(node, [p for p in parts if shape_of(p) is not None], shape_out)
        if any(lay is None for lay in lays):
            self._opaque(node, "concatenates channels with a fixed tensor")
            return None
        known = [lay for lay in lays if lay is not None]
        if any(lay.cdim != dim for lay in known):  # concatenation along another axis: like an add
            return self._pointwise(node, [p for p in parts if isinstance(p, fx.Node)], shape_out)
        if len({lay.expand for lay in known}) != 1:
            self._opaque(node, "concatenates tensors flattened differently")
            return None
        return Layout(dim, tuple(s for lay in known for s in lay.spaces), known[0].expand)

    def index(self, lay: Layout, keep: dict[int, Any] | None = None) -> torch.Tensor:
        """Positions along `lay.cdim` of the kept channels (all when `keep` has no entry for a space)."""
        keep = keep or {}
        parts, offset = [], 0
        for s in lay.spaces:
            sp = self.space(s)
            units = keep.get(self.find(s))
            chans = self.unit_index(s, units) + offset
            parts.append((chans[:, None] * lay.expand + torch.arange(lay.expand)).reshape(-1))
            offset += sp.size * sp.unit
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def unit_index(self, s: int, units: Any = None) -> torch.Tensor:
        """Channel indices (within space `s`) of the given units (all units when None)."""
        sp = self.space(s)
        u = torch.arange(sp.size) if units is None else torch.as_tensor(units, dtype=torch.long)
        return (u[:, None] * sp.unit + torch.arange(sp.unit)).reshape(-1)

    # --- results ----------------------------------------------------------------------------------

    def groups(self) -> list[Group]:
        """Every group in graph order (frozen ones included, with the reason)."""
        owners: dict[int, list[str]] = {}
        consumers: dict[int, list[str]] = {}
        for use in self.uses.values():
            if use.out is not None and use.kind != "attention":
                owners.setdefault(self.find(use.out), []).append(use.name)
            if use.kind == "attention":
                assert use.heads is not None and use.out is not None
                owners.setdefault(self.find(use.heads), []).append(use.name)
                owners.setdefault(self.find(use.out), []).append(use.name + ".out")
            if use.inp is not None:
                bucket = owners if use.kind in ("norm", "dwconv", "param") else consumers
                for s in use.inp.spaces:
                    bucket.setdefault(self.find(s), []).append(use.name)
        out = []
        for root in sorted(owners):
            sp = self.spaces[root]
            out.append(Group(root, sp.size, sp.unit, owners[root], consumers.get(root, []), sp.frozen))
        return out

    def prunable(self) -> list[Group]:
        return [g for g in self.groups() if g.frozen is None]

    def macs(self, keep: dict[int, int] | None = None) -> float:
        """MACs per sample, with group root r keeping keep[r] units (all when absent)."""
        keep = keep or {}
        total = 0.0
        for term in self.terms:
            value = term.base
            for factor in term.factors:
                size = sum(self.space(s).size for s in factor)
                kept = sum(keep.get(self.find(s), self.space(s).size) for s in factor)
                value *= kept / size if size else 1.0
            total += value
        return total


def _hooked_macs(model: nn.Module, example_inputs: Sequence[torch.Tensor], ignore: Sequence[str]) -> float:
    """MACs of the conv / linear layers inside ignored (untraced) modules, counted with forward hooks."""
    total = [0.0]

    def hook(m: nn.Module, args: Any, out: torch.Tensor) -> None:
        per_out = (
            m.in_features
            if isinstance(m, nn.Linear)
            else (m.in_channels // m.groups) * math.prod(m.kernel_size)
        )
        total[0] += out.numel() * per_out

    handles = [
        m.register_forward_hook(hook)
        for name, m in model.named_modules()
        if isinstance(m, (*_CONVS, nn.Linear)) and matches(name, ignore)
    ]
    try:
        with evaluating(model), torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def _flat(*items: Any) -> list[Any]:
    found: list[Any] = []
    fx.node.map_arg(items, lambda n: found.append(n) or n)
    return found
