"""`pocketfleet demo` end to end, as a user runs it (the README's first command), with --json."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_every_stage_and_reports_it(tmp_path: Path, digits_cnn_dir: Path) -> None:
    shutil.copytree(digits_cnn_dir, tmp_path / "models" / "digits-cnn")  # reuse the session's trained model
    proc = subprocess.run(
        [sys.executable, "-m", "pocketfleet", "demo", "--workdir", str(tmp_path), "--devices", "3", "--rounds", "2",
         "--json"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    rows = {(r["format"], r["dtype"]): r for r in out["packages"]}
    assert set(rows) == {(f, d) for f in ("onnx", "tflite") for d in ("fp32", "fp16", "int8")}
    for (_, dtype), row in rows.items():
        assert row["verified"] and row["parity_agree"] >= 0.99
        assert row["top1"] >= out["pytorch_top1"] - 0.01
        if dtype == "int8":
            assert row["model_bytes"] < 0.35 * rows[row["format"], "fp32"]["model_bytes"]
    swap = out["agent_swap"]
    assert swap["failures"] == 0 and {r["version"] for r in swap["rows"]} == {1, 3}

    fleet = out["fleet"]
    assert fleet["canary_rollout"]["state"] == "complete" and set(fleet["canary_rollout"]["versions"].values()) == {2}
    fl = fleet["federated"]
    assert fl["state"] == "finished" and len(fl["rounds"]) == 2 and fl["rounds"][-1]["test_top1"] > 0.9
    final = fleet["head_rollout"]
    assert final["state"] == "complete" and set(final["versions"].values()) == {3}
    assert final["bytes"]["received"] < 0.25 * (final["bytes"]["received"] + final["bytes"]["reused"])
    # every agent now answers with the federated head
    assert all(abs(r["test_top1"] - fl["federated_head_top1"]) < 1e-6 for r in fleet["device_rows"])
