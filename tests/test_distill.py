"""Distillation: logit KD pulls a student towards its teacher on real digits, feature KD learns a projection
between hidden states of different widths, fine-tuning without a teacher, best-epoch selection, hooks, and
clear errors for bad configs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from compress.distill import DistillConfig, Distiller, DistillError, distill
from compress.zoo.bert import BertConfig, BertEncoder
from compress.zoo.cnn import DigitsCNN
from compress.zoo.digits_data import digits_split
from compress.zoo.mbnet import DigitsMobileNet


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def kl_to(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(
            F.kl_div(
                F.log_softmax(student.eval()(x), 1), F.softmax(teacher.eval()(x), 1), reduction="batchmean"
            )
        )


def test_logit_kd_pulls_a_narrow_student_towards_the_teacher_on_real_digits():
    torch.manual_seed(0)
    teacher = DigitsCNN({"channels": [16, 32], "num_classes": 10}).eval()
    with torch.no_grad():  # a confident teacher: sharpen its random logits
        teacher.classifier.weight.mul_(20.0)
    student = DigitsCNN({"channels": [4, 8], "num_classes": 10})
    images, labels = digits_split("train")
    x_val = torch.from_numpy(digits_split("val")[0])
    before = kl_to(student, teacher, x_val)
    report = Distiller(student, teacher, DistillConfig(epochs=3, alpha=1.0, lr=3e-3, temperature=2.0)).fit(
        ({"image": images}, labels), progress=False
    )
    assert kl_to(student, teacher, x_val) < 0.5 * before
    assert report["history"][-1]["loss"] < report["history"][0]["loss"] and report["output_loss"] == "kl"
    assert not student.training


def test_finetuning_without_teacher_learns_the_labels():
    torch.manual_seed(0)
    model = DigitsCNN({"channels": [8, 16], "num_classes": 10})
    images, labels = digits_split("train")
    x_val, y_val = (torch.from_numpy(a) for a in digits_split("val"))
    distill(model, None, DistillConfig(epochs=3, lr=3e-3), (images, labels), progress=False)
    with torch.no_grad():
        assert float((model(x_val).argmax(1) == y_val).float().mean()) > 0.8
    with pytest.raises(DistillError, match="needs labels"):
        distill(model, None, DistillConfig(epochs=1), (images, None), progress=False)


def tiny_bert(layers: int) -> BertEncoder:
    cfg = BertConfig(
        vocab_size=60,
        hidden=32,
        num_layers=layers,
        layer_map=list(range(layers)),
        num_heads=4,
        head_dim=8,
        intermediate=64,
        max_position=24,
    )
    return BertEncoder(cfg)


def test_feature_kd_on_token_states_uses_an_identity_initialised_projection_and_raises_cosine():
    torch.manual_seed(0)
    teacher = tiny_bert(2).eval()
    student = tiny_bert(1)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("layers.")}
    state.update(
        {
            k.replace("layers.1.", "layers.0."): v
            for k, v in teacher.state_dict().items()
            if k.startswith("layers.1.")
        }
    )
    student.load_state_dict(state)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 60, (96, 16))
    mask = np.ones((96, 16), dtype=np.int64)
    mask[::3, 10:] = 0
    data = ({"input_ids": ids, "attention_mask": mask}, None)
    tensors = (torch.from_numpy(ids), torch.from_numpy(mask))

    def cosine(m: nn.Module) -> float:
        with torch.no_grad():
            return float(F.cosine_similarity(m.eval()(*tensors), teacher(*tensors)).mean())

    before = cosine(student)
    frozen = student.word_embeddings.weight.detach().clone()
    cfg = DistillConfig(
        epochs=6, lr=2e-3, batch_size=16, features={"layers.0": "layers.1"}, freeze=["word_embeddings.*"]
    )
    distiller = Distiller(student, teacher, cfg)
    report = distiller.fit(data, evaluate=cosine, progress=False)
    proj = distiller.projections["0"]
    assert isinstance(proj, nn.Linear) and proj.weight.shape == (32, 32)
    assert report["output_loss"] == "cosine" and report["best_metric"] == pytest.approx(cosine(student))
    assert cosine(student) > before
    assert torch.equal(student.word_embeddings.weight, frozen)


def test_feature_kd_between_conv_maps_of_different_width_learns_a_1x1_projection():
    torch.manual_seed(0)
    blocks = [[1, 16, 1, 1], [6, 24, 1, 2]]
    teacher = DigitsMobileNet({"stem": 16, "blocks": blocks, "last": 32, "num_classes": 10}).eval()
    student = DigitsMobileNet({"stem": 16, "blocks": blocks, "last": 32, "num_classes": 10, "width": 0.5})
    images, labels = digits_split("val")
    distiller = Distiller(student, teacher, DistillConfig(epochs=1, features={"features.2": "features.2"}))
    distiller.fit((images, labels), progress=False)
    proj = distiller.projections["0"]
    assert isinstance(proj, nn.Conv2d) and proj.weight.shape == (24, 16, 1, 1)


def test_keep_best_restores_the_best_epoch_and_hooks_run_every_step():
    torch.manual_seed(0)
    model = DigitsCNN({"channels": [4, 8], "num_classes": 10})
    images, labels = digits_split("val")
    scores, states = iter([0.5, 0.9, 0.1]), {}

    def evaluate(m: nn.Module) -> float:
        states[len(states)] = copy.deepcopy(m.state_dict())
        return next(scores)

    calls = []
    report = Distiller(model, None, DistillConfig(epochs=3, batch_size=100)).fit(
        (images, labels), evaluate=evaluate, step_hooks=[lambda: calls.append(1)], progress=False
    )
    assert report["best_epoch"] == 1 and len(calls) == report["steps"] == 3 * 4
    assert all(torch.equal(states[1][k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"output_loss": "hinge"}, "output_loss must be one of"),
        ({"temprature": 2}, "unknown field"),
    ],
)
def test_bad_distill_configs_are_named(fields, message):
    with pytest.raises(DistillError, match=message):
        DistillConfig.from_dict(fields)


def test_unknown_feature_layer_and_bad_data_are_named():
    images, labels = digits_split("val")
    teacher, student = (
        DigitsCNN({"channels": [4], "num_classes": 10}),
        DigitsCNN({"channels": [4], "num_classes": 10}),
    )
    with pytest.raises(DistillError, match="the student has no module 'nope'"):
        distill(
            student,
            teacher,
            DistillConfig(epochs=1, features={"nope": "features"}),
            (images, labels),
            progress=False,
        )
    with pytest.raises(DistillError, match="disagree on the number of rows"):
        distill(student, teacher, DistillConfig(epochs=1), (images, labels[:10]), progress=False)


def test_cache_teacher_runs_the_teacher_once_per_batch_and_buckets_by_length():
    torch.manual_seed(0)
    teacher, student = tiny_bert(2).eval(), tiny_bert(1)
    calls, lengths = [], []
    teacher.register_forward_hook(lambda m, args, out: calls.append(1))
    student.register_forward_hook(
        lambda m, args, out: lengths.append(args[0].shape[1]) if m.training else None
    )
    rng = np.random.default_rng(0)
    mask = (np.arange(20)[None, :] < rng.integers(2, 21, (64, 1))).astype(np.int64)
    data = ({"input_ids": rng.integers(1, 60, (64, 20)) * mask, "attention_mask": mask}, None)
    cfg = DistillConfig(epochs=3, batch_size=16, cache_teacher=True, features={"layers.0": "layers.1"})
    Distiller(student, teacher, cfg).fit(data, progress=False)
    assert len(calls) == 1 + 4  # building the projections, then once per fixed batch
    assert sum(lengths) < 0.75 * 20 * len(lengths)  # batches of similar length: little padding left
    with pytest.raises(DistillError, match="cache_teacher needs shift=0"):
        Distiller(student, teacher, DistillConfig(cache_teacher=True, shift=1)).fit(data, progress=False)
