"""The canary probe a device runs after installing a release (torch-free).

It feeds the package's sample inputs one at a time through the freshly installed model, `runs` rounds,
and measures what the canary gates need: requests, errors (an exception or a non-finite output), p95
latency in ms, and - when the signed manifest carries labels for the samples in
`extra.golden = {"labels": [...], "output": "<output name>"}` - the top-1 accuracy on them ("golden").
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def golden_labels(manifest: Any) -> tuple[list[int], str | None] | None:
    golden = (manifest.extra or {}).get("golden")
    if not isinstance(golden, dict) or not isinstance(golden.get("labels"), list):
        return None
    labels = golden["labels"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        return None
    output = golden.get("output")
    return labels, output if isinstance(output, str) else None


def run_probe(loaded: Any, runs: int = 20) -> dict[str, Any]:
    """Probe a served model (edge_agent.health.ServedModel) on its samples; returns the pf.ota.report/1 `probe` object."""
    from export.samples import Samples

    manifest = loaded.manifest
    samples = Samples.from_bytes((loaded.path / manifest.samples["path"]).read_bytes(), manifest.samples)
    count = samples.count
    golden = golden_labels(manifest)
    out_name = (golden[1] if golden else None) or manifest.outputs[0].name
    latencies: list[float] = []
    errors = requests = 0
    predictions: list[int | None] = [None] * count
    for _ in range(max(1, runs)):
        for i in range(count):
            x = {k: v[i : i + 1] for k, v in samples.inputs.items()}
            requests += 1
            start = time.perf_counter()
            try:
                out = loaded.runtime.run(x)
            except Exception:  # noqa: BLE001 - a failing request is what the probe counts
                errors += 1
                continue
            latencies.append((time.perf_counter() - start) * 1000.0)
            arrays = [np.asarray(v) for v in out.values()]
            if not all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f"):
                errors += 1
                continue
            if out_name in out:
                predictions[i] = int(np.asarray(out[out_name]).reshape(1, -1).argmax(axis=1)[0])
    result: dict[str, Any] = {
        "requests": requests,
        "errors": errors,
        "p95_ms": float(np.percentile(latencies, 95)) if latencies else 0.0,
        "golden": None,
        "golden_kind": None,
    }
    if golden is not None:
        labels = golden[0][:count]
        if labels:
            hits = sum(1 for p, y in zip(predictions, labels, strict=False) if p is not None and p == y)
            result["golden"] = hits / len(labels)
            result["golden_kind"] = "top1_accuracy"
    return result
