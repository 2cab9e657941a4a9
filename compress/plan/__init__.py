"""Latency-in-the-loop planning: search pruning level x float layers x format x threads, time every
candidate on its target (measured on the host, estimated by the calibrated cost model elsewhere), keep
the Pareto front of metric x latency x size and pick the smallest model meeting the budgets.
See docs/recipes.md ("latency_plan")."""

from pocketfleet.lazy import lazy_exports

_EXPORTS = {
    "PlanConfig": "config",
    "PlanError": "config",
    "Candidate": "candidates",
    "build_candidates": "candidates",
    "time_candidates": "timing",
    "pareto_front": "pareto",
    "choose": "pareto",
    "write_plan_report": "report",
    "run_plan": "search",
    "PlanResult": "search",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
