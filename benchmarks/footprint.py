"""Device footprint per agent extra: installed size in a fresh venv and idle RSS of the agent serving a
~0.5 MB model (digits-mbnet fp32) in that venv.

    python benchmarks/footprint.py --work /tmp/fp [--extras agent-onnx agent-tflite agent agent-pte]
        [--reuse] [--slim] [--json benchmarks/results/footprint.json]

For each extra: a new venv (`python -m venv`), `pip install ".[extra]"` from a copy of this checkout; the
installed size is site-packages minus what a bare venv already has (pip, setuptools). Then a package of
the venv's format is exported (in this interpreter, which has torch) and installed into an agent state
directory with the venv's `pocketfleet agent install`, the venv's `pocketfleet agent run` serves it, and
after one prediction and `--idle-s` seconds its VmRSS is read from /proc. Needs network access to the
package index for the installs (the venvs are kept under --work; --reuse skips the install).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FORMAT = {"agent-onnx": "onnx", "agent-tflite": "tflite", "agent": "onnx", "agent-pte": "pte"}
GOAL_MB, GOAL_RSS_MB = 150, 60


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _site(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def make_venv(venv: Path, extra: str | None, src: Path, reuse: bool) -> None:
    if reuse and (venv / "bin" / "python").exists():
        return
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if extra is not None:
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", f"{src}[{extra}]"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def largest(venv: Path, n: int = 6) -> list[tuple[str, float]]:
    site = _site(venv)
    sizes = [(p.name, _du(p) / 1e6) for p in site.iterdir() if p.is_dir() and not p.name.endswith(".dist-info")]
    return [(k, round(v, 1)) for k, v in sorted(sizes, key=lambda kv: -kv[1])[:n]]


def package_for(fmt: str, work: Path) -> tuple[Path, Path]:
    """A signed digits-mbnet fp32 package of `fmt` (exported here) and its public key."""
    from compress.zoo import load_model_dir, make_model_dir
    from export import export_model, generate_keys

    keys = work / "keys"
    if not (keys / "pocketfleet.pub").exists():
        generate_keys(keys, overwrite=True)
    pub = next(keys.glob("*.pub"))
    pkg = work / f"mbnet-{fmt}.pfpkg"
    if not pkg.exists():
        model = work / "digits-mbnet"
        if not (model / "model.json").exists():
            make_model_dir("digits-mbnet", model, seed=0, progress=False)
        export_model(load_model_dir(model), fmt, "fp32", out=pkg, key=next(keys.glob("*.key")), version=1)
    return pkg, pub


def idle_rss(venv: Path, pkg: Path, pub: Path, state: Path, idle_s: float) -> dict[str, Any]:
    import numpy as np

    shutil.rmtree(state, ignore_errors=True)
    exe = str(venv / "bin" / "pocketfleet")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([exe, "agent", "install", str(pkg), "--state-dir", str(state), "--trust", str(pub)],
                   check=True, capture_output=True, env=env, cwd="/")  # fmt: skip
    proc = subprocess.Popen([exe, "agent", "run", "--state-dir", str(state), "--trust", str(pub), "--listen", "127.0.0.1:0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd="/")  # fmt: skip
    try:
        url = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and url is None:
            info_file = state / "agent.json"
            if info_file.exists():
                info = json.loads(info_file.read_text())
                url = info["urls"][0] if info.get("pid") == proc.pid else None
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited: {proc.stderr.read().decode()[-500:] if proc.stderr else ''}")
            time.sleep(0.1)
        if url is None:
            raise RuntimeError("agent did not start")
        x = np.zeros((1, 1, 8, 8), np.float32).tolist()
        req = urllib.request.Request(f"{url}/v1/predict", json.dumps({"inputs": {"image": x}}).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as resp:
            ok = resp.status == 200
        time.sleep(idle_s)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
        return {"rss_mb": round(rss_kb / 1024, 1), "predict_ok": ok}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/pf-footprint"))
    ap.add_argument("--extras", nargs="+", default=list(FORMAT))
    ap.add_argument("--reuse", action="store_true", help="reuse venvs already under --work")
    ap.add_argument("--idle-s", type=float, default=3.0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--slim", action="store_true", help="also measure each venv after `pocketfleet agent slim` "
                    "(it changes the venv: rerun without --reuse for plain figures)")
    args = ap.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src"
    if not args.reuse or not src.exists():
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "results", "*.egg-info"))
    make_venv(work / "venv-bare", None, src, reuse=True)
    bare = _du(_site(work / "venv-bare"))
    rows = []
    for extra in args.extras:
        venv = work / f"venv-{extra}"
        make_venv(venv, extra, src, args.reuse)
        installed = (_du(_site(venv)) - bare) / 1e6
        pkg, pub = package_for(FORMAT[extra], work)
        rss = idle_rss(venv, pkg, pub, work / f"state-{extra}", args.idle_s)
        rows.append({"extra": extra, "format": FORMAT[extra], "installed_mb": round(installed, 1), **rss,
                     "largest_mb": largest(venv), "meets_goal": installed <= GOAL_MB and rss["rss_mb"] <= GOAL_RSS_MB})  # fmt: skip
        if args.slim and extra != "agent-pte":  # `pocketfleet agent slim` in that venv, then measured again
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            subprocess.run([str(venv / "bin" / "pocketfleet"), "agent", "slim"], check=True, capture_output=True,
                           env=env, cwd="/")  # fmt: skip
            installed = (_du(_site(venv)) - bare) / 1e6
            rss = idle_rss(venv, pkg, pub, work / f"state-{extra}", args.idle_s)
            rows.append({"extra": f"{extra}+slim", "format": FORMAT[extra], "installed_mb": round(installed, 1), **rss,
                         "largest_mb": largest(venv), "meets_goal": installed <= GOAL_MB and rss["rss_mb"] <= GOAL_RSS_MB})  # fmt: skip
    print(f"{'extra':18s} {'format':7s} {'installed MB':>12s} {'idle RSS MB':>12s}  largest packages (MB)")
    for r in rows:
        big = ", ".join(f"{k} {v}" for k, v in r["largest_mb"][:4])
        print(f"{r['extra']:18s} {r['format']:7s} {r['installed_mb']:12.1f} {r['rss_mb']:12.1f}  {big}")
    print(f"goal: <= {GOAL_MB} MB installed and <= {GOAL_RSS_MB} MB idle RSS with one runtime")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "bare_venv_mb": round(bare / 1e6, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
