"""What sparsity is worth on disk, and whether exported weights really follow an N:M pattern.

A sparse fp32 ONNX file is exactly as large as the dense one: zeros are stored as zeros. They only pay off
when the file (or package) is compressed for transfer or storage, so sizes are reported both raw and
zstd-compressed. Runtime speed is a separate, measured question (dense CPU kernels skip no zeros).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ZSTD_LEVEL = 19


def zstd_size(path: str | Path, level: int = ZSTD_LEVEL) -> int:
    """Bytes of the file compressed with zstd at `level`."""
    import zstandard

    return len(zstandard.ZstdCompressor(level=level).compress(Path(path).read_bytes()))


def storage_sizes(path: str | Path, level: int = ZSTD_LEVEL) -> dict[str, Any]:
    """{"bytes": raw size, "zstd_bytes": compressed size, "zstd_ratio": compressed / raw}."""
    raw = Path(path).stat().st_size
    packed = zstd_size(path, level)
    return {"bytes": raw, "zstd_bytes": packed, "zstd_ratio": packed / raw if raw else 1.0}


def nm_violations(weight: np.ndarray, n: int, m: int, axis: int) -> tuple[int, int]:
    """(groups with more than n non-zeros, groups) over m consecutive entries along `axis`."""
    moved = np.moveaxis(np.asarray(weight), axis, -1)
    groups = moved.reshape(-1, m)
    return int(((groups != 0).sum(axis=1) > n).sum()), int(groups.shape[0])


def check_onnx_nm(path: str | Path, n: int = 2, m: int = 4) -> dict[str, Any]:
    """Check every Conv / Gemm / MatMul weight of an ONNX file along its reduction (input-channel) axis.

    Layers whose input width is not a multiple of m are listed as dense (the pattern cannot apply);
    `ok` is True when every other layer has at most n non-zeros in every group of m.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    weights = {t.name: t for t in model.graph.initializer}
    layers, dense = [], []
    for node in model.graph.node:
        if (
            node.op_type not in ("Conv", "Gemm", "MatMul")
            or len(node.input) < 2
            or node.input[1] not in weights
        ):
            continue
        w = numpy_helper.to_array(weights[node.input[1]])
        if node.op_type == "Conv":
            axis = 1
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 1 if trans_b else 0
        else:
            axis = w.ndim - 2  # MatMul B: [..., K, N]
        if w.ndim < 2 or w.shape[axis] % m:
            dense.append(node.input[1])
            continue
        bad, total = nm_violations(w, n, m, axis)
        layers.append({"weight": node.input[1], "op": node.op_type, "groups": total, "violations": bad})
    return {
        "pattern": f"{n}:{m}",
        "ok": bool(layers) and all(row["violations"] == 0 for row in layers),
        "layers": layers,
        "dense": dense,
    }
