"""Shared pytest fixtures. Keep each group small and documented; heavy fixtures are session-scoped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# --- a device footprint: a fresh interpreter where torch and the workstation packages cannot import ------

NO_TORCH = """
import sys
BLOCKED = ("torch", "onnx", "onnxscript", "litert_torch", "ai_edge_quantizer", "sklearn", "compress.zoo")
class _Block:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is blocked in this test (device footprint)")
        return None
sys.meta_path.insert(0, _Block())
"""


class NoTorch:
    """Run Python code or the `pocketfleet` command in a fresh interpreter behind NO_TORCH."""

    prelude = NO_TORCH

    def python(self, code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120,
               allow: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        """`allow`: blocked packages this code may import after all (e.g. onnx for ONNX analysis)."""
        prelude = NO_TORCH + (f"BLOCKED = tuple(b for b in BLOCKED if b not in {allow!r})\n" if allow else "")
        return subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True,
                              text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout)

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.python("import sys\nfrom pocketfleet.cli import main\nsys.exit(main(sys.argv[1:]))", *args,
                           env=env, timeout=timeout)


@pytest.fixture(scope="session")
def no_torch() -> NoTorch:
    """The one way tests check the device footprint: `no_torch.python(code)`, `no_torch.cli(*args)`."""
    blocked = NoTorch().python("import torch")
    assert blocked.returncode != 0 and "blocked" in blocked.stderr, "the NO_TORCH prelude does not block torch"
    return NoTorch()


# --- reference model directories (compress.zoo), made once per test session -------------------------


def _make(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    from compress.zoo import make_model_dir

    return make_model_dir(name, tmp_path_factory.mktemp("zoo") / name, seed=0, progress=False)


@pytest.fixture(scope="session")
def digits_cnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained digits-cnn model directory (model.json + weights.safetensors)."""
    return _make(tmp_path_factory, "digits-cnn")


@pytest.fixture(scope="session")
def digits_mbnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained digits-mbnet (MobileNetV2-style) model directory."""
    return _make(tmp_path_factory, "digits-mbnet")


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pretrained minilm-l6 model directory, with tokenizer.json, sentences.json and the fp32
    reference embeddings of the eval sentences (reference.safetensors)."""
    return _make(tmp_path_factory, "minilm-l6")


# --- hypothesis profiles for the fuzz tests (tests/test_fuzz_*.py) -----------------------------------
# "ci" (default): deterministic, bounded so the whole fuzz set runs in well under a minute on 2 cores;
# "deep": HYPOTHESIS_PROFILE=deep for long local runs (FUZZ_SCALE examples per CI example, no deadline
# flakes from a loaded machine, the example database kept so failures replay).
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is in the dev extra; only the fuzz tests need it
    pass
else:
    settings.register_profile(
        "ci", max_examples=60, deadline=2000, derandomize=True, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile(
        "deep", max_examples=2000, deadline=10000, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a fresh signing key pair (pocketfleet.key / pocketfleet.pub), one per test module."""
    from export.signing import generate_keys

    d = tmp_path_factory.mktemp("keys")
    generate_keys(d)
    return d
