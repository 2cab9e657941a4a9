"""Per-layer quantization sensitivity and the accuracy-aware choice of layers kept in float.

Both work on any quantizer through two callables: `build(only_layers=..., float_layers=...) -> path`
writes a quantized model file, `score(path) -> float` runs it in its runtime and returns the workload
metric. The sensitivity of a layer is the metric with ONLY that layer quantized; the accuracy-aware
search starts from the all-int8 model and moves layers to float in order of sensitivity until the
metric is within `max_drop` of fp32, then tries to move each of them back (least sensitive first), so
the float set it reports is the smallest it found, not just a prefix of the ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Build = Callable[..., Path]
Score = Callable[[Path], float]


@dataclass
class SensitivityTable:
    """metric[layer]: the metric with only `layer` quantized (everything else float)."""

    metric_name: str
    higher_is_better: bool
    baseline: float  # fp32
    all_int8: float  # every layer quantized
    split: str
    samples: int
    rows: list[dict[str, Any]] = field(default_factory=list)  # {"layer", "metric", "drop"}

    def drop(self, value: float) -> float:
        """How much worse than fp32 `value` is (positive = worse)."""
        return self.baseline - value if self.higher_is_better else value - self.baseline

    def within(self, value: float, max_drop: float) -> bool:
        """`value` is no more than `max_drop` worse than fp32 (a drop exactly at the budget counts)."""
        return self.drop(value) <= max_drop + 1e-9

    def ranked(self) -> list[str]:
        """Layers, most sensitive first."""
        return [r["layer"] for r in sorted(self.rows, key=lambda r: -r["drop"])]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> list[dict[str, Any]]:
        return [{"layer": r["layer"], self.metric_name: round(r["metric"], 5), "drop": round(r["drop"], 5)} for r in
                sorted(self.rows, key=lambda r: -r["drop"])]  # fmt: skip


def layer_sensitivity(
    layers: Sequence[str],
    build: Build,
    score: Score,
    baseline: float,
    metric_name: str,
    higher_is_better: bool = True,
    split: str = "val",
    samples: int = 0,
    progress: bool = False,
) -> SensitivityTable:
    """Quantize one layer at a time and score it; also scores the all-int8 model."""
    from tqdm.auto import tqdm

    table = SensitivityTable(metric_name, higher_is_better, baseline, float("nan"), split, samples)
    table.all_int8 = score(build(float_layers=()))
    for layer in tqdm(list(layers), desc="sensitivity", unit="layer", disable=not progress, leave=False):
        value = score(build(only_layers=[layer]))
        table.rows.append({"layer": layer, "metric": value, "drop": table.drop(value)})
    return table


@dataclass
class FloatChoice:
    float_layers: list[str]
    metric: float
    met: bool
    steps: list[dict[str, Any]] = field(default_factory=list)


def choose_float_layers(
    table: SensitivityTable,
    max_drop: float,
    build: Build,
    score: Score,
    keep_float: Iterable[str] = (),
) -> FloatChoice:
    """The smallest set of float layers found that keeps the metric within `max_drop` of fp32."""
    fixed = list(dict.fromkeys(keep_float))
    chosen: list[str] = []
    steps: list[dict[str, Any]] = []

    def evaluate(extra: list[str]) -> float:
        value = score(build(float_layers=fixed + extra))
        steps.append({"float_layers": list(extra), "metric": value})
        return value

    value = evaluate(chosen)
    queue = [x for x in table.ranked() if x not in fixed]
    while not table.within(value, max_drop) and queue:
        chosen.append(queue.pop(0))
        value = evaluate(chosen)
    met = table.within(value, max_drop)
    if met and len(chosen) > 1:  # try giving each back to int8, least sensitive first
        for layer in reversed(list(chosen)):
            trial = [x for x in chosen if x != layer]
            trial_value = evaluate(trial)
            if table.within(trial_value, max_drop):
                chosen, value = trial, trial_value
    return FloatChoice(fixed + chosen, value, met, steps)
