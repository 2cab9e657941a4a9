"""What export needs of a model, as a small Protocol, and the wrapper that makes any `nn.Module` one.

    src = as_source(my_module, example_inputs=torch.randn(4, 3, 32, 32))   # a plain module + its inputs
    src.input_specs    # [TensorSpec("input", ("batch", 3, 32, 32), "float32")]
    src.predict({"input": x})   # {"output": ...}: the module run in PyTorch, outputs by name

`compress.zoo.LoadedModel` (a reference workload) satisfies `ExportableModel` as it is; a user's module
becomes one through `UserModel`, which infers names, shapes and dtypes from the example inputs and one run
of the module. Without evaluation data the "metric" of a user model is its fidelity to the module itself
(top-1 agreement for [batch, classes] outputs, else cosine similarity), never skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from export.errors import ExportError
from export.evaluate import num_rows, run_batched
from export.metrics import Metric, resolve_metric
from export.specs import TensorSpec

Predict = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@runtime_checkable
class ExportableModel(Protocol):
    """A PyTorch module with named inputs/outputs, real inputs for tracing and parity, and a metric."""

    @property
    def module(self) -> Any: ...  # torch.nn.Module

    @property
    def name(self) -> str: ...

    @property
    def input_specs(self) -> Sequence[TensorSpec]: ...

    @property
    def output_specs(self) -> Sequence[TensorSpec]: ...

    @property
    def preprocessing(self) -> Any: ...

    @property
    def metric_name(self) -> str | None: ...

    @property
    def workload_name(self) -> str | None: ...

    def sample_inputs(self, n: int) -> dict[str, np.ndarray]: ...

    def eval_inputs(self) -> dict[str, np.ndarray]: ...

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def evaluate(self, predict: Predict | None = None) -> dict[str, Any]: ...


def as_source(model: Any, example_inputs: Any = None, **kwargs: Any) -> ExportableModel:
    """`model` as an ExportableModel: one already (a zoo LoadedModel), or an `nn.Module` wrapped with its
    `example_inputs` (UserModel's keyword arguments pass through)."""
    if isinstance(model, ExportableModel) and example_inputs is None:
        return model
    try:
        from torch import nn
    except ModuleNotFoundError as exc:  # pragma: no cover - a device install
        raise ExportError("exporting a module needs torch: pip install 'pocketfleet[all]'") from exc
    if isinstance(model, nn.Module):
        if example_inputs is None:
            raise ExportError(
                f"{type(model).__name__}: give example_inputs= (a tensor, an array or a tuple of them, with a "
                "batch dimension first) so the model can be traced and checked"
            )
        return UserModel.wrap(model, example_inputs, **kwargs)
    if isinstance(model, ExportableModel):
        return model
    raise ExportError(
        f"expected a torch.nn.Module (with example_inputs=...) or a loaded reference model, got "
        f"{type(model).__name__}; a model directory on disk is loaded with compress.zoo.load_model_dir(path)"
    )


def _numpy(value: Any, what: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == object or arr.ndim == 0:
        raise ExportError(f"{what} must be an array or tensor with a batch dimension, got {type(value).__name__}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ExportError(f"{what} holds NaN or infinite values")
    return np.ascontiguousarray(arr)


def named_arrays(value: Any, names: Sequence[str] | None, what: str) -> dict[str, np.ndarray]:
    """A tensor/array, a tuple/list of them or a dict name -> array as {name: ndarray} in input order."""
    if isinstance(value, Mapping):
        arrays = {str(k): _numpy(v, f"{what}[{k!r}]") for k, v in value.items()}
        if names is not None and list(names) != list(arrays):
            raise ExportError(f"{what} names {list(arrays)} but the inputs are {list(names)}")
        return arrays
    items = list(value) if isinstance(value, (tuple, list)) else [value]
    if names is None:
        names = ["input"] if len(items) == 1 else [f"input_{i}" for i in range(len(items))]
    if len(names) != len(items):
        raise ExportError(f"{what} has {len(items)} tensors but {len(names)} input names: {list(names)}")
    return {n: _numpy(v, f"{what} {n!r}") for n, v in zip(names, items, strict=True)}


def first_tensor(out: Any) -> Any | None:
    """The first output of a forward call (a tensor, a tuple / list, a dict or a transformers ModelOutput),
    or None when it is not a tensor."""
    if hasattr(out, "to_tuple") and not hasattr(out, "detach"):  # transformers ModelOutput
        out = out.to_tuple()
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        out = out[0] if out else None
    return out if hasattr(out, "detach") else None


def _flatten_outputs(out: Any, module: str) -> list[tuple[str | None, Any]]:
    """(key or None, tensor) for each output of a forward call; a non-tensor output is an ExportError."""
    if isinstance(out, Mapping):
        pairs = [(str(k), v) for k, v in out.items() if v is not None]
    elif isinstance(out, (tuple, list)):
        pairs = [(None, v) for v in out]
    else:
        pairs = [(None, out)]
    if hasattr(out, "to_tuple") and not isinstance(out, Mapping):  # transformers ModelOutput
        pairs = [(None, v) for v in out.to_tuple()]
    for i, (key, value) in enumerate(pairs):
        if not hasattr(value, "detach"):
            label = repr(key) if key is not None else str(i)
            raise ExportError(
                f"{module}: output {label} is a {type(value).__name__}, not a tensor; export needs every "
                "output to be a tensor (wrap the model to return tensors only)"
            )
    return pairs


@dataclass
class UserModel:
    """A user's `nn.Module` with its example inputs: satisfies ExportableModel.

    `dynamic_axes` maps an input name to {axis: dim name}; by default axis 0 of every input is "batch".
    `parity_inputs` (same form as the examples) are added to the rows parity is checked on. With
    `eval_data=(inputs, labels)` and a `metric` ("top1", "cosine", "mse" or a callable (outputs, labels)
    -> float), `evaluate` scores that; otherwise it scores fidelity to the module's own outputs.
    """

    module: Any
    name: str
    input_specs: list[TensorSpec]
    output_specs: list[TensorSpec]
    examples: dict[str, np.ndarray]
    parity: dict[str, np.ndarray]
    eval_data: tuple[dict[str, np.ndarray], np.ndarray] | None = None
    metric: Metric | None = None
    preprocessing: Any = ""
    workload_name: str | None = None
    output_keys: list[str | None] = field(default_factory=list)

    @classmethod
    def wrap(
        cls,
        module: Any,
        example_inputs: Any,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
        dynamic_axes: Mapping[str, Mapping[int, str] | Sequence[int]] | None = None,
        parity_inputs: Any = None,
        eval_data: Any = None,
        metric: str | Callable[..., float] | None = None,
        name: str | None = None,
        preprocessing: Any = "",
    ) -> UserModel:
        import torch

        label = type(module).__name__
        examples = named_arrays(example_inputs, input_names, "example_inputs")
        num_rows(examples)  # every input has the same batch size
        axes = _dynamic_axes(examples, dynamic_axes)
        input_specs = [
            TensorSpec(n, tuple(axes[n].get(i, d) for i, d in enumerate(a.shape)), str(a.dtype))
            for n, a in examples.items()
        ]
        module = module.eval()
        with torch.no_grad():
            try:
                out = module(*[torch.from_numpy(a) for a in examples.values()])
            except Exception as exc:  # noqa: BLE001 - the user's forward: say what was passed
                shapes = {n: list(a.shape) for n, a in examples.items()}
                raise ExportError(
                    f"{label} cannot run on example_inputs {shapes}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                ) from None
        pairs = _flatten_outputs(out, label)
        keys = [k for k, _ in pairs]
        if output_names is None:
            output_names = [k or ("output" if len(pairs) == 1 else f"output_{i}") for i, k in enumerate(keys)]
        if len(output_names) != len(pairs):
            raise ExportError(f"{label} returns {len(pairs)} outputs but {len(output_names)} output names were given")
        batch = num_rows(examples)
        output_specs = []
        for oname, (_, tensor) in zip(output_names, pairs, strict=True):
            shape = tuple(tensor.shape)
            dims = tuple("batch" if i == 0 and d == batch else int(d) for i, d in enumerate(shape))
            output_specs.append(TensorSpec(str(oname), dims, str(tensor.detach().cpu().numpy().dtype)))
        parity = named_arrays(parity_inputs, list(examples), "parity_inputs") if parity_inputs is not None else {}
        if parity:
            for n, a in parity.items():
                if a.shape[1:] != examples[n].shape[1:] or a.dtype != examples[n].dtype:
                    raise ExportError(
                        f"parity_inputs {n!r} has shape {list(a.shape)} {a.dtype}, the example "
                        f"{list(examples[n].shape)} {examples[n].dtype}"
                    )
        data = None
        if eval_data is not None:
            inputs, labels = eval_data
            data = (named_arrays(inputs, list(examples), "eval_data inputs"), np.asarray(labels))
        return cls(module, name or label.lower(), input_specs, output_specs, examples, parity, data,
                   resolve_metric(metric) if metric is not None else None, preprocessing, None, keys)

    @property
    def metric_name(self) -> str | None:
        return self.metric.name if self.metric and self.eval_data is not None else "fidelity"

    def eval_inputs(self) -> dict[str, np.ndarray]:
        if not self.parity:
            return dict(self.examples)
        return {n: np.concatenate([a, self.parity[n]]) for n, a in self.examples.items()}

    def sample_inputs(self, n: int) -> dict[str, np.ndarray]:
        """`n` rows of the example inputs (rows repeated when there are fewer)."""
        rows = self.eval_inputs()
        have = num_rows(rows)
        idx = np.arange(n) % have
        return {k: np.ascontiguousarray(v[idx]) for k, v in rows.items()}

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(inputs[s.name])) for s in self.input_specs]
        with torch.no_grad():
            out = self.module(*args)
        pairs = _flatten_outputs(out, type(self.module).__name__)
        return {s.name: t.detach().cpu().numpy() for s, (_, t) in zip(self.output_specs, pairs, strict=True)}

    def evaluate(self, predict: Predict | None = None) -> dict[str, Any]:
        """The user's metric on eval_data, else fidelity of `predict` to the module on the eval inputs."""
        predict = predict or self.predict
        if self.eval_data is not None and self.metric is not None:
            inputs, labels = self.eval_data
            outputs = run_batched(predict, inputs, 32)
            return self.metric.score(outputs[self.output_specs[0].name], labels)
        from export.metrics import fidelity

        inputs = self.eval_inputs()
        reference = run_batched(self.predict, inputs, 32)
        candidate = reference if predict is self.predict else run_batched(predict, inputs, 32)
        name = self.output_specs[0].name
        return fidelity(candidate[name], reference[name])


def _dynamic_axes(
    examples: Mapping[str, np.ndarray], given: Mapping[str, Mapping[int, str] | Sequence[int]] | None
) -> dict[str, dict[int, str]]:
    """{input: {axis: dim name}}: the given axes, or axis 0 named "batch" for every input."""
    if given is None:
        return {n: {0: "batch"} for n in examples}
    out: dict[str, dict[int, str]] = {n: {} for n in examples}
    for n, axes in given.items():
        if n not in examples:
            raise ExportError(f"dynamic_axes names input {n!r}; the inputs are {list(examples)}")
        pairs = axes.items() if isinstance(axes, Mapping) else ((a, "batch" if a == 0 else f"{n}_dim{a}") for a in axes)
        for axis, dim in pairs:
            if not 0 <= int(axis) < examples[n].ndim:
                raise ExportError(f"dynamic_axes[{n!r}]: axis {axis} is out of range for shape {list(examples[n].shape)}")
            out[n][int(axis)] = str(dim)
    return out
