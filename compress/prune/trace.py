"""Trace a model into a torch.fx graph with tensor shapes, specialized at the example inputs.

A concrete-value tracer: every fx Proxy carries the real value computed on the example inputs (eval mode,
no grad), so Python code that reads shapes or dtypes (`if x.dtype != ...`, `b, s, d = x.size()`,
`int(h / 2)`, `len(x)`, TF-style padding) resolves to concrete values and control flow is specialized at
the example shapes. The graph is only used to find which channels go together; surgery edits the original
modules, whose Python code still runs at any input size.

Control flow on tensor *values* (`if x.mean() > 0`) cannot be specialized safely. A submodule whose forward
cannot be traced (that, or anything else that fails inside it) becomes a leaf automatically: it is called
as one opaque op, its channels are kept whole, and the reason is recorded in `TracedModel.leaves`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .errors import PruneTraceError

_VALUE, _DATA, _DYNSHAPE = "pf_value", "pf_data", "pf_dynshape"
_META_METHODS = {
    "size", "dim", "numel", "nelement", "is_floating_point", "is_complex", "element_size", "stride",
    "is_contiguous", "get_device", "ndimension",
}  # fmt: skip
_DYNAMIC_SHAPE = {"nonzero", "masked_select", "unique", "unique_consecutive", "argwhere", "nonzero_static"}
MAX_LEAVES = 256


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode, every submodule's own training flag restored afterwards (a model in train
    mode may hold submodules in eval mode)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether module `name` is one of `patterns` (exact names or fnmatch patterns), or inside one."""
    return any(fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


def is_attention(module: nn.Module) -> bool:
    """Multi-head self-attention with per-head reshapes we know how to prune (compress.zoo.bert style):
    `query`/`key`/`value`/`out` Linear layers and int `num_heads`, `head_dim` attributes."""
    return (
        all(isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key", "value", "out"))
        and isinstance(getattr(module, "num_heads", None), int)
        and isinstance(getattr(module, "head_dim", None), int)
    )


class DataDependentFlow(fx.proxy.TraceError):
    """Python control flow on tensor values: the graph would hold one branch only."""


class ConcreteProxy(fx.Proxy):
    """An fx Proxy that knows the value it stands for on the example inputs."""

    @property
    def value(self) -> Any:
        return self.node.meta[_VALUE]

    def _meta_only(self, what: str) -> None:
        if self.node.meta.get(_DATA, True):
            raise DataDependentFlow(
                f"{what} of {self.node.name!r} depends on tensor values (data-dependent control flow)"
            )

    def __getattr__(self, k: str) -> Any:
        if k.startswith("__"):
            raise AttributeError(k)
        value = getattr(self.value, k)  # AttributeError as for the real value (hasattr works)
        if k == "shape" or isinstance(value, torch.Tensor) or callable(value):
            return _Attribute(self, k, value)
        return value  # dtype, device, ndim, requires_grad...: fixed by the inputs, not by the channels

    def __len__(self) -> int:
        if isinstance(self.value, torch.Tensor) and self.node.meta.get(_DYNSHAPE):
            self._meta_only("len()")
        return len(self.value)

    def __iter__(self) -> Iterator[Any]:
        value = self.value
        if isinstance(value, dict):
            return iter(value)
        return (self[i] for i in range(len(self)))

    def __int__(self) -> int:
        self._meta_only("int()")
        return int(self.value)

    def __index__(self) -> int:
        self._meta_only("an index")
        return operator.index(self.value)

    def __float__(self) -> float:
        self._meta_only("float()")
        return float(self.value)

    def keys(self) -> Any:
        return self.value.keys()


class _Attribute(ConcreteProxy):
    """`x.attr` of a ConcreteProxy: a method call (`x.view(...)`) or a lazily recorded getattr (`x.shape`)."""

    def __init__(self, root: ConcreteProxy, attr: str, value: Any) -> None:
        self.root, self.attr, self.tracer, self._value = root, attr, root.tracer, value
        self._node: fx.Node | None = None

    @property
    def node(self) -> fx.Node:  # type: ignore[override]
        if self._node is None:
            self._node = self.tracer.create_proxy("call_function", getattr, (self.root, self.attr), {}).node
        return self._node

    @property
    def value(self) -> Any:
        return self._value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.tracer.create_proxy("call_method", self.attr, (self.root, *args), kwargs)


class _Tracer(fx.Tracer):
    """Concrete-value fx tracer that keeps ignored layers, leaves and attention blocks whole and remembers
    the module stack (so a failure names the innermost module)."""

    proxy_buffer_attributes = True

    def __init__(self, ignore: Sequence[str], leaves: dict[str, str], inputs: dict[str, Any]) -> None:
        super().__init__()
        self.ignore = list(ignore)
        self.leaves = leaves
        self.inputs = inputs
        self.stack: list[tuple[str, str]] = []
        self.failed_in: tuple[str, str] | None = None
        self.eager = 0

    @contextlib.contextmanager
    def _eagerly(self) -> Iterator[None]:
        """Run real code (a leaf module, an op's value) without recording anything."""
        self.eager += 1
        try:
            yield
        finally:
            self.eager -= 1

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            qualname in self.leaves
            or matches(qualname, self.ignore)
            or is_attention(m)
            or super().is_leaf_module(m, qualname)
        )

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        return attr_val if self.eager else super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self.eager:
            return forward(*args, **kwargs)
        try:
            name = self.path_of_module(m)
        except NameError:  # built inside forward (`nn.ReLU()(x)`): not a layer of the model, trace through
            return forward(*args, **kwargs)
        self.stack.append((name, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ConcreteProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        assert isinstance(obj, ConcreteProxy)
        obj._meta_only("a condition")
        return bool(obj.value)

    def iter(self, obj: fx.Proxy) -> Iterator:
        return iter(obj)

    def keys(self, obj: fx.Proxy) -> Any:
        assert isinstance(obj, ConcreteProxy)
        return obj.keys()

    def create_node(
        self, kind: str, target: Any, args: Any, kwargs: Any, name: Any = None, type_expr: Any = None
    ) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "output":
            return node
        found: list[fx.Node] = []
        fx.node.map_arg((args, kwargs), lambda n: found.append(n) or n)
        data = any(n.meta.get(_DATA, True) for n in found)
        dynshape = any(n.meta.get(_DYNSHAPE, False) for n in found)
        vargs, vkwargs = fx.node.map_arg((args, kwargs), lambda n: n.meta[_VALUE])
        with self._eagerly(), torch.no_grad():
            if kind == "placeholder":
                value = self.inputs[str(target)]
                data = isinstance(value, torch.Tensor)
            elif kind == "get_attr":
                value = self.root
                for part in str(target).split("."):
                    value = getattr(value, part)
                data = True
            elif kind == "call_module":
                value = self.root.get_submodule(str(target))(*vargs, **vkwargs)
            elif kind == "call_method":
                value = getattr(vargs[0], target)(*vargs[1:], **vkwargs)
                if target in _META_METHODS:
                    data = bool(args[0].meta.get(_DYNSHAPE)) if isinstance(args[0], fx.Node) else data
                dynshape = dynshape or target in _DYNAMIC_SHAPE
            else:
                value = target(*vargs, **vkwargs)
                fname = getattr(target, "__name__", "")
                if target is getattr and vargs[1] == "shape":
                    data = bool(args[0].meta.get(_DYNSHAPE)) if isinstance(args[0], fx.Node) else data
                elif target is len:
                    data = dynshape
                dynshape = dynshape or fname in _DYNAMIC_SHAPE or _bool_index(target, vargs)
        node.meta[_VALUE], node.meta[_DATA], node.meta[_DYNSHAPE] = value, data, dynshape
        if isinstance(value, torch.Tensor):
            node.meta["tensor_meta"] = _extract_tensor_metadata(value)
        return node


def _bool_index(target: Any, vargs: tuple) -> bool:
    if target is not operator.getitem or len(vargs) < 2:
        return False
    idx = vargs[1] if isinstance(vargs[1], tuple) else (vargs[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)


@dataclass
class TracedModel:
    """The traced graph (node shapes in meta["tensor_meta"]) and the submodules kept whole as leaves
    because tracing into them failed: {module name: reason}."""

    gm: fx.GraphModule
    leaves: dict[str, str] = field(default_factory=dict)


def trace(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    ignore: Sequence[str] = (),
) -> TracedModel:
    """Trace `model` at the example inputs (ignored layers stay leaves; a submodule that cannot be traced
    becomes a leaf, with the reason in `.leaves`) and record every node's output shape."""
    forward = inspect.signature(model.forward)
    params = [p for p in forward.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(example_inputs) > len(params):
        raise PruneTraceError(
            f"{type(model).__name__}.forward takes {len(params)} inputs, got {len(example_inputs)} example inputs"
        )
    concrete: dict[str, Any] = {}
    for p in params[len(example_inputs) :]:
        if p.default is p.empty:
            raise PruneTraceError(
                f"{type(model).__name__}.forward needs input {p.name!r}: pass one example input per model input"
            )
        concrete[p.name] = p.default
    concrete.update({p.name: {} for p in forward.parameters.values() if p.kind == p.VAR_KEYWORD})
    leaves: dict[str, str] = {}
    model = copy.deepcopy(model)  # tracing runs the model's Python code: caches it fills stay in the copy
    with evaluating(model):
        while True:
            inputs = {p.name: x.clone() for p, x in zip(params, example_inputs, strict=False)}
            inputs.update({f"{k}_1": v for k, v in concrete.items()})
            tracer = _Tracer(ignore, leaves, inputs)
            try:
                with torch.no_grad():
                    graph = tracer.trace(model, concrete_args=concrete or None)
                break
            except Exception as exc:
                _record_failure(model, tracer, leaves, exc)
        gm = fx.GraphModule(model, graph)
    for node in gm.graph.nodes:
        node.meta.pop(_VALUE, None)  # shapes stay in tensor_meta; the values are not needed any more
    return TracedModel(gm, leaves)


def _record_failure(model: nn.Module, tracer: _Tracer, leaves: dict[str, str], exc: Exception) -> None:
    """Make the module where tracing failed a leaf, or raise PruneTraceError when that cannot help."""
    where = tracer.failed_in
    last = next(reversed(tracer.graph.nodes), None) if getattr(tracer, "graph", None) is not None else None
    after = f" after node {last.name!r}" if last is not None else ""
    if where is None:
        raise PruneTraceError(
            f"cannot trace {type(model).__name__}.forward{after}: {_first_line(exc)}. "
            "Control flow on tensor values cannot be traced; move it into a submodule (kept whole)"
        ) from None
    name, kind = where
    if name in leaves or len(leaves) >= MAX_LEAVES:  # a leaf fails: the module fails on these inputs
        raise PruneTraceError(
            f"module {name!r} ({kind}) fails on the example inputs: {_first_line(exc)}"
        ) from None
    leaves[name] = f"tracing into it failed ({_first_line(exc)})"


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The output shape recorded for an fx node (None for non-tensor values)."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
