"""`pocketfleet agent slim` on a copy of this environment's real onnxruntime and numpy: it removes what a
serving agent never loads (onnxruntime's C API library and model-building tools, numpy's tests), keeps pip's
RECORD true, and onnxruntime from the slimmed copy still runs a model; an environment with torch is refused."""

from __future__ import annotations

import csv
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.errors import AgentError
from edge_agent.slim import slim

RUN_A_MODEL = """
import numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g", [x], [y])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
print(ort.__file__, s.run(None, {"x": np.array([1.5, 2.0], np.float32)})[0].tolist())
"""


def _copy_dist(name: str, site: Path) -> None:
    dist = md.distribution(name)
    tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    for top in tops:
        src = Path(dist.locate_file(top))
        if src.is_dir():
            shutil.copytree(src, site / top, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            shutil.copy2(src, site / top)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    for name in ("onnxruntime", "numpy"):
        _copy_dist(name, site)
    return site


def _record(site: Path, dist: str) -> set[str]:
    record = next(site.glob(f"{dist}-*.dist-info/RECORD"))
    return {row[0] for row in csv.reader(record.read_text().splitlines()) if row}


def test_slim_removes_what_an_agent_never_loads_and_onnxruntime_still_runs(site: Path) -> None:
    capi = next(site.glob("onnxruntime/capi/libonnxruntime.so.*"))
    binding = next(site.glob("onnxruntime/capi/onnxruntime_pybind11_state*.so"))
    plan = slim(site, dry_run=True)
    assert capi.exists() and plan.bytes_removed > 30e6  # a dry run deletes nothing
    assert str(capi.relative_to(site)) in plan.removed["onnxruntime"]
    assert any("/tests/" in p for p in plan.removed["numpy"])

    done = slim(site)
    assert done.bytes_removed == plan.bytes_removed and set(done.checked) == {"onnxruntime", "numpy"}
    assert not capi.exists() and not (site / "onnxruntime" / "quantization").exists()
    assert binding.exists() and (site / "onnxruntime" / "capi" / "onnxruntime_inference_collection.py").exists()
    assert str(capi.relative_to(site)) not in _record(site, "onnxruntime")
    copied = [p for p in _record(site, "onnxruntime") if not p.endswith(".pyc") and not p.startswith("..")]
    assert copied and all((site / p).exists() for p in copied)  # RECORD lists only what is on disk
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", RUN_A_MODEL], capture_output=True, text=True, env=env, cwd=site)
    assert out.returncode == 0, out.stderr[-800:]
    assert out.stdout.startswith(str(site)) and out.stdout.strip().endswith("[3.0, 4.0]"), out.stdout
    assert slim(site).bytes_removed == 0  # nothing left to remove


def test_slim_refuses_an_environment_that_builds_models(tmp_path: Path) -> None:
    info = tmp_path / "torch-2.13.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0\n")
    with pytest.raises(AgentError, match="has torch: it builds models"):
        slim(tmp_path)
