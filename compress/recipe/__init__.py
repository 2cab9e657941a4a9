"""Compression recipes: a TOML file naming a model, data, an ordered list of steps (prune, sparsify,
finetune, distill, quantize, ... from a registry) and export targets; `run_recipe` runs it and writes
report.json and report.png. See docs/recipes.md.

    recipe = load_recipe("examples/digits-cnn-int8.toml")   # every error found here, before any work
    report = run_recipe(recipe, "out/cnn")
"""

from __future__ import annotations

from pocketfleet import lazy_exports

_EXPORTS = {
    "Recipe": "schema",
    "Target": "schema",
    "load_recipe": "schema",
    "parse_recipe": "schema",
    "RecipeError": "errors",
    "run_recipe": "runner",
    "Pipeline": "runner",
    "Step": "steps",
    "Artifact": "steps",
    "register_step": "steps",
    "step_types": "steps",
    "render": "report",
    "write_plot": "plot",
    # a user's own model (factory + safetensors weights + inputs) and data files, as recipes read them
    "user_model": "user",
    "build_module": "user",
    "load_weights": "user",
    "save_weights": "user",
    "parse_input_arg": "user",
    "UserWorkload": "user",
    "FactoryError": "user",
    "WeightsError": "user",
    "InputSpecError": "user",
    "DataFileError": "datafiles",
    "load_file": "datafiles",
    "load_image_folder": "datafiles",
    "OnnxSource": "onnx_source",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

