"""A user's own model for recipes and the CLI: `package.module:callable` (+ kwargs) that builds an
`nn.Module`, weights from a `.safetensors` file (never pickle), named inputs with shape and dtype, and the
user's data and metric. `user_model(...)` returns a `compress.zoo.LoadedModel` whose workload is a
`UserWorkload`, so every compression step and export takes it as it takes a reference model.

    lm = user_model("mypkg.nets:make_net", {"classes": 10}, "w.safetensors",
                    [TensorSpec("image", ("batch", 3, 32, 32), "float32")], metric="top1",
                    splits={"train": (x_train, y_train), "test": (x_test, y_test)})
"""

from __future__ import annotations

import copy
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compress.zoo.base import Workload, torch_predict
from export.evaluate import Predict, num_rows, run_batched
from export.metrics import Metric, fidelity, resolve_metric
from export.specs import TensorSpec
from pocketfleet import PocketfleetError

if TYPE_CHECKING:
    from torch import nn

Split = tuple[dict[str, np.ndarray], "np.ndarray | None"]
DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")


class FactoryError(PocketfleetError):
    """The model factory cannot be imported, cannot be called, or does not return an nn.Module."""


class WeightsError(PocketfleetError):
    """A weights file that cannot be read or does not fit the module (missing / unexpected keys, shapes)."""


class InputSpecError(PocketfleetError):
    """An input given as NAME:SHAPE[:DTYPE] (or a [model.inputs] entry) that cannot be read."""


def import_callable(ref: str, what: str = "factory") -> Callable[..., Any]:
    """`package.module:attribute` (dots after the colon walk attributes) as a callable."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise FactoryError(f"{what} {ref!r} must look like 'package.module:callable'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - ImportError or an error raised while importing the user's module
        raise FactoryError(
            f"{what} {ref!r} cannot be imported: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            " (is the package installed, or its folder on PYTHONPATH?)"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FactoryError(f"{what} {ref!r}: module {module_name!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FactoryError(f"{what} {ref!r} is a {type(obj).__name__}, not a callable")
    return obj


def build_module(factory: str, kwargs: Mapping[str, Any] | None = None, weights: str | Path | None = None) -> nn.Module:
    """Import and call the factory with `kwargs`, check it returns an nn.Module, load `weights` into it."""
    from torch import nn

    fn = import_callable(factory)
    kwargs = dict(kwargs or {})
    try:
        module = fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's code: say what was called and how it failed
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        raise FactoryError(f"factory {factory!r} failed when called with kwargs {kwargs}: {type(exc).__name__}: {first}") from None
    if not isinstance(module, nn.Module):
        raise FactoryError(f"factory {factory!r} returned a {type(module).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(module, weights)
    return module.eval()


def load_weights(module: nn.Module, path: str | Path, limit: int = 8) -> None:
    """Load a .safetensors state dict into `module` (strict): a WeightsError lists the missing and unexpected
    keys and the shape mismatches when the file does not fit."""
    from safetensors.torch import load_file

    file = Path(path)
    if file.suffix != ".safetensors":
        raise WeightsError(f"weights {file}: only .safetensors files are loaded (pickled .pt/.bin files never are)")
    if not file.is_file():
        raise WeightsError(f"weights {file}: no such file")
    try:
        state = load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise WeightsError(f"weights {file} is not a readable safetensors file ({exc})") from None
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(state[k].shape)} (module {list(expected[k].shape)})"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if keys:
                more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:limit])}{more}")
        raise WeightsError(f"weights {file} do not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def save_weights(module: nn.Module, path: str | Path) -> Path:
    """Write `module`'s state dict as .safetensors (shared tensors cloned; the reverse of load_weights)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(path))
    return Path(path)


_SPEC = re.compile(r"^([A-Za-z_][\w.\-]*):([^:]+)(?::([a-z0-9]+))?$")


def parse_input_arg(text: str) -> TensorSpec:
    """`NAME:SHAPE[:DTYPE]` as a TensorSpec, e.g. `image:1x3x32x32`, `ids:1,128:int64` (axis 0 is the batch)."""
    m = _SPEC.match(text.strip())
    if not m:
        raise InputSpecError(f"--input {text!r}: expected NAME:SHAPE[:DTYPE], e.g. image:1x3x32x32 or ids:1x128:int64")
    name, shape, dtype = m.group(1), m.group(2), m.group(3) or "float32"
    try:
        dims = [int(d) for d in re.split(r"[x,]", shape)]
    except ValueError:
        raise InputSpecError(f"--input {text!r}: the shape {shape!r} must be integers separated by 'x'") from None
    return input_spec(name, dims, dtype, f"--input {text!r}")


def input_spec(name: str, shape: Sequence[Any], dtype: str, where: str) -> TensorSpec:
    """A checked TensorSpec (axis 0 becomes the dynamic "batch" dimension)."""
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise InputSpecError(f"{where}: shape must be a non-empty list of integers >= 1, got {list(shape)}")
    if dtype not in DTYPES:
        raise InputSpecError(f"{where}: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return TensorSpec(name, ("batch", *[int(d) for d in shape[1:]]), dtype)


def example_arrays(specs: Sequence[TensorSpec], rows: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs of the specs' shapes: standard normal floats, integers in [0, 100), booleans."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        shape = (rows, *[int(d) if isinstance(d, int) else 16 for d in s.shape[1:]])
        if s.dtype.startswith("float"):
            out[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif s.dtype == "bool":
            out[s.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            out[s.name] = rng.integers(0, 100, shape).astype(s.dtype)
    return out


class UserWorkload(Workload):
    """The workload of a user's model: its input specs, outputs found by one run of the module, the user's
    metric, and data by split ("train" = fine-tuning rows, "val"/"test" = evaluation rows). Without labels
    the metric is fidelity (top-1 agreement or cosine) to the model as it was first built."""

    arch = "user"
    description = "a user's own model"

    def __init__(
        self,
        name: str,
        module: nn.Module,
        inputs: Sequence[TensorSpec],
        metric: str | Callable[..., float] | Metric | None = None,
        splits: Mapping[str, Split] | None = None,
        factory: str | None = None,
        kwargs: Mapping[str, Any] | None = None,
        preprocessing: str = "",
        seed: int = 0,
    ) -> None:
        self.name, self.inputs, self.preprocessing = name, list(inputs), preprocessing
        self.factory, self.kwargs, self.seed = factory, dict(kwargs or {}), seed
        self.splits: dict[str, Split] = dict(splits or {})
        self.reference = copy.deepcopy(module).eval()  # what fidelity is measured against
        self.user_metric = resolve_metric(metric) if metric is not None else None
        self.outputs = _output_specs(module, self.inputs, self._probe())
        self.metric = self.user_metric if self.user_metric is not None and self._labelled() else Metric(
            "fidelity", lambda a, b: 0.0
        )

    def _probe(self) -> dict[str, np.ndarray]:
        for split in ("test", "val", "train", "calibration"):
            if split in self.splits:
                return {k: v[:2] for k, v in self.splits[split][0].items()}
        return example_arrays(self.inputs, 2, self.seed)

    def _labelled(self) -> bool:
        return any(labels is not None for _, labels in self.splits.values())

    def default_config(self) -> dict[str, Any]:
        return dict(self.kwargs)

    def build(self, config: dict[str, Any] | None = None, pretrained: bool = True) -> nn.Module:
        if self.factory is None:
            raise FactoryError(f"{self.name}: a new model of this architecture needs a factory ('package.module:callable')")
        return build_module(self.factory, config if config is not None else self.kwargs)

    def data(self, split: str) -> Split:
        order = {"train": ("train", "test", "val", "calibration"), "val": ("val", "test", "train", "calibration"),
                 "test": ("test", "val", "train", "calibration")}
        for name in order.get(split, (split,)):
            if name in self.splits:
                return self.splits[name]
        return example_arrays(self.inputs, 64, self.seed), None

    def evaluate(self, predict: Predict, batch_size: int = 32, split: str = "test") -> dict[str, Any]:
        inputs, labels = self.data(split)
        first = self.outputs[0].name
        outputs = run_batched(predict, inputs, batch_size)[first]
        if labels is not None and self.user_metric is not None:
            return self.user_metric.score(outputs, labels)
        reference = run_batched(torch_predict(self.reference, self), inputs, batch_size)[first]
        out = fidelity(outputs, reference)
        out["of"] = out["metric"]
        out["metric"] = "fidelity"
        return out

    def make(self, out_dir: str | Path, seed: int = 0, progress: bool = True) -> Path:
        raise FactoryError(f"{self.name} is a user's model: there is no reference model to make")


def _output_specs(module: nn.Module, inputs: Sequence[TensorSpec], probe: dict[str, np.ndarray]) -> list[TensorSpec]:
    """Output names and shapes from one run of the module (a UserModel wrap: non-tensor outputs fail here)."""
    from export.source import UserModel

    src = UserModel.wrap(module, probe, input_names=[s.name for s in inputs])
    return list(src.output_specs)


def user_model(
    factory: str | nn.Module,
    kwargs: Mapping[str, Any] | None = None,
    weights: str | Path | None = None,
    inputs: Sequence[TensorSpec] = (),
    metric: str | Callable[..., float] | None = None,
    splits: Mapping[str, Split] | None = None,
    name: str | None = None,
    preprocessing: str = "",
) -> Any:
    """A LoadedModel of the user's module (built from a factory string, or given) with a UserWorkload."""
    from compress.zoo.modeldir import LoadedModel

    if isinstance(factory, str):
        module = build_module(factory, kwargs, weights)
        ref: str | None = factory
    else:
        module, ref = factory.eval(), None
        if weights is not None:
            load_weights(module, weights)
    if not inputs:
        raise InputSpecError("give the model's inputs (name, shape, dtype): [model.inputs] or --input NAME:SHAPE")
    for split, (arrays, labels) in (splits or {}).items():
        have = sorted(arrays)
        want = [s.name for s in inputs]
        if sorted(want) != have:
            raise InputSpecError(f"{split} data has inputs {have}, the model takes {want}")
        if labels is not None and len(labels) != num_rows(arrays):
            raise InputSpecError(f"{split} data: {len(labels)} labels for {num_rows(arrays)} rows")
    label = name or (ref.rpartition(":")[2] if ref else type(module).__name__.lower())
    wl = UserWorkload(label, module, inputs, metric, splits, ref, kwargs, preprocessing)
    meta = {"workload": label, "factory": ref, "kwargs": dict(kwargs or {}), "weights": str(weights) if weights else None}
    return LoadedModel(module, wl, dict(kwargs or {}), meta, Path(str(weights)) if weights else Path(label))
