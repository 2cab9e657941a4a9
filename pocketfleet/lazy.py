"""Lazy re-exports for package `__init__`s, so that `import edge_agent` never pulls in onnxruntime,
nor `import compress` torch."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str], modules: Sequence[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for a package `__init__` that re-exports names without importing
    their modules up front.

    `exports`: name -> module, absolute when dotted ("edge_agent.daemon") or a submodule of `package`
    ("modeldir"),
    optionally "module:attribute" when the exported name differs. `modules`: names that are submodules
    of `package`, returned as modules.
    """
    def getattr_(name: str) -> Any:
        if name in modules:
            value = importlib.import_module(f"{package}.{name}")
        elif name in exports:
            module, _, attr = exports[name].partition(":")
            absolute = "." in module or module == package.split(".")[0]
            value = getattr(importlib.import_module(module if absolute else f"{package}.{module}"), attr or name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def dir_() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports) | set(modules))

    return getattr_, dir_


def callable_package(package: str, fn: Callable[..., Any]) -> None:
    """Make `import pkg; pkg(...)` call `fn` while `pkg` stays the package (`compress.quantize(...)`)."""

    class _CallablePackage(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

    sys.modules[package].__class__ = _CallablePackage
