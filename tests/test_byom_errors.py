"""Bring your own model: every mistake a user can make with their own module or data gives one message
that says what to change (the op and the module path, the input and the dimension, the row with NaN),
never a traceback from deep inside torch.export, litert-torch or onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import compress  # noqa: E402
from compress import QuantConfig  # noqa: E402
from compress.distill import DistillError  # noqa: E402
from compress.quantize import CalibrationDataError, QuantizeError  # noqa: E402
from export import ExportError  # noqa: E402
from export.pipeline import convert  # noqa: E402

ONNX = QuantConfig(formats=["onnx"])


class Eig(nn.Module):
    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvals(y @ y.T).real


class NoOnnxOp(nn.Module):
    """A linear layer, then a submodule calling an op no converter handles."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)
        self.head = Eig()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(x))


class FixedBatch(nn.Module):
    """Only runs at the batch size it was written for (a constant in reshape)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).reshape(2, 4)


class FixedBatch3d(FixedBatch):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).reshape(2, 2, 2)


class TextOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        return self.proj(x), "done"


class OnlyText(TextOut):
    def forward(self, x: torch.Tensor) -> str:  # type: ignore[override]
        return "done"


def _x(n: int = 16) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)


def test_an_op_the_onnx_exporter_cannot_handle_names_the_op_and_the_module_path(tmp_path: Path):
    with pytest.raises(QuantizeError, match=r"cannot convert op aten\.linalg_eig \(called in head \(Eig\)\) of NoOnnxOp"):
        compress.quantize(NoOnnxOp(), ONNX, _x(), out_dir=tmp_path, latency_runs=0)


def test_an_op_the_tflite_converter_cannot_handle_names_the_op_and_the_module_path(tmp_path: Path):
    with pytest.raises(ExportError, match=r"litert-torch \(TFLite\) cannot convert op aten\.linalg_eig \(called in head \(Eig\)\)"):
        convert(NoOnnxOp(), "tflite", "fp32", tmp_path / "m.tflite", example_inputs=_x(2))


def test_a_model_that_only_traces_at_one_input_size_says_which_dimension(tmp_path: Path):
    with pytest.raises(QuantizeError, match=r"FixedBatch only traces at one input size: .*dimension 0 of input 'input' to 2"):
        compress.quantize(FixedBatch(), ONNX, _x(), out_dir=tmp_path, latency_runs=0)
    with pytest.raises(ExportError, match=r"FixedBatch only traces at one input size: it fails at the export size \{'input': \[1, 8\]\}"):
        convert(FixedBatch(), "tflite", "fp32", tmp_path / "m.tflite", example_inputs=_x(2))


def test_an_output_that_is_not_a_tensor_is_named(tmp_path: Path):
    with pytest.raises(QuantizeError, match=r"TextOut: output 1 is a str, not a tensor"):
        compress.quantize(TextOut(), ONNX, _x(), out_dir=tmp_path, latency_runs=0)


@pytest.mark.parametrize(
    ("calib", "pattern"),
    [
        (np.full((4, 8), np.nan, np.float32), r"NaN/inf value\(s\), first in row 0"),
        (_x()[:, :6], r"'input' has shape \[16, 6\]; expected \['batch', 8\] \(dimension 1 is 6, not 8\)"),
        (_x().reshape(16, 2, 4), r"'input' has shape \[16, 2, 4\]; expected 2 dimensions"),
        (np.array([["a"] * 8] * 4), r"dtype <U1; expected a numeric array"),
        ([], r"empty"),
    ],
)
def test_bad_calibration_data_for_a_user_module_is_named(tmp_path: Path, calib: object, pattern: str):
    model = nn.Linear(8, 3)
    with pytest.raises(CalibrationDataError, match=pattern):
        compress.quantize(model, ONNX, calib, out_dir=tmp_path, latency_runs=0, example_inputs=torch.randn(2, 8))


def test_nan_in_a_dataloader_batch_is_found(tmp_path: Path):
    x = torch.randn(40, 8)
    x[33, 2] = float("nan")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(40)), batch_size=16)
    with pytest.raises(CalibrationDataError, match=r"1 NaN/inf value\(s\), first in row 33"):
        compress.quantize(nn.Linear(8, 3), ONNX, loader, out_dir=tmp_path, latency_runs=0)


def test_no_calibration_data_for_a_module_and_bad_model_or_metric(tmp_path: Path):
    with pytest.raises(CalibrationDataError, match=r"Linear: give calibration data"):
        compress.quantize(nn.Linear(8, 3), ONNX, None, out_dir=tmp_path)
    with pytest.raises(QuantizeError, match=r"quantize takes a torch.nn.Module, a path to an .onnx file"):
        compress.quantize(object(), ONNX, _x(), out_dir=tmp_path)
    with pytest.raises(QuantizeError, match=r"unknown metric 'f1'"):
        compress.quantize(nn.Linear(8, 3), ONNX, _x(), out_dir=tmp_path, eval_data=(_x(), np.zeros(16)), metric="f1")
    with pytest.raises(CalibrationDataError, match=r"eval_data inputs and labels disagree on the number of rows: \[10, 16\]"):
        compress.quantize(nn.Linear(8, 3), ONNX, _x(), out_dir=tmp_path, eval_data=(_x(), np.zeros(10)))


def test_onnx_input_errors(tmp_path: Path):
    path = convert(nn.Linear(8, 3), "onnx", "fp32", tmp_path / "lin.onnx", example_inputs=_x(2))
    with pytest.raises(QuantizeError, match=r"lin.onnx: an ONNX input makes formats \['onnx'\] only, not \['tflite'\]"):
        compress.quantize(str(path), QuantConfig(formats=["tflite"]), _x(), out_dir=tmp_path / "q")
    with pytest.raises(QuantizeError, match=r"mode 'qat' trains a PyTorch module"):
        compress.quantize(path, QuantConfig(mode="qat"), _x(), out_dir=tmp_path / "q")
    with pytest.raises(QuantizeError, match=r"missing.onnx: no such ONNX file"):
        compress.quantize(tmp_path / "missing.onnx", ONNX, _x(), out_dir=tmp_path / "q")
    with pytest.raises(CalibrationDataError, match=r"'input' has shape \[16, 5\]"):
        compress.quantize(path, ONNX, _x()[:, :5], out_dir=tmp_path / "q")
    with pytest.raises(CalibrationDataError, match=r"unknown input 'pixels'; the model takes \['input'\]"):
        compress.quantize(path, ONNX, {"pixels": _x()}, out_dir=tmp_path / "q")


def test_an_onnx_file_with_a_fixed_batch_is_made_batch_free_or_refused(tmp_path: Path):
    fixed = convert(nn.Linear(8, 3), "onnx", "fp32", tmp_path / "fixed.onnx", example_inputs=_x(2), dynamic_axes={})
    result = compress.quantize(fixed, QuantConfig(mode="dynamic", formats=["onnx"]), _x(), out_dir=tmp_path / "ok",
                               latency_runs=0)  # fmt: skip
    assert result.artifacts[0].metric["n"] == 16
    only_two = convert(FixedBatch3d(), "onnx", "fp32", tmp_path / "two.onnx", example_inputs=_x(2), dynamic_axes={})
    with pytest.raises(QuantizeError, match=r"two.onnx has a fixed batch size of 2 on input 'input' and does not run at another"):
        compress.quantize(only_two, ONNX, _x(), out_dir=tmp_path / "q")


def test_distill_data_errors():
    student, teacher = nn.Linear(8, 3), nn.Linear(8, 3)
    with pytest.raises(DistillError, match=r"data must be \(inputs, labels\) or an iterable"):
        compress.distill(student, teacher, compress.DistillConfig(epochs=1), 42, progress=False)
    with pytest.raises(DistillError, match=r"eval_data has no labels and there is no teacher"):
        compress.distill(student, None, compress.DistillConfig(epochs=1), (_x(), np.zeros(16, np.int64)),
                         eval_data=(_x(), None), progress=False)  # fmt: skip
    with pytest.raises(DistillError, match=r"returns a str, not a tensor"):
        compress.distill(OnlyText(), teacher, compress.DistillConfig(epochs=1), (_x(), None), progress=False)


def test_first_tensor_of_every_output_shape_and_none_for_a_non_tensor() -> None:
    import torch
    from transformers.modeling_outputs import SequenceClassifierOutput

    from export.source import first_tensor

    t = torch.ones(2, 3)
    for out in (t, (t, t * 2), [t], {"logits": t, "other": t * 2}, SequenceClassifierOutput(logits=t)):
        assert first_tensor(out) is t
    for bad in ("text", ("text", t), (), {"k": 1}, None):
        assert first_tensor(bad) is None
