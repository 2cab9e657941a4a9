"""The step registry: a step type is a class registered under its `type` name.

A step parses its TOML table (typed, with field paths) when the recipe loads, checks what it needs from
the rest of the recipe, and later runs on the pipeline state. New step types plug in with
`@register_step` and are found by the recipe parser and the runner without touching either.

Two kinds:
  - "model" steps change the PyTorch model (prune, sparsify, finetune, distill) and are measured after
    they run (metric, size, MACs, host latency of the fp32 ONNX snapshot);
  - "export" steps turn the final model into deployable artifacts for the [[targets]] they claim
    (quantize); they come after every model step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pocketfleet.config import Extra, parse_config

from ..errors import RecipeError

if TYPE_CHECKING:
    from ..runner import Pipeline
    from ..schema import Recipe, Target


@dataclass
class StepContext:
    """What a step sees of the recipe while it is parsed and checked."""

    index: int
    path: str  # "steps[3]"
    recipe_dir: Path
    workload: str  # workload name of the model
    labelled: Callable[[], bool]  # whether the fine-tuning data has labels (looked up on first call)


class Step:
    """One recipe step. Subclasses set `type`, `kind`, `config_cls` (a dataclass with `validate()`),
    optional recipe-only `extra` options and `excluded` config fields (field -> reason)."""

    type: ClassVar[str]
    kind: ClassVar[str] = "model"  # "model" | "export"
    trains: ClassVar[bool] = False  # an active sparsifier keeps its masks through this step
    config_cls: ClassVar[type]
    extra: ClassVar[Extra] = {}
    excluded: ClassVar[Mapping[str, str]] = {}

    def __init__(self, config: Any, options: dict[str, Any], ctx: StepContext) -> None:
        self.config, self.options, self.ctx = config, options, ctx

    @classmethod
    def parse(cls, table: Mapping[str, Any], ctx: StepContext) -> Step:
        config, extras = parse_config(
            cls.config_cls, table, ctx.path, cls.extra, cls.excluded, ignore=("type",)
        )
        step = cls(config, extras, ctx)
        step.check()
        return step

    def check(self) -> None:
        """Cross-checks of this step's options before any work starts (raise `self.error(...)`)."""

    def error(self, problem: str, key: str | None = None) -> RecipeError:
        return RecipeError(problem, f"{self.ctx.path}.{key}" if key else self.ctx.path)

    def to_dict(self) -> dict[str, Any]:
        config = self.config.to_dict() if hasattr(self.config, "to_dict") else dict(vars(self.config))
        return {"type": self.type, **config, **self.options}

    # --- model steps
    def run(self, pipeline: Pipeline) -> dict[str, Any]:
        """Change `pipeline.model` (a LoadedModel); return details for the report."""
        raise NotImplementedError(f"step {self.type!r} is not a model step")

    # --- export steps
    def claims(self, target: Target) -> bool:
        """Whether this export step produces `target`."""
        return False

    def export(self, pipeline: Pipeline, targets: list[tuple[int, Target]]) -> list[Artifact | Failure]:
        """An Artifact (or, when it cannot be made, e.g. parity out of bounds, a Failure) per target."""
        raise NotImplementedError(f"step {self.type!r} is not an export step")

    def check_recipe(self, recipe: Recipe) -> None:
        """Checks against the whole recipe (e.g. that a target needs this step); after all steps parse."""


@dataclass
class Artifact:
    """One deployable file made for a target, before it is timed and estimated."""

    target: int
    path: Path
    package: Path | None
    format: str
    dtype: str
    mode: str
    metric: dict[str, Any]
    parity: dict[str, Any]
    float_layers: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Failure:
    """A target whose artifact could not be made, and why."""

    target: int
    error: str


_REGISTRY: dict[str, type[Step]] = {}


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: make `cls` available as `[[steps]] type = cls.type`."""
    if cls.kind not in ("model", "export"):
        raise ValueError(f"step kind must be 'model' or 'export', got {cls.kind!r}")
    _REGISTRY[cls.type] = cls
    return cls


def step_types() -> dict[str, type[Step]]:
    """The registered step types by name (the built-in ones are loaded on first use)."""
    from . import builtin  # noqa: F401  (registers prune, sparsify, finetune, distill, quantize)

    return dict(_REGISTRY)


def get_step(name: str, path: str) -> type[Step]:
    types = step_types()
    if name not in types:
        raise RecipeError(f"unknown step type {name!r}; known types: {', '.join(sorted(types))}", path)
    return types[name]
