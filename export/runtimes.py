"""One small interface over the on-device inference runtimes: onnxruntime and LiteRT (torch-free).

    rt = load_runtime("model.onnx", threads=2)
    rt.inputs, rt.outputs            # list[TensorSpec]; dynamic dims are strings ("batch")
    out = rt.run({"image": x})      # dict[str, np.ndarray]

Inputs are checked before the runtime sees them: unknown or missing names, wrong static dims and wrong
dtypes raise `InputError` naming the input, the expected and the received value. Lossless integer
conversions are made for the caller (int64 ids into an int32 model when every value fits). Tensors
stored as int8/uint8 with affine quantization (TFLite) are exchanged as float32: `run` quantizes float
inputs and dequantizes outputs with the scale/zero-point shown in `TensorSpec.quantization`, so callers
never handle raw int8 (a caller may still pass the storage dtype; it goes through unchanged).

LiteRT models have a fixed batch (usually 1). A larger batch is first tried by resizing the interpreter's
inputs; when the model cannot be resized (XNNPACK, constant reshapes) the batch is run in chunks of the
model's batch and the outputs concatenated. The leading dimension of every tensor is the batch. An ONNX file
that export.onnx had to make at a fixed batch (metadata `pocketfleet.fixed_batch`) runs in chunks the same way.

Thread-safety: `Runtime.run` may be called from several threads. onnxruntime's `InferenceSession.run` is
thread-safe on its own; a LiteRT interpreter is not, so `LiteRTRuntime.run` holds `Runtime.lock` (one
call at a time per runtime; load one runtime per worker thread for parallel LiteRT inference).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from export.specs import Quantization, TensorSpec
from pocketfleet import PocketfleetError

FORMATS = {".onnx": "onnx", ".tflite": "tflite", ".pte": "pte", ".mlpackage": "coreml"}
_MLPACKAGE_ZIP = ".mlpackage.zip"  # a Core ML package zipped into one file (export.coreml)

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


class RuntimeLoadError(PocketfleetError):
    """A model file could not be loaded by its runtime (missing file, unknown format, bad model)."""


class InputError(PocketfleetError):
    """`Runtime.run` was given inputs that do not match the model (name, shape or dtype)."""


def is_quantized(spec: TensorSpec) -> bool:
    return spec.quantization is not None and np.dtype(spec.dtype).kind in "iu"


def io_dtype(spec: TensorSpec) -> str:
    """The dtype a caller exchanges for this tensor: float32 for quantized tensors, else its own dtype."""
    return "float32" if is_quantized(spec) else spec.dtype


class Runtime:
    """A loaded model. Subclasses implement `_specs()` and `_invoke()`; `run` validates and converts."""

    format: str = ""
    _batch_free = False  # True: the leading dim may differ from a static model batch (handled by chunking)

    def __init__(self, path: Path, threads: int) -> None:
        self.path = path
        self.threads = threads
        self.lock = threading.Lock()
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, threads={self.threads})"

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "threads": self.threads,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
        }

    def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the model on a dict of named arrays and return a dict of named float/int arrays."""
        return self._invoke(self.validate(inputs))

    def validate(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Check names, static dims and dtypes; return arrays in the dtype the caller exchanges."""
        if not isinstance(inputs, Mapping):
            raise InputError(f"inputs must be a dict of name -> array, got {type(inputs).__name__}")
        expected = {s.name: s for s in self.inputs}
        unknown = sorted(set(inputs) - set(expected))
        if unknown:
            raise InputError(
                f"unknown input {unknown[0]!r} for {self.path.name}; expected inputs: {sorted(expected)}"
            )
        missing = sorted(set(expected) - set(inputs))
        if missing:
            raise InputError(
                f"missing input {missing[0]!r} for {self.path.name}; expected inputs: {sorted(expected)}"
            )
        out = {}
        for name, spec in expected.items():
            out[name] = _check_one(spec, np.asarray(inputs[name]), batch_free=self._batch_free)
        batches = {a.shape[0] for a in out.values() if a.ndim}
        if len(batches) > 1:
            raise InputError(f"inputs disagree on the batch size (leading dimension): {sorted(batches)}")
        return out

    def _invoke(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def _check_one(spec: TensorSpec, arr: np.ndarray, batch_free: bool) -> np.ndarray:
    want = list(spec.shape)
    if arr.ndim != len(want):
        raise InputError(
            f"input {spec.name!r}: expected {len(want)} dimensions {_shape_str(want)}, got shape {list(arr.shape)}"
        )
    for axis, (dim, got) in enumerate(zip(want, arr.shape, strict=True)):
        if isinstance(dim, int) and dim >= 0 and dim != got and not (axis == 0 and batch_free):
            raise InputError(
                f"input {spec.name!r}: expected shape {_shape_str(want)}, got {list(arr.shape)} (dimension {axis})"
            )
    want_dtype = np.dtype(io_dtype(spec))
    if arr.dtype == want_dtype or (is_quantized(spec) and arr.dtype == np.dtype(spec.dtype)):
        return arr
    if want_dtype.kind in "iu" and arr.dtype.kind in "iu":
        info = np.iinfo(want_dtype)
        if arr.size == 0 or (arr.min() >= info.min and arr.max() <= info.max):
            return arr.astype(want_dtype)
        raise InputError(f"input {spec.name!r}: values outside the {want_dtype} range of the model")
    raise InputError(f"input {spec.name!r}: expected dtype {want_dtype}, got {arr.dtype}")


def _shape_str(shape: list[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# ---------------------------------------------------------------------------------------------- onnxruntime


class OnnxRuntime(Runtime):
    """onnxruntime CPU session; `run` is thread-safe (onnxruntime guarantees it for `session.run`)."""

    format = "onnx"

    def __init__(self, path: Path, threads: int = 1) -> None:
        super().__init__(path, threads)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeLoadError(
                f"running .onnx models needs onnxruntime: pip install 'pocketfleet[agent-onnx]' ({exc})"
            ) from exc

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise RuntimeLoadError(f"onnxruntime cannot load {path}: {_first_line(exc)}") from exc
        self.inputs = [_ort_spec(a) for a in self.session.get_inputs()]
        self.outputs = [_ort_spec(a) for a in self.session.get_outputs()]
        # a model export had to fix the batch of (export.onnx): other batches run in chunks of it
        fixed = self.session.get_modelmeta().custom_metadata_map.get("pocketfleet.fixed_batch")
        self.fixed_batch = int(fixed) if fixed else None
        self._batch_free = self.fixed_batch is not None

    def _invoke(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = next((a.shape[0] for a in inputs.values() if a.ndim), None)
        if self.fixed_batch is not None and batch is not None and batch != self.fixed_batch:
            return _run_chunked(self._invoke_once, inputs, batch, self.fixed_batch)
        return self._invoke_once(inputs)

    def _invoke_once(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [s.name for s in self.outputs]
        values = self.session.run(names, inputs)
        return dict(zip(names, values, strict=True))


def _ort_spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or "dynamic") for d in arg.shape)
    return TensorSpec(arg.name, shape, _ORT_DTYPES.get(arg.type, arg.type))


# ---------------------------------------------------------------------------------------------- LiteRT


def _litert_interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
        except ImportError as exc:
            raise RuntimeLoadError(
                "running .tflite models needs LiteRT: pip install 'pocketfleet[agent-tflite]' (ai-edge-litert)"
            ) from exc
    return Interpreter


class LiteRTRuntime(Runtime):
    """A LiteRT interpreter behind a lock (interpreters are not thread-safe)."""

    format = "tflite"
    _batch_free = True

    def __init__(self, path: Path, threads: int = 1) -> None:
        super().__init__(path, threads)
        interpreter_cls = _litert_interpreter_class()
        try:
            self.interpreter = interpreter_cls(model_path=str(path), num_threads=threads)
            self.interpreter.allocate_tensors()
        except Exception as exc:
            raise RuntimeLoadError(f"LiteRT cannot load {path}: {_first_line(exc)}") from exc
        details_in = {d["index"]: d for d in self.interpreter.get_input_details()}
        details_out = {d["index"]: d for d in self.interpreter.get_output_details()}
        in_names, out_names = self._signature_names(details_in, details_out)
        self._in = {name: details_in[i] for name, i in in_names.items()}
        self._out = {name: details_out[i] for name, i in out_names.items()}
        self.inputs = [_litert_spec(n, d) for n, d in self._in.items()]
        self.outputs = [_litert_spec(n, d) for n, d in self._out.items()]
        self._model_batch = {n: int(d["shape"][0]) if len(d["shape"]) else 0 for n, d in self._in.items()}
        self._qin = {n: _Codec(d) for n, d in self._in.items()}
        self._qout = {n: _Codec(d) for n, d in self._out.items()}
        self._resizable = True  # becomes False after the first failed resize (then we chunk)

    def _signature_names(self, din: dict, dout: dict) -> tuple[dict[str, int], dict[str, int]]:
        """Prefer the names of the single signature (litert-torch keeps the PyTorch names there)."""
        try:
            sigs = self.interpreter._get_full_signature_list()
        except Exception:
            sigs = {}
        if len(sigs) == 1:
            sig = next(iter(sigs.values()))
            ins, outs = dict(sig.get("inputs", {})), dict(sig.get("outputs", {}))
            if set(ins.values()) == set(din) and set(outs.values()) == set(dout):
                return _ordered(ins, din), _ordered(outs, dout)
        return {d["name"]: i for i, d in din.items()}, {d["name"]: i for i, d in dout.items()}

    def _invoke(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.lock:
            arrays = {n: self._qin[n].quantize(a) for n, a in inputs.items()}
            batch = next((a.shape[0] for a in arrays.values() if a.ndim), None)
            model_batch = next(iter(self._model_batch.values()), None)
            if batch is None or batch == model_batch or not model_batch:
                return self._invoke_once(arrays)
            if self._resizable and self._resize(batch):
                return self._invoke_once(arrays)
            return _run_chunked(self._invoke_once, arrays, batch, next(iter(self._model_batch.values())))

    def _invoke_once(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        it = self.interpreter
        for name, arr in arrays.items():
            it.set_tensor(self._in[name]["index"], arr)
        it.invoke()
        return {name: self._qout[name].dequantize(it.get_tensor(d["index"])) for name, d in self._out.items()}

    def _resize(self, batch: int) -> bool:
        """Try to give every input the batch `batch`; on failure restore the model's shapes."""
        it = self.interpreter
        try:
            for d in self._in.values():
                it.resize_tensor_input(d["index"], [batch, *d["shape"][1:]])
            it.allocate_tensors()
            self._model_batch = {n: batch for n in self._in}
            return True
        except Exception:
            self._resizable = False
            for d in self._in.values():
                it.resize_tensor_input(d["index"], list(d["shape"]))
            it.allocate_tensors()
            self._model_batch = {n: int(d["shape"][0]) for n, d in self._in.items()}
            return False


def _run_chunked(invoke_once: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                 arrays: dict[str, np.ndarray], batch: int, step: int) -> dict[str, np.ndarray]:  # fmt: skip
    """Run a fixed-batch model on `batch` rows in chunks of its batch `step` (the last chunk zero-padded)."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, batch, step):
        chunk = {n: _pad_batch(a[start : start + step], step) for n, a in arrays.items()}
        take = min(step, batch - start)
        for name, value in invoke_once(chunk).items():
            parts.setdefault(name, []).append(value[:take].copy())
    return {n: np.concatenate(p, axis=0) for n, p in parts.items()}


def _ordered(names: dict[str, int], details: dict) -> dict[str, int]:
    """Signature names in tensor-index order (the order of get_input_details)."""
    by_index = {i: n for n, i in names.items()}
    return {by_index[i]: i for i in details}


def _litert_spec(name: str, d: dict) -> TensorSpec:
    dtype = np.dtype(d["dtype"]).name
    shape = tuple(int(x) if x >= 0 else "dynamic" for x in d.get("shape_signature", d["shape"]))
    scale, zero_point = d.get("quantization", (0.0, 0))
    quant = Quantization(float(scale), int(zero_point)) if scale and np.dtype(dtype).kind in "iu" else None
    return TensorSpec(name, shape, dtype, quant)


class _Codec:
    """float <-> int8/uint8 for one quantized LiteRT tensor, with its constants worked out once: the
    conversion is on every call, and rebuilding np.iinfo and numpy scalars there cost more than the int8
    model saved (digits-cnn: ~45 us of wrapper around a ~17 us XNNPACK int8 invoke, vs ~2 us for fp32)."""

    def __init__(self, d: dict) -> None:
        self.dtype = np.dtype(d["dtype"])
        scale, zero_point = d.get("quantization", (0.0, 0))
        self.quantized = bool(scale) and self.dtype.kind in "iu"
        if self.quantized:
            info = np.iinfo(self.dtype)
            self.scale = np.float32(scale)
            self.zero_point = np.float32(zero_point)
            self.lo, self.hi = np.float32(info.min), np.float32(info.max)

    def quantize(self, arr: np.ndarray) -> np.ndarray:
        if arr.dtype == self.dtype:
            return np.ascontiguousarray(arr)
        if self.quantized and arr.dtype.kind == "f":
            q = arr / self.scale  # float32 in, float32 out (a multiply by 1/scale rounds halves differently)
            np.rint(q, out=q)  # round half to even, as LiteRT's own quantize
            q += self.zero_point
            np.maximum(q, self.lo, out=q)  # np.clip costs ~5x more on small arrays
            np.minimum(q, self.hi, out=q)
            return q.astype(self.dtype)
        return np.ascontiguousarray(arr.astype(self.dtype))

    def dequantize(self, arr: np.ndarray) -> np.ndarray:
        if not (self.quantized and arr.dtype.kind in "iu"):
            return arr
        out = arr.astype(np.float32)
        out -= self.zero_point
        out *= self.scale
        return out


def _pad_batch(arr: np.ndarray, size: int) -> np.ndarray:
    if arr.shape[0] == size:
        return np.ascontiguousarray(arr)
    pad = np.zeros((size - arr.shape[0], *arr.shape[1:]), dtype=arr.dtype)
    return np.concatenate([arr, pad], axis=0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# ---------------------------------------------------------------------------------------------- entry point


def load_runtime(path: str | Path, format: str | None = None, threads: int = 1) -> Runtime:
    """Load a model file into its runtime; `format` ("onnx"|"tflite"|"pte"|"coreml") defaults to the suffix.

    .pte programs go to export.runtime_pte (ExecuTorch), Core ML packages to export.runtime_coreml; each
    runtime's own package is imported only when a file of its format is loaded."""
    path = Path(path)
    fmt = format or ("coreml" if path.name.lower().endswith(_MLPACKAGE_ZIP) else FORMATS.get(path.suffix.lower()))
    if fmt not in ("onnx", "tflite", "pte", "coreml"):
        raise RuntimeLoadError(
            f"cannot tell the runtime for {path.name}: use a .onnx, .tflite, .pte or .mlpackage(.zip) file "
            "or pass format='onnx'|'tflite'|'pte'|'coreml'"
        )
    if not (path.is_file() or (fmt == "coreml" and path.is_dir())):
        raise RuntimeLoadError(f"model file not found: {path}")
    if threads < 1:
        raise RuntimeLoadError(f"threads must be >= 1, got {threads}")
    if fmt == "pte":
        from export.runtime_pte import PteRuntime

        return PteRuntime(path, threads)
    if fmt == "coreml":
        from export.runtime_coreml import CoreMLRuntime

        return CoreMLRuntime(path, threads)
    return OnnxRuntime(path, threads) if fmt == "onnx" else LiteRTRuntime(path, threads)
