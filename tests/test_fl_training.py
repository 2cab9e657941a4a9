"""edge_agent.training: NumPy head training, FedProx, local datasets, sample store, real onnxruntime
features, torch fine-tuning, and the torch-free import rule."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from edge_agent.training import (
    DatasetError,
    DenseLayer,
    Head,
    HeadTrainer,
    LocalDataset,
    SampleStore,
    TrainConfig,
    TrainingError,
    load_dataset_dir,
    save_dataset_file,
    train_head,
)
from export.errors import HeadError
from tests.fl_helpers import digits_flat, head_package

ROOT = Path(__file__).resolve().parents[1]
MLP = Head([DenseLayer("h.0.weight", "h.0.bias", "relu"), DenseLayer("h.1.weight", "h.1.bias")])


def test_head_gradients_match_finite_differences():
    x, y = digits_flat("train")
    w = {k: v.astype(np.float64) for k, v in MLP.init([64, 16, 10], seed=1).items()}
    xb, yb = x[:32].astype(np.float64), y[:32]
    loss, grads = MLP.loss_and_grads(w, xb, yb)
    eps = 1e-6
    for name, idx in [("h.0.weight", (3, 20)), ("h.0.bias", (5,)), ("h.1.weight", (2, 7)), ("h.1.bias", (9,))]:
        w2 = {k: v.copy() for k, v in w.items()}
        w2[name][idx] += eps
        numeric = (MLP.loss_and_grads(w2, xb, yb)[0] - loss) / eps
        assert numeric == pytest.approx(grads[name][idx], rel=1e-3, abs=1e-7), name


def test_train_head_learns_digits_and_is_seeded():
    x, y = digits_flat("train")
    xt, yt = digits_flat("test")
    w0 = MLP.init([64, 32, 10], seed=0)
    before = float((MLP.predict(w0, xt) == yt).mean())
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.1, seed=3)
    r1 = train_head(MLP, w0, x, y, cfg)
    r2 = train_head(MLP, w0, x, y, cfg)
    after = float((MLP.predict(r1.weights, xt) == yt).mean())
    assert before < 0.3 and after > 0.9
    assert r1.num_samples == len(y) and r1.steps == 4 * int(np.ceil(len(y) / 32))
    assert r1.metrics["loss_last"] < r1.metrics["loss_first"]
    assert all(np.array_equal(r1.weights[k], r2.weights[k]) for k in r1.weights)
    assert np.array_equal(w0["h.0.weight"], MLP.init([64, 32, 10], seed=0)["h.0.weight"])  # input untouched


def test_fedprox_mu_keeps_weights_near_the_global_model():
    x, y = digits_flat("train")
    w0 = MLP.init([64, 32, 10], seed=0)
    dist = {}
    for mu in (0.0, 1.0):
        r = train_head(MLP, w0, x[:200], y[:200], TrainConfig(epochs=5, lr=0.1, mu=mu))
        dist[mu] = np.sqrt(sum(float(((r.weights[k] - w0[k]) ** 2).sum()) for k in w0))
    assert dist[1.0] < 0.7 * dist[0.0]


def test_train_head_rejects_bad_inputs():
    x, y = digits_flat("train")
    w0 = MLP.init([64, 32, 10])
    with pytest.raises(TrainingError, match="labels must lie"):
        train_head(MLP, w0, x[:10], np.full(10, 12), TrainConfig())
    with pytest.raises(TrainingError, match="takes 64 inputs"):
        train_head(MLP, w0, x[:10, :32], y[:10], TrainConfig())
    with pytest.raises(TrainingError, match="lr"):
        TrainConfig.from_dict({"lr": -1})
    with pytest.raises(TrainingError, match="train config.learning_rate: unknown key"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(HeadError, match="schema"):
        Head.from_manifest({"schema": "other", "layers": []})


def test_dataset_directory_npz_and_safetensors(tmp_path):
    x, y = digits_flat("train")
    np.savez(tmp_path / "a.npz", features=x[:30], label=y[:30])
    save_dataset_file(tmp_path / "b.safetensors", LocalDataset({"features": x[30:50]}, y[30:50]))
    (tmp_path / "notes.txt").write_text("ignored")
    ds = load_dataset_dir(tmp_path)
    assert len(ds) == 50 and np.array_equal(ds.arrays["features"], x[:50]) and np.array_equal(ds.labels, y[:50])
    np.savez(tmp_path / "c.npz", features=x[:5])
    with pytest.raises(DatasetError, match="c.npz.*no 'label'"):
        load_dataset_dir(tmp_path)
    (tmp_path / "c.npz").unlink()
    np.savez(tmp_path / "d.npz", features=np.array([object()] * 3, dtype=object), label=np.arange(3))
    with pytest.raises(DatasetError, match="d.npz"):  # object arrays would need pickle: refused
        load_dataset_dir(tmp_path)


def test_sample_store_roundtrip_and_validation(tmp_path):
    x, y = digits_flat("train")
    store = SampleStore(tmp_path / "samples.db")
    for i in range(12):
        store.add({"image": x[i].reshape(1, 8, 8)}, int(y[i]))
    with pytest.raises(DatasetError, match="differ"):
        store.add({"image": x[0]}, 1)
    with pytest.raises(DatasetError, match="label"):
        store.add({"image": x[0].reshape(1, 8, 8)}, -1)
    with pytest.raises(DatasetError, match="finite"):
        store.add({"image": np.full((1, 8, 8), np.nan, np.float32)}, 1)
    store.close()
    reopened = SampleStore(tmp_path / "samples.db")
    ds = reopened.dataset()
    assert reopened.count() == 12 and ds.arrays["image"].shape == (12, 1, 8, 8)
    assert np.array_equal(ds.labels, y[:12]) and np.array_equal(ds.arrays["image"][3, 0], x[3].reshape(8, 8))
    assert len(reopened.dataset(limit=5)) == 5 and np.array_equal(reopened.dataset(limit=5).labels, y[7:12])


def test_head_trainer_on_a_real_package_and_onnxruntime(tmp_path):
    trainer = HeadTrainer.from_package_dir(head_package(tmp_path)[1])
    xi, y = digits_split_images("train")
    xt, yt = digits_split_images("test")
    train, test = LocalDataset({"image": xi}, y), LocalDataset({"image": xt}, yt)
    logits = trainer.runtime.run({"image": xt[:8]})["logits"]
    assert np.allclose(trainer.head.logits(trainer.initial, trainer.features(test)[:8]), logits, atol=1e-4)
    before = trainer.accuracy(trainer.initial, test)
    result = trainer.fit(None, train, TrainConfig(epochs=5, lr=0.1))
    after = trainer.accuracy(result.weights, test)
    assert before < 0.3 and after > before + 0.5
    assert trainer.features(train) is trainer.features(train)  # cached, the backbone is frozen


def digits_split_images(split: str) -> tuple[np.ndarray, np.ndarray]:
    from compress.zoo.digits_data import digits_split

    return digits_split(split)


def test_finetune_torch_with_fedprox():
    torch = pytest.importorskip("torch")
    from edge_agent.training import finetune_torch, module_weights

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    x, y = digits_split_images("train")
    ds = LocalDataset({"image": x[:300]}, y[:300])
    w0 = module_weights(model)
    free = finetune_torch(model, ds, TrainConfig(epochs=3, lr=0.05), weights=w0)
    prox = finetune_torch(model, ds, TrainConfig(epochs=3, lr=0.05, mu=5.0), weights=w0)
    assert free.metrics["train_accuracy"] > 0.8 and free.metrics["loss_last"] < free.metrics["loss_first"]
    dist = {n: sum(float(((r.weights[k] - w0[k]) ** 2).sum()) for k in w0) for n, r in (("free", free), ("prox", prox))}
    assert dist["prox"] < dist["free"]
    assert set(free.weights) == set(w0)


def test_training_imports_and_runs_without_torch(no_torch):
    code = textwrap.dedent(
        """
        import numpy as np
        from edge_agent.training import Head, DenseLayer, TrainConfig, train_head, finetune_torch, LocalDataset
        from edge_agent.training import TrainingError, torch_available
        import cloud_sync.fl.codecs, cloud_sync.fl.secagg, cloud_sync.fl.strategy, cloud_sync.fl.client
        h = Head([DenseLayer("w", "b")])
        r = train_head(h, h.init([4, 3]), np.ones((6, 4), np.float32), np.arange(6) % 3, TrainConfig())
        assert r.num_samples == 6 and not torch_available()
        try:
            finetune_torch(None, LocalDataset({"x": np.ones((2, 4))}, np.zeros(2, int)), TrainConfig())
        except TrainingError as e:
            print("ok", e)
        """
    )
    out = no_torch.python(code)
    assert out.returncode == 0, out.stderr
    assert "ok full-model fine-tuning needs torch" in out.stdout


def test_head_release_changes_only_the_head_and_is_signed(tmp_path):
    from cloud_sync.fl.errors import FLError
    from cloud_sync.fl.release import head_release
    from export.package import open_package
    from export.verify import extract_package

    pkg, extracted, keys = head_package(tmp_path)
    trainer = HeadTrainer.from_package_dir(extracted)
    new = {k: v + 1.0 for k, v in trainer.initial.items()}
    manifest = head_release(pkg, new, 2, keys["private_key"], tmp_path / "v2.pfpkg", trust=keys["public_key"],
                            note={"task": "digits", "round": 7})
    assert manifest.version == 2 and manifest.extra["fl"] == {"task": "digits", "round": 7}
    extract_package(tmp_path / "v2.pfpkg", tmp_path / "v2", trust=keys["public_key"])
    again = HeadTrainer.from_package_dir(tmp_path / "v2")
    assert all(np.array_equal(again.initial[k], new[k]) for k in new)
    with open_package(pkg) as a, open_package(tmp_path / "v2.pfpkg") as b:
        assert a.read("model.onnx", 1 << 20) == b.read("model.onnx", 1 << 20)  # model bytes untouched
        assert a.read("head.safetensors", 1 << 20) != b.read("head.safetensors", 1 << 20)
    with pytest.raises(FLError, match="newer"):
        head_release(pkg, new, 1, keys["private_key"], tmp_path / "old.pfpkg")
    with pytest.raises(FLError, match="do not match"):
        head_release(pkg, {"head.weight": new["head.weight"]}, 3, keys["private_key"], tmp_path / "bad.pfpkg")


def test_release_hook_writes_one_signed_package_per_global_model(tmp_path):
    from cloud_sync.fl.release import release_hook
    from export.verify import verify_package

    pkg, extracted, keys = head_package(tmp_path)
    published = []
    hook = release_hook(pkg, keys["private_key"], tmp_path / "rel", publish=published.append)
    w = HeadTrainer.from_package_dir(extracted).initial
    hook("digits", 1, w)
    hook("digits", 2, {k: v * 0.5 for k, v in w.items()})
    assert [p.name for p in published] == ["digits-head-v2.pfpkg", "digits-head-v3.pfpkg"]
    assert verify_package(published[1], keys["public_key"]).version == 3
