"""PyTorch -> Core ML (`.mlpackage`, ML program) through torch.export and coremltools; compressed weights
through `coremltools.optimize.coreml`; a deterministic zip of the package directory; what can be checked
on a host that cannot run Core ML.

    export_coreml(module, inputs, outputs, (x,), "model.mlpackage", dtype="fp16")
    zip_mlpackage("model.mlpackage", "model.mlpackage.zip")
    inspect_mlpackage("model.mlpackage.zip")          # ops, weight bytes, compression against fp32

dtypes: `fp32` and `fp16` (compute precision of the ML program), `int8` (fp32 program, every conv/linear
weight linearly quantized to int8, symmetric per output channel: `linear_quantize_weights`) and `pal4`
(fp32 program, weights palettized to a 16-entry k-means lookup table per tensor, 4-bit indices:
`palettize_weights`). Activations stay float in all of them (Core ML's weight compression).

Prediction needs macOS: on Linux `coremltools` converts and reads the program but cannot run it, so the
numeric parity of a Core ML export is recorded as not run (never estimated). `inspect_mlpackage` checks
what the host can: the program loads as a spec, its inputs/outputs, the op histogram (the constexpr
dequantize / lookup-table ops of the compressed variants), weight bytes and the compression against fp32.
"""

from __future__ import annotations

import os
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export._quiet import quiet
from export.errors import ExportError
from export.mlpackage import NOT_RUN, can_predict, unzip_mlpackage, zip_mlpackage
from export.specs import TensorSpec

__all__ = ["NOT_RUN", "can_predict", "export_coreml", "inspect_mlpackage", "unzip_mlpackage", "zip_mlpackage"]

if TYPE_CHECKING:
    import torch

DTYPES = ("fp32", "fp16", "int8", "pal4")
MINIMUM_TARGET = "iOS17"  # iPhone 15 ships with iOS 17
# op types the compressed variants must contain (the weights are decompressed by these at load time)
COMPRESSION_OPS = {
    "int8": ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"),
    "pal4": ("constexpr_lut_to_dense",),
}
# weight bytes / fp32 weight bytes a variant must reach (with headroom for per-channel scales, biases and
# the small tensors the compression passes skip)
EXPECTED_RATIO = {"fp32": 1.05, "fp16": 0.55, "int8": 0.35, "pal4": 0.25}
# the weight file pads every blob to 64 bytes behind a 64-byte header: below this many fp32 weight bytes the
# padding, not the dtype, sets the ratio (a 6-input classifier: fp16 608 vs fp32 896 bytes), so it is not checked
RATIO_MIN_FP32_BYTES = 64 << 10
FP32_WEIGHTS_KEY = "pocketfleet.fp32_weight_bytes"


def export_coreml(
    module: torch.nn.Module,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    example: Sequence[torch.Tensor],
    path: str | Path,
    dtype: str = "fp32",
) -> Path:
    """Convert `module(*example)` (fixed shapes of the example) to an ML program `.mlpackage` at `path`."""
    import torch

    path = Path(path)
    if dtype not in DTYPES:
        raise ExportError(f"Core ML export supports dtype {list(DTYPES)}, got {dtype!r}")
    with quiet(loggers=("torch", "coremltools", "root")) as log:
        try:
            import coremltools as ct
        except ImportError as exc:
            raise ExportError(f"Core ML export needs coremltools (pip install 'pocketfleet[coreml]'): {exc}") from exc
        try:
            with torch.no_grad():
                program = torch.export.export(module.eval(), tuple(example)).run_decompositions({})
            def convert(precision: Any) -> Any:
                return ct.convert(
                    program,
                    convert_to="mlprogram",
                    minimum_deployment_target=getattr(ct.target, MINIMUM_TARGET),
                    compute_precision=precision,
                    inputs=[ct.TensorType(name=s.name, shape=tuple(t.shape)) for s, t in zip(inputs, example, strict=True)],
                    outputs=[ct.TensorType(name=s.name) for s in outputs],
                )

            model = convert(ct.precision.FLOAT32)
            baseline = _saved_weight_bytes(model)  # the fp32 program's weights: what compression is judged by
            if dtype == "fp16":
                model = convert(ct.precision.FLOAT16)
            elif dtype in ("int8", "pal4"):
                model = _compress(model, dtype)
            model.user_defined_metadata[FP32_WEIGHTS_KEY] = str(baseline)
            model.user_defined_metadata["pocketfleet.dtype"] = dtype
            model.short_description = f"exported by pocketfleet (weights {dtype})"
            if path.exists():
                import shutil

                shutil.rmtree(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            model.save(str(path))
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(log.failure(f"coremltools could not convert {path.name} ({dtype})", exc)) from exc
    return path


def _saved_weight_bytes(model: Any) -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pf-coreml-") as tmp:
        model.save(f"{tmp}/fp32.mlpackage")
        return sum(p.stat().st_size for p in Path(tmp, "fp32.mlpackage", "Data").rglob("weight*.bin"))


def _compress(model: Any, dtype: str) -> Any:
    import coremltools.optimize.coreml as cto

    if dtype == "int8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=0)  # fmt: skip
        return cto.linear_quantize_weights(model, config=cto.OptimizationConfig(global_config=op))
    op = cto.OpPalettizerConfig(nbits=4, mode="kmeans", granularity="per_tensor", weight_threshold=0)
    return cto.palettize_weights(model, config=cto.OptimizationConfig(global_config=op))


def inspect_mlpackage(path: str | Path, dtype: str | None = None, fp32_weight_bytes: int | None = None) -> dict[str, Any]:
    """What a host without Core ML can verify: the spec loads as an ML program, its inputs/outputs, op
    histogram, weight bytes; with `dtype` and `fp32_weight_bytes`, `checks` says whether the compressed ops
    are present and the weight bytes reach `EXPECTED_RATIO`. Raises ExportError when the spec does not load."""
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="pf-coreml-") as tmp:
            info = inspect_mlpackage(unzip_mlpackage(path, tmp), dtype, fp32_weight_bytes)
            info["package_bytes"] = path.stat().st_size
            return info
    with quiet(loggers=("coremltools", "root")):
        import coremltools as ct

        try:
            spec = ct.utils.load_spec(str(path))
        except Exception as exc:
            raise ExportError(f"coremltools cannot load {path.name} as a model spec: {exc}") from exc
    if spec.WhichOneof("Type") != "mlProgram":
        raise ExportError(f"{path.name} is a {spec.WhichOneof('Type')} model, not an ML program")
    ops: Counter[str] = Counter()
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            ops.update(op.type for op in block.operations)
    weights = sum(p.stat().st_size for p in (path / "Data").rglob("weight*.bin")) if path.is_dir() else 0
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    info: dict[str, Any] = {
        "spec_version": int(spec.specificationVersion),
        "type": "mlProgram",
        "inputs": [_feature(f) for f in spec.description.input],
        "outputs": [_feature(f) for f in spec.description.output],
        "ops": dict(sorted(ops.items())),
        "weight_bytes": weights,
        "package_bytes": total,
        "predict": "available" if can_predict() else NOT_RUN,
    }
    meta = dict(spec.description.metadata.userDefined)
    if fp32_weight_bytes is None and meta.get(FP32_WEIGHTS_KEY, "").isdigit():
        fp32_weight_bytes = int(meta[FP32_WEIGHTS_KEY])
    dtype = dtype or meta.get("pocketfleet.dtype")
    if fp32_weight_bytes:
        info["fp32_weight_bytes"] = fp32_weight_bytes
        info["compression_ratio"] = round(weights / fp32_weight_bytes, 4)
    if dtype is not None:
        checks = {}
        if dtype in COMPRESSION_OPS:
            checks["compression_ops"] = any(ops.get(op, 0) > 0 for op in COMPRESSION_OPS[dtype])
        if fp32_weight_bytes and fp32_weight_bytes >= RATIO_MIN_FP32_BYTES:
            checks["ratio"] = weights <= EXPECTED_RATIO[dtype] * fp32_weight_bytes
        info["checks"] = checks
    return info


def _feature(f: Any) -> dict[str, Any]:
    arr = f.type.multiArrayType
    names = {65568: "float32", 65552: "float16", 131104: "int32", 65600: "float64"}
    return {"name": f.name, "shape": [int(d) for d in arr.shape], "dtype": names.get(int(arr.dataType), str(arr.dataType))}


def dir_size(path: str | Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
