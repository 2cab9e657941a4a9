"""export: ONNX/TFLite artifacts, parity checks against PyTorch, and signed model packages.

`import export` stays torch-free: names are resolved lazily, and only the conversion / parity functions
import torch, onnx or litert-torch when called.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # conversion and parity (need torch when called)
    "export_model": "export.pipeline",
    "package_artifact": "export.pipeline",
    "ExportResult": "export.pipeline",
    "convert": "export.pipeline",
    "export_onnx": "export.onnx",
    "export_tflite": "export.tflite",
    "check_parity": "export.parity",
    "ParityBounds": "export.parity",
    "ParityReport": "export.parity",
    "Recorded": "export.parity",
    # packages (torch-free)
    "build_package": "export.package",
    "sign_package": "export.package",
    "inspect_package": "export.package",
    "open_package": "export.package",
    "read_manifest": "export.package",
    "Limits": "export.package",
    "PackageReader": "export.package",
    "verify_package": "export.verify",
    "extract_package": "export.verify",
    "verify_installed": "export.installed",
    "load_runtime": "export.runtimes",
    "Runtime": "export.runtimes",
    "Manifest": "export.manifest",
    "FileEntry": "export.manifest",
    "Samples": "export.samples",
    "check_samples": "export.samples",
    "SampleMismatchError": "export.samples",
    "generate_keys": "export.signing",
    "load_private_key": "export.signing",
    "load_public_key": "export.signing",
    "load_trust": "export.signing",
    "key_id": "export.signing",
    "canonical_json": "export.signing",
    # root of trust: key rotation and revocation (TUF root metadata)
    "RootTrust": "export.trust_root",
    "load_root_trust": "export.trust_root",
    "init_root": "export.trust_root",
    "rotate_root": "export.trust_root",
    "sign_pending_root": "export.trust_root",
    "attach_roots": "export.trust_root",
    "show_root": "export.trust_root",
    "TrustRootError": "export.trust_root",
    "MalformedRootError": "export.trust_root",
    "RootSignatureError": "export.trust_root",
    "RootRollbackError": "export.trust_root",
    "ExpiredRootError": "export.trust_root",
    "TensorSpec": "export.specs",
    "Quantization": "export.specs",
    "MetricSpec": "export.specs",
    "Head": "export.head",
    "DenseLayer": "export.head",
}
_ERRORS = [
    "ExportError",
    "ParityError",
    "PackageError",
    "KeyFileError",
    "VerificationError",
    "NotAPackageError",
    "MalformedManifestError",
    "MalformedSignatureError",
    "MalformedPackageError",
    "UnsignedPackageError",
    "UntrustedKeyError",
    "BadSignatureError",
    "ExpiredPackageError",
    "MissingFileError",
    "UnexpectedFileError",
    "FileMismatchError",
    "UnsafePathError",
    "OversizeError",
    "DowngradeError",
    "HeadError",
]
_EXPORTS.update({name: "export.errors" for name in _ERRORS})

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
