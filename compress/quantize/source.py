"""What quantize needs of a model, whatever the user handed in: one `QuantModel` for a plain `nn.Module`
(with the user's example inputs, evaluation data and metric), a reference workload (`compress.zoo`), an
ExportableModel, or an existing `.onnx` file. Every later stage (calibration, the quantizers, sensitivity,
max_drop, packaging) sees only this, so there is one code path.

QuantModel satisfies export.source.ExportableModel: export.package_artifact checks parity against its
`predict` (the float model: PyTorch, or onnxruntime on the fp32 ONNX file) and records `evaluate`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError
from export.metrics import Metric, resolve_metric
from export.specs import TensorSpec

from .data import check_calib_data, collect_eval, collect_rows, infer_specs
from .errors import CalibrationDataError, QuantizeError
from .scoring import CachedPredict, Predict, Scorer

PARITY_ROWS = 64  # rows of the user's data that parity and the fidelity metric run on when there are no labels
SCORE_ROWS = 256


@dataclass
class QuantModel:
    """A model ready for quantization: a module (or an fp32 ONNX file), named inputs/outputs, the float
    reference, the rows parity runs on and the scorer the metric comes from."""

    module: Any  # torch.nn.Module, or None for an ONNX input
    name: str
    input_specs: list[TensorSpec]
    output_specs: list[TensorSpec]
    reference: Predict
    parity_rows: dict[str, np.ndarray]
    scorer: Scorer  # sensitivity, max_drop, QAT and the artifact's recorded metric (at the eval batch size)
    evaluate_fn: Callable[[Predict], dict[str, Any]] | None = None  # a workload's own evaluation
    onnx_file: Path | None = None
    preprocessing: Any = ""
    workload_name: str | None = None
    train_data: tuple[dict[str, np.ndarray], np.ndarray | None] | None = None  # QAT
    default_calib: Callable[[int], dict[str, np.ndarray]] | None = None
    path: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    # --- export.source.ExportableModel
    @property
    def metric_name(self) -> str:
        return self.scorer.metric

    def sample_inputs(self, n: int) -> dict[str, np.ndarray]:
        rows = self.parity_rows
        have = len(next(iter(rows.values())))
        idx = np.arange(n) % have
        return {k: np.ascontiguousarray(v[idx]) for k, v in rows.items()}

    def eval_inputs(self) -> dict[str, np.ndarray]:
        return dict(self.parity_rows)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.reference(inputs)

    def evaluate(self, predict: Predict | None = None) -> dict[str, Any]:
        predict = predict or self.reference
        if self.evaluate_fn is not None:
            return self.evaluate_fn(predict)
        return self.scorer.report(predict)

    # --- torch side
    def with_module(self, module: Any) -> QuantModel:
        """The same model with another (BN-folded, QAT-trained) module; the float reference is unchanged."""
        return dataclasses.replace(self, module=module)


def _torch_predict(module: Any, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> Predict:
    from export.source import _flatten_outputs

    def predict(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(rows[s.name])) for s in inputs]
        with torch.no_grad():
            out = module(*args)
        pairs = _flatten_outputs(out, type(module).__name__)
        return {s.name: t.detach().cpu().numpy() for s, (_, t) in zip(outputs, pairs, strict=True)}

    return predict


# ------------------------------------------------------------------------------------------ resolve


def _default_metric(labels: np.ndarray | None) -> Metric | None:
    """top1 for integer class labels, cosine for float targets."""
    if labels is None:
        return None
    return resolve_metric("top1" if labels.dtype.kind in "iub" else "cosine")


def _user_metric(metric: Any, labels: np.ndarray | None) -> Metric | None:
    if metric is None:
        return _default_metric(labels)
    try:
        return resolve_metric(metric)
    except ExportError as exc:
        raise QuantizeError(str(exc)) from None


def _rows(arrays: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[:n]) for k, v in arrays.items()}


def resolve(
    model: Any,
    calib_data: Any,
    *,
    example_inputs: Any = None,
    eval_data: Any = None,
    metric: Any = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Any] | None = None,
    calib_samples: int = 256,
    split: str = "val",
    samples: int = 0,
    eval_batch_size: int = 1,
    threads: int = 1,
) -> tuple[QuantModel, dict[str, np.ndarray]]:
    """(QuantModel, checked calibration rows) for any model form quantize accepts."""
    if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
        return _from_onnx(Path(model), calib_data, eval_data, metric, eval_batch_size, threads)
    if isinstance(model, (str, Path)):
        from compress.zoo import load_model_dir

        model = load_model_dir(model)
    if hasattr(model, "workload") and hasattr(model, "module") and example_inputs is None and eval_data is None:
        return _from_workload(model, calib_data, metric, calib_samples, split, samples, eval_batch_size, threads)
    return _from_module(model, calib_data, example_inputs, eval_data, metric, input_names, output_names,
                        dynamic_axes, eval_batch_size, threads)  # fmt: skip


def _from_workload(
    lm: Any, calib_data: Any, metric: Any, calib_samples: int, split: str, samples: int, batch: int, threads: int
) -> tuple[QuantModel, dict[str, np.ndarray]]:
    """A reference workload: calibration from its train split by default, scored on `split` with its
    metric, the artifact's metric from its own evaluation of the test split."""
    from compress.zoo.base import torch_predict

    wl = lm.workload
    calib = check_calib_data(calib_data if calib_data is not None else wl.calib_inputs(calib_samples), wl.inputs)
    reference = CachedPredict(torch_predict(lm.module, wl))
    inputs, labels = wl.data(split)
    n = len(next(iter(inputs.values())))
    take = min(samples, n) if samples else n
    inputs, labels = _rows(inputs, take), (labels[:take] if labels is not None else None)
    chosen = _user_metric(metric, None) if metric is not None else resolve_metric(wl.metric.name)
    # a metric without labels (cosine of embeddings) is judged against the float model's outputs
    scorer = Scorer(inputs, labels, chosen, reference, wl.outputs[0].name, batch, threads, split)
    return QuantModel(
        module=lm.module, name=wl.name, input_specs=list(wl.inputs), output_specs=list(wl.outputs),
        reference=reference, parity_rows=wl.eval_inputs(), scorer=scorer,
        evaluate_fn=lambda predict: wl.evaluate(predict, batch_size=batch, split="test"),
        preprocessing=wl.preprocessing, workload_name=wl.name, train_data=wl.data("train"),
        default_calib=wl.calib_inputs, path=str(getattr(lm, "path", wl.name)),
    ), calib  # fmt: skip


def _from_module(
    model: Any, calib_data: Any, example_inputs: Any, eval_data: Any, metric: Any,
    input_names: Sequence[str] | None, output_names: Sequence[str] | None, dynamic_axes: Mapping[str, Any] | None,
    batch: int, threads: int,
) -> tuple[QuantModel, dict[str, np.ndarray]]:  # fmt: skip
    """A user's nn.Module (or an ExportableModel such as a LoadedModel given with eval_data)."""
    from export.source import UserModel

    try:
        from torch import nn
    except ModuleNotFoundError as exc:  # pragma: no cover - a device install
        raise QuantizeError("quantizing a PyTorch module needs torch: pip install 'pocketfleet[all]'") from exc
    exportable = None
    if not isinstance(model, nn.Module):
        if hasattr(model, "module") and hasattr(model, "input_specs"):
            exportable, module = model, model.module
            input_names = input_names or [s.name for s in model.input_specs]
            output_names = output_names or [s.name for s in model.output_specs]
        else:
            raise QuantizeError(
                f"quantize takes a torch.nn.Module, a path to an .onnx file, a compress.zoo model directory "
                f"or LoadedModel; got {type(model).__name__}"
            )
    else:
        module = model
    if calib_data is None:
        if exportable is None:
            raise CalibrationDataError(
                f"{type(module).__name__}: give calibration data (calib_data=): an array, a dict name -> array, "
                "a list of batches or a DataLoader of representative inputs"
            )
        calib_data = exportable.sample_inputs(256)
    names = list(input_names) if input_names else None
    if example_inputs is not None and names is None and isinstance(example_inputs, Mapping):
        names = [str(k) for k in example_inputs]
    rows, _ = collect_rows(calib_data, names)
    names = list(rows)
    calib = check_calib_data(rows, infer_specs(rows))  # NaN, empty, rows that disagree: before any work
    examples = example_inputs if example_inputs is not None else _rows(calib, 2)
    data = collect_eval(eval_data, names) if eval_data is not None else None
    chosen = _user_metric(metric, data[1] if data is not None else None)
    if metric is not None and data is None:
        chosen = _user_metric(metric, None)
    try:
        user = UserModel.wrap(module, examples, input_names=names, output_names=output_names,
                              dynamic_axes=dynamic_axes)  # fmt: skip
    except ExportError as exc:
        raise QuantizeError(str(exc)) from None
    calib = check_calib_data(calib, user.input_specs)
    reference = CachedPredict(user.predict)
    parity = _rows(calib, PARITY_ROWS) if data is None else _rows(data[0], SCORE_ROWS)
    if data is None:  # no labels: fidelity to the float outputs on calibration rows
        score_inputs, labels = _rows(calib, SCORE_ROWS), None
    else:
        score_inputs, labels = check_calib_data(data[0], user.input_specs), data[1]
    first = user.output_specs[0].name
    scorer = Scorer(score_inputs, labels, chosen, reference, first, batch, threads)
    qm = QuantModel(
        module=module, name=getattr(exportable, "name", None) or user.name, input_specs=user.input_specs,
        output_specs=user.output_specs, reference=reference, parity_rows=parity, scorer=scorer,
        preprocessing=getattr(exportable, "preprocessing", "") or "",
        workload_name=getattr(exportable, "workload_name", None),
        train_data=(score_inputs, labels) if labels is not None else (calib, None),
        path=str(getattr(exportable, "path", "")) or type(module).__name__,
    )  # fmt: skip
    return qm, calib


def _from_onnx(
    path: Path, calib_data: Any, eval_data: Any, metric: Any, batch: int, threads: int
) -> tuple[QuantModel, dict[str, np.ndarray]]:
    """An existing fp32 ONNX file: the float reference is the file itself in onnxruntime."""
    from export.runtimes import load_runtime

    if not path.is_file():
        raise QuantizeError(f"{path}: no such ONNX file")
    original = path
    path = _batch_dynamic(path)
    try:
        runtime = load_runtime(path, format="onnx", threads=threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors: name the file
        raise QuantizeError(f"{path}: onnxruntime cannot load it: {str(exc).splitlines()[0][:300]}") from None
    specs = list(runtime.inputs)
    if calib_data is None:
        raise CalibrationDataError(
            f"{path.name}: give calibration data (calib_data=) for inputs {[s.name for s in specs]}"
        )
    rows, _ = collect_rows(calib_data, [s.name for s in specs])
    calib = check_calib_data(rows, specs)
    data = collect_eval(eval_data, [s.name for s in specs]) if eval_data is not None else None
    chosen = _user_metric(metric, data[1] if data is not None else None)
    reference = CachedPredict(runtime.run)
    first = runtime.outputs[0].name
    if data is None:
        score_inputs, labels = _rows(calib, SCORE_ROWS), None
    else:
        score_inputs, labels = check_calib_data(data[0], specs), data[1]
    parity = _rows(calib, PARITY_ROWS) if data is None else _rows(score_inputs, SCORE_ROWS)
    return QuantModel(
        module=None, name=path.stem, input_specs=specs, output_specs=list(runtime.outputs), reference=reference,
        parity_rows=parity, scorer=Scorer(score_inputs, labels, chosen, reference, first, batch, threads),
        onnx_file=path, path=str(original),
    ), calib  # fmt: skip


def _batch_dynamic(path: Path) -> Path:
    """`path`, or a copy whose fixed leading (batch) dimension is made symbolic so that parity, metrics and
    calibration can run in batches; a model that does not run at another batch size is refused."""
    import tempfile

    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf's own errors: name the file
        raise QuantizeError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0][:200]})") from None
    inits = {i.name for i in model.graph.initializer}
    fixed = [(i.name, i.type.tensor_type.shape.dim[0].dim_value) for i in model.graph.input
             if i.name not in inits and i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].dim_value > 0]  # fmt: skip
    if not fixed:
        return path
    for vi in (*model.graph.input, *model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.name not in inits and dims and dims[0].dim_value == fixed[0][1]:
            dims[0].dim_param = "batch"
    del model.graph.value_info[:]
    out = Path(tempfile.mkdtemp(prefix="pf-onnx-")) / path.name
    onnx.save(model, str(out))
    try:
        from export.runtimes import load_runtime

        rt = load_runtime(out, format="onnx")
        other = 1 if fixed[0][1] > 1 else 2
        feed = {}
        for spec in rt.inputs:
            shape = [other if i == 0 else (d if isinstance(d, int) else 1) for i, d in enumerate(spec.shape)]
            feed[spec.name] = np.zeros(shape, np.dtype(spec.dtype))
        rt.run(feed)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors
        name, size = fixed[0]
        raise QuantizeError(
            f"{path.name} has a fixed batch size of {size} on input {name!r} and does not run at another batch "
            f"size ({str(exc).splitlines()[0][:200]}); re-export it with a dynamic batch dimension"
        ) from None
    return out
