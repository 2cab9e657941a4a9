"""The agent's model store: verified install, rollback protection, health checks, quarantine, fallback
at start-up, and kill -9 at every named install step followed by a restart."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import DowngradeError, HealthCheckError, StoreError
from edge_agent.store import ModelStore
from export import FileMismatchError, Samples, UntrustedKeyError, build_package, extract_package
from export.installed import verify_installed
from tests.agent_fixtures import FIELDS, NAME, Packages, X, cli, session_packages


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    return session_packages(tmp_path_factory)


def _store(tmp_path: Path, packages: Packages, **kw: int) -> ModelStore:
    return ModelStore(tmp_path / "state", packages.public_key, **kw)


def _assert_serves(loaded: dict, version: int, packages: Packages) -> None:
    model = loaded[NAME]
    assert model.version == version
    np.testing.assert_allclose(model.runtime.run({"image": X})["logits"], packages.expected[version], rtol=1e-5, atol=1e-5)


def _flip_byte(path: Path, offset: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _model_file(s: ModelStore, version: int) -> Path:
    d = s.version_dir(NAME, version)
    return d / json.loads((d / "manifest.json").read_text())["model"]


def test_install_verifies_unpacks_activates_and_is_idempotent(tmp_path: Path, packages: Packages) -> None:
    s = _store(tmp_path, packages)
    r1 = s.install(packages.versions[1])
    assert (r1.name, r1.version, r1.previous, r1.status) == (NAME, 1, None, "installed")
    assert r1.health == {"logits": 0.0}
    files = sorted(p.name for p in s.version_dir(NAME, 1).iterdir())
    assert files == ["m1.onnx", "manifest.json", "manifest.sig", "samples.safetensors"]
    r2 = s.install(packages.versions[2])
    assert (r2.previous, r2.status) == (1, "installed")
    state = s.read_state()[NAME]
    assert (state.active, state.good, state.highest) == (2, [1, 2], 2)
    assert s.install(packages.versions[2]).status == "already-active"
    assert list(s.tmp.iterdir()) == []
    assert [e["event"] for e in s.events()] == ["install", "install"]
    _assert_serves(s.recover(), 2, packages)


def test_older_version_is_refused_unless_allowed_or_signed_rollback(tmp_path: Path, packages: Packages) -> None:
    s = _store(tmp_path, packages)
    s.install(packages.versions[3])
    with pytest.raises(DowngradeError, match=r"v2 is older than v3"):
        s.install(packages.versions[2])
    assert s.read_state()[NAME].active == 3 and s.installed(NAME) == [3]
    # a caller that checked a signed rollback authorization may go back
    assert s.install(packages.versions[2], allow_downgrade=True).previous == 3
    assert (s.read_state()[NAME].active, s.read_state()[NAME].highest) == (2, 3)
    # a package whose signed manifest carries extra.rollback = true may go back too
    signed_rollback = tmp_path / "v1-rollback.pfpkg"
    build_package(
        packages.dir / "m1.onnx", {**FIELDS, "name": NAME, "version": 1, "extra": {"rollback": True}},
        Samples({"image": X}, {"logits": packages.expected[1]}), signed_rollback, key=packages.private_key,
    )
    assert s.install(signed_rollback).version == 1
    _assert_serves(s.recover(), 1, packages)


def test_untrusted_and_tampered_packages_leave_no_trace(tmp_path: Path, packages: Packages) -> None:
    s = _store(tmp_path, packages)
    s.install(packages.versions[1])
    with pytest.raises(UntrustedKeyError):
        s.install(packages.other_key)
    tampered = tmp_path / "tampered.pfpkg"
    shutil.copy(packages.versions[2], tampered)
    with zipfile.ZipFile(tampered) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(".onnx"))
        offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + 100
    _flip_byte(tampered, offset)
    with pytest.raises(FileMismatchError, match="damaged|SHA-256"):
        s.install(tampered)
    assert s.installed(NAME) == [1] and s.read_state()[NAME].active == 1 and list(s.tmp.iterdir()) == []


def test_package_that_fails_its_health_check_never_serves(tmp_path: Path, packages: Packages) -> None:
    s = _store(tmp_path, packages)
    s.install(packages.versions[1])
    with pytest.raises(HealthCheckError, match="differs from the expected sample output"):
        s.install(packages.unhealthy)
    assert s.read_state()[NAME].active == 1 and s.installed(NAME) == [1]
    (q,) = s.quarantined()
    assert q["version"] == 50 and "health check" in q["reason"]
    _assert_serves(s.recover(), 1, packages)


def test_rollback_switches_to_previous_known_good(tmp_path: Path, packages: Packages) -> None:
    s = _store(tmp_path, packages)
    with pytest.raises(StoreError, match="no active models"):
        s.rollback()
    for v in (1, 2, 3):
        s.install(packages.versions[v])
    assert s.rollback() == {"model": NAME, "version": 2, "previous": 3}
    assert s.read_state()[NAME].good == [1, 2]
    assert s.rollback(NAME, to=3)["version"] == 3
    assert s.rollback()["version"] == 2
    assert s.rollback()["version"] == 1
    with pytest.raises(StoreError, match="no earlier known-good version"):
        s.rollback()
    _assert_serves(s.recover(), 1, packages)


def test_old_versions_are_pruned_beyond_keep(tmp_path: Path, packages: Packages) -> None:
    s = _store(tmp_path, packages, keep=2)
    for v in (1, 2, 3, 4):
        s.install(packages.versions[v])
    assert s.installed(NAME) == [3, 4] and s.read_state()[NAME].good == [3, 4]
    assert s.rollback()["version"] == 3


def test_corrupted_file_at_startup_falls_back_to_last_known_good(tmp_path: Path, packages: Packages) -> None:
    s = _store(tmp_path, packages)
    s.install(packages.versions[1])
    s.install(packages.versions[2])
    _flip_byte(_model_file(s, 2))
    seen = []
    loaded = _store(tmp_path, packages).recover(on_event=seen.append)
    _assert_serves(loaded, 1, packages)
    state = s.read_state()[NAME]
    assert (state.active, state.good, state.highest) == (1, [1], 2)  # highest stays: v2 cannot be replayed below
    (q,) = s.quarantined()
    assert q["version"] == 2 and "SHA-256" in q["reason"]
    assert seen and seen[0]["event"] == "fallback" and seen[0]["previous"] == 2
    # the same signed v2 can be installed again to repair the store
    assert s.install(packages.versions[2]).status == "installed"
    _assert_serves(s.recover(), 2, packages)


def test_version_failing_health_at_startup_is_set_aside(tmp_path: Path, packages: Packages) -> None:
    """A store whose active version was written without a health check (e.g. by an older agent)."""
    s = _store(tmp_path, packages)
    s.install(packages.versions[1])
    extract_package(packages.unhealthy, s.version_dir(NAME, 50), packages.public_key)
    state = s.read_state()
    state[NAME].promote(50)
    s.write_state(state)
    _assert_serves(s.recover(), 1, packages)
    assert s.read_state()[NAME].active == 1
    assert "health check failed" in s.quarantined()[0]["reason"]


def test_unreadable_state_is_rebuilt_from_the_verified_versions(tmp_path: Path, packages: Packages) -> None:
    s = _store(tmp_path, packages)
    s.install(packages.versions[1])
    s.install(packages.versions[2])
    s.state_path.write_text("{ not json")
    with pytest.raises(StoreError, match="unreadable"):
        s.read_state()
    _assert_serves(s.recover(), 2, packages)
    assert s.read_state()[NAME].active == 2
    assert any(e["event"] == "state-rebuilt" for e in s.events())


INSTALL_POINTS = [
    ("install.after_verify", 1),
    ("install.after_unpack", 1),
    ("install.after_fsync", 1),
    ("install.after_rename", 1),
    ("install.after_health", 1),
    ("state.after_tmp", 1),
    ("state.after_replace", 2),
]


@pytest.mark.parametrize(("point", "serves"), INSTALL_POINTS)
def test_kill_9_during_install_then_restart_serves_a_complete_verified_version(
    tmp_path: Path, packages: Packages, point: str, serves: int
) -> None:
    s = _store(tmp_path, packages)
    s.install(packages.versions[1])
    r = cli("agent", "install", str(packages.versions[2]), "--state-dir", str(s.root), "--trust", packages.public_key,
            env={"POCKETFLEET_FAULT": point})
    assert r.returncode == -9, (r.returncode, r.stderr)
    restarted = _store(tmp_path, packages)
    loaded = restarted.recover()
    _assert_serves(loaded, serves, packages)
    verify_installed(restarted.version_dir(NAME, serves), restarted.trust)
    assert list(restarted.tmp.iterdir()) == []
    assert not (restarted.root / "state.json.tmp").exists()
    state = json.loads(restarted.state_path.read_text())
    assert state["models"][NAME]["active"] == serves
    # running the install again finishes the job
    res = restarted.install(packages.versions[2])
    assert res.status in ("installed", "resumed", "already-active")
    _assert_serves(restarted.recover(), 2, packages)
