"""Typed configuration of structured pruning (`PruneConfig`) and unstructured sparsity (`SparsityConfig`).

Both load from plain dicts (a recipe step's TOML table) with `from_dict`, which names unknown or
out-of-range fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pocketfleet.config import config_from_dict

from .errors import PruneError

IMPORTANCES = ("l1", "l2", "bn_scale", "taylor", "random")
SCOPES = ("layer", "global")
SCHEDULES = ("oneshot", "iterative", "polynomial")



def check_ratio(value: Any, what: str) -> float:
    """A pruning ratio must be a number in [0, 1): 1 would leave no channels at all."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise PruneError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


@dataclass
class PruneConfig:
    """Structured (channel / head) pruning.

    ratio: fraction of the channels removed from every prunable group (a group is a set of layers whose
      channels must go together: conv -> BN -> depthwise -> conv, residual adds, concat, heads).
    ratios: per-layer overrides {module name or fnmatch pattern: ratio}; a name matches a group when it
      names any layer of the group (e.g. its first conv).
    target_macs: when set, keep this fraction of the model's MACs: the uniform ratio (or, with
      global_ranking, the global threshold) is searched for; `ratio` is then ignored.
    importance: "l1" | "l2" (group magnitude), "bn_scale" (|gamma| of the group's BatchNorms),
      "taylor" (first order |sum w * dL/dw|, needs data), "random" (a baseline).
    global_ranking: rank channels of all groups together (normalised scores) instead of per group;
      `ratio` is then the overall fraction of prunable channels removed.
    max_ratio: the most any one group may lose under global ranking or a target_macs search.
    round_to: remaining channel counts are rounded to a multiple of this (hardware-friendly widths).
    ignore: module names / patterns never pruned and never traced into (their inputs and outputs keep
      their width): use it for layers the tracer cannot follow.
    taylor_batches: how many data batches accumulate gradients for "taylor".
    recalibrate_bn: when `prune` gets data, re-estimate BatchNorm running statistics of the pruned model
      on it (pruning shifts every downstream activation distribution; this alone recovers much accuracy).
    """

    ratio: float = 0.0
    ratios: dict[str, float] = field(default_factory=dict)
    target_macs: float | None = None
    importance: str = "l2"
    global_ranking: bool = False
    max_ratio: float = 0.9
    round_to: int = 1
    ignore: list[str] = field(default_factory=list)
    taylor_batches: int = 4
    recalibrate_bn: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PruneConfig:
        return config_from_dict(cls, data, "PruneConfig", PruneError)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> PruneConfig:
        check_ratio(self.ratio, "PruneConfig.ratio")
        check_ratio(self.max_ratio, "PruneConfig.max_ratio")
        if not isinstance(self.ratios, dict):
            raise PruneError(f"PruneConfig.ratios must be a table {{layer: ratio}}, got {self.ratios!r}")
        for name, value in self.ratios.items():
            check_ratio(value, f"PruneConfig.ratios[{name!r}]")
        if self.target_macs is not None and (
            isinstance(self.target_macs, bool)
            or not isinstance(self.target_macs, (int, float))
            or not 0.0 < float(self.target_macs) <= 1.0
        ):
            raise PruneError(
                f"PruneConfig.target_macs must be a fraction in (0, 1], got {self.target_macs!r}"
            )
        if self.importance not in IMPORTANCES:
            raise PruneError(f"PruneConfig.importance must be one of {IMPORTANCES}, got {self.importance!r}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise PruneError(f"PruneConfig.round_to must be an integer >= 1, got {self.round_to!r}")
        if not isinstance(self.ignore, (list, tuple)) or not all(isinstance(i, str) for i in self.ignore):
            raise PruneError(f"PruneConfig.ignore must be a list of module names, got {self.ignore!r}")
        if not isinstance(self.taylor_batches, int) or self.taylor_batches < 1:
            raise PruneError(
                f"PruneConfig.taylor_batches must be an integer >= 1, got {self.taylor_batches!r}"
            )
        return self


@dataclass
class SparsityConfig:
    """Unstructured (element-wise) magnitude sparsity of Conv/Linear weights, or an N:M pattern.

    sparsity: final fraction of zero weights (per layer, or over all layers with scope="global").
    pattern: "N:M" (e.g. "2:4": at most N non-zeros in every M consecutive input-channel weights);
      when set it replaces `sparsity`/`scope` (layers whose input width is not a multiple of M stay dense).
    schedule: "oneshot" (all at begin_step), "iterative" (`iterations` equal increments between
      begin_step and end_step), "polynomial" (Zhu & Gupta: s_t = s_f + (s_i - s_f)(1 - progress)^power,
      masks updated every `frequency` steps).
    ignore: module names / patterns left dense; min_params: layers smaller than this stay dense.
    """

    sparsity: float = 0.5
    scope: str = "layer"
    pattern: str | None = None
    schedule: str = "oneshot"
    begin_step: int = 0
    end_step: int = 0
    frequency: int = 1
    iterations: int = 4
    initial_sparsity: float = 0.0
    power: float = 3.0
    ignore: list[str] = field(default_factory=list)
    min_params: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SparsityConfig:
        return config_from_dict(cls, data, "SparsityConfig", PruneError)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def nm(self) -> tuple[int, int] | None:
        """(N, M) of the pattern, or None."""
        if self.pattern is None:
            return None
        try:
            n, m = (int(p) for p in str(self.pattern).split(":"))
        except ValueError:
            raise PruneError(f"SparsityConfig.pattern must look like '2:4', got {self.pattern!r}") from None
        if not 0 < n < m:
            raise PruneError(f"SparsityConfig.pattern {self.pattern!r} needs 0 < N < M")
        return n, m

    def validate(self) -> SparsityConfig:
        check_ratio(self.sparsity, "SparsityConfig.sparsity")
        check_ratio(self.initial_sparsity, "SparsityConfig.initial_sparsity")
        self.nm()
        if self.scope not in SCOPES:
            raise PruneError(f"SparsityConfig.scope must be one of {SCOPES}, got {self.scope!r}")
        if self.schedule not in SCHEDULES:
            raise PruneError(f"SparsityConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("begin_step", "end_step", "min_params"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise PruneError(
                    f"SparsityConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}"
                )
        for name in ("frequency", "iterations"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise PruneError(
                    f"SparsityConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}"
                )
        if self.schedule != "oneshot" and self.end_step <= self.begin_step:
            raise PruneError(
                f"SparsityConfig: schedule {self.schedule!r} needs end_step > begin_step, "
                f"got begin_step={self.begin_step}, end_step={self.end_step}"
            )
        if self.pattern is not None and self.schedule != "oneshot":
            raise PruneError(
                f"SparsityConfig.pattern {self.pattern!r} is applied one-shot; set schedule='oneshot'"
            )
        if self.power <= 0:
            raise PruneError(f"SparsityConfig.power must be > 0, got {self.power!r}")
        return self
