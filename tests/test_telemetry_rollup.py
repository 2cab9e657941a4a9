"""Telemetry rollups in the registry (per device and model version, bounded retention, drift) and the
operator's commands that read them: `cloud status`, `cloud devices --json`, `cloud telemetry`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_sync.registry import Registry
from cloud_sync.telemetry_rollup import Rollups, RollupSettings, summary

ROOT = Path(__file__).resolve().parent.parent


def _rec(rid: int, device: str, version: int, requests: int, errors: int, p50: float, p95: float,
         mean: list[float] | None = None, end: float | None = None) -> dict:
    body = {"schema": "pf.telemetry/1", "device": device, "model": {"name": "m", "version": version},
            "window": {"start": (end or time.time()) - 1, "end": end or time.time()}, "requests": requests,
            "errors": {"x": errors} if errors else {}, "error_count": errors,
            "latency_ms": {"p50": p50, "p95": p95, "max": p95},
            "inputs": {"image": {"count": requests - errors, "mean": mean or [0.5, 0.5], "var": [0.01, 0.04]}}}
    return {"id": rid, "kind": "telemetry", "created": time.time(), "body": body}


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    r = Registry(tmp_path / "registry.sqlite")
    for d in ("a", "b"):
        r.ensure_device(d, "lab")
    yield r
    r.close()


def test_rollups_aggregate_per_device_and_version_and_ignore_redeliveries(reg: Registry) -> None:
    roll = Rollups(reg)
    batch = [("a", _rec(1, "a", 1, 100, 0, 2.0, 4.0)), ("a", _rec(2, "a", 1, 100, 10, 4.0, 8.0)),
             ("b", _rec(1, "b", 2, 50, 5, 10.0, 20.0))]
    assert reg.add_telemetry_batch(batch, on_new=roll.fold) == 3
    assert reg.add_telemetry_batch(batch[:1], on_new=roll.fold) == 0  # a redelivery is not counted twice
    rows = {(r["device"], r["version"]): r for r in summary(reg, 600)}
    a = rows[("a", 1)]
    assert (a["requests"], a["errors"]) == (200, 10)
    assert a["error_rate"] == pytest.approx(0.05)
    # request-weighted (by successful requests: 100 and 90) means of the window percentiles
    assert a["p50_ms"] == pytest.approx((2.0 * 100 + 4.0 * 90) / 190)
    assert a["p95_ms"] == pytest.approx((4.0 * 100 + 8.0 * 90) / 190)
    assert a["p95_max"] == 8.0
    assert rows[("b", 2)]["error_rate"] == pytest.approx(0.1)
    per_version = {r["version"]: r for r in summary(reg, 600, by=("version",))}
    assert per_version[1]["requests"] == 200 and per_version[2]["requests"] == 50


def test_drift_is_zero_on_the_reference_and_grows_with_a_shift(reg: Registry) -> None:
    roll = Rollups(reg, RollupSettings(reference_samples=300))
    reg.add_telemetry_batch([("a", _rec(i, "a", 1, 101, 0, 1, 2)) for i in range(1, 5)], on_new=roll.fold)
    reg.add_telemetry_batch([("b", _rec(1, "b", 1, 101, 0, 1, 2, mean=[0.6, 0.7]))], on_new=roll.fold)
    d = {r["device"]: r for r in summary(reg, 600)}
    assert d["a"]["drift"] == pytest.approx(0.0, abs=1e-9)
    # features moved by one reference std each: (0.1/0.115 + 0.2/0.215) / 2 = 0.90, less the noise of 101
    # samples (0.8/sqrt(101) = 0.08)
    assert d["b"]["drift"] == pytest.approx(0.82, abs=0.01)
    ref = reg.query("SELECT count FROM telemetry_ref WHERE name='m'")
    assert ref[0]["count"] == 303  # frozen once it held reference_samples inputs


def test_retention_deletes_old_buckets_and_raw_records(reg: Registry) -> None:
    settings = RollupSettings(fine_keep_s=3600, coarse_keep_s=7200, raw_retention_s=10)
    roll = Rollups(reg, settings)
    old = time.time() - 5000
    reg.add_telemetry_batch([("a", _rec(1, "a", 1, 10, 0, 1, 2, end=old)), ("a", _rec(2, "a", 1, 10, 0, 1, 2))],
                            on_new=roll.fold)
    with reg.tx() as db:
        db.execute("UPDATE telemetry SET received = received - 100 WHERE record_id='1'")
    out = roll.prune(force=True)
    assert out == {"rollup_60s": 1, "rollup_3600s": 0, "raw": 1}
    widths = sorted(r["width"] for r in reg.query("SELECT width FROM telemetry_rollup"))
    assert widths == [60, 3600, 3600]  # the old record lives on in its hour bucket only
    assert [r["record_id"] for r in reg.telemetry()] == ["2"]


@pytest.mark.mosquitto
def test_cloud_status_devices_and_telemetry_commands_show_the_live_fleet(tmp_path: Path) -> None:
    from cloud_sync.cloud import wait_for
    from pocketfleet.sim.fleet import Fleet, make_digits_package
    from pocketfleet.sim.traffic import TrafficSettings
    from tests.mosquitto import Mosquitto

    ids = [f"dev-{i:03d}" for i in range(3)]
    accounts = {d: ("device", "lab") for d in ids} | {"cloud-1": ("cloud", None)}
    with Mosquitto(tmp_path, accounts=accounts, persistence=False) as broker:
        fleet = Fleet(tmp_path / "fleet", devices=3, mqtt_for=broker.mqtt_config,
                      traffic=TrafficSettings(rate_hz=20, telemetry_interval_s=0.5))
        try:
            fleet.start(start_devices=False)
            v1 = make_digits_package(tmp_path / "v1.pfpkg", 1, fleet.key, hidden=32)
            for d in ids:
                fleet.store(d).install(v1)
            fleet.start_devices()
            reg = fleet.registry()
            try:
                wait_for(lambda: len([r for r in summary(reg, 600) if r["requests"] >= 20]) == 3, 30)
            finally:
                reg.close()
            fleet.stop_device("dev-002")
            conf = tmp_path / "cloud.toml"
            conf.write_text(f'[cloud]\nstate_dir = "{fleet.workdir / "cloud"}"\ntrust = "{fleet.trust}"\n')

            def cli(*argv: str) -> object:
                out = subprocess.run([str(Path(sys.executable).parent / "pocketfleet"), *argv, "--config", str(conf)], cwd=ROOT,
                                     capture_output=True, text=True, timeout=60,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
                assert out.returncode == 0, out.stderr
                return json.loads(out.stdout) if "--json" in argv else out.stdout

            devices = {d["device"]: d for d in cli("cloud", "devices", "--json")}  # type: ignore[union-attr]
            assert sorted(devices) == ids
            for d in ids[:2]:
                row = devices[d]
                assert row["online"] and row["health"] == "ok" and row["link"].startswith("online")
                assert (row["model"], row["version"]) == ("digits-mlp", 1)
                assert row["requests"] >= 20 and row["errors"] == 0 and row["p95_ms"] >= row["p50_ms"] > 0
                assert row["drift"] is not None and row["drift"] < 0.5
            assert devices["dev-002"]["health"] == "offline" and devices["dev-002"]["link"].startswith("offline")
            status = cli("cloud", "status", "--json")
            assert status["devices"] == 3 and status["online"] == 2  # type: ignore[index]
            assert status["groups"][0]["versions"] == {"digits-mlp v1": {"online": 2, "offline": 1}}  # type: ignore[index]
            series = cli("cloud", "telemetry", "dev-000", "--since", "10m", "--json")
            assert series and all(s["model"] == "digits-mlp" and s["version"] == 1 for s in series)  # type: ignore[union-attr]
            assert sum(s["requests"] for s in series) >= 20  # type: ignore[union-attr]
            group = cli("cloud", "telemetry", "--group", "lab", "--json")
            assert sum(s["requests"] for s in group) >= sum(s["requests"] for s in series)  # type: ignore[union-attr]
            assert "dev-000" in cli("cloud", "devices")  # type: ignore[operator]
        finally:
            fleet.stop()


def test_a_record_the_rollups_cannot_fold_is_still_stored(reg: Registry) -> None:
    roll = Rollups(reg)
    bad = _rec(1, "a", 1, 10, 0, 1, 2)
    bad["body"]["model"]["version"] = 10**30  # SQLite cannot hold it: the rollup upsert fails
    good = _rec(2, "a", 1, 10, 0, 1, 2)
    assert reg.add_telemetry_batch([("a", bad), ("a", good)], on_new=roll.fold) == 2
    assert roll.fold_errors == 1
    assert sorted(r["record_id"] for r in reg.telemetry()) == ["1", "2"]
    assert [(r["version"], r["requests"]) for r in summary(reg, 600)] == [(1, 10)]
