"""ExecuTorch runtime for `.pte` programs (`executorch.runtime`), behind the common `Runtime` interface.

    rt = load_runtime("model.pte", threads=2)     # dispatched here by the .pte suffix
    rt.run({"image": x})                          # dict[str, np.ndarray] in and out

The program's tensor names come from its `pf_io` constant method (written by `export.pte`); a program
without one gets `input_0`, `output_0`, ... Shapes and dtypes come from the method's metadata. Programs are
exported at a fixed batch (usually 1): a larger batch runs in chunks of the program's batch.

executorch's Python bindings take torch tensors, so this runtime needs torch (the `agent-pte` extra pulls
it in); nothing imports this module unless a `.pte` file is loaded. The XNNPACK thread pool is one per
process and loaded methods keep a pointer to it: it is sized when the first program loads, and loading a
program with another thread count while one is alive raises RuntimeLoadError (resizing under a loaded
method crashes the process). Calls are serialised by a module-wide lock.
"""

from __future__ import annotations

import json
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from export.runtimes import Runtime, RuntimeLoadError, _first_line
from export.specs import TensorSpec

IO_METHOD = "pf_io"  # constant method holding {"inputs": [...], "outputs": [...]} as a list of bytes
# executorch ScalarType codes (runtime/core/portable_type/scalar_type.h) -> numpy dtype names
_SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32",
                 7: "float64", 11: "bool"}  # fmt: skip
_EXEC_LOCK = threading.Lock()  # one XNNPACK thread pool per process
_LIVE: weakref.WeakSet[PteRuntime] = weakref.WeakSet()  # loaded runtimes (they hold the pool)


def _modules() -> tuple[Any, Any, Any]:
    try:
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime as EtRuntime
    except ImportError as exc:
        raise RuntimeLoadError(
            f"running .pte programs needs ExecuTorch: pip install 'pocketfleet[agent-pte]' ({exc})"
        ) from exc
    return torch, EtRuntime, portable_lib


class PteRuntime(Runtime):
    """One loaded ExecuTorch program (method `forward`)."""

    format = "pte"
    _batch_free = True

    def __init__(self, path: Path, threads: int = 1) -> None:
        super().__init__(path, threads)
        self._torch, et_runtime, self._lib = _modules()
        from export._quiet import quiet

        _set_threads(self._lib, threads)
        try:
            with quiet():  # the XNNPACK backend logs its CPU probe on stderr
                # the Method borrows the Program's memory: keep both alive together
                self.program = et_runtime.get().load_program(Path(path))
                self.method = self.program.load_method("forward")
                names = _io_names(self.program)
        except RuntimeLoadError:
            raise
        except Exception as exc:
            raise RuntimeLoadError(f"ExecuTorch cannot load {path}: {_first_line(exc)}") from exc
        meta = self.method.metadata
        n_in, n_out = meta.num_inputs(), meta.num_outputs()
        in_names = names.get("inputs") or [f"input_{i}" for i in range(n_in)]
        out_names = names.get("outputs") or [f"output_{i}" for i in range(n_out)]
        if len(in_names) != n_in or len(out_names) != n_out:
            raise RuntimeLoadError(
                f"{path.name}: {IO_METHOD} names {len(in_names)} inputs / {len(out_names)} outputs, "
                f"the program has {n_in} / {n_out}"
            )
        self.inputs = [_spec(n, meta.input_tensor_meta(i)) for i, n in enumerate(in_names)]
        self.outputs = [_spec(n, meta.output_tensor_meta(i)) for i, n in enumerate(out_names)]
        self._model_batch = int(self.inputs[0].shape[0]) if self.inputs and self.inputs[0].shape else 0
        _LIVE.add(self)

    def _invoke(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = [np.ascontiguousarray(inputs[s.name]) for s in self.inputs]
        batch = arrays[0].shape[0] if arrays and arrays[0].ndim else None
        step = self._model_batch
        if batch is None or not step or batch == step:
            return self._execute(arrays)
        parts: dict[str, list[np.ndarray]] = {s.name: [] for s in self.outputs}
        for start in range(0, batch, step):
            take = min(step, batch - start)
            chunk = [_pad(a[start : start + step], step) for a in arrays]
            for name, value in self._execute(chunk).items():
                parts[name].append(value[:take])
        return {n: np.concatenate(p, axis=0) for n, p in parts.items()}

    def _execute(self, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        tensors = [self._torch.from_numpy(a) for a in arrays]
        with _EXEC_LOCK:
            outs = self.method.execute(tensors)
        return {s.name: np.array(o.numpy()) for s, o in zip(self.outputs, outs, strict=True)}


def _set_threads(lib: Any, threads: int) -> None:
    """Size the process-wide XNNPACK thread pool. Loaded methods keep a pointer to the pool, so it may be
    resized only while no program is loaded; a second thread count while one is raises RuntimeLoadError."""
    with _EXEC_LOCK:
        current = int(lib._threadpool_get_thread_count())
        if current == threads:
            return
        if len(_LIVE):
            raise RuntimeLoadError(
                f"ExecuTorch has one thread pool per process, now used with {current} threads by "
                f"{len(_LIVE)} loaded program(s): cannot load another with threads={threads}"
            )
        lib._unsafe_reset_threadpool(threads)


def _io_names(program: Any) -> dict[str, list[str]]:
    if IO_METHOD not in program.method_names:
        return {}
    raw = program.load_method(IO_METHOD).execute([])
    try:
        doc = json.loads(bytes(int(b) for b in raw).decode("utf-8"))
    except (ValueError, TypeError) as exc:
        raise RuntimeLoadError(f"the {IO_METHOD} names of the program are not valid JSON: {exc}") from exc
    return {k: [str(x) for x in doc.get(k, [])] for k in ("inputs", "outputs")}


def _spec(name: str, info: Any) -> TensorSpec:
    code = int(info.dtype())
    dtype = _SCALAR_TYPES.get(code)
    if dtype is None:
        raise RuntimeLoadError(f"tensor {name!r} has ExecuTorch scalar type {code}, which this runtime does not map")
    return TensorSpec(name, tuple(int(d) for d in info.sizes()), dtype)


def _pad(arr: np.ndarray, size: int) -> np.ndarray:
    if arr.shape[0] == size:
        return np.ascontiguousarray(arr)
    pad = np.zeros((size - arr.shape[0], *arr.shape[1:]), dtype=arr.dtype)
    return np.concatenate([arr, pad], axis=0)
