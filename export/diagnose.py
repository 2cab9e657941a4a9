"""One line a user can act on when a converter fails: the op it cannot handle and the module path that
produced it, or the input dimension the model code fixes to one size.

torch.onnx.export (dynamo) and litert-torch wrap the real cause several exceptions deep in banners of
advice; `explain(exc, module, example)` walks the chain, and for an op without a conversion re-traces the
module with torch.export to find which submodule called it (torch is imported only here, lazily).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_STATIC = re.compile(r"inferred a static shape of (\d+) for dimension inputs\['?([^'\]]+)'?\]\.shape\[(\d+)\]")
_STATIC_ARGS = re.compile(r"inferred a static shape of (\d+) for dimension (\w+)\[(\d+)\]\.shape\[(\d+)\]")
_NO_FUNCTION = re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>")
_LOWERING = re.compile(r"Lowering not found: (?:torch\.ops\.)?(aten\.\w+)")
_BAD_SHAPE = re.compile(r"shape '\[[^\]]*\]' is invalid for input of size \d+")
# torch.export: the example's size is outside the range the model code allows
_RANGE = re.compile(r"\b(\d+) not in VR\[(\d+), (\d+)\]")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _clean(text: str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return " ".join(text.split())


def module_paths(module: Any, example: Sequence[Any], op: str) -> list[str]:
    """'path (Type)' of the submodules whose forward calls `op` (e.g. "aten.linalg_eig"), by tracing the
    module with torch.export (non-strict); [] when that trace fails too."""
    import torch

    try:
        program = torch.export.export(module, tuple(example), strict=False)
    except Exception:  # noqa: BLE001 - only a better message is at stake
        return []
    name = op.split(".", 1)[-1]
    paths: list[str] = []
    for node in program.graph.nodes:
        target = str(getattr(node, "target", ""))
        if node.op != "call_function" or (name not in target):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, kind = list(stack.values())[-1]
            kind_name = getattr(kind, "__name__", str(kind).rsplit(".", 1)[-1].strip("'>"))
            label = f"{path or '<top>'} ({kind_name})"
        else:
            label = f"<top> ({type(module).__name__})"
        if label not in paths:
            paths.append(label)
    return paths


def _our_name(module: Any, arg: str, input_names: Sequence[str]) -> str:
    """Our input name for the forward argument `arg` (torch.export names dims by the forward's parameters)."""
    import inspect

    if arg in input_names:
        return arg
    try:
        params = [p for p in inspect.signature(module.forward).parameters if p not in ("self",)]
    except (TypeError, ValueError):
        return arg
    return input_names[params.index(arg)] if arg in params and params.index(arg) < len(input_names) else arg


def explain(exc: BaseException, module: Any, example: Sequence[Any], converter: str,
            input_names: Sequence[str] = ()) -> str | None:  # fmt: skip
    """The actionable one-line cause of a failed conversion, or None when none is recognised."""
    texts = [_clean(str(e)) for e in _chain(exc)]
    label = type(module).__name__
    for text in texts:
        m = _STATIC.search(text)
        if m:
            size, name, axis = m.group(1), _our_name(module, m.group(2), input_names), m.group(3)
            return (f"{label} only traces at one input size: the model code fixes dimension {axis} of input "
                    f"{name!r} to {size} (a reshape/view with a constant, or a loop over that size); make it follow "
                    f"the input's shape (x.shape[{axis}] or -1), or export with fixed sizes (dynamic_axes={{}})")  # fmt: skip
        m = _STATIC_ARGS.search(text)
        if m:
            size, idx, axis = m.group(1), int(m.group(3)), m.group(4)
            name = input_names[idx] if idx < len(input_names) else f"#{idx}"
            return (f"{label} only traces at one input size: the model code fixes dimension {axis} of input "
                    f"{name!r} to {size} (a reshape/view with a constant, or a loop over that size); make it follow "
                    f"the input's shape (x.shape[{axis}] or -1), or export with fixed sizes (dynamic_axes={{}})")  # fmt: skip
    for text in texts:
        m = _NO_FUNCTION.search(text) or _LOWERING.search(text)
        if m:
            op = m.group(1)
            where = module_paths(module, example, op)
            at = f" (called in {', '.join(where[:3])})" if where else ""
            return (f"{converter} cannot convert op {op}{at} of {label}: there is no conversion for it; replace "
                    f"that call in the module (or keep that module out of the exported model)")  # fmt: skip
    for text in texts:
        m = _BAD_SHAPE.search(text) or _RANGE.search(text)
        if m:
            shapes = {n: list(getattr(x, "shape", [])) for n, x in zip(input_names, example, strict=False)}
            return (f"{label} only traces at one input size: it fails at the export size {shapes} ({m.group(0)}); "
                    f"a reshape/view in the model fixes a size the input does not have: make it follow the input's "
                    f"shape (x.shape[0] or -1)")  # fmt: skip
    return None
