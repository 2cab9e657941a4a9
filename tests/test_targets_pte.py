"""ExecuTorch (.pte) target: export through torch.export + XNNPACK, int8 through PT2E, parity in the
ExecuTorch runtime, signed packages the agent serves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compress.zoo import load_model_dir
from edge_agent.health import health_check
from export import (
    ExportError,
    ExportResult,
    Samples,
    check_samples,
    export_model,
    extract_package,
    generate_keys,
    verify_package,
)
from export.manifest import Manifest
from export.runtimes import RuntimeLoadError, load_runtime


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return generate_keys(tmp_path_factory.mktemp("pte-keys"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest, keys: dict):
    cache: dict[tuple[str, str], ExportResult] = {}
    out = tmp_path_factory.mktemp("pte")

    def get(workload: str, dtype: str) -> ExportResult:
        if (workload, dtype) not in cache:
            model_dir = load_model_dir(request.getfixturevalue(workload.replace("-", "_") + "_dir"))
            stem = f"{workload}-{dtype}"
            cache[workload, dtype] = export_model(
                model_dir, "pte", dtype, out=out / f"{stem}.pfpkg", version=3, key=keys["private_key"],
                model_out=out / f"{stem}.pte",
            )  # fmt: skip
        return cache[workload, dtype]

    return get


def _verified(result: ExportResult, keys: dict, tmp_path: Path) -> tuple[Manifest, Path]:
    manifest = verify_package(result.package, keys["public_key"])
    dest = tmp_path / "unpacked"
    extract_package(result.package, dest, keys["public_key"])
    return manifest, dest


def test_pte_fp32_export_matches_pytorch_in_the_executorch_runtime(exported, keys: dict, tmp_path: Path) -> None:
    result = exported("digits-cnn", "fp32")
    (logits,) = result.parity.outputs
    assert result.parity.samples >= 300 and logits.agreement == 1.0 and logits.max_abs < 1e-4
    assert result.metric["value"] == pytest.approx(result.reference_metric["value"], abs=1e-9)
    manifest, dest = _verified(result, keys, tmp_path)
    assert manifest.format == "pte" and manifest.model == "model.pte" and manifest.dtype == "fp32"
    assert manifest.report["parity"]["passed"] is True
    runtime = load_runtime(dest / manifest.model)
    assert runtime.format == "pte"
    # the names travel inside the program (pf_io constant method), the batch is fixed at 1 and stated
    assert [s.to_dict() for s in runtime.inputs] == [{"name": "image", "shape": [1, 1, 8, 8], "dtype": "float32"}]
    assert manifest.inputs == runtime.inputs and manifest.outputs == runtime.outputs
    samples = Samples.from_bytes((dest / manifest.samples["path"]).read_bytes(), manifest.samples)
    check_samples(runtime.run, samples)  # 4 rows through a batch-1 program: chunked
    served = health_check(dest, manifest)  # what the agent does before it serves a version
    assert served.runtime.format == "pte" and set(served.health) == {"logits"}


def test_pte_int8_is_quantized_smaller_and_agrees(exported, keys: dict, tmp_path: Path) -> None:
    fp32, int8 = exported("digits-cnn", "fp32"), exported("digits-cnn", "int8")
    (logits,) = int8.parity.outputs
    assert logits.agreement >= 0.97
    assert logits.max_abs > 1e-4  # really quantized, not a copy of the float program
    assert int8.size_bytes < 0.5 * fp32.size_bytes
    assert abs(int8.metric["value"] - int8.reference_metric["value"]) <= 0.02
    manifest, dest = _verified(int8, keys, tmp_path)
    assert manifest.dtype == "int8" and manifest.report["parity"]["passed"] is True


def test_pte_runtime_threads_and_batches(exported) -> None:
    import gc

    result = exported("digits-cnn", "fp32")
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    one = load_runtime(result.model_file, threads=1)
    a = one.run({"image": x})["logits"]
    assert a.shape == (5, 10)
    np.testing.assert_allclose(a[2:3], one.run({"image": x[2:3]})["logits"], atol=1e-6)
    # one XNNPACK pool per process, held by loaded methods: a second thread count is refused, not a crash
    with pytest.raises(RuntimeLoadError, match="one thread pool per process"):
        load_runtime(result.model_file, threads=2)
    del one
    gc.collect()
    two = load_runtime(result.model_file, threads=2)
    np.testing.assert_allclose(two.run({"image": x})["logits"], a, atol=1e-5)
    del two
    gc.collect()


def test_pte_bad_file_and_bad_dtype_fail_with_one_line(digits_cnn_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.pte"
    bad.write_bytes(b"not a program")
    with pytest.raises(RuntimeLoadError, match="ExecuTorch cannot load"):
        load_runtime(bad)
    with pytest.raises(ExportError, match="dtype must be one of"):
        export_model(load_model_dir(digits_cnn_dir), "pte", "fp16")


@pytest.mark.slow
def test_pte_mbnet_fp32_and_int8_parity(exported) -> None:
    fp32, int8 = exported("digits-mbnet", "fp32"), exported("digits-mbnet", "int8")
    assert fp32.parity.outputs[0].max_abs < 1e-4
    assert int8.parity.outputs[0].agreement >= 0.97
    assert int8.size_bytes < 0.5 * fp32.size_bytes


def test_pte_int8_quantizes_token_models_dynamically_and_image_models_statically() -> None:
    """A model with integer inputs (token ids) gets dynamic int8 activations (ranges per call: a choose-qparams
    op), one with float inputs static ranges from calibration (none): static ranges broke MiniLM."""
    import torch

    from export.pte import _quantized

    class Tokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc(self.emb(ids)).mean(1)

    rng = np.random.default_rng(0)
    cases = {
        "ids": (Tokens().eval(), rng.integers(0, 50, (8, 6)).astype(np.int64)),
        "x": (torch.nn.Sequential(torch.nn.Linear(16, 4)).eval(), rng.standard_normal((8, 16)).astype(np.float32)),
    }
    dynamic = {}
    for name, (module, rows) in cases.items():
        program = torch.export.export(module, (torch.from_numpy(rows[:1]),))
        graph = _quantized(program, [name], {name: rows}).graph
        dynamic[name] = any("choose_qparams" in str(n.target) for n in graph.nodes)
    assert dynamic == {"ids": True, "x": False}
