"""The console's data: one JSON document with what `cloud status`, `cloud devices`, `rollout status` and the
FL commands show, read from the same functions (cloud_sync.fleet_view)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cloud_sync.fleet_view import (
    device_rows,
    fl_tasks,
    fleet_status,
    model_rows,
    rollout_rows,
    telemetry_series,
)
from cloud_sync.registry import Registry
from cloud_sync.telemetry_rollup import RollupSettings

_ROLLOUT_KEYS = ("rollout_id", "state", "reason", "group", "name", "version", "canary", "gates", "created",
                 "promoted", "finished", "counts", "gate_result", "stages", "stage", "criteria", "abort", "stage_log",
                 "plan")


_SEVERITY = {"failing": 0, "degraded": 1, "offline": 2, "quiet": 3, "ok": 4}


def console_state(registry: Registry, state_dir: str | Path, since_s: float = 1800.0,
                  settings: RollupSettings | None = None, max_devices: int = 500,
                  max_rollout_devices: int = 50) -> dict[str, Any]:
    """The page's data. A large fleet shows its `max_devices` least healthy devices (failing first) and,
    per rollout, the counts and the `max_rollout_devices` devices that are not installed."""
    rollouts = []
    for r in rollout_rows(registry, limit=20):
        item = {k: r.get(k) for k in _ROLLOUT_KEYS}
        devs = sorted(r["devices"], key=lambda d: (d["state"] == "installed", d["device"]))
        item["devices"] = [{k: d[k] for k in ("device", "phase", "state", "error")} for d in devs[:max_rollout_devices]]
        rollouts.append(item)
    devices = device_rows(registry, since_s=since_s, settings=settings)
    if len(devices) > max_devices:
        devices = sorted(devices, key=lambda d: (_SEVERITY.get(d["health"], 5), d["device"]))[:max_devices]
        devices.sort(key=lambda d: d["device"])
    return {
        "generated": time.time(),
        "status": fleet_status(registry),
        "devices_shown": len(devices),
        "devices": devices,
        "models": model_rows(registry, since_s=since_s, settings=settings),
        "series": telemetry_series(registry, since_s=since_s, settings=settings),
        "rollouts": rollouts,
        "fl_tasks": fl_tasks(state_dir),
    }
