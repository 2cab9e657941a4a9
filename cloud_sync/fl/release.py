"""Turn a new global head into a signed model package for the OTA path (torch-free).

The new package is the base package with only the head weights member replaced and the version bumped:
the model file's bytes are unchanged, so content-defined chunking moves only the few chunks of the head.
When the head serves an output (`trainable_head.output`), the samples' expected value of that output is
recomputed from their `features` with the new weights, so the package passes the agent's health check.
The lead's release path then ships it (`pocketfleet release PKG --group G`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FLError

_SKIP = ("format_version", "files", "samples", "created", "expires")


def head_release(
    base: str | Path, weights: Mapping[str, np.ndarray], version: int, key: Any, out_path: str | Path,
    trust: Any = None, note: Mapping[str, Any] | None = None,
) -> Any:
    """Write `out_path`: `base` with its trainable head weights replaced by `weights`, at `version`, signed.

    `trust` (optional) verifies the base first. Returns the new Manifest.
    """
    from safetensors.numpy import load, save

    from export.package import build_package, open_package
    from export.samples import Samples
    from export.verify import verify_package

    if trust is not None:
        verify_package(base, trust)
    with open_package(base) as reader:
        manifest = reader.manifest
        head = manifest.trainable_head or {}
        member = head.get("weights")
        if not member or member not in manifest.files:
            raise FLError(f"{base}: trainable_head.weights names no file of the package")
        if version <= manifest.version:
            raise FLError(f"head release version {version} must be newer than the base's {manifest.version}")
        old = load(reader.read(member, manifest.files[member].size))
        if set(old) != set(weights) or any(old[k].shape != np.asarray(weights[k]).shape for k in old):
            raise FLError(f"new head tensors {sorted(weights)} do not match the package's {sorted(old)}")
        files: dict[str, Any] = {}
        for name, entry in manifest.files.items():
            if name == (manifest.samples or {}).get("path"):
                continue
            files[name] = save({k: np.ascontiguousarray(weights[k], dtype=old[k].dtype) for k in sorted(old)}) \
                if name == member else reader.read(name, entry.size)
        samples = None
        if manifest.samples:
            samples = Samples.from_bytes(reader.read(manifest.samples["path"], manifest.files[manifest.samples["path"]].size),
                                         manifest.samples)
            _recompute_head_output(samples, head, weights, base)
    fields = {k: v for k, v in manifest.raw.items() if k not in _SKIP}
    fields["version"] = version
    fields["extra"] = {**(manifest.extra or {}), "fl": dict(note or {})}
    return build_package(files, fields, samples, out_path, key=key)


def _recompute_head_output(samples: Any, entry: Mapping[str, Any], weights: Mapping[str, np.ndarray],
                           base: str | Path) -> None:
    from export.head import Head

    head = Head.from_manifest(entry)
    if head.output is None:
        return
    if head.features not in samples.outputs:
        raise FLError(f"{base}: the samples hold no {head.features!r} output to recompute {head.output!r} from")
    new = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    samples.outputs[head.output] = head.logits(new, samples.outputs[head.features]).astype(np.float32)


def release_hook(
    base: str | Path, key: Any, out_dir: str | Path, publish: Any = None, trust: Any = None,
) -> Any:
    """An `Aggregator(on_model=...)` callback: each new global head becomes `<name>-v<N>.pfpkg` in
    `out_dir` (N = base version + FL model version), signed with `key`; `publish(path)` (e.g. the
    rollout path of cloud_sync) is then called with it."""
    from export.package import read_manifest

    manifest = read_manifest(base)
    out_dir = Path(out_dir)

    def on_model(task: str, version: int, weights: Mapping[str, np.ndarray]) -> None:
        out = out_dir / f"{manifest.name}-v{manifest.version + version}.pfpkg"
        head_release(base, weights, manifest.version + version, key, out, trust=trust,
                     note={"task": task, "fl_model_version": version})
        if publish is not None:
            publish(out)

    return on_model
