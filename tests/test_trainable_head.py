"""A trainable head from the normal export path: the package ships the classifier's final Linear, the
agent serves the logits from the package's head weights, and a head-only release changes what it serves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloud_sync.fl.release import head_release
from edge_agent.store import ModelStore
from edge_agent.training import HeadTrainer, LocalDataset, TrainConfig
from export import ExportError, export_model, extract_package, generate_keys


@pytest.fixture(scope="module")
def exported(digits_cnn_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from compress.zoo import load_model_dir

    d = tmp_path_factory.mktemp("head")
    keys = generate_keys(d / "keys")
    lm = load_model_dir(digits_cnn_dir)
    res = export_model(lm, format="onnx", dtype="fp32", out=d / "v1.pfpkg", name="cnn-head", version=1,
                       key=keys["private_key"], trainable_head=True)
    return {"dir": d, "keys": keys, "lm": lm, "result": res}


def test_export_declares_the_final_linear_as_the_head(exported: dict) -> None:
    import onnx

    res, lm = exported["result"], exported["lm"]
    head = res.manifest.trainable_head
    assert head["output"] == "logits" and head["features"] == "features" and head["weights"] == "head.safetensors"
    assert [la["weight"] for la in head["layers"]] == ["classifier.weight"]
    assert "head.safetensors" in res.manifest.files and res.parity.passed
    out = exported["dir"] / "x"
    extract_package(res.package, out, trust=exported["keys"]["public_key"])
    assert [o.name for o in onnx.load(str(out / res.manifest.model)).graph.output] == ["logits", "features"]
    from safetensors.numpy import load_file

    w = load_file(str(out / "head.safetensors"))
    assert np.allclose(w["classifier.weight"], lm.module.classifier.weight.detach().numpy())


def test_agent_serves_the_package_head_and_a_head_release_changes_it(exported: dict) -> None:
    d, keys, lm = exported["dir"], exported["keys"], exported["lm"]
    store = ModelStore(d / "state", keys["public_key"])
    store.install(exported["result"].package)
    x = lm.workload.eval_inputs()
    served = store.load("cnn-head", 1).runtime.run(x)
    assert np.abs(served["logits"] - lm.predict(x)["logits"]).max() < 1e-4

    # retrain the head on a few labelled samples (as a device would), release it, install it
    extract_package(exported["result"].package, d / "v1", trust=keys["public_key"])
    trainer = HeadTrainer.from_package_dir(d / "v1")
    images, labels = lm.workload.data("train")
    fit = trainer.fit(None, LocalDataset({"image": images["image"][:200]}, labels[:200]),
                      TrainConfig.from_dict({"epochs": 2, "lr": 0.05}))
    new = {k: v * 0.5 if k.endswith("weight") else v for k, v in fit.weights.items()}
    head_release(exported["result"].package, new, 2, keys["private_key"], d / "v2.pfpkg", trust=keys["public_key"])
    store.install(d / "v2.pfpkg")  # installs only if v2 passes its health check on the recomputed samples
    v2 = store.load("cnn-head", 2).runtime.run(x)
    want = served["features"] @ new["classifier.weight"].T + new["classifier.bias"]
    assert np.allclose(v2["logits"], want, atol=1e-4) and not np.allclose(v2["logits"], served["logits"], atol=1e-2)
    assert np.array_equal(v2["features"], served["features"])  # the model file did not change


def test_bad_head_requests_are_refused(exported: dict, digits_mbnet_dir: Path) -> None:
    with pytest.raises(ExportError, match="ONNX exports only"):
        export_model(exported["lm"], format="tflite", out=exported["dir"] / "t.pfpkg", trainable_head=True)
    from compress.zoo import load_model_dir
    from export.errors import HeadError
    from export.head import Head

    with pytest.raises(HeadError, match="cannot be the features"):
        Head.from_manifest({**exported["result"].manifest.trainable_head, "output": "features"})
    mbnet = load_model_dir(digits_mbnet_dir)  # ends in a Linear too: the head must work there as well
    res = export_model(mbnet, format="onnx", out=exported["dir"] / "mb.pfpkg", trainable_head=True)
    assert res.manifest.trainable_head["output"] == "logits" and res.parity.passed


def test_cli_fp16_export_serves_the_head_at_any_batch(exported: dict, digits_cnn_dir: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import onnx
    from safetensors.numpy import load_file

    from pocketfleet.cli import main

    d, keys, lm = exported["dir"], exported["keys"], exported["lm"]
    assert main(["export", str(digits_cnn_dir), "--format", "onnx", "--dtype", "fp16", "--out", str(d / "h16.pfpkg"),
                 "--name", "cnn-h16", "--key", str(keys["private_key"]), "--trainable-head", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "fp16" and report["parity"]["passed"]
    extract_package(d / "h16.pfpkg", d / "h16", trust=keys["public_key"])
    onnx.checker.check_model(str(d / "h16" / "model.onnx"), full_check=True)
    w = load_file(str(d / "h16" / "head.safetensors"))
    assert w["classifier.weight"].dtype == np.float32  # fp16-stored in the model, float32 in the head file
    store = ModelStore(d / "state16", keys["public_key"])
    store.install(d / "h16.pfpkg")
    runtime = store.load("cnn-h16", 1).runtime
    x = lm.workload.eval_inputs()
    for n in (1, 7):  # the dynamic batch survives the extra output
        out = runtime.run({k: v[:n] for k, v in x.items()})
        assert out["features"].dtype == np.float32 and out["features"].shape == (n, w["classifier.weight"].shape[1])
        want = out["features"] @ w["classifier.weight"].T + w["classifier.bias"]
        assert np.allclose(out["logits"], want, atol=1e-4)
        assert np.abs(out["logits"] - lm.predict({k: v[:n] for k, v in x.items()})["logits"]).max() < 0.05


def test_a_model_without_a_final_linear_is_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from export.head_split import split_head

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["logits"])], "no_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    with pytest.raises(ExportError, match="not from a final Linear layer"):
        split_head(tmp_path / "m.onnx", "logits")


def test_a_signed_package_whose_head_does_not_fit_never_serves(exported: dict) -> None:
    """A correctly signed package whose head weights do not match the features fails its health check."""
    import json

    from safetensors.numpy import save_file

    from edge_agent.errors import HealthCheckError
    from export.package import build_package
    from export.samples import Samples

    d, keys = exported["dir"], exported["keys"]
    src = d / "bad-src"
    extract_package(exported["result"].package, src, trust=keys["public_key"])
    manifest = json.loads((src / "manifest.json").read_text())
    save_file({"classifier.weight": np.zeros((10, 7), np.float32), "classifier.bias": np.zeros(10, np.float32)},
              str(d / "bad-head.safetensors"))
    fields = {k: v for k, v in manifest.items() if k not in ("format_version", "files", "samples", "created", "expires")}
    samples = Samples.from_bytes((src / manifest["samples"]["path"]).read_bytes(), manifest["samples"])
    build_package({"model.onnx": src / manifest["model"], "head.safetensors": d / "bad-head.safetensors"},
                  {**fields, "version": 5}, samples, d / "bad.pfpkg", key=keys["private_key"])
    store = ModelStore(d / "bad-state", keys["public_key"])
    with pytest.raises(HealthCheckError, match="bad trainable head"):
        store.install(d / "bad.pfpkg")
    assert store.read_state().get("cnn-head") is None or store.read_state()["cnn-head"].active != 5
