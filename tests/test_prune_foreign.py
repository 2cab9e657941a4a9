"""Structured pruning of models this project did not write: `transformers` classes whose forward reads
shapes and dtypes in Python control flow (traced with concrete values, specialized at the example shapes,
still running at other batch sizes), and GRU / LSTM sequence classifiers (hidden units and input features
removed in every gate, layer and direction)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compress.prune import PruneConfig, count_macs, count_params, fit_to_state_dict, plan_pruning, prune


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, num_labels=5)  # fmt: skip
    return Logits(ViTForImageClassification(cfg).eval())


def mobilenet_v2() -> nn.Module:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(0)
    cfg = MobileNetV2Config(image_size=16, depth_multiplier=0.25, min_depth=8, num_labels=5)
    return Logits(MobileNetV2ForImageClassification(cfg).eval())


def check_batches(model: nn.Module, pruned: nn.Module, x: torch.Tensor, classes: int) -> None:
    """The pruned model runs at batch 1 and 3 (it was traced at batch 2) and agrees with itself row by row."""
    with torch.no_grad():
        three = pruned(x[:3])
        one = torch.cat([pruned(x[i : i + 1]) for i in range(3)])
        assert three.shape == (3, classes) and model(x[:3]).shape == (3, classes)
    torch.testing.assert_close(three, one, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("build", [vit, mobilenet_v2])
def test_transformers_model_with_shape_dependent_control_flow_is_pruned(build):
    """ViT checks `pixel_values.dtype` and unpacks `.shape`; MobileNetV2 computes TF "same" padding with
    int() of shapes: plain torch.fx cannot trace either."""
    model = build()
    x = torch.randn(4, 3, 16, 16)
    plan = plan_pruning(model, PruneConfig(ratio=0.5), x[:2])
    assert plan.graph.leaves == {}  # everything traced: nothing had to be kept whole
    pruned = plan.apply()
    check_batches(model, pruned, x, 5)
    assert count_params(pruned) < 0.7 * count_params(model)
    assert count_macs(pruned, x[:2]) < 0.7 * count_macs(model, x[:2])
    if build is vit:
        layer = pruned.model.vit.layers[0]
        assert layer.mlp.fc1.out_features == 16 and layer.mlp.fc2.in_features == 16
        assert layer.attention.q_proj.out_features == 16  # heads are reshaped: kept whole
        assert "splits the channel axis" in plan.frozen()["model.vit.layers.0.attention.q_proj"]
        emb = pruned.model.vit.embeddings  # the hidden size: patch conv, class token, position embeddings
        assert emb.patch_embeddings.projection.out_channels == 8 and emb.cls_token.shape == (1, 1, 8)
        assert emb.position_embeddings.shape[-1] == 8 and layer.attention.q_proj.in_features == 8
    else:
        first = pruned.model.mobilenet_v2.conv_stem.first_conv.convolution
        assert first.out_channels == 4  # 8 channels halved


class Classifier(nn.Module):
    """Embedding -> RNN -> linear over the last step (GRU batch-first; LSTM time-first, 2 layers,
    bidirectional, its output unpacked as (output, (h_n, c_n)))."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        self.cell = cell
        self.embed = nn.Embedding(30, 12)
        if cell == "gru":
            self.rnn: nn.Module = nn.GRU(12, 16, batch_first=True)
            self.head = nn.Linear(16, 3)
        else:
            self.rnn = nn.LSTM(12, 16, num_layers=2, bidirectional=True)
            self.head = nn.Linear(32, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cell == "gru":
            out, _ = self.rnn(self.embed(ids))
            return self.head(out[:, -1])
        out, (h, c) = self.rnn(self.embed(ids).transpose(0, 1))
        return self.head(out[-1])


def silence(model: Classifier, units: np.ndarray, features: np.ndarray) -> None:
    """Cut every path out of hidden `units` and embedding `features` (and make their own weights small,
    so magnitude ranks them last): removing them must leave the output exactly as it is."""
    rnn, size = model.rnn, 16
    dirs = 2 if rnn.bidirectional else 1
    with torch.no_grad():
        model.embed.weight[:, features] *= 1e-3
        for name, p in rnn.named_parameters():
            gates = p.shape[0] // size
            rows = np.concatenate([g * size + units for g in range(gates)])
            p[rows] *= 1e-3
            if name.startswith("weight_hh"):
                p[:, units] = 0.0
            elif name.startswith("weight_ih_l0"):
                p[:, features] = 0.0
            elif name.startswith("weight_ih"):
                p[:, np.concatenate([d * size + units for d in range(dirs)])] = 0.0
        model.head.weight[:, np.concatenate([d * size + units for d in range(dirs)])] = 0.0


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gru_and_bidirectional_lstm_classifiers_lose_hidden_units_and_inputs(cell):
    torch.manual_seed(0)
    model = Classifier(cell).eval()
    rng = np.random.default_rng(0)
    units, features = np.sort(rng.permutation(16)[:8]), np.sort(rng.permutation(12)[:6])
    silence(model, units, features)
    ids = torch.randint(0, 30, (4, 7), generator=torch.Generator().manual_seed(1))
    plan = plan_pruning(model, PruneConfig(ratio=0.5), ids[:2])
    assert sorted(g.name for g in plan.graph.prunable()) == ["embed", "rnn"]
    assert plan.macs_after < 0.3 * plan.macs_before
    pruned = plan.apply()
    rnn = pruned.rnn
    dirs = 2 if cell == "lstm" else 1
    gates = 4 if cell == "lstm" else 3
    assert (rnn.hidden_size, rnn.input_size, pruned.embed.embedding_dim) == (8, 6, 6)
    assert pruned.head.in_features == 8 * dirs
    for name, p in rnn.named_parameters():
        cols = 6 if "_l0" in name else 8 * dirs
        assert p.shape[0] == gates * 8 and (p.ndim == 1 or p.shape[1] == (8 if "hh" in name else cols)), name
    with torch.no_grad():
        for batch in (1, 3):
            assert pruned(ids[:batch]).shape == (batch, 3)
        torch.testing.assert_close(pruned(ids), model(ids), atol=1e-5, rtol=1e-4)  # only dead units left
    fresh = fit_to_state_dict(Classifier(cell).eval(), pruned.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), pruned(ids))


def test_rnn_with_projections_or_an_initial_state_is_kept_with_the_reason():
    class Projected(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.rnn = nn.LSTM(8, 16, proj_size=4, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.rnn(self.inp(x))[0].mean(1)

    plan = plan_pruning(Projected().eval(), PruneConfig(ratio=0.5), torch.randn(2, 5, 4))
    assert plan.frozen()["rnn"] == "LSTM 'rnn' has proj_size=4, which pruning does not resize"
    assert plan.frozen()["inp"] == plan.frozen()["rnn"]
    assert prune(Projected().eval(), PruneConfig(ratio=0.5), torch.randn(2, 5, 4)).rnn.hidden_size == 16
