"""Models the converters trip on, exported anyway with the same arithmetic: a Linear over a channels-last 4-D
tensor to TFLite (ConvNeXt), a model whose batch the dynamo ONNX exporter cannot keep dynamic (Swin: the
TorchScript exporter; a loop over the batch: a fixed batch, recorded), and the one-input-size error when
nothing works."""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from export import ExportError  # noqa: E402
from export.pipeline import export_model  # noqa: E402
from export.runtimes import load_runtime  # noqa: E402
from export.tflite import flat_linears  # noqa: E402


class ChannelsLastMLP(nn.Module):
    """ConvNeXt's block at its last stage: permute to [N, H, W, C] (here H = W = 1), Linear, GELU, Linear, scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)
        self.scale = nn.Parameter(torch.full((8,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).permute(0, 2, 3, 1)
        y = self.scale * self.down(nn.functional.gelu(self.up(y)))
        return y.permute(0, 3, 1, 2)


class RowLoop(nn.Module):
    """Runs at any batch in PyTorch, but its loop over the rows is unrolled at the traced batch."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.proj(x[i : i + 1]) for i in range(x.shape[0])])


class BatchOf3(nn.Module):
    """Only runs at batch 3 (a constant in reshape): no export batch (dynamic, 1, 2) traces."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).reshape(3, 4)


def _x(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _manifest(package: Path) -> dict:
    with zipfile.ZipFile(package) as z:
        return json.loads(z.read("manifest.json"))


def test_a_linear_over_a_channels_last_4d_tensor_converts_to_tflite_with_parity(tmp_path: Path):
    module = ChannelsLastMLP().eval()
    result = export_model(
        module, "tflite", "fp32", example_inputs=_x(4, 3, 1, 1), parity_inputs=_x(4, 3, 1, 1)
    )
    assert result.parity.passed
    # the converter got a copy sharing the weights; the user's module runs its own forward
    twin, x = flat_linears(module), torch.from_numpy(_x(2, 3, 1, 1))
    assert twin is not module and twin.up.weight is module.up.weight and "forward" not in vars(module.up)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), module(x))
        wide = torch.from_numpy(_x(2, 3, 2, 5, 8))  # 5-D: reshaped to 4-D around the 1x1 convolution
        torch.testing.assert_close(twin.up(wide), module.up(wide))


def test_swin_exports_to_onnx_with_a_dynamic_batch_through_the_torchscript_exporter(tmp_path: Path):
    pytest.importorskip("transformers")
    from examples.byom_zoo import ARCHS

    module, examples = ARCHS["swin"]()
    result = export_model(module, "onnx", "fp32", out=tmp_path / "swin.pfpkg", example_inputs=examples)
    assert result.parity.passed and result.fixed_batch is None
    manifest = _manifest(tmp_path / "swin.pfpkg")
    assert manifest["report"]["onnx_exporter"] == "torchscript"
    assert manifest["inputs"][0]["shape"][0] == "batch"


def test_a_module_that_only_traces_at_a_fixed_batch_exports_with_that_batch_recorded(tmp_path: Path):
    module = RowLoop().eval()
    with pytest.warns(
        UserWarning, match=r"RowLoop does not export to ONNX with a dynamic batch .*fixed batch of 1"
    ):
        result = export_model(module, "onnx", "fp32", out=tmp_path / "loop.pfpkg", example_inputs=_x(4, 8),
                              model_out=tmp_path / "loop.onnx")  # fmt: skip
    assert result.parity.passed and result.fixed_batch == 1
    manifest = _manifest(tmp_path / "loop.pfpkg")
    assert manifest["report"]["fixed_batch"] == 1 and manifest["inputs"][0]["shape"] == [1, 8]
    runtime = load_runtime(tmp_path / "loop.onnx")  # batches by the recorded batch: 5 rows in 5 runs
    rows = _x(5, 8)
    with torch.no_grad():
        want = module(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(runtime.run({"input": rows})["output"], want, rtol=1e-5, atol=1e-5)


def test_a_module_no_export_batch_traces_gives_the_one_input_size_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fixed-batch file is written, so none is announced
        with pytest.raises(ExportError, match=r"BatchOf3 only traces at one input size: it fails at the export size "
                                              r"\{'input': \[2, 8\]\}.*fixed batch of \[1, 2\] failed too"):  # fmt: skip
            export_model(BatchOf3(), "onnx", "fp32", example_inputs=_x(3, 8))
