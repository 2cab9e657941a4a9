"""Structured pruning: every coupling kind keeps shapes valid and outputs exact, ONNX/TFLite parity after
export, MACs agree with the device analyser, and bad plans fail with clear messages."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from compress.prune import (
    DependencyGraph,
    PruneConfig,
    PruneError,
    PruneTraceError,
    count_macs,
    fit_to_state_dict,
    layer_sensitivity,
    macs_target_for_latency,
    plan_from_sensitivity,
    plan_pruning,
    prune,
)
from compress.zoo.bert import BertConfig, BertEncoder
from compress.zoo.mbnet import DigitsMobileNet
from export.specs import TensorSpec


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def conv_bn(cin: int, cout: int, k: int = 1, groups: int = 1, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=bias), nn.BatchNorm2d(cout), nn.ReLU()
    )


class Couplings(nn.Module):
    """conv -> BN -> conv chains, a depthwise conv, a residual add, a channel concat, flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 16, 3)
        self.dw = conv_bn(16, 16, 3, groups=16)
        self.res = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.branch_a = conv_bn(16, 12, 3)
        self.branch_b = conv_bn(16, 8, 1, bias=True)
        self.mix = nn.Sequential(conv_bn(20, 24), nn.MaxPool2d(2))
        self.head = nn.Linear(24 * 4 * 4, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        s = self.stem(image)
        y = s + self.res(self.dw(s))
        cat = torch.cat([self.branch_a(y), self.branch_b(y)], dim=1)
        return self.head(torch.flatten(self.mix(cat), 1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def silence_half(model: nn.Module, x: torch.Tensor, seed: int = 1) -> dict[str, int]:
    """Zero gamma and beta of a random half of every prunable group's channels in all its BatchNorms, so
    those channels are exactly 0 everywhere: removing them must not change the output at all."""
    graph = DependencyGraph.build(model, (x,))
    gen = torch.Generator().manual_seed(seed)
    kept = {}
    for g in graph.prunable():
        drop = torch.randperm(g.size, generator=gen)[: g.size // 2]
        for name in g.owners:
            m = model.get_submodule(name)
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data[drop] = 0.0
                m.bias.data[drop] = 0.0
        kept[g.name] = g.size - g.size // 2
    return kept


def test_every_coupling_kind_is_exact_when_removed_channels_are_silent():
    torch.manual_seed(0)
    model = randomize_bn(Couplings())
    x = torch.rand(4, 1, 8, 8)
    kept = silence_half(model, x)
    assert set(kept) == {"stem.0", "branch_a.0", "branch_b.0", "mix.0.0"}
    pruned = prune(model, PruneConfig(ratio=0.5, importance="bn_scale"), x)
    assert pruned is not model and model.stem[0].out_channels == 16  # the caller's model is untouched
    assert (pruned.stem[0].out_channels, pruned.dw[0].groups, pruned.res[0].out_channels) == (8, 8, 8)
    assert (
        pruned.branch_a[0].out_channels,
        pruned.branch_b[0].out_channels,
        pruned.mix[0][0].in_channels,
    ) == (6, 4, 10)
    assert pruned.head.in_features == 12 * 4 * 4 and pruned.head.out_features == 10
    torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-5)


def test_groups_record_what_couples_and_what_is_frozen():
    graph = DependencyGraph.build(Couplings().eval(), (torch.rand(2, 1, 8, 8),))
    groups = {g.name: g for g in graph.groups()}
    assert {"stem.0", "stem.1", "dw.0", "dw.1", "res.0", "res.1"} <= set(
        groups["stem.0"].owners
    )  # residual + depthwise
    assert {"branch_a.0", "branch_b.0", "res.0"} == set(groups["stem.0"].consumers)
    assert groups["mix.0.0"].consumers == ["head"]  # flatten -> linear
    assert "model output" in (groups["head"].frozen or "")


def bert(num_heads: int = 4) -> BertEncoder:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden=32,
        num_layers=2,
        layer_map=[0, 1],
        num_heads=num_heads,
        head_dim=8,
        intermediate=48,
        max_position=32,
    )
    return BertEncoder(cfg).eval()


def bert_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return ids, mask


def test_attention_heads_and_ffn_are_removed_consistently():
    model = bert()
    inputs = bert_inputs()
    with torch.no_grad():  # silence heads 1, 2 of every layer and half the FFN neurons
        for layer in model.layers:
            att = layer.attention
            for h in (1, 2):
                rows = slice(h * 8, (h + 1) * 8)
                for proj in (att.query, att.key, att.value):
                    proj.weight[rows] = 0.0
                    proj.bias[rows] = 0.0
                att.out.weight[:, rows] = 0.0
            layer.ffn_in.weight[::2] = 0.0
            layer.ffn_in.bias[::2] = 0.0
            layer.ffn_out.weight[:, ::2] = 0.0
    plan = plan_pruning(model, PruneConfig(ratio=0.5, importance="l2"), inputs)
    names = {g.name for g in plan.graph.prunable()}
    assert names == {"layers.0.attention", "layers.0.ffn_in", "layers.1.attention", "layers.1.ffn_in"}
    pruned = plan.apply()
    for layer in pruned.layers:
        att = layer.attention
        assert (
            att.num_heads == 2
            and att.query.out_features == att.value.out_features == att.out.in_features == 16
        )
        assert layer.ffn_in.out_features == layer.ffn_out.in_features == 24
    torch.testing.assert_close(pruned(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)
    assert plan.macs_after < 0.75 * plan.macs_before


def _onnx_parity(
    module: nn.Module, inputs: list[TensorSpec], outputs: list[TensorSpec], example: tuple, arrays: dict, path
) -> None:
    from export.onnx import export_onnx
    from export.parity import ParityBounds, check_parity
    from export.runtimes import load_runtime

    def reference(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = module(*(torch.from_numpy(batch[s.name]) for s in inputs))
        return {outputs[0].name: out.numpy()}

    export_onnx(module, inputs, outputs, example, path)
    check_parity(
        reference,
        load_runtime(path).run,
        arrays,
        ParityBounds(max_abs=1e-4, min_agreement=1.0, min_cosine=0.9999),
    )


@pytest.mark.slow
def test_pruned_couplings_and_mbnet_export_with_parity_and_devices_macs(tmp_path):
    from devices.analysis import count_macs as onnx_macs
    from export.parity import check_parity
    from export.runtimes import load_runtime
    from export.tflite import export_tflite

    images = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    specs_in, specs_out = (
        [TensorSpec("image", ("batch", 1, 8, 8), "float32")],
        [TensorSpec("logits", ("batch", 10), "float32")],
    )
    example = (torch.from_numpy(images[:2]),)
    model = randomize_bn(Couplings())
    pruned = prune(model, PruneConfig(ratio=0.4, round_to=4), example).eval()
    _onnx_parity(pruned, specs_in, specs_out, example, {"image": images}, tmp_path / "couplings.onnx")
    assert onnx_macs(tmp_path / "couplings.onnx") == pytest.approx(count_macs(pruned, example), rel=1e-6)

    export_tflite(pruned, ["logits"], {"image": example[0][:1]}, tmp_path / "couplings.tflite")

    def reference(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {"logits": pruned(torch.from_numpy(batch["image"])).numpy()}

    check_parity(reference, load_runtime(tmp_path / "couplings.tflite").run, {"image": images})

    mbnet = randomize_bn(
        DigitsMobileNet({"stem": 16, "blocks": [[1, 16, 1, 1], [6, 24, 2, 2]], "last": 64, "num_classes": 10})
    )
    small = prune(mbnet, PruneConfig(target_macs=0.5, round_to=8), example).eval()
    _onnx_parity(small, specs_in, specs_out, example, {"image": images}, tmp_path / "mbnet.onnx")
    assert onnx_macs(tmp_path / "mbnet.onnx") == pytest.approx(count_macs(small, example), rel=1e-6)
    assert count_macs(small, example) <= 0.5 * count_macs(mbnet, example)
    budget = macs_target_for_latency(tmp_path / "mbnet.onnx", "raspberry-pi-4", 0.95)
    assert budget["target_macs"] < 0.95 and budget["overhead_ms"] > 0
    assert budget["overhead_ms"] + budget["target_macs"] * (
        budget["estimated_ms"] - budget["overhead_ms"]
    ) == pytest.approx(0.95 * budget["estimated_ms"])
    with pytest.raises(PruneError, match="below the fixed overhead"):
        macs_target_for_latency(tmp_path / "mbnet.onnx", "raspberry-pi-4", 0.01)


@pytest.mark.slow
def test_pruned_attention_exports_to_onnx_with_parity(tmp_path):
    model = bert()
    inputs = bert_inputs()
    pruned = prune(model, PruneConfig(ratio=0.5), inputs).eval()
    specs_in = [
        TensorSpec("input_ids", ("batch", "sequence"), "int64"),
        TensorSpec("attention_mask", ("batch", "sequence"), "int64"),
    ]
    arrays = {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()}
    _onnx_parity(
        pruned,
        specs_in,
        [TensorSpec("embedding", ("batch", 32), "float32")],
        inputs,
        arrays,
        tmp_path / "bert.onnx",
    )


def test_round_to_global_ranking_and_target_macs():
    model = randomize_bn(Couplings())
    x = torch.rand(2, 1, 8, 8)
    rounded = prune(model, PruneConfig(ratio=0.3, round_to=4), x)
    assert rounded.stem[0].out_channels % 4 == 0 and rounded.mix[0][0].out_channels % 4 == 0
    plan = plan_pruning(model, PruneConfig(ratio=0.5, global_ranking=True), x)
    kept = sum(r["kept"] for r in plan.summary()["groups"] if r["frozen"] is None)
    total = sum(r["units"] for r in plan.summary()["groups"] if r["frozen"] is None)
    assert kept == pytest.approx(total * 0.5, abs=4)
    for global_ranking in (False, True):
        plan = plan_pruning(model, PruneConfig(target_macs=0.4, global_ranking=global_ranking), x)
        assert 0.3 < plan.macs_after / plan.macs_before <= 0.4
        assert count_macs(plan.apply(), x) == pytest.approx(plan.macs_after)


def test_per_layer_ratios_and_taylor_importance():
    model = randomize_bn(Couplings())
    x = torch.rand(8, 1, 8, 8)
    only = prune(model, PruneConfig(ratios={"branch_*": 0.5}), x)
    assert (only.branch_a[0].out_channels, only.branch_b[0].out_channels, only.stem[0].out_channels) == (
        6,
        4,
        16,
    )
    data = [(x, torch.randint(0, 10, (8,)))] * 2
    taylor = prune(model, PruneConfig(ratio=0.25, importance="taylor"), x, data=data)
    assert taylor.stem[0].out_channels == 12 and taylor(x).shape == (8, 10)
    with pytest.raises(PruneError, match="taylor.*needs data"):
        prune(model, PruneConfig(ratio=0.25, importance="taylor"), x)


def test_pruned_weights_reload_into_a_fresh_model_from_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = randomize_bn(Couplings())
    x = torch.rand(2, 1, 8, 8)
    pruned = prune(model, PruneConfig(ratio=0.5), x)
    save_file({k: v.contiguous() for k, v in pruned.state_dict().items()}, str(tmp_path / "w.safetensors"))
    fresh = fit_to_state_dict(Couplings(), load_file(str(tmp_path / "w.safetensors"))).eval()
    assert fresh.dw[0].groups == pruned.dw[0].groups == 8
    torch.testing.assert_close(fresh(x), pruned(x))


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "half", True])
def test_ratio_outside_0_1_is_rejected(bad):
    with pytest.raises(PruneError, match=r"PruneConfig.ratio must be a number in \[0, 1\)"):
        PruneConfig(ratio=bad).validate()
    with pytest.raises(PruneError, match=r"ratios\['stem.0'\] must be a number in \[0, 1\)"):
        prune(Couplings().eval(), PruneConfig(ratios={"stem.0": bad}), torch.rand(2, 1, 8, 8))


def test_plan_leaving_a_layer_without_channels_is_rejected():
    model = nn.Sequential(conv_bn(1, 2, 3), nn.Conv2d(2, 4, 1), nn.Flatten(), nn.Linear(256, 3)).eval()
    with pytest.raises(PruneError, match=r"pruning 0.8 of the 2 channels of layer '0.0' leaves none"):
        prune(model, PruneConfig(ratio=0.8), torch.rand(2, 1, 8, 8))


def test_unknown_or_frozen_layers_and_unreachable_budgets_are_named():
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(PruneError, match="no layer of the model matches; prunable layers: stem.0"):
        prune(Couplings().eval(), PruneConfig(ratios={"nope": 0.5}), x)
    with pytest.raises(PruneError, match="layer 'head' cannot be pruned: it reaches the model output"):
        prune(Couplings().eval(), PruneConfig(ratios={"head": 0.5}), x)
    with pytest.raises(PruneError, match="target_macs=0.01 is out of reach"):
        prune(Couplings().eval(), PruneConfig(target_macs=0.01), x)
    with pytest.raises(PruneError, match="unknown field"):
        PruneConfig.from_dict({"ratio": 0.5, "ratoi": 0.2})


class Gate(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.mean() > 0 else x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 8, 3)
        self.gate = Gate()
        self.body = conv_bn(8, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.gate(self.stem(x))).mean((2, 3)))


class GatedRoot(Gated):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(self.body(y if y.mean() > 0 else -y).mean((2, 3)))


def test_untraceable_block_is_kept_whole_with_its_reason_or_ignored():
    model = Gated().eval()
    x = torch.rand(2, 1, 8, 8)
    plan = plan_pruning(model, PruneConfig(ratio=0.5), x)
    assert list(plan.graph.leaves) == ["gate"]
    assert "depends on tensor values (data-dependent control flow)" in plan.graph.leaves["gate"]
    assert "is layer 'gate' (Gate), kept whole: tracing into it failed" in plan.frozen()["stem.0"]
    assert "gate" in plan.why_frozen() and plan.summary()["kept_whole"] == plan.graph.leaves
    pruned = plan.apply()
    assert (
        pruned.stem[0].out_channels == 8 and pruned.gate.conv.in_channels == 8
    )  # kept whole around the gate
    assert pruned.body[0].out_channels == 8 and pruned.head.in_features == 8
    for sign in (1.0, -1.0):  # both branches of the gate still run: the graph did not specialize on values
        assert pruned(sign * x).shape == (2, 10)
    ignored = prune(model, PruneConfig(ratio=0.5, ignore=["gate"]), x)
    assert ignored.body[0].out_channels == 8 and ignored.gate.conv.in_channels == 8
    gate_macs = 8 * 8 * 64
    expected = 1 * 8 * 9 * 64 + gate_macs + 8 * 16 * 64 + 16 * 10
    assert count_macs(model, x, ignore=["gate"]) == pytest.approx(expected)
    assert count_macs(model, x) == pytest.approx(expected)  # the automatic leaf is counted the same way
    with pytest.raises(
        PruneTraceError, match=r"cannot trace GatedRoot.forward .*data-dependent control flow"
    ):
        prune(GatedRoot().eval(), PruneConfig(ratio=0.5), x)


def test_mbnet_target_macs_halves_macs_and_keeps_the_caller_model():
    torch.manual_seed(0)
    model = randomize_bn(
        DigitsMobileNet(
            {
                "stem": 16,
                "blocks": [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 1]],
                "last": 64,
                "num_classes": 10,
            }
        )
    )
    x = torch.rand(2, 1, 8, 8)
    before = copy.deepcopy(model.state_dict())
    plan = plan_pruning(model, PruneConfig(target_macs=0.5, round_to=8), x)
    pruned = plan.apply([(x, None)])
    assert count_macs(pruned, x) <= 0.5 * count_macs(model, x)
    assert pruned(x).shape == (2, 10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    rows = plan.summary()["groups"]
    assert all(r["kept"] % 8 == 0 or r["kept"] == r["units"] for r in rows if r["frozen"] is None)


def test_sensitivity_table_and_plan_spare_the_sensitive_layer_and_meet_the_budget():
    model = randomize_bn(Couplings())
    x = torch.rand(2, 1, 8, 8)

    def evaluate(m: nn.Module) -> float:  # branch_a matters a lot, the rest a little
        lost = {
            "a": 1 - m.branch_a[0].out_channels / 12,
            "stem": 1 - m.stem[0].out_channels / 16,
            "mix": 1 - m.mix[0][0].out_channels / 24,
        }
        return 1.0 - 1.0 * lost["a"] - 0.05 * lost["stem"] - 0.01 * lost["mix"]

    sens = layer_sensitivity(model, x, evaluate, ratios=(0.25, 0.5, 0.75), round_to=4)
    assert set(sens.metric) == {"stem.0", "branch_a.0", "branch_b.0", "mix.0.0"} and sens.baseline == 1.0
    assert sens.metric["branch_a.0"] == pytest.approx(
        [2 / 3, 2 / 3, 1 / 3]
    )  # 12 channels -> 8, 8, 4 (round_to=4)
    assert sens.actual["branch_a.0"] == pytest.approx([1 / 3, 1 / 3, 2 / 3]) and sens.actual["stem.0"] == [
        0.25,
        0.5,
        0.75,
    ]
    cfg = plan_from_sensitivity(sens, model, x, target_macs=0.6, round_to=4)
    assert "branch_a.0" not in cfg.ratios and cfg.ratios["stem.0"] > 0
    plan = plan_pruning(model, cfg, x)
    assert plan.macs_after <= 0.6 * plan.macs_before
    uniform = plan_pruning(model, PruneConfig(target_macs=0.6, round_to=4), x)
    assert evaluate(plan.apply()) > evaluate(uniform.apply())


def test_compress_prune_and_distill_are_callable_packages():
    import compress

    model = randomize_bn(Couplings())
    x = torch.rand(2, 1, 8, 8)
    small = compress.prune(model, compress.PruneConfig(ratio=0.5), x)
    assert small.stem[0].out_channels == 8 and compress.prune.PruneConfig is compress.PruneConfig
    images, labels = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    trained = compress.distill(
        small, model, compress.DistillConfig(epochs=1), (images, labels), progress=False
    )
    assert trained is small and not trained.training
