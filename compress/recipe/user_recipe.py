"""The recipe check of a user's model ([model] factory = ... or onnx = ...): import and call the factory,
load its weights, read every data source, run the module once on real rows; all before any work starts.
Every problem is one RecipeError naming the field."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.specs import TensorSpec
from pocketfleet import PocketfleetError

from .errors import RecipeError

if TYPE_CHECKING:
    from .schema import DataSource, DataSpec, ModelSpec, Recipe


@dataclass
class UserCheck:
    """What the check built: the data spec, the model (a LoadedModel with a UserWorkload; for an ONNX model
    an OnnxModel) and the rows of every data source."""

    data_spec: DataSpec
    model: Any
    onnx: Path | None = None

    def check_recipe(self, recipe: Recipe) -> None:
        if self.onnx is None:
            return
        for step in recipe.steps:
            if step.kind == "model":
                raise RecipeError(
                    f"a {step.type} step changes a PyTorch module; model.onnx gives only an ONNX file "
                    "(use model.factory for prune / finetune / distill)",
                    f"{step.ctx.path}.type",
                )
            raise RecipeError(
                f"a {step.type} step on an onnx model is not supported by recipes yet; quantize the file with "
                "compress.quantize or package it with `pocketfleet export model.onnx`",
                f"{step.ctx.path}.type",
            )
        for i, target in enumerate(recipe.targets):
            if (target.format, target.dtype) != ("onnx", "fp32"):
                raise RecipeError(
                    f"an onnx model is packaged as onnx/fp32 (got {target.label}); converting it to another "
                    "format needs the PyTorch module (model.factory)",
                    f"targets[{i}]",
                )


def input_specs(model: ModelSpec) -> list[TensorSpec]:
    from .user import InputSpecError, input_spec

    specs = []
    for name, entry in model.inputs.items():
        path = f"model.inputs.{name}"
        if not isinstance(entry, dict):
            raise RecipeError('expected a table such as { shape = [1, 3, 32, 32], dtype = "float32" }', path)
        unknown = sorted(set(entry) - {"shape", "dtype"})
        if unknown:
            raise RecipeError(f"unknown key {unknown[0]!r}; an input has shape and dtype", path)
        if "shape" not in entry:
            raise RecipeError("missing shape (a list of integers, the first the batch size)", f"{path}.shape")
        try:
            specs.append(input_spec(name, entry["shape"], str(entry.get("dtype", "float32")), path))
        except InputSpecError as exc:
            raise RecipeError(str(exc).removeprefix(f"{path}: "), path) from None
    return specs


def load_source(source: DataSource, specs: list[TensorSpec]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The rows of one data source (a file or an image folder); DataFileError when it cannot be read."""
    from .datafiles import load_file, load_image_folder

    if source.folder is not None:
        if len(specs) != 1:
            raise RecipeError(f"an image folder feeds a one-input model; this one takes {[s.name for s in specs]}")
        inputs, labels, _ = load_image_folder(
            Path(source.folder), specs[0], source.size or None, source.mean, source.std, source.scale
        )
        return inputs, labels
    assert source.file is not None
    return load_file(Path(source.file), specs, Path(source.labels) if source.labels else None)


def check_user_model(model: ModelSpec, table: dict[str, Any], base: Path) -> UserCheck:
    from .schema import _resolve, parse_data_sources

    data_spec = parse_data_sources(table, base)
    if model.onnx is not None:
        return _check_onnx(model, data_spec, base)
    from .user import FactoryError, WeightsError, build_module, user_model

    if model.weights is not None:
        model.weights = str(_resolve(model.weights, base))
    specs = input_specs(model)
    splits = _splits(data_spec, specs)
    try:
        module = build_module(model.factory or "", model.kwargs, None)
    except FactoryError as exc:
        raise RecipeError(str(exc), "model.factory") from None
    try:
        lm = user_model(module, model.kwargs, model.weights, specs, model.metric, splits,
                        model.name or (model.factory or "model").rpartition(":")[2],
                        model.preprocessing)
    except WeightsError as exc:
        raise RecipeError(str(exc), "model.weights") from None
    except PocketfleetError as exc:  # bad metric, output not a tensor, cannot run on the inputs
        raise RecipeError(str(exc), "model.metric" if "metric" in str(exc) else "model") from None
    lm.workload.factory = model.factory
    lm.meta["factory"] = model.factory
    return UserCheck(data_spec, lm)


def _splits(data_spec: DataSpec, specs: list[TensorSpec]) -> dict[str, Any]:
    """Rows of every given source: "calibration", "train" (finetune) and "test" (eval)."""
    splits: dict[str, Any] = {}
    for role, source in data_spec.sources():
        if source.file is None and source.folder is None:
            continue
        try:
            rows = load_source(source, specs)
        except PocketfleetError as exc:
            raise RecipeError(str(exc), f"data.{role}.{'folder' if source.folder else 'file'}") from None
        if role == "calibration" and rows[1] is not None:
            rows = (rows[0], None)
        splits[{"calibration": "calibration", "finetune": "train", "eval": "test"}[role]] = rows
    return splits


def _check_onnx(model: ModelSpec, data_spec: DataSpec, base: Path) -> UserCheck:
    from .schema import _resolve

    file = _resolve(model.onnx, base)
    if not file.is_file():
        raise RecipeError(f"no such file: {file}", "model.onnx")
    try:
        from export.runtimes import load_runtime

        runtime = load_runtime(file)
        specs = [TensorSpec(s.name, ("batch", *s.shape[1:]), s.dtype) for s in runtime.inputs]
    except Exception as exc:  # noqa: BLE001 - not an ONNX file, an op onnxruntime lacks
        raise RecipeError(f"{file} cannot be loaded by onnxruntime: {str(exc).splitlines()[0][:300]}", "model.onnx") from None
    model.onnx = str(file)
    _splits(data_spec, specs)
    return UserCheck(data_spec, None, onnx=file)
