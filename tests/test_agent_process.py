"""The agent as a process, where importing torch fails (device footprint): install into the running agent
through the CLI, predict/status/rollback commands, telemetry through a sink, graceful SIGTERM, kill -9 at
each swap step then restart, and a swap to a version that turns out bad."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.client import Client
from edge_agent.config import AgentConfig
from edge_agent.daemon import Agent, running_agent
from edge_agent.store import ModelStore
from export.installed import verify_installed
from tests.agent_fixtures import NAME, Packages, X, cli, session_packages, spawn
from tests.conftest import NO_TORCH


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    return session_packages(tmp_path_factory)


def _start(state: Path, packages: Packages, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    proc = spawn("agent", "run", "--state-dir", str(state), "--trust", packages.public_key, "--listen", "127.0.0.1:0",
                 *extra, env=env, prelude=NO_TORCH)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = running_agent(state)
        if info and info["pid"] == proc.pid:
            return proc, info["urls"][0]
        if proc.poll() is not None:
            raise AssertionError(f"agent exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("agent did not start in 60 s")


def _wait_version(url: str, version: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    with Client(url) as c:
        while time.monotonic() < deadline:
            if c.health()["models"].get(NAME, {}).get("version") == version:
                return
            time.sleep(0.05)
    raise AssertionError(f"agent did not switch to v{version}")


def _check_serves(url: str, version: int, packages: Packages) -> None:
    with Client(url) as c:
        pred = c.predict(X)
    assert pred.model == {"name": NAME, "version": version}
    np.testing.assert_allclose(pred.outputs["logits"], packages.expected[version], rtol=1e-5, atol=1e-5)


def test_torch_free_agent_installs_swaps_rolls_back_and_reports(tmp_path: Path, packages: Packages) -> None:
    state, sink = tmp_path / "state", tmp_path / "sink.jsonl"
    blocked = subprocess.run([sys.executable, "-c", NO_TORCH + "\nimport torch"], capture_output=True, text=True)
    assert blocked.returncode != 0 and "blocked" in blocked.stderr  # the prelude really removes torch
    r = cli("agent", "install", str(packages.versions[1]), "--state-dir", str(state), "--trust", packages.public_key, prelude=NO_TORCH)
    assert r.returncode == 0, r.stderr
    proc, url = _start(state, packages, "--telemetry-interval-s", "0.3", "--sink", f"jsonl:{sink}", "--drain-interval-s", "0.2",
                       "--device-id", "dev-test")
    try:
        _check_serves(url, 1, packages)
        np.save(tmp_path / "x.npy", X)
        r = cli("agent", "predict", "--input", str(tmp_path / "x.npy"), "--state-dir", str(state), "--json", prelude=NO_TORCH)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["model"] == {"name": NAME, "version": 1}
        np.testing.assert_allclose(out["outputs"]["logits"], packages.expected[1], rtol=1e-5, atol=1e-5)
        # install into the running agent: the CLI writes the store and the agent swaps
        r = cli("agent", "install", str(packages.versions[2]), "--state-dir", str(state), "--trust", packages.public_key,
                "--json", prelude=NO_TORCH)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["agent"]["serving"] == {NAME: 2}
        _check_serves(url, 2, packages)
        r = cli("agent", "status", "--state-dir", str(state), "--trust", packages.public_key, "--json", prelude=NO_TORCH)
        status = json.loads(r.stdout)
        assert status["models"][NAME]["active"] == 2 and status["agent"]["pid"] == proc.pid
        assert status["agent"]["health"]["models"][NAME]["version"] == 2
        r = cli("agent", "rollback", "--state-dir", str(state), "--trust", packages.public_key, "--json", prelude=NO_TORCH)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["version"] == 1
        _check_serves(url, 1, packages)
        # an older package is refused with a clear message and a non-zero exit
        r = cli("agent", "install", str(packages.versions[1]), "--state-dir", str(state), "--trust", packages.public_key, prelude=NO_TORCH)
        assert r.returncode == 0  # v1 is active again: installing it is a no-op
        r = cli("agent", "install", str(packages.other_key), "--state-dir", str(state), "--trust", packages.public_key, prelude=NO_TORCH)
        assert r.returncode == 4 and "not trusted" in r.stderr and "Traceback" not in r.stderr
        deadline = time.monotonic() + 20
        kinds: set[str] = set()
        while time.monotonic() < deadline and not {"telemetry", "event"} <= kinds:
            time.sleep(0.1)
            lines = [json.loads(x) for x in sink.read_text().splitlines()] if sink.exists() else []
            kinds = {x["kind"] for x in lines}
        tele = [x["body"] for x in lines if x["kind"] == "telemetry"]
        events = [x["body"]["event"] for x in lines if x["kind"] == "event"]
        assert tele and tele[0]["device"] == "dev-test" and "swap" in events
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
    assert rc == 0, proc.stderr.read() if proc.stderr else ""
    assert running_agent(state) is None and not (state / "agent.json").exists()


@pytest.mark.parametrize("point", ["swap.after_load", "swap.after_switch"])
def test_kill_9_during_a_swap_then_restart_serves_a_complete_verified_version(
    tmp_path: Path, packages: Packages, point: str
) -> None:
    state = tmp_path / "state"
    ModelStore(state, packages.public_key).install(packages.versions[1])
    proc, url = _start(state, packages, "--watch-interval-s", "0.05", env={"POCKETFLEET_FAULT": point})
    try:
        _check_serves(url, 1, packages)
        r = cli("agent", "install", str(packages.versions[2]), "--state-dir", str(state), "--trust", packages.public_key, "--json")
        # the install is durable, but the agent died mid-swap: the command says so (issue 12, case 13)
        assert r.returncode != 0 and "does not serve" in r.stderr, r.stderr
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    proc, url = _start(state, packages)
    try:
        _check_serves(url, 2, packages)
        verify_installed(state / "versions" / NAME / "2", ModelStore(state, packages.public_key).trust)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_swap_to_a_version_that_fails_keeps_serving_and_reverts(tmp_path: Path, packages: Packages) -> None:
    state = tmp_path / "state"
    store = ModelStore(state, packages.public_key)
    store.install(packages.versions[1])
    store.install(packages.versions[2], activate=False)  # installed and healthy, not active
    agent = Agent(AgentConfig(state_dir=str(state), trust=packages.public_key, listen="127.0.0.1:0", watch_interval_s=60)).start()
    try:
        v2 = store.version_dir(NAME, 2)
        model = v2 / json.loads((v2 / "manifest.json").read_text())["model"]
        model.write_bytes(model.read_bytes()[:-10] + b"0123456789")  # damaged after the install
        store.set_active(NAME, 2, "activate")  # what a buggy tool could do: point at it without checks
        result = agent.reload()
        assert result["swapped"] == [] and result["failed"][0]["version"] == 2
        assert agent.served() == {NAME: 1}
        assert store.read_state()[NAME].active == 1
        assert any(q["version"] == 2 for q in store.quarantined())
        _check_serves(agent.urls()[0], 1, packages)
        events = [r.json()["event"] for r in agent.outbox.peek(100) if r.kind == "event"]
        assert "swap-failed" in events
    finally:
        agent.stop()


def test_demo_stage_swaps_under_load_and_reports_each_version(tmp_path: Path, packages: Packages) -> None:
    from pocketfleet.sim.swap import swap_under_load

    result = swap_under_load(tmp_path / "state", packages.public_key, [packages.versions[1], packages.versions[2]], dwell_s=0.4)
    assert result["failures"] == 0, result["errors"]
    assert [r["version"] for r in result["rows"]] == [1, 2] and all(r["requests"] > 0 for r in result["rows"])
    assert result["swaps"][0]["from"] == 1 and result["swaps"][0]["to"] == 2


def test_a_second_agent_on_the_same_store_is_refused(tmp_path: Path, packages: Packages) -> None:
    from edge_agent.errors import AgentError

    state = tmp_path / "state"
    ModelStore(state, packages.public_key).install(packages.versions[1])
    cfg = {"state_dir": str(state), "trust": packages.public_key, "listen": "127.0.0.1:0"}
    first = Agent(AgentConfig(**cfg)).start()
    try:
        with pytest.raises(AgentError, match=rf"another agent \(pid {os.getpid()}"):
            Agent(AgentConfig(**cfg)).start()
    finally:
        first.stop()
    Agent(AgentConfig(**cfg)).start().stop()  # free again once the first one stopped
