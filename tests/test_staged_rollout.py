"""Staged rollouts that stop themselves: exponential (rate) and share stages, abort criteria on the
telemetry the devices send while serving, an abort that rolls the stage back, pause / resume / abort.
End to end on a real mosquitto with 40 simulated devices that serve real onnxruntime models."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cloud_sync.cloud import wait_for
from cloud_sync.errors import ReleaseError, RolloutError
from cloud_sync.staged import AbortCriterion, breaches, parse_criterion, parse_rate, parse_stages

N = 40
SERVICE_MS = 10.0


def test_rate_stages_grow_by_the_factor_and_share_stages_cover_the_group() -> None:
    assert parse_rate("2,2").counts(40) == [2, 6, 14, 30, 40]
    assert parse_rate("1").counts(5) == [1, 3, 5]
    assert parse_rate("5,1").counts(12) == [5, 10, 12]
    assert parse_stages("5%,25%").counts(40) == [2, 10, 40]
    assert parse_stages("1%,50%,100%").counts(10) == [1, 5, 10]
    with pytest.raises(ReleaseError, match="BASE"):
        parse_rate("0,2")
    with pytest.raises(ReleaseError, match="increasing"):
        parse_stages("50%,10%")


def test_criteria_need_their_minimum_device_count() -> None:
    c = parse_criterion("error_rate>0.05@3")
    assert c == AbortCriterion("error_rate", ">", 0.05, 3)
    assert not c.breached(0.5, 2) and c.breached(0.5, 3) and not c.breached(0.01, 10)
    assert parse_criterion("golden<0.9").min_devices == 3
    hit = breaches([c, parse_criterion("p95_ratio>2@1")], {"error_rate": (0.1, 2), "p95_ratio": (2.5, 1)})
    assert [h["metric"] for h in hit] == ["p95_ratio"]
    with pytest.raises(ReleaseError, match="METRIC"):
        parse_criterion("latency>3")


@pytest.mark.mosquitto
@pytest.mark.timeout(400)
def test_a_slow_or_erroring_release_is_stopped_by_telemetry_at_5_percent_and_a_good_one_completes(
        tmp_path: Path) -> None:
    from cloud_sync.rollout import RolloutConfig
    from pocketfleet.sim.fleet import Fleet, make_digits_package
    from pocketfleet.sim.traffic import TrafficSettings
    from tests.mosquitto import Mosquitto

    ids = [f"dev-{i:03d}" for i in range(N)]
    accounts = {d: ("device", "lab") for d in ids} | {"cloud-1": ("cloud", None)}
    with Mosquitto(tmp_path, accounts=accounts, persistence=False) as broker:
        fleet = Fleet(tmp_path / "fleet", devices=N, mqtt_for=broker.mqtt_config,
                      traffic=TrafficSettings(rate_hz=10, telemetry_interval_s=0.5, drain_interval_s=0.3),
                      rollout=RolloutConfig(tick_s=0.2, resend_s=10.0, rollback_timeout_s=60.0, probe_runs=3))
        try:
            fleet.start(start_devices=False)
            sim = {"service_ms": SERVICE_MS}
            pk = {
                "v1": make_digits_package(tmp_path / "v1.pfpkg", 1, fleet.key, hidden=32, extra={"sim": sim}),
                "v2": make_digits_package(tmp_path / "v2.pfpkg", 2, fleet.key, hidden=32, head_seed=1,
                                          extra={"sim": sim}),
                "slow": make_digits_package(tmp_path / "v3.pfpkg", 3, fleet.key, hidden=32, head_seed=2,
                                            extra={"sim": {"service_ms": 3 * SERVICE_MS}}),
                "erroring": make_digits_package(tmp_path / "v4.pfpkg", 4, fleet.key, hidden=32, head_seed=3,
                                                extra={"sim": {**sim, "error_rate": 0.1}}),
            }
            for d in ids:
                fleet.store(d).install(pk["v1"])
            fleet.start_devices()
            abort = ["error_rate>0.04@2", "p95_ratio>2@2", "failure_rate>0.2@1"]

            # a good release goes through its share stages to the whole group
            good = fleet.release(pk["v2"], plan=parse_stages("5%,50%", soak_s=3.0), abort=abort)
            assert good["stages"] == [2, 20, 40]
            done = fleet.wait(good["rollout_id"], timeout=150)
            assert done["state"] == "complete", done["reason"]
            assert [e["stage"] for e in done["stage_log"] if e["kind"] == "stage"] == [2, 3]
            assert set(fleet.versions().values()) == {2}
            time.sleep(1.5)  # v2 telemetry before the next release: the p95 baseline of each device

            for bad, metric in (("slow", "p95_ratio"), ("erroring", "error_rate")):
                out = fleet.release(pk[bad], plan=parse_rate("2,2", soak_s=6.0), abort=abort)
                assert out["stages"] == [2, 6, 14, 30, 40]
                final = fleet.wait(out["rollout_id"], timeout=120)
                assert final["state"] == "aborted", final["reason"]
                assert final["stage"] == 0 and len(final["devices"]) == 2  # never beyond stage 1: 2 of 40 = 5%
                assert final["abort"]["by"] == "telemetry"
                assert [b["metric"] for b in final["abort"]["breaches"]] == [metric], final["reason"]
                assert f"{metric} = " in final["reason"]
                assert all(d["state"] == "rolled_back" for d in final["devices"])
                wait_for(lambda: set(fleet.versions().values()) == {2}, 30)  # the 2 went back to v2

            # pause holds the next stage, resume lets it go, abort by hand rolls everything back
            reg = fleet.registry()
            try:
                v5 = make_digits_package(tmp_path / "v5.pfpkg", 5, fleet.key, hidden=32, head_seed=4, extra={"sim": sim})
                out = fleet.release(v5, plan=parse_rate("2,2", soak_s=1.0), abort=abort)
                rid = out["rollout_id"]
                from cloud_sync.staged import operator_action, plan_of

                assert operator_action(reg, rid, "pause")["state"] == "paused"
                time.sleep(4)
                assert plan_of(reg, rid)["stage"] == 0 and len(reg.rollout_devices(rid)) == 2
                with pytest.raises(RolloutError, match="only a staged rollout can be paused"):
                    operator_action(reg, rid, "pause")
                operator_action(reg, rid, "resume")
                with pytest.raises(RolloutError, match="not paused"):
                    operator_action(reg, rid, "resume")
                wait_for(lambda: plan_of(reg, rid)["stage"] >= 1, 60)
                operator_action(reg, rid, "abort", "operator test")
                final = fleet.wait(rid, timeout=60)
                assert final["state"] == "aborted" and "operator test" in final["reason"]
                wait_for(lambda: set(fleet.versions().values()) == {2}, 30)
            finally:
                reg.close()
        finally:
            fleet.stop()


def test_release_rate_and_rollout_pause_resume_abort_from_the_command_line(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    from cloud_sync.registry import Registry
    from export.signing import generate_keys
    from pocketfleet.sim.fleet import make_digits_package

    root = Path(__file__).resolve().parent.parent
    generate_keys(tmp_path / "keys")
    pkg = make_digits_package(tmp_path / "v1.pfpkg", 1, tmp_path / "keys" / "pocketfleet.key", hidden=16)
    state = tmp_path / "state"
    reg = Registry(state / "registry.sqlite")
    for i in range(10):
        reg.ensure_device(f"d{i}", "lab")
    reg.close()
    conf = tmp_path / "cloud.toml"
    conf.write_text(f'[cloud]\nstate_dir = "{state}"\ntrust = "{tmp_path / "keys" / "pocketfleet.pub"}"\n')

    def cli(*argv: str, ok: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([str(Path(sys.executable).parent / "pocketfleet"), *argv, "--config", str(conf)],
                             capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(root)})
        assert (out.returncode == 0) == ok, out.stdout + out.stderr
        return out

    started = json.loads(cli("release", str(pkg), "--group", "lab", "--rate", "2,2", "--soak", "30s",
                             "--abort", "error_rate>0.05@2", "--json").stdout)
    assert started["stages"] == [2, 6, 10] and started["abort"] == ["error_rate>0.05@2"]
    rid = started["rollout_id"]
    assert json.loads(cli("rollout", "pause", rid, "--json").stdout)["state"] == "paused"
    assert "only a staged rollout can be paused" in cli("rollout", "pause", rid, ok=False).stderr
    assert json.loads(cli("rollout", "resume", rid, "--json").stdout)["state"] == "staged"
    out = json.loads(cli("rollout", "abort", rid, "--reason", "field reports", "--json").stdout)
    assert out["state"] == "aborting"
    status = json.loads(cli("rollout", "status", rid, "--json").stdout)
    assert status["abort"]["by"] == "operator" and "field reports" in status["reason"]
    from cloud_sync.releases import create_release

    reg = Registry(state / "registry.sqlite")
    try:
        with pytest.raises(ReleaseError, match="--abort needs a staged rollout"):
            create_release(reg, state / "artifacts", pkg, "lab", str(tmp_path / "keys" / "pocketfleet.pub"),
                           abort=["drift>1"])
    finally:
        reg.close()
