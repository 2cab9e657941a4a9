"""Unstructured and N:M sparsity: schedules, exact sparsity levels, masks that survive training, the 2:4
pattern checked on the exported ONNX weights, and honest (zstd) storage accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compress.prune import (
    PruneError,
    Sparsifier,
    SparsityConfig,
    check_onnx_nm,
    nm_mask,
    nm_violations,
    sparsify,
    sparsity_at,
    storage_sizes,
)
from export.specs import TensorSpec


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32 * 16, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.body(torch.relu(self.stem(image))))
        return self.head(torch.flatten(nn.functional.max_pool2d(x, 2), 1))


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def test_oneshot_schedule_jumps_at_begin_step():
    cfg = SparsityConfig(sparsity=0.6, begin_step=3)
    assert [sparsity_at(cfg, s) for s in range(5)] == [0.0, 0.0, 0.0, 0.6, 0.6]


def test_iterative_schedule_rises_in_equal_steps_and_ends_before_end_step():
    cfg = SparsityConfig(sparsity=0.8, schedule="iterative", begin_step=0, end_step=8, iterations=4)
    assert [round(sparsity_at(cfg, s), 6) for s in range(10)] == [
        0.2,
        0.2,
        0.4,
        0.4,
        0.6,
        0.6,
        0.8,
        0.8,
        0.8,
        0.8,
    ]


def test_polynomial_schedule_is_monotone_cubic_and_moves_every_frequency_steps():
    cfg = SparsityConfig(
        sparsity=0.9, schedule="polynomial", begin_step=10, end_step=110, frequency=10, initial_sparsity=0.1
    )
    values = [sparsity_at(cfg, s) for s in range(130)]
    assert (
        values[:10] == [0.0] * 10
        and values[10] == pytest.approx(0.1)
        and values[110:] == [pytest.approx(0.9)] * 20
    )
    assert all(b >= a for a, b in zip(values[10:], values[11:], strict=False))
    assert values[60] == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3)  # half way: s_f + (s_i - s_f)(1 - 0.5)^3
    assert len(set(values[10:110])) == 10  # a new target every 10 steps


def test_layer_and_global_magnitude_sparsity_hit_their_targets():
    model = net()
    layered = sparsify(model, SparsityConfig(sparsity=0.7))
    for layer in (layered.stem, layered.body, layered.head):
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.7, abs=1 / layer.weight.numel())
    assert float((model.body.weight == 0).float().mean()) == 0.0  # the original is untouched
    glob = sparsify(model, SparsityConfig(sparsity=0.7, scope="global"))
    weights = torch.cat([m.weight.reshape(-1) for m in (glob.stem, glob.body, glob.head)])
    assert float((weights == 0).float().mean()) == pytest.approx(0.7, abs=1e-4)
    kept_min = min(
        float(m.weight.detach()[m.weight != 0].abs().min()) for m in (glob.stem, glob.body, glob.head)
    )
    orig = torch.cat([m.weight.reshape(-1) for m in (model.stem, model.body, model.head)]).abs()
    assert kept_min >= float(orig.sort().values[int(0.7 * orig.numel()) - 1])  # the smallest ones went


def test_masks_survive_optimizer_steps_and_follow_the_schedule():
    model = net().train()
    sp = Sparsifier(
        model, SparsityConfig(sparsity=0.5, schedule="polynomial", begin_step=0, end_step=6, frequency=2)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    seen = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step()
        seen.append(round(sp.report()["sparsity"], 3))
    assert seen == sorted(seen) and seen[0] < 0.05 and seen[-1] == pytest.approx(0.5, abs=0.01)
    model = sp.finalize()
    assert float((model.body.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_nm_mask_keeps_the_two_largest_of_every_four_input_channels():
    w = torch.randn(6, 8, 3, 3)
    masked = w * nm_mask(w, 2, 4)
    bad, groups = nm_violations(masked.numpy(), 2, 4, axis=1)
    assert bad == 0 and groups == 6 * 3 * 3 * 2
    blocks = w.movedim(1, -1).reshape(-1, 4).abs()
    kept = masked.movedim(1, -1).reshape(-1, 4).abs()
    assert torch.equal(kept.sort(1).values[:, 2:], blocks.sort(1).values[:, 2:])


@pytest.mark.slow
def test_two_four_pattern_is_in_the_exported_onnx_and_zstd_pays_for_zeros(tmp_path):
    from export.onnx import export_onnx
    from export.parity import check_parity
    from export.runtimes import load_runtime

    model = net()
    sp = Sparsifier(model, SparsityConfig(pattern="2:4"))
    sp.update(0.5)
    sparse = sp.finalize()
    assert set(sp.skipped) == {"stem"}  # one input channel: the pattern cannot apply
    specs = (
        [TensorSpec("image", ("batch", 1, 8, 8), "float32")],
        [TensorSpec("logits", ("batch", 10), "float32")],
    )
    example = (torch.rand(2, 1, 8, 8),)
    export_onnx(sparse, *specs, example, tmp_path / "sparse.onnx")
    export_onnx(net(), *specs, example, tmp_path / "dense.onnx")
    report = check_onnx_nm(tmp_path / "sparse.onnx", 2, 4)
    assert report["ok"] and len(report["layers"]) == 2 and report["dense"] == ["stem.weight"]
    assert not check_onnx_nm(tmp_path / "dense.onnx", 2, 4)["ok"]

    images = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)

    def reference(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {"logits": sparse(torch.from_numpy(batch["image"])).numpy()}

    check_parity(reference, load_runtime(tmp_path / "sparse.onnx").run, {"image": images})
    dense, packed = storage_sizes(tmp_path / "dense.onnx"), storage_sizes(tmp_path / "sparse.onnx")
    assert abs(dense["bytes"] - packed["bytes"]) < 1024  # zeros cost as much as any float when stored raw
    assert packed["zstd_bytes"] < 0.8 * dense["zstd_bytes"]  # and much less once compressed


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sparsity": 1.0}, r"SparsityConfig.sparsity must be a number in \[0, 1\)"),
        ({"pattern": "4:2"}, "needs 0 < N < M"),
        ({"pattern": "2-4"}, "must look like '2:4'"),
        ({"pattern": "2:4", "schedule": "polynomial", "end_step": 5}, "applied one-shot"),
        ({"schedule": "iterative"}, "needs end_step > begin_step"),
        ({"scope": "model"}, "scope must be one of"),
        ({"sparsity": 0.5, "sparsty": 0.1}, "unknown field"),
    ],
)
def test_bad_sparsity_configs_are_named(fields, message):
    with pytest.raises(PruneError, match=message):
        SparsityConfig.from_dict(fields)


def test_nothing_selected_is_an_error():
    with pytest.raises(PruneError, match="selects no Conv/Linear layer"):
        Sparsifier(net(), SparsityConfig(ignore=["stem", "body", "head"]))
