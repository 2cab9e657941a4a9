"""Pruning that shrinks the exported model: structured channel / head removal over a traced dependency
graph, unstructured and N:M magnitude sparsity with schedules, per-layer sensitivity and MACs-budgeted
plans, and honest storage accounting. See docs/pruning.md."""

from pocketfleet import callable_package

from .api import PrunePlan, as_inputs, count_macs, count_params, plan_pruning, prune, recalibrate_bn
from .config import PruneConfig, SparsityConfig
from .errors import PruneError, PruneTraceError
from .graph import DependencyGraph, Group
from .sensitivity import Sensitivity, layer_sensitivity, macs_target_for_latency, plan_from_sensitivity
from .sparsity import Sparsifier, nm_mask, sparsify, sparsity_at
from .storage import check_onnx_nm, nm_violations, storage_sizes, zstd_size
from .surgery import fit_to_state_dict

__all__ = [
    "DependencyGraph",
    "Group",
    "PruneConfig",
    "PruneError",
    "PrunePlan",
    "PruneTraceError",
    "Sensitivity",
    "Sparsifier",
    "SparsityConfig",
    "as_inputs",
    "check_onnx_nm",
    "count_macs",
    "count_params",
    "fit_to_state_dict",
    "layer_sensitivity",
    "macs_target_for_latency",
    "nm_mask",
    "nm_violations",
    "plan_from_sensitivity",
    "plan_pruning",
    "prune",
    "recalibrate_bn",
    "sparsify",
    "sparsity_at",
    "storage_sizes",
    "zstd_size",
]


callable_package(__name__, prune)
