"""Bring your own model: compress.quantize / distill / prune sensitivity on plain user modules, on model
classes of `transformers` (small configs, random init, no download) and on an existing ONNX file, with the
user's own data (arrays, dicts, DataLoaders) and metric. Every artifact runs in its real runtime and is
packaged and signed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import compress  # noqa: E402
from compress import QuantConfig  # noqa: E402
from export.package import read_manifest  # noqa: E402
from export.signing import generate_keys  # noqa: E402
from export.verify import verify_package  # noqa: E402


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return generate_keys(tmp_path_factory.mktemp("byom-keys"))


class Classifier(nn.Module):
    """A user's own small classifier (not a zoo model): conv, BN, pooling, a linear head."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))  # fmt: skip
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _images(n: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def test_plain_module_with_a_dataloader_is_quantized_judged_by_fidelity_and_signed(tmp_path: Path, keys: dict):
    torch.manual_seed(0)
    model = Classifier().eval()
    x = _images()
    y = model(x).argmax(1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    result = compress.quantize(model, QuantConfig(formats=["onnx"]), loader, out_dir=tmp_path,
                               latency_runs=2, key=keys["private_key"], device="raspberry-pi-4")  # fmt: skip
    (art,) = result.artifacts
    assert (art.format, art.dtype, art.mode) == ("onnx", "int8", "static")
    # no eval data: fidelity to the float model's own outputs, never skipped
    assert art.metric["metric"] == "agreement" and art.metric["value"] >= 0.9 and art.metric["n"] == 96
    assert result.metric["name"] == "fidelity" and result.baseline["metric"]["value"] == 1.0
    assert art.parity["outputs"][0]["min_cosine"] > 0.95
    manifest = verify_package(art.package, keys["public_key"])
    assert manifest.dtype == "int8" and manifest.device == "raspberry-pi-4"
    assert [s.name for s in manifest.inputs] == ["input"] and manifest.report["estimate"]["estimated_ms"] > 0
    assert art.details["estimate"]["device"] == "raspberry-pi-4"
    assert result.details["folded_batchnorms"], "the user's BatchNorm is folded like a zoo model's"


def test_user_metric_and_eval_data_drive_the_accuracy_aware_mode(tmp_path: Path):
    torch.manual_seed(1)
    model = Classifier().eval()
    x, x_val = _images(64, 1), _images(48, 2)
    y_val = model(x_val).argmax(1).numpy()
    calls = []

    def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
        calls.append(len(labels))
        return float((outputs.argmax(1) == labels).mean())

    cfg = QuantConfig(mode="dynamic", formats=["onnx"], max_drop=0.0)
    result = compress.quantize(model, cfg, {"input": x.numpy()}, out_dir=tmp_path, latency_runs=0,
                               eval_data=(x_val, y_val), metric=accuracy)  # fmt: skip
    (art,) = result.artifacts
    assert result.metric == {"name": "accuracy", "higher_is_better": True}
    assert art.metric["metric"] == "accuracy" and art.metric["n"] == 48
    steps = art.details["max_drop"]
    assert steps["metric_name"] == "accuracy" and steps["met"] and steps["metric"] >= steps["baseline"]
    assert result.sensitivity["onnx"].metric_name == "accuracy" and set(calls) == {48}  # one call on all rows
    table = compress.quantization_sensitivity(model, QuantConfig(mode="dynamic"), x.numpy(),
                                              eval_data=(x_val, None), metric="mse")  # vs float outputs  # fmt: skip
    assert table.metric_name == "mse" and not table.higher_is_better and table.rows


def test_transformers_bert_dynamic_int8_per_token(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)  # fmt: skip
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 120, (24, 16), generator=torch.Generator().manual_seed(0))
    calib = [{"input_ids": ids[i : i + 8], "attention_mask": torch.ones_like(ids[i : i + 8])} for i in (0, 8, 16)]
    result = compress.quantize(model, QuantConfig(mode="dynamic", formats=["onnx"]), calib, out_dir=tmp_path,
                               latency_runs=0)  # fmt: skip
    (art,) = result.artifacts
    manifest = read_manifest(art.package)
    assert [s.name for s in manifest.inputs] == ["input_ids", "attention_mask"]
    assert [s.name for s in manifest.outputs] == ["last_hidden_state", "pooler_output"]
    assert art.metric["metric"] == "cosine" and art.metric["value"] > 0.99
    assert art.size_bytes < 0.6 * result.baseline["formats"]["onnx"]["size_bytes"]


def test_transformers_resnet_static_int8_onnx_and_full_integer_tflite(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    model = transformers.ResNetModel(config).eval()  # forward(pixel_values): not our input name
    result = compress.quantize(model, QuantConfig(mode="static"), _images(32).repeat(1, 1, 2, 2), out_dir=tmp_path,
                               latency_runs=0)  # fmt: skip
    by_format = {a.format: a for a in result.artifacts}
    assert set(by_format) == {"onnx", "tflite"}
    for art in by_format.values():
        assert art.dtype == "int8" and art.metric["metric"] == "cosine" and art.metric["value"] > 0.99
        assert art.package is not None and art.package.exists()
    assert by_format["tflite"].size_bytes < result.baseline["formats"]["tflite"]["size_bytes"]


def test_an_existing_onnx_file_static_dynamic_fp16_with_parity_package_and_estimate(tmp_path: Path, keys: dict):
    from export.pipeline import convert

    torch.manual_seed(0)
    model = Classifier(4).eval()
    x = _images(64, 3).numpy()
    onnx_file = convert(model, "onnx", "fp32", tmp_path / "theirs.onnx", example_inputs=x[:2])  # "another tool"
    for mode in ("static", "dynamic", "fp16"):
        result = compress.quantize(str(onnx_file), QuantConfig(mode=mode), x, out_dir=tmp_path / mode,
                                   latency_runs=2, key=keys["private_key"], device="raspberry-pi-4")  # fmt: skip
        (art,) = result.artifacts  # ONNX in, ONNX out
        assert art.format == "onnx" and art.dtype == ("fp16" if mode == "fp16" else "int8")
        assert art.metric["value"] > 0.95 and art.parity["outputs"][0]["min_cosine"] > 0.95  # vs the fp32 ONNX
        assert verify_package(art.package, keys["public_key"]).dtype == art.dtype
        assert art.details["estimate"]["estimated_ms"] > 0 and art.latency_ms["p50"] > 0
    assert result.model == str(onnx_file)


def test_distill_with_a_dataloader_eval_data_and_metric():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    student = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(256, 10)
    y = teacher(x).argmax(1).detach()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=False)
    seen: list[float] = []
    evaluate = compress.distill.make_evaluate((x[:128], y[:128]), "top1")
    before = evaluate(student)
    compress.distill(student, teacher, compress.DistillConfig(epochs=8, lr=1e-2), loader,
                     eval_data=(x[:128], y[:128].numpy()), metric=lambda o, lab: seen.append(1) or (o.argmax(1) == lab).mean(),
                     progress=False)  # fmt: skip
    assert len(seen) == 8 and evaluate(student) > max(before, 0.7)
    fidelity = compress.distill.make_evaluate(loader, teacher=teacher)  # no metric: labels -> top1
    assert 0.7 < fidelity(student) <= 1.0


def test_prune_sensitivity_and_plan_with_the_users_data_and_metric():
    torch.manual_seed(0)
    model = Classifier().eval()
    x = _images(48, 4)
    y = model(x).argmax(1)
    sens = compress.layer_sensitivity(model, x[:2], eval_data=(x, y), metric="top1", ratios=(0.5,))
    assert sens.baseline == 1.0 and sens.metric and all(0.0 <= v[0] <= 1.0 for v in sens.metric.values())
    cfg = compress.plan_from_sensitivity(sens, model, x[:2], target_macs=0.6)
    small = compress.prune(model, cfg, x[:2])
    assert compress.prune.count_macs(small, x[:2]) <= 0.6 * compress.prune.count_macs(model, x[:2]) + 1
    mse = compress.layer_sensitivity(model, x[:2], eval_data=(x, None), metric="mse", ratios=(0.5,))
    assert mse.baseline == 0.0 and all(v[0] <= 0.0 for v in mse.metric.values())  # negated: higher is better


class TokenClassifier(nn.Module):
    """Integer token ids in (int64, as PyTorch users write them): embedding, mean pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(1))


def test_full_integer_tflite_calibrates_int64_token_ids_against_its_int32_input(tmp_path: Path):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (64, 8), generator=torch.Generator().manual_seed(1))
    result = compress.quantize(TokenClassifier().eval(), QuantConfig(formats=["tflite"], mode="static"), ids,
                               out_dir=tmp_path, latency_runs=0)  # fmt: skip
    (art,) = result.artifacts
    assert (art.format, art.dtype) == ("tflite", "int8")
    assert art.metric["metric"] == "agreement" and art.metric["value"] >= 0.8


def test_tflite_int8_with_weights_stored_after_the_flatbuffer_still_loads(tmp_path: Path):
    """ai-edge-quantizer stores weights past the flatbuffer (by offset) once they total 256 KiB; the
    compacted file must carry them, or LiteRT refuses it ("buffer specified an out of range offset")."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 640), nn.ReLU(), nn.Linear(640, 8)).eval()  # 330 KB of int8 weights
    x = torch.randn(32, 512)
    result = compress.quantize(model, QuantConfig(formats=["tflite"], mode="dynamic"), x, out_dir=tmp_path,
                               latency_runs=0)  # fmt: skip
    (art,) = result.artifacts
    data = Path(art.path).read_bytes()
    buffers = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0)).buffers
    assert all(b.offset + b.size <= len(data) for b in buffers)
    Interpreter(model_content=data).allocate_tensors()
    assert art.metric["value"] > 0.99
