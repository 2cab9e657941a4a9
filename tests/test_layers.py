"""The import layers of shared/ARCHITECTURE.md (docs/architecture.md): the import-linter contracts in
pyproject.toml hold, they catch an upward import, and a plain count of upward import statements is 0."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pocketfleet", "export", "devices", "compress", "cloud_sync", "edge_agent")
# layer -> the layers its modules may import (module level or inside functions)
ALLOWED = {
    "base": {"base"},
    "export": {"base", "export"},
    "devices": {"base", "export", "devices"},
    "compress": {"base", "export", "devices", "compress"},
    "cloud_sync": {"base", "export", "cloud_sync"},
    "edge_agent": {"base", "export", "cloud_sync", "edge_agent"},
    "root": {"base", "export", "devices", "compress", "cloud_sync", "edge_agent", "root"},
}
ROOT_MODULES = ("cli", "demo", "sim", "__main__")


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "pocketfleet":
        return "root" if len(parts) > 1 and parts[1] in ROOT_MODULES else "base"
    return parts[0] if parts[0] in ALLOWED else None


def upward_imports(root: Path = ROOT) -> list[str]:
    """Every import statement (module level or in a function) or lazy-export string that crosses up."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            module = ".".join(rel.parts).removesuffix(".__init__")
            parent = module if path.name == "__init__.py" else module.rpartition(".")[0]
            src = _layer(module)
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = parent.split(".")[: len(parent.split(".")) - node.level + 1]
                        names = [".".join(base + ([node.module] if node.module else []))]
                    else:
                        names = [node.module or ""]
                elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value \
                        and node.value.split(".")[0] in PACKAGES and node.value.replace(".", "").replace(":", "").replace("_", "").isalnum():
                    names = [node.value.split(":")[0]]  # lazy_exports tables: "edge_agent.daemon"
                else:
                    continue
                for name in names:
                    dst = _layer(name)
                    if dst is not None and src is not None and dst not in ALLOWED[src]:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {src} -> {name}")
    return found


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(exe), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_no_import_statement_crosses_a_layer_upward() -> None:
    assert upward_imports() == []


def test_the_counter_sees_an_upward_import(tmp_path: Path) -> None:
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "bad.py").write_text("def f():\n    from compress.zoo import load_model_dir\n")
    for package in PACKAGES[:1] + PACKAGES[2:]:
        (tmp_path / package).mkdir(exist_ok=True)
    assert upward_imports(tmp_path) == ["export/bad.py:2 export -> compress.zoo"]


def test_import_contracts_hold_and_catch_an_upward_import(tmp_path: Path) -> None:
    kept = _lint_imports(ROOT)
    assert kept.returncode == 0, kept.stdout[-3000:] + kept.stderr[-2000:]
    assert "0 broken" in kept.stdout
    # the same tree with one deliberate upward import (export -> compress, inside a function) must fail
    for name in (*PACKAGES, "pyproject.toml"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "*.tflite"))
        else:
            shutil.copy(src, tmp_path / name)
    bad = tmp_path / "export" / "pipeline.py"
    bad.write_text(bad.read_text() + "\n\ndef _upward():\n    from compress.zoo import load_model_dir\n")
    broken = _lint_imports(tmp_path)
    assert broken.returncode != 0
    assert "export.pipeline -> compress.zoo" in broken.stdout
