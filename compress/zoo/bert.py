"""A compact BERT sentence encoder (the all-MiniLM-L6-v2 architecture) written for clean export.

Differences from transformers' BertModel that matter here: plain Linear layers with explicit per-head
reshapes (so heads can be pruned and the graph traces to ONNX/TFLite without custom ops), an additive
attention mask computed arithmetically (no bool indexing, no data-dependent control flow), token type
fixed to 0, and mean pooling + L2 normalisation built in. Per-layer head and FFN widths may differ,
which is what structured pruning produces.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

MASK_VALUE = -10000.0  # added to attention scores of padding tokens (exp underflows to exactly 0 in fp32)


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden: int = 384
    num_layers: int = 6
    layer_map: list[int] = field(default_factory=lambda: list(range(6)))  # teacher layer behind each layer
    num_heads: int | list[int] = 12  # per layer when a list
    head_dim: int = 32
    intermediate: int | list[int] = 1536  # per layer when a list
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> BertConfig:
        cfg = cls(**(data or {}))
        cfg.layer_map = [int(i) for i in cfg.layer_map]
        if len(cfg.layer_map) != cfg.num_layers:
            from pocketfleet import PocketfleetError

            raise PocketfleetError(
                f"config.layer_map has {len(cfg.layer_map)} entries but num_layers is {cfg.num_layers}"
            )
        for name in ("num_heads", "intermediate"):
            value = getattr(cfg, name)
            if isinstance(value, list) and len(value) != cfg.num_layers:
                from pocketfleet import PocketfleetError

                raise PocketfleetError(
                    f"config.{name} lists {len(value)} layers but num_layers is {cfg.num_layers}"
                )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def heads(self, layer: int) -> int:
        return self.num_heads[layer] if isinstance(self.num_heads, list) else self.num_heads

    def ffn(self, layer: int) -> int:
        return self.intermediate[layer] if isinstance(self.intermediate, list) else self.intermediate


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.query = nn.Linear(hidden, inner)
        self.key = nn.Linear(hidden, inner)
        self.value = nn.Linear(hidden, inner)
        self.out = nn.Linear(inner, hidden)
        self.scale = 1.0 / math.sqrt(head_dim)

    def _split(self, x: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        return x.reshape(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)  # [b,h,s,d]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, seq = x.shape[0], x.shape[1]
        q = self._split(self.query(x), batch, seq)
        k = self._split(self.key(x), batch, seq)
        v = self._split(self.value(x), batch, seq)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale + mask  # mask: [b,1,1,s]
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)  # [b,h,s,d]
        ctx = ctx.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.out(ctx)


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer layer: x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x))."""

    def __init__(self, hidden: int, num_heads: int, head_dim: int, intermediate: int, eps: float) -> None:
        super().__init__()
        self.attention = SelfAttention(hidden, num_heads, head_dim)
        self.attention_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn_in = nn.Linear(hidden, intermediate)
        self.act = nn.GELU()  # exact (erf) GELU, as in BERT
        self.ffn_out = nn.Linear(intermediate, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x, mask))
        return self.ffn_norm(x + self.ffn_out(self.act(self.ffn_in(x))))


class BertEncoder(nn.Module):
    """input_ids, attention_mask (int64 [batch, sequence]) -> L2-normalised mean-pooled embedding [batch, hidden]."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden)
        self.position_embeddings = nn.Embedding(config.max_position, config.hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden)
        self.embedding_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(
            EncoderLayer(
                config.hidden, config.heads(i), config.head_dim, config.ffn(i), config.layer_norm_eps
            )
            for i in range(config.num_layers)
        )
        self.register_buffer("position_ids", torch.arange(config.max_position)[None, :], persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(self.position_ids[:, :seq])
            + self.token_type_embeddings.weight[0]  # token type is always 0 for single sentences
        )
        x = self.embedding_norm(x)
        keep = attention_mask.to(x.dtype)  # [b,s], 1 = token, 0 = padding
        mask = ((1.0 - keep) * MASK_VALUE)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        summed = (x * keep[:, :, None]).sum(dim=1)
        pooled = summed / keep.sum(dim=1, keepdim=True).clamp(min=1e-9)
        norm = torch.sqrt((pooled * pooled).sum(dim=-1, keepdim=True)).clamp(min=1e-12)
        return pooled / norm


# teacher (HF BertModel safetensors) name -> our name, per layer
_LAYER_KEYS = {
    "attention.self.query": "attention.query",
    "attention.self.key": "attention.key",
    "attention.self.value": "attention.value",
    "attention.output.dense": "attention.out",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}
_EMBED_KEYS = {
    "embeddings.word_embeddings": "word_embeddings",
    "embeddings.position_embeddings": "position_embeddings",
    "embeddings.token_type_embeddings": "token_type_embeddings",
    "embeddings.LayerNorm": "embedding_norm",
}


def teacher_state_dict(teacher: dict[str, torch.Tensor], config: BertConfig) -> dict[str, torch.Tensor]:
    """Map a BertModel state dict onto a BertEncoder of `config`: layer i takes teacher layer layer_map[i];
    a layer with fewer heads / FFN neurons than the teacher takes the leading ones."""
    out: dict[str, torch.Tensor] = {}
    for src, dst in _EMBED_KEYS.items():
        for p in ("weight", "bias"):
            if f"{src}.{p}" in teacher:
                out[f"{dst}.{p}"] = teacher[f"{src}.{p}"]
    for i, t in enumerate(config.layer_map):
        inner, ffn = config.heads(i) * config.head_dim, config.ffn(i)
        for src, dst in _LAYER_KEYS.items():
            for p in ("weight", "bias"):
                w = teacher[f"encoder.layer.{t}.{src}.{p}"]
                if dst in ("attention.query", "attention.key", "attention.value"):
                    w = w[:inner]
                elif dst == "attention.out" and p == "weight":
                    w = w[:, :inner]
                elif dst == "ffn_in":
                    w = w[:ffn]
                elif dst == "ffn_out" and p == "weight":
                    w = w[:, :ffn]
                out[f"layers.{i}.{dst}.{p}"] = w.contiguous()
    return out
