"""The recipe file: TOML -> a validated `Recipe`, or one RecipeError naming the file and the field.

Everything a run needs is checked here, before any work starts: unknown keys at every level, types and
ranges, the model (zoo name or model directory), data files, step types and their options, devices,
signing keys, and whether the steps can produce every target's format and dtype. See docs/recipes.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from export.pipeline import FORMAT_DTYPES, FORMATS
from pocketfleet.config import ConfigError, check_keys, check_type, load_toml, parse_config, require_table

from .errors import RecipeError
from .steps.base import Step, StepContext, get_step

QUANTIZE_FORMATS = ("onnx", "tflite")  # int8 / fp16 of these come from a quantize step; pte and coreml make
# their own at export (PT2E int8; Core ML fp16, int8 weights and 4-bit palettization)
DTYPES = {f: (*dtypes, "int8") if f in QUANTIZE_FORMATS else dtypes for f, dtypes in FORMAT_DTYPES.items()}
SPLITS = ("train", "val", "test")
TOP_LEVEL = ("name", "description", "model", "data", "run", "steps", "targets")


@dataclass
class ModelSpec:
    """The model a recipe starts from: a zoo workload made on the fly (`zoo`), a model dir (`path`), the
    user's own module (`factory = "package.module:callable"` with `kwargs` and a `.safetensors` `weights`
    file) or an existing ONNX file (`onnx`). A user's model names its `inputs` ({name: {shape, dtype}}; from
    the graph for ONNX) and its `metric` ("top1", "cosine", "mse" or "module:function")."""

    zoo: str | None = None
    path: str | None = None
    factory: str | None = None
    onnx: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    metric: str | None = None
    name: str | None = None
    preprocessing: str = ""
    seed: int = 0

    def validate(self) -> ModelSpec:
        given = [k for k in ("zoo", "path", "factory", "onnx") if getattr(self, k) is not None]
        if len(given) != 1:
            raise RecipeError(
                'give exactly one of zoo = "<workload>", path = "<model dir>", factory = "package.module:callable" '
                f'or onnx = "model.onnx"{" (got " + ", ".join(given) + ")" if given else ""}'
            )
        if self.seed < 0:
            raise RecipeError(f"ModelSpec.seed must be an integer >= 0, got {self.seed}")
        user_only = [k for k in ("weights", "metric") if getattr(self, k) is not None]
        user_only += [k for k in ("kwargs", "inputs") if getattr(self, k)]
        if not self.is_user and user_only:
            raise RecipeError(f"{user_only[0]} applies to a factory or onnx model, not to a zoo or path model")
        if self.onnx is not None and (self.kwargs or self.weights is not None):
            raise RecipeError("kwargs and weights apply to a factory model; an onnx model carries its weights")
        if self.factory is not None and not self.inputs:
            raise RecipeError(
                "a factory model needs [model.inputs], e.g. image = { shape = [1, 3, 32, 32], dtype = \"float32\" }"
            )
        return self

    @property
    def is_user(self) -> bool:
        return self.factory is not None or self.onnx is not None


@dataclass
class DataSource:
    """Rows for calibration or fine-tuning: `samples` rows (0 = all) of a workload split, or a .npz file
    with one array per model input (and `labels` for fine-tuning)."""

    split: str = "train"
    samples: int = 0
    file: str | None = None
    labels: str | None = None
    folder: str | None = None
    size: list[int] = field(default_factory=list)
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    scale: float = 1.0 / 255.0

    def validate(self) -> DataSource:
        if self.file is not None and self.folder is not None:
            raise RecipeError("give file (.npz / .npy) or folder (images), not both")
        if self.labels is not None and (self.file is None or not self.file.endswith(".npy")):
            raise RecipeError("labels names an .npy of labels for an .npy file; an .npz carries a 'labels' array")
        if self.split not in SPLITS:
            raise RecipeError(f"DataSource.split must be one of {list(SPLITS)}, got {self.split!r}")
        if self.samples < 0:
            raise RecipeError(
                f"DataSource.samples must be an integer >= 0 (0 = all rows), got {self.samples}"
            )
        return self


@dataclass
class DataSpec:
    calibration: DataSource = field(default_factory=lambda: DataSource(samples=256))
    finetune: DataSource = field(default_factory=DataSource)
    eval: DataSource = field(default_factory=DataSource)
    seed: int = 0

    def sources(self) -> list[tuple[str, DataSource]]:
        return [("calibration", self.calibration), ("finetune", self.finetune), ("eval", self.eval)]


@dataclass
class RunSettings:
    """How the run measures: threads for evaluation and latency, and how long each latency is timed."""

    threads: int = 1
    latency_seconds: float = 1.0
    latency_runs: int = 20

    def validate(self) -> RunSettings:
        if self.threads < 1:
            raise RecipeError(f"RunSettings.threads must be an integer >= 1, got {self.threads}")
        if not 0.0 <= self.latency_seconds <= 600.0:
            raise RecipeError(f"RunSettings.latency_seconds must be in [0, 600], got {self.latency_seconds}")
        if self.latency_runs < 1:
            raise RecipeError(f"RunSettings.latency_runs must be an integer >= 1, got {self.latency_runs}")
        return self


@dataclass
class Target:
    """One deployable artifact: format and dtype, optional device profile, package name/version/key."""

    format: str
    dtype: str = "fp32"
    device: str | None = None
    name: str | None = None
    version: int = 1
    key: str | None = None

    def validate(self) -> Target:
        if self.format not in FORMATS:
            raise RecipeError(f"Target.format must be one of {list(FORMATS)}, got {self.format!r}")
        if self.dtype not in DTYPES[self.format]:
            raise RecipeError(f"Target.dtype: {self.format} targets take one of {list(DTYPES[self.format])}, "
                              f"got {self.dtype!r}")  # fmt: skip
        if self.version < 1:
            raise RecipeError(f"Target.version must be an integer >= 1, got {self.version}")
        return self

    @property
    def label(self) -> str:
        return f"{self.format}/{self.dtype}"


@dataclass
class Recipe:
    file: Path
    name: str
    description: str
    model: ModelSpec
    workload: str
    data: DataSpec
    run: RunSettings
    steps: list[Step]
    targets: list[Target]
    user: Any = None  # a factory model: its LoadedModel (module, UserWorkload with the data), built by the check

    @property
    def model_steps(self) -> list[Step]:
        return [s for s in self.steps if s.kind == "model"]

    @property
    def export_steps(self) -> list[Step]:
        return [s for s in self.steps if s.kind == "export"]

    def producer(self, index: int) -> Step | None:
        """The export step that makes targets[index] (None: a plain fp32/fp16 export)."""
        return next((s for s in self.export_steps if s.claims(self.targets[index])), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": str(self.file),
            "name": self.name,
            "description": self.description,
            "model": asdict(self.model),
            "workload": self.workload,
            "data": asdict(self.data),
            "run": asdict(self.run),
            "steps": [s.to_dict() for s in self.steps],
            "targets": [asdict(t) for t in self.targets],
        }


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; RecipeError (naming the file and the field) when it is wrong."""
    file = Path(path)
    return parse_recipe(load_toml(file, RecipeError), file)


def parse_recipe(data: dict[str, Any], file: str | Path = "<recipe>") -> Recipe:
    """Validate an already-parsed TOML document (relative paths resolve against `file`'s directory)."""
    file = Path(file)
    try:
        return _parse(data, file)
    except ConfigError as exc:
        raise RecipeError(exc.problem, exc.path, file) from None


def _parse(data: dict[str, Any], file: Path) -> Recipe:
    base = file.parent
    check_keys(data, TOP_LEVEL, "")
    if "model" not in data:
        raise _missing("model")
    model, _ = parse_config(ModelSpec, require_table(data["model"], "model"), "model")
    data_table = require_table(data.get("data", {}), "data")
    user = None
    if model.is_user:
        from .user_recipe import check_user_model

        user = check_user_model(model, data_table, base)
        data_spec = user.data_spec
        wl = user.model.workload if user.model is not None else None  # an onnx model has no workload
        workload = wl.name if wl is not None else (model.name or Path(model.onnx or "model").stem)
    else:
        workload = _check_model(model, base)
        wl = _workload(workload)
        data_spec = _parse_data(data_table, base, wl)
    name = check_type(data.get("name", workload), str, "name")
    description = check_type(data.get("description", ""), str, "description")
    run, _ = parse_config(RunSettings, require_table(data.get("run", {}), "run"), "run")
    steps = _parse_steps(data.get("steps", []), base, workload, wl, data_spec)
    if "targets" not in data:
        raise _missing("targets")
    targets = _parse_targets(data["targets"], base, name)
    recipe = Recipe(file, name, description, model, workload, data_spec, run, steps, targets, user)
    _check_order(recipe)
    for step in recipe.steps:
        step.check_recipe(recipe)
    _check_targets(recipe)
    if user is not None:
        user.check_recipe(recipe)
    return recipe


def _missing(key: str) -> RecipeError:
    hint = {
        "model": 'a [model] table with zoo = "<workload>" or path = "<model dir>"',
        "targets": 'at least one [[targets]] table with format = "onnx" | "tflite" | "pte" | "coreml"',
    }[key]
    return RecipeError(f"missing; the recipe needs {hint}", key)


def _check_model(model: ModelSpec, base: Path) -> str:
    """The workload name of the recipe's model (no model is loaded or made here)."""
    from pocketfleet import PocketfleetError

    if model.zoo is not None:
        from compress.zoo import get_workload

        try:
            get_workload(model.zoo)
        except PocketfleetError as exc:
            raise RecipeError(str(exc), "model.zoo") from None
        return model.zoo
    from compress.zoo import read_meta

    resolved = _resolve(model.path, base)
    if not resolved.is_dir():
        raise RecipeError(f"no model directory at {resolved}", "model.path")
    try:
        meta = read_meta(resolved)
    except PocketfleetError as exc:
        raise RecipeError(str(exc), "model.path") from None
    model.path = str(resolved)
    return str(meta["workload"])


def _workload(name: str) -> Any:
    from compress.zoo import get_workload

    return get_workload(name)


def _resolve(path: str | None, base: Path) -> Path:
    p = Path(path or "").expanduser()
    return p if p.is_absolute() else base / p


def parse_data_sources(table: dict[str, Any], base: Path) -> DataSpec:
    """The [data] table's sources (paths resolved against the recipe's folder; files are not read here)."""
    check_keys(table, ("calibration", "finetune", "eval", "seed"), "data")
    spec = DataSpec(seed=check_type(table.get("seed", 0), int, "data.seed"))
    for role, default_samples in (("calibration", 256), ("finetune", 0), ("eval", 0)):
        path = f"data.{role}"
        sub = {"samples": default_samples, **require_table(table.get(role, {}), path)}
        source, _ = parse_config(DataSource, sub, path)
        for key in ("file", "labels", "folder"):
            if getattr(source, key) is not None:
                setattr(source, key, str(_resolve(getattr(source, key), base)))
        setattr(spec, role, source)
    return spec


def _parse_data(table: dict[str, Any], base: Path, wl: Any) -> DataSpec:
    spec = parse_data_sources(table, base)
    if "eval" in table:
        raise RecipeError(
            "[data.eval] applies to a factory or onnx model; a zoo model is scored on its workload's test split",
            "data.eval",
        )
    for role, source in spec.sources():
        path = f"data.{role}"
        if source.folder is not None or source.labels is not None:
            raise RecipeError("a zoo model reads .npz files (folder and labels apply to a factory model)", path)
        if source.file is not None:
            _check_data_file(Path(source.file), wl, role, f"{path}.file")
    return spec


def _check_data_file(file: Path, wl: Any, role: str, path: str) -> Path:
    """An .npz of plain arrays (no pickles) with one array per model input (+ `labels`), shapes checked."""
    import numpy as np

    from compress.quantize.data import check_calib_data
    from pocketfleet import PocketfleetError

    if not file.is_file():
        raise RecipeError(f"no such file: {file}", path)
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # not a zip, a pickled object array, a truncated member
        raise RecipeError(f"{file} is not a readable .npz of plain arrays ({exc})", path) from None
    labels = arrays.pop("labels", None)
    if labels is not None and role == "calibration":
        arrays["labels"] = labels  # calibration data takes model inputs only: report it as unknown
    try:
        inputs = check_calib_data(arrays, wl.inputs)
    except PocketfleetError as exc:
        raise RecipeError(f"{file}: {str(exc).replace('calibration ', '')}", path) from None
    if labels is not None and len(labels) != len(next(iter(inputs.values()))):
        raise RecipeError(f"{file}: 'labels' has {len(labels)} rows, the inputs have a different count", path)
    return file


def _parse_steps(value: Any, base: Path, workload: str, wl: Any, data: DataSpec) -> list[Step]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise RecipeError("expected an array of tables ([[steps]] entries)", "steps")
    labelled = _LabelCheck(wl, data)
    steps = []
    for i, table in enumerate(value):
        path = f"steps[{i}]"
        if "type" not in table:
            raise RecipeError('missing; every step needs type = "<step type>"', f"{path}.type")
        kind = check_type(table["type"], str, f"{path}.type")
        cls = get_step(kind, f"{path}.type")
        steps.append(cls.parse(table, StepContext(i, path, base, workload, labelled)))
    return steps


class _LabelCheck:
    """Whether the fine-tuning data carries labels (a file's `labels` array, or the workload's split);
    looked up once, and only when a step asks."""

    def __init__(self, wl: Any, data: DataSpec) -> None:
        self.wl, self.data, self.value = wl, data, None

    def __call__(self) -> bool:
        if self.value is None and self.wl is None:  # an onnx model: no model steps run on it
            self.value = False
        if self.value is None:
            source = self.data.finetune
            if source.file is not None:
                import numpy as np

                with np.load(source.file, allow_pickle=False) as npz:
                    self.value = "labels" in npz.files
            else:
                self.value = self.wl.data(source.split)[1] is not None
        return self.value


def _parse_targets(value: Any, base: Path, default_name: str) -> list[Target]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise RecipeError("expected an array of tables ([[targets]] entries)", "targets")
    if not value:
        raise RecipeError("empty; give at least one [[targets]] table", "targets")
    targets, seen = [], {}
    for i, table in enumerate(value):
        path = f"targets[{i}]"
        if "format" not in table:
            raise RecipeError(f"missing; every target needs format = {' | '.join(map(repr, FORMATS))}", f"{path}.format")
        target, _ = parse_config(Target, table, path)
        target.name = target.name or default_name
        if target.key is not None:
            target.key = str(_check_key(_resolve(target.key, base), f"{path}.key"))
        if target.device is not None:
            target.device = _check_device(target, base, path)
        ident = (target.name, target.format, target.dtype)
        if ident in seen:
            raise RecipeError(
                f"same name, format and dtype as targets[{seen[ident]}] ({target.name} {target.label}); "
                "give one of them another name",
                path,
            )
        seen[ident] = i
        targets.append(target)
    return targets


def _check_key(file: Path, path: str) -> Path:
    from export.signing import load_private_key
    from pocketfleet import PocketfleetError

    try:
        load_private_key(file)
    except PocketfleetError as exc:
        raise RecipeError(str(exc), path) from None
    return file


def _check_device(target: Target, base: Path, path: str) -> str:
    from devices.profile import load_profile, profile_names
    from pocketfleet import PocketfleetError

    name = target.device or ""
    if name == "host":
        return name  # probed when first used; the host runs every format
    if name.endswith(".toml"):
        name = str(_resolve(name, base))
    elif name not in profile_names():
        raise RecipeError(
            f"unknown device {name!r}; known devices: {', '.join(profile_names())}", f"{path}.device"
        )
    try:
        profile = load_profile(name)
    except PocketfleetError as exc:
        raise RecipeError(str(exc), f"{path}.device") from None
    if target.format not in profile.runtimes:
        raise RecipeError(
            f"device {profile.name!r} runs only {' and '.join(profile.runtimes)}, not {target.format}",
            f"{path}.format",
        )
    return name


def _check_order(recipe: Recipe) -> None:
    """Export steps come after every model step (they turn the final model into artifacts)."""
    first_export = next((s for s in recipe.steps if s.kind == "export"), None)
    if first_export is None:
        return
    for step in recipe.steps[first_export.ctx.index + 1 :]:
        if step.kind == "model":
            raise RecipeError(
                f"a {step.type} step cannot follow the {first_export.type} step {first_export.ctx.path}, which turns "
                "the final model into artifacts; move it before",
                step.ctx.path,
            )


def _check_targets(recipe: Recipe) -> None:
    for i, target in enumerate(recipe.targets):
        producers = [s for s in recipe.export_steps if s.claims(target)]
        if len(producers) > 1:
            raise RecipeError(
                f"{target.label} is produced by both {producers[0].ctx.path} and {producers[1].ctx.path}; "
                "keep one", f"targets[{i}]",
            )  # fmt: skip
        if not producers and target.dtype == "int8" and target.format in QUANTIZE_FORMATS:
            modes = [f"{s.ctx.path} makes {getattr(s.config, 'mode', '?')}" for s in recipe.export_steps]
            raise RecipeError(
                'int8 needs a [[steps]] entry with type = "quantize" and mode = "static", "dynamic" or '
                f'"qat"{" (" + "; ".join(modes) + ")" if modes else ""}',
                f"targets[{i}].dtype",
            )
