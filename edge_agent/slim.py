"""`pocketfleet agent slim`: remove from a device's Python environment the parts of the runtime wheels that
a serving agent never loads, and keep pip's records of them true.

What goes (each entry is checked to belong to its distribution's RECORD before anything is deleted):
- onnxruntime: `capi/libonnxruntime.so.*`, the C API library for C/C++ programs (the Python binding,
  `onnxruntime_pybind11_state`, is self-contained and does not link it), and the model-building tools
  `transformers/`, `quantization/`, `tools/` (pocketfleet's compress layer uses them; an agent does not);
- ai_edge_litert: the WebGPU accelerator library, the vendor NPU plugins and `tools/` (the agent runs
  the CPU interpreter with XNNPACK);
- numpy: its `tests/` folders.

An environment with torch builds models and keeps everything: slim refuses it (compress needs
onnxruntime's quantization tools). After deleting, every runtime still installed is imported in a fresh
interpreter; `pip install --force-reinstall onnxruntime ai-edge-litert numpy` brings everything back.
"""

from __future__ import annotations

import csv
import fnmatch
import importlib.metadata as md
import io
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from pocketfleet.fs import atomic_write_bytes

from .errors import AgentError

UNUSED = {
    "onnxruntime": ("onnxruntime/capi/libonnxruntime.so.*", "onnxruntime/transformers/*",
                    "onnxruntime/quantization/*", "onnxruntime/tools/*"),
    "ai-edge-litert": ("ai_edge_litert/libLiteRtWebGpuAccelerator.so", "ai_edge_litert/vendors/*",
                       "ai_edge_litert/tools/*"),
    "numpy": ("numpy/*/tests/*", "numpy/tests/*"),
}  # fmt: skip
IMPORT_CHECK = {
    "onnxruntime": "import onnxruntime; onnxruntime.SessionOptions()",
    "ai-edge-litert": "from ai_edge_litert.interpreter import Interpreter",
    "numpy": "import numpy; numpy.zeros(3).sum()",
}


@dataclass
class SlimResult:
    removed: dict[str, list[str]] = field(default_factory=dict)  # distribution -> paths (site-relative)
    bytes_removed: int = 0
    dry_run: bool = True
    checked: list[str] = field(default_factory=list)  # distributions imported fine afterwards

    def to_dict(self) -> dict[str, object]:
        return {"dry_run": self.dry_run, "bytes_removed": self.bytes_removed, "checked": self.checked,
                "removed": {k: len(v) for k, v in self.removed.items()}}  # fmt: skip


def slim(site: str | Path | None = None, dry_run: bool = False, force: bool = False) -> SlimResult:
    """Delete (or with `dry_run` list) the unused files of the runtimes installed in `site` (default: this
    interpreter's site-packages); raises AgentError when that environment builds models (torch installed)
    unless `force`, or when a runtime no longer imports afterwards."""
    site = Path(site or sysconfig.get_paths()["purelib"])
    dists = {_name(d): d for d in md.distributions(path=[str(site)])}
    if "torch" in dists and not force:
        raise AgentError(f"{site} has torch: it builds models, and pocketfleet's compress layer needs onnxruntime's "
                         "quantization tools; slim a device environment (pip install 'pocketfleet[agent-onnx]' "
                         "or '[agent-tflite]') instead")  # fmt: skip
    result = SlimResult(dry_run=dry_run)
    for dist_name, patterns in UNUSED.items():
        dist = dists.get(dist_name)
        files = [f for f in (dist.files or []) if any(fnmatch.fnmatch(str(f), p) for p in patterns)] if dist else []
        paths = [(str(f), Path(dist.locate_file(f))) for f in files] if dist else []
        paths = [(rel, p) for rel, p in paths if p.is_file()]
        if not paths:
            continue
        result.removed[dist_name] = [rel for rel, _ in paths]
        result.bytes_removed += sum(p.stat().st_size for _, p in paths)
        if dry_run:
            continue
        for _, p in paths:
            p.unlink()
        _prune_empty_dirs({p.parent for _, p in paths})
        _rewrite_record(dist, {rel for rel, _ in paths})
    if not dry_run:
        for dist_name in UNUSED:
            if dist_name in dists:
                _check_import(dist_name, site)
                result.checked.append(dist_name)
    return result


def _name(dist: md.Distribution) -> str:
    return (dist.metadata["Name"] or "").lower().replace("_", "-")


def _prune_empty_dirs(dirs: set[Path]) -> None:
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        while d.is_dir() and not any(d.iterdir()):
            d.rmdir()
            d = d.parent


def _rewrite_record(dist: md.Distribution, removed: set[str]) -> None:
    """Drop the deleted files from the distribution's RECORD, so pip's view matches the disk."""
    entry = next((f for f in dist.files or [] if f.name == "RECORD" and f.parent.name.endswith(".dist-info")), None)
    record = Path(dist.locate_file(entry)) if entry is not None else None
    if record is None or not record.is_file():
        return
    rows = [r for r in csv.reader(io.StringIO(record.read_text())) if r and r[0] not in removed]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    atomic_write_bytes(record, out.getvalue().encode())


def _check_import(dist_name: str, site: Path) -> None:
    """Import the runtime from `site` in a fresh interpreter (site first on its path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK[dist_name]], capture_output=True, text=True, env=env,
                          cwd=site)  # fmt: skip
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise AgentError(f"{dist_name} no longer imports after slimming ({tail}); restore it with "
                         f"pip install --force-reinstall {dist_name}")  # fmt: skip
