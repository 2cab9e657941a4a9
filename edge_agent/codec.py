"""Tensors on the wire of the local API: JSON nested lists, `.npy` (one tensor) and `.npz` (several).

Decoding never unpickles (allow_pickle=False, object dtypes refused) and checks every tensor against the
model's input specs before the runtime sees it: a 400 RequestError names the input and the problem.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from edge_agent.errors import RequestError
from export.runtimes import io_dtype
from export.specs import TensorSpec

NPY = "application/x-npy"
NPZ = "application/x-npz"
JSON = "application/json"
NPY_MAGIC = b"\x93NUMPY"
_CACHE_MAX = 256  # distinct (dtype, shape) headers remembered
_HEADS: dict[tuple[str, tuple[int, ...]], bytes] = {}
_PARSED: dict[bytes, tuple[np.dtype, tuple[int, ...], str, int]] = {}
_NPY_HEADER = re.compile(r"\{'descr': '([<>|=]?[a-zA-Z]\d*)', 'fortran_order': (True|False), 'shape': \(([0-9, ]*)\), \}\s*")


def bad(message: str, code: str = "bad_input", status: int = 400, **fields: Any) -> RequestError:
    return RequestError(status, code, message, **fields)


# ---------------------------------------------------------------------------------------------- .npy


def npy_bytes(arr: np.ndarray) -> bytes:
    """The .npy (format 1.0) encoding of a numeric array (the header is cached per dtype and shape)."""
    arr = np.asarray(arr)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    key = (arr.dtype.str, arr.shape)
    head = _HEADS.get(key)
    if head is None:
        header = f"{{'descr': {arr.dtype.str!r}, 'fortran_order': False, 'shape': {tuple(arr.shape)!r}, }}"
        pad = 63 - (10 + len(header)) % 64  # header + pad + "\n" ends on a 64-byte boundary
        text = (header + " " * pad + "\n").encode("latin1")
        head = NPY_MAGIC + b"\x01\x00" + struct.pack("<H", len(text)) + text
        if len(_HEADS) < _CACHE_MAX:
            _HEADS[key] = head
    return head + arr.tobytes()


def npy_array(data: bytes | memoryview, where: str = "body") -> np.ndarray:
    """Parse .npy bytes without copying the data (the array is read-only); numeric dtypes only."""
    buf = memoryview(data)
    if len(buf) < 12 or buf[:6] != NPY_MAGIC:
        raise bad(f"{where} is not a .npy array (bad magic)", "bad_npy")
    if buf[6] == 1:
        end = 10 + (buf[8] | buf[9] << 8)
    elif buf[6] in (2, 3):
        end = 12 + struct.unpack("<I", buf[8:12])[0]
    else:
        raise bad(f"{where}: .npy format version {buf[6]} is not supported", "bad_npy")
    head = bytes(buf[:end])
    parsed = _PARSED.get(head)
    if parsed is None:
        parsed = _parse_header(head[10 if buf[6] == 1 else 12 :].decode("latin1"), where)
        if parsed is None:
            return _npy_fallback(bytes(buf), where)
        if len(_PARSED) < _CACHE_MAX:
            _PARSED[head] = parsed
    dtype, shape, order, nbytes = parsed
    if len(buf) - end != nbytes:
        raise bad(f"{where}: .npy holds {len(buf) - end} data bytes, the header needs {nbytes}", "bad_npy")
    try:
        arr = np.ndarray(shape, dtype, buf, end, None, order)  # a read-only view of the body, no copy
    except (ValueError, TypeError) as exc:  # > 64 dimensions, or a zero-size shape too big to index
        raise bad(f"{where}: .npy shape {list(shape)[:8]} is not a valid array shape ({exc})", "bad_npy") from exc
    return arr if dtype.isnative else arr.astype(dtype.newbyteorder("="))


def _parse_header(header: str, where: str) -> tuple[np.dtype, tuple[int, ...], str, int] | None:
    m = _NPY_HEADER.fullmatch(header)
    if m is None:
        return None
    try:
        dtype = np.dtype(m.group(1))
        shape = tuple(int(d) for d in m.group(3).replace(" ", "").split(",") if d)
    except (TypeError, ValueError) as exc:
        raise bad(f"{where}: .npy header is invalid ({exc})", "bad_npy") from exc
    _check_dtype(dtype, where)
    return dtype, shape, "F" if m.group(2) == "True" else "C", math.prod(shape) * dtype.itemsize


def _npy_fallback(data: bytes, where: str) -> np.ndarray:
    try:
        arr = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError/OSError/... on junk
        raise bad(f"{where} is not a valid .npy array: {exc}", "bad_npy") from exc
    _check_dtype(arr.dtype, where)
    return arr


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise bad(f"{where}: dtype {dtype} is not a numeric tensor type", "bad_npy")


MAX_NPZ_MEMBERS = 64
NPZ_INFLATE_FACTOR = 4  # an .npz may inflate to this many times the body limit, no more


def npz_arrays(data: bytes, max_bytes: int = 32 << 20) -> dict[str, np.ndarray]:
    """Tensors of an .npz body, inflating at most `max_bytes` in all (a decompression bomb is refused).

    The sizes the zip's central directory declares are checked before anything is inflated, each member
    is then read in blocks and stopped past its declared size (a header that lies gains nothing), and
    each .npy header must agree with the bytes that follow it.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
        raise bad(f"body is not a valid .npz archive: {exc}", "bad_npz") from exc
    if len(infos) > MAX_NPZ_MEMBERS:
        raise bad(f".npz holds {len(infos)} members, more than {MAX_NPZ_MEMBERS}", "bad_npz")
    declared = sum(i.file_size for i in infos)
    if declared > max_bytes:
        raise bad(f".npz would inflate to {declared} bytes, more than the limit of {max_bytes}",
                  "inflated_too_large", 413)
    out: dict[str, np.ndarray] = {}
    total = 0
    with zf:
        for info in infos:
            if info.flag_bits & 0x1:
                raise bad(f".npz member {info.filename!r} is encrypted", "bad_npz")
            if not info.filename.endswith(".npy") or info.is_dir():
                raise bad(f".npz member {info.filename!r} is not a .npy array", "bad_npz")
            name = info.filename[:-4]
            buf = bytearray()
            try:
                with zf.open(info) as member:
                    while block := member.read(min(1 << 20, info.file_size - len(buf) + 1)):
                        buf += block
                        total += len(block)
                        if len(buf) > info.file_size or total > max_bytes:
                            raise bad(f".npz member {info.filename!r} inflates beyond its declared "
                                      f"{info.file_size} bytes", "inflated_too_large", 413)
            except RequestError:
                raise
            except (zipfile.BadZipFile, NotImplementedError, ValueError, OSError, EOFError, RuntimeError,
                    zlib.error) as exc:  # zlib.error: a damaged deflate stream
                raise bad(f".npz member {info.filename!r} cannot be read: {exc}", "bad_npz") from exc
            if name in out:
                raise bad(f".npz holds {name!r} twice", "bad_npz")
            out[name] = npy_array(bytes(buf), f"input {name!r}")
    return out


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **dict(arrays))
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- requests


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except RecursionError as exc:
        raise bad("body is not valid JSON: nested too deeply", "malformed_json") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"body is not valid JSON: {exc}", "malformed_json") from exc
    if not isinstance(doc, dict):
        raise bad('body must be a JSON object like {"inputs": {"<input name>": [[...]]}}', "malformed_json")
    return doc


def json_inputs(doc: Mapping[str, Any], specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """{"inputs": {name: nested list}} -> arrays in each input's exchange dtype (JSON has no dtypes)."""
    raw = doc.get("inputs")
    if not isinstance(raw, dict):
        raise bad('body needs "inputs": an object of input name -> nested list', "malformed_json")
    by_name = {s.name: s for s in specs}
    out = {}
    for name, value in raw.items():
        spec = by_name.get(name)
        if spec is None:
            raise bad(f"unknown input {name!r}; the model's inputs are {sorted(by_name)}", input=name)
        out[name] = _from_list(value, spec)
    return out


def _from_list(value: Any, spec: TensorSpec) -> np.ndarray:
    want = np.dtype(io_dtype(spec))
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # ragged nesting
        raise bad(f"input {spec.name!r} is not a rectangular nested list: {exc}", input=spec.name) from exc
    if arr.dtype.kind == "b" and want.kind != "b":
        raise bad(f"input {spec.name!r}: expected {want} numbers, got booleans", input=spec.name)
    if arr.dtype.kind not in "biuf":
        raise bad(f"input {spec.name!r}: expected {want} numbers, got {arr.dtype.kind!r}-kind values", input=spec.name)
    if want.kind in "iu" and arr.dtype.kind == "f" and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
        raise bad(f"input {spec.name!r}: expected integers ({want}), got non-integer numbers", input=spec.name)
    if want.kind in "iu":
        info = np.iinfo(want)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise bad(f"input {spec.name!r}: values outside the {want} range", input=spec.name)
    return arr.astype(want, copy=False)


def binary_inputs(body: bytes, content_type: str, specs: list[TensorSpec], input_name: str | None,
                  max_inflate: int = 32 << 20) -> dict[str, np.ndarray]:
    if content_type == NPZ:
        return npz_arrays(body, max_inflate)
    if input_name is None:
        if len(specs) != 1:
            raise bad(
                f"the model has inputs {[s.name for s in specs]}: send an .npz body, or name the input (?input=NAME)"
            )
        input_name = specs[0].name
    return {input_name: npy_array(body, f"input {input_name!r}")}


def check_values(inputs: Mapping[str, np.ndarray], max_batch: int) -> None:
    """Batch limit and finite values (NaN/inf in a float input is rejected, naming the input)."""
    for name, arr in inputs.items():
        if arr.ndim and arr.shape[0] > max_batch:
            raise bad(
                f"input {name!r} has a batch of {arr.shape[0]}, more than max_batch {max_batch}",
                "batch_too_large", 413, input=name,
            )
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise bad(f"input {name!r} holds NaN or infinity", input=name)


# ---------------------------------------------------------------------------------------------- responses


def json_outputs(outputs: Mapping[str, np.ndarray], model: dict[str, Any]) -> bytes:
    try:
        return json.dumps({"outputs": {k: v.tolist() for k, v in outputs.items()}, "model": model}, allow_nan=False).encode()
    except ValueError as exc:
        bad_out = [k for k, v in outputs.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
        raise RequestError(500, "non_finite_output", f"the model produced NaN or infinity in output {bad_out}") from exc
