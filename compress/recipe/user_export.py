"""`pocketfleet export` for a user's model: `--factory pkg.mod:fn [--kwargs JSON] [--weights w.safetensors]
--input NAME:SHAPE[:DTYPE] ...`, or an existing `model.onnx` (packaged as is, with parity of the packaged
file against the original in onnxruntime and sample outputs)."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pocketfleet import PocketfleetError

from .user import InputSpecError, example_arrays, parse_input_arg


class ExportArgsError(PocketfleetError):
    """`pocketfleet export` arguments that do not name one model."""


def export_source(args: argparse.Namespace) -> Any:
    """The ExportableModel the arguments name: a UserModel (--factory), an OnnxSource or a model directory."""
    if args.factory is not None:
        if args.model_dir is not None:
            raise ExportArgsError(f"give a MODEL ({args.model_dir}) or --factory, not both")
        return _factory_source(args)
    if args.model_dir is None:
        raise ExportArgsError("give a MODEL (a model directory or an .onnx file) or --factory PKG.MOD:FN")
    if args.input or args.weights is not None or args.kwargs != "{}":
        raise ExportArgsError("--input, --weights and --kwargs apply to --factory models")
    path = Path(args.model_dir)
    if path.suffix == ".onnx":
        from .onnx_source import OnnxSource

        if not path.is_file():
            raise ExportArgsError(f"no such file: {path}")
        if args.format != "onnx" or args.dtype != "fp32":
            raise ExportArgsError(
                f"an existing ONNX file is packaged as onnx/fp32 (got {args.format}/{args.dtype}); int8 and fp16 "
                "come from compress.quantize, another format needs the PyTorch module (--factory)"
            )
        src = OnnxSource.load(path, name=args.name)
        if args.data:
            src = OnnxSource.load(path, rows=_rows(args.data, src.input_specs), name=args.name)
        return src
    from compress.zoo import load_model_dir

    return load_model_dir(path)


def _factory_source(args: argparse.Namespace) -> Any:
    from export.source import UserModel

    from .user import build_module

    if not args.input:
        raise InputSpecError("--factory needs the model's inputs: --input NAME:SHAPE[:DTYPE], e.g. --input image:1x3x32x32")
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as exc:
        raise ExportArgsError(f"--kwargs is not JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise ExportArgsError(f"--kwargs must be a JSON object, got {args.kwargs!r}")
    specs = [parse_input_arg(text) for text in args.input]
    module = build_module(args.factory, kwargs, args.weights)
    rows = _rows(args.data, specs) if args.data else example_arrays(specs, 4)
    return UserModel.wrap(module, rows, input_names=[s.name for s in specs],
                          name=args.name or args.factory.rpartition(":")[2])


def _rows(file: str, specs: Any) -> dict[str, np.ndarray]:
    from .datafiles import load_file

    return load_file(Path(file), list(specs))[0]


def package_onnx(src: Any, args: argparse.Namespace) -> Any:
    """Package an existing ONNX file: copied as is, parity of the copy vs the original, samples, signature."""
    from export.pipeline import package_artifact

    work = Path(tempfile.mkdtemp(prefix="pf-onnx-"))
    try:
        file = work / "model.onnx"
        shutil.copyfile(src.path, file)
        result = package_artifact(
            file, src, "onnx", "fp32", args.out, name=args.name or src.name, version=args.version, key=args.key,
            device=args.device, valid_days=args.valid_days,
        )  # fmt: skip
        result.model_file = None
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
