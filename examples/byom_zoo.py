"""Architectures this project did not write, for the bring-your-own-model benchmark and tests: `transformers`
model classes with small configs and random init (no download), plus the user-style modules of
examples/byom_models.py. `ARCHS[name]()` returns (module, {input name: example array}); every module
returns tensors only (transformers outputs are unwrapped to logits / last_hidden_state)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from examples import byom_models as user

Built = tuple[nn.Module, dict[str, np.ndarray]]


class Unwrap(nn.Module):
    """transformers model -> one tensor: `.logits` (classifiers) or `.last_hidden_state` (encoders)."""

    def __init__(self, model: nn.Module, key: str = "logits", arg: str | None = None) -> None:
        super().__init__()
        self.model, self.key, self.arg = model, key, arg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(**{self.arg: x}) if self.arg else self.model(x)
        return getattr(out, self.key)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _ids(rows: int = 4, seq: int = 16, vocab: int = 100) -> dict[str, np.ndarray]:
    return {"input_ids": _rng().integers(1, vocab, (rows, seq)).astype(np.int64)}


def _image(rows: int = 4, size: int = 32, channels: int = 3) -> dict[str, np.ndarray]:
    return {"pixel_values": _rng().standard_normal((rows, channels, size, size)).astype(np.float32)}


def _text(model_cls: str, config_cls: str, **cfg: object) -> Callable[[], Built]:
    def build() -> Built:
        import transformers

        base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64, num_labels=4)
        base.update(cfg)
        config = getattr(transformers, config_cls)(**base)
        return Unwrap(getattr(transformers, model_cls)(config).eval(), arg="input_ids"), _ids()

    return build


def _vision(model_cls: str, config_cls: str, size: int = 32, **cfg: object) -> Callable[[], Built]:
    def build() -> Built:
        import transformers

        config = getattr(transformers, config_cls)(num_labels=10, **cfg)
        return Unwrap(getattr(transformers, model_cls)(config).eval(), arg="pixel_values"), _image(size=size)

    return build


def _wav2vec2() -> Built:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(32, 32, 32), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, do_stable_layer_norm=True,
                         feat_extract_norm="layer", apply_spec_augment=False, mask_time_prob=0.0)
    values = _rng().standard_normal((4, 1600)).astype(np.float32)
    return Unwrap(Wav2Vec2Model(cfg).eval(), key="last_hidden_state", arg="input_values"), {"input_values": values}


def _user(factory: Callable[..., nn.Module], inputs: dict[str, np.ndarray], **kw: object) -> Callable[[], Built]:
    def build() -> Built:
        torch.manual_seed(0)
        return factory(**kw).eval(), inputs

    return build


_HEADS = dict(hidden_sizes=[16, 32], depths=[1, 1])
ARCHS: dict[str, Callable[[], Built]] = {
    "bert": _text("BertForSequenceClassification", "BertConfig"),
    "distilbert": _text("DistilBertForSequenceClassification", "DistilBertConfig", dim=32, n_layers=2, n_heads=2,
                        hidden_dim=64),
    "roberta": _text("RobertaForSequenceClassification", "RobertaConfig", pad_token_id=0),
    "albert": _text("AlbertForSequenceClassification", "AlbertConfig", embedding_size=16),
    "vit": _vision("ViTForImageClassification", "ViTConfig", image_size=32, patch_size=8, hidden_size=32,
                   num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "deit": _vision("DeiTForImageClassification", "DeiTConfig", image_size=32, patch_size=8, hidden_size=32,
                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "swin": _vision("SwinForImageClassification", "SwinConfig", image_size=32, patch_size=4, embed_dim=16,
                    depths=[1, 1], num_heads=[2, 2], window_size=4),
    "convnext": _vision("ConvNextForImageClassification", "ConvNextConfig", hidden_sizes=[16, 32, 48, 64],
                        depths=[1, 1, 1, 1]),
    "resnet": _vision("ResNetForImageClassification", "ResNetConfig", embedding_size=16,
                      hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], layer_type="basic"),
    "mobilenet_v2": _vision("MobileNetV2ForImageClassification", "MobileNetV2Config", image_size=32,
                            depth_multiplier=0.35, min_depth=8),
    "mobilevit": _vision("MobileViTForImageClassification", "MobileViTConfig", size=64, image_size=64,
                         hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 48, 64, 80],
                         num_attention_heads=2),
    "efficientnet": _vision("EfficientNetForImageClassification", "EfficientNetConfig", image_size=32,
                            width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320),
    "wav2vec2": _wav2vec2,
    "gru_classifier": _user(user.make_gru, _ids(seq=12), classes=4),
    "lstm_classifier": _user(user.make_lstm, _ids(seq=12), classes=4),
    "kws_conv1d": _user(user.make_kws, {"features": _rng().standard_normal((4, 20, 32)).astype(np.float32)}),
    "two_in_two_out": _user(user.make_two_tower, {
        "image": _rng().standard_normal((4, 3, 16, 16)).astype(np.float32),
        "extra": _rng(1).standard_normal((4, 8)).astype(np.float32)}),
    "unet": _user(user.make_unet, _image(size=32)),
}
QUICK = ("bert", "resnet", "mobilenet_v2", "kws_conv1d", "two_in_two_out")


def rows_like(examples: dict[str, np.ndarray], n: int, seed: int) -> dict[str, np.ndarray]:
    """`n` more rows of the same kind as the examples: ids from the same range, floats standard normal."""
    rng = _rng(seed)
    out = {}
    for k, v in examples.items():
        shape = (n, *v.shape[1:])
        out[k] = (rng.integers(int(v.min()), int(v.max()) + 1, shape).astype(v.dtype) if v.dtype.kind in "iu"
                  else rng.standard_normal(shape).astype(v.dtype))
    return out
