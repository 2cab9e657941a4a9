"""compress: quantization, pruning, distillation and recipes, plus the reference workloads (`compress.zoo`).

This package imports without torch: public names are resolved lazily on first access.
"""

from __future__ import annotations

from pocketfleet import lazy_exports

# public name -> submodule that defines it (extend this table; keep heavy imports out of this file)
_EXPORTS = {
    "Workload": "zoo",
    "LoadedModel": "zoo",
    "list_workloads": "zoo",
    "get_workload": "zoo",
    "make_model_dir": "zoo",
    "save_model_dir": "zoo",
    "load_model_dir": "zoo",
    "PruneConfig": "prune",
    "SparsityConfig": "prune",
    "Sparsifier": "prune",
    "layer_sensitivity": "prune",
    "plan_from_sensitivity": "prune",
    "DistillConfig": "distill",
    "QuantConfig": "quantize",
    "QuantResult": "quantize",
    "quantization_sensitivity": "quantize",
    "Recipe": "recipe",
    "RecipeError": "recipe",
    "load_recipe": "recipe",
    "run_recipe": "recipe",
}
# callable subpackages: compress.prune(model, PruneConfig(...), example_inputs), compress.distill(...),
# compress.quantize(model, QuantConfig(...), calib_data)
_SUBPACKAGES = {"prune", "distill", "quantize"}

__all__ = sorted(set(_EXPORTS) | _SUBPACKAGES)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, modules=sorted(_SUBPACKAGES))

