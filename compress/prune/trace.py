"""Trace a model into a torch.fx graph with tensor shapes, naming the module where tracing fails."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import PruneTraceError


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


class _Tracer(fx.Tracer):
    """fx tracer that keeps ignored layers and attention blocks whole and remembers the module stack."""

    proxy_buffer_attributes = True

    def __init__(self, ignore: Sequence[str]) -> None:
        super().__init__()
        self.ignore = list(ignore)
        self.stack: list[tuple[str, str]] = []
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return matches(qualname, self.ignore) or is_attention(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        name = self.path_of_module(m)
        self.stack.append((name, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def trace(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], ignore: Sequence[str] = ()
) -> fx.GraphModule:
    """Symbolically trace `model` (ignored layers stay leaves) and record every node's output shape
    by running the example inputs through it once (eval mode, no grad)."""
    tracer = _Tracer(ignore)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = tracer.failed_in
        last = (
            next(reversed(tracer.graph.nodes), None) if getattr(tracer, "graph", None) is not None else None
        )
        after = f" after node {last.name!r}" if last is not None else ""
        if where is None:
            raise PruneTraceError(
                f"cannot trace {type(model).__name__}.forward{after}: {_first_line(exc)}. "
                "Data-dependent control flow cannot be traced; wrap it in a submodule and add that "
                "module to PruneConfig.ignore"
            ) from None
        name, kind = where
        raise PruneTraceError(
            f"cannot trace module {name!r} ({kind}){after}: {_first_line(exc)}. "
            f"Add {name!r} to PruneConfig.ignore to keep that layer whole"
        ) from None
    gm = fx.GraphModule(model, graph)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        raise PruneTraceError(
            f"the traced graph of {type(model).__name__} fails on the example inputs: {_first_line(exc)}"
        ) from None
    finally:
        model.train(was_training)
    return gm


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
