"""The reference workloads: digits-cnn, digits-mbnet and minilm-l6 (data, models, metrics, model dirs).

Attributes are imported lazily, so `compress.zoo.digits_data` or `compress.zoo.sentences` can be used
without importing torch.
"""

from __future__ import annotations

from pocketfleet import lazy_exports

_EXPORTS = {
    "Workload": "base",
    "torch_predict": "base",
    "list_workloads": "registry",
    "get_workload": "registry",
    "make_model_dir": "registry",
    "UnknownWorkloadError": "registry",
    "save_model_dir": "modeldir",
    "load_model_dir": "modeldir",
    "read_meta": "modeldir",
    "LoadedModel": "modeldir",
    "ModelDirError": "modeldir",
    "MODEL_FORMAT": "modeldir",
    "run_batched": "export.evaluate",
    "top1_accuracy": "export.evaluate",
    "embedding_fidelity": "export.evaluate",
    "digits_split": "digits_data",
    "stdlib_sentences": "sentences",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

