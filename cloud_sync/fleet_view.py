"""What an operator looks at, as plain dicts: the fleet summary, the device table, telemetry per device or
group. Shared by `pocketfleet cloud status|devices|telemetry` and the browser console, so both always
say the same thing.

Health of a device (over the telemetry window, default the last hour, of the version it runs):
offline (no presence) | failing (error rate >= 50%) | degraded (error rate >= 5% or drift >= 1.0) |
quiet (online, but no telemetry for `stale_s`) | ok.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_sync.errors import ConfigError
from cloud_sync.registry import Registry
from cloud_sync.telemetry_rollup import RollupSettings, summary

ACTIVE_STATES = ("canary", "promoted", "rolling_back", "staged", "paused", "aborting")
_SINCE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


@dataclass(frozen=True)
class HealthRules:
    failing_error_rate: float = 0.5
    degraded_error_rate: float = 0.05
    degraded_drift: float = 1.0
    stale_s: float = 300.0


def parse_since(text: str | float) -> float:
    """'90s', '15m', '2h', '7d' or plain seconds -> seconds."""
    m = _SINCE_RE.match(str(text))
    if not m:
        raise ConfigError(f"--since {text!r} must be a duration like 90s, 15m, 2h or 7d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def health(dev: Any, tel: dict[str, Any] | None, now: float, rules: HealthRules = HealthRules()) -> str:
    if not dev["online"]:
        return "offline"
    if tel is None or tel.get("last") is None or now - tel["last"] > rules.stale_s:
        return "quiet"
    rate = tel.get("error_rate")
    if rate is not None and rate >= rules.failing_error_rate:
        return "failing"
    drift = tel.get("drift")
    if (rate is not None and rate >= rules.degraded_error_rate) or (drift is not None and drift >= rules.degraded_drift):
        return "degraded"
    return "ok"


def link_state(dev: Any, now: float) -> str:
    if dev["online"]:
        since = dev["online_since"]
        return "online" + (f" {_ago(now - since)}" if since else "")
    if dev["last_seen"] is None:
        return "never connected"
    return f"offline {_ago(now - dev['last_seen'])}"


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _r(v: float | None, nd: int = 4) -> float | None:
    return None if v is None else round(v, nd)


def device_rows(registry: Registry, group: str | None = None, since_s: float = 3600.0,
                settings: RollupSettings | None = None, rules: HealthRules = HealthRules()) -> list[dict[str, Any]]:
    """One row per device: presence, group, model and version, telemetry of that version, health, link."""
    now = time.time()
    tel = {(t["device"], t["name"], t["version"]): t
           for t in summary(registry, since_s, group=group, settings=settings)}
    rows = []
    for d in registry.devices(group):
        t = tel.get((d["id"], d["active_name"], d["active_version"]))
        rows.append({
            "device": d["id"], "group": d["grp"], "online": bool(d["online"]), "model": d["active_name"],
            "version": d["active_version"], "requests": t["requests"] if t else 0, "errors": t["errors"] if t else 0,
            "error_rate": _r(t["error_rate"]) if t else None, "p50_ms": _r(t["p50_ms"], 3) if t else None,
            "p95_ms": _r(t["p95_ms"], 3) if t else None, "drift": _r(t["drift"], 3) if t else None,
            "health": health(d, t, now, rules), "link": link_state(d, now),
            "last_seen": d["last_seen"],
            "last_seen_s": None if d["last_seen"] is None else round(now - d["last_seen"], 1),
        })
    return rows


def model_rows(registry: Registry, since_s: float = 3600.0, group: str | None = None,
               settings: RollupSettings | None = None) -> list[dict[str, Any]]:
    """Per model version over the window: devices reporting, requests, errors, error rate, p50/p95, drift."""
    per_dev = summary(registry, since_s, group=group, settings=settings)
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for agg in summary(registry, since_s, group=group, by=("name", "version"), settings=settings):
        out[(agg["name"], agg["version"])] = {
            "model": agg["name"], "version": agg["version"], "devices": 0, "requests": agg["requests"],
            "errors": agg["errors"], "error_rate": _r(agg["error_rate"]), "p50_ms": _r(agg["p50_ms"], 3),
            "p95_ms": _r(agg["p95_ms"], 3), "p95_max_ms": _r(agg["p95_max"], 3), "drift": _r(agg["drift"], 3)}
    for t in per_dev:
        out[(t["name"], t["version"])]["devices"] += 1
    return list(out.values())


def telemetry_series(registry: Registry, device: str | None = None, group: str | None = None,
                     since_s: float = 3600.0, settings: RollupSettings | None = None) -> list[dict[str, Any]]:
    """Bucket by bucket, per model version: the data of `cloud telemetry` and of the console's charts."""
    if device is not None and registry.device(device) is None:
        raise ConfigError(f"no device {device!r} in the registry (see `pocketfleet cloud devices`)")
    rows = summary(registry, since_s, device=device, group=group, by=("bucket", "name", "version"), settings=settings)
    return [{"bucket": r["bucket"], "width_s": r["width_s"], "model": r["name"], "version": r["version"],
             "requests": r["requests"], "errors": r["errors"], "error_rate": _r(r["error_rate"]),
             "p50_ms": _r(r["p50_ms"], 3), "p95_ms": _r(r["p95_ms"], 3), "drift": _r(r["drift"], 3)} for r in rows]


def rollout_rows(registry: Registry, limit: int = 50) -> list[dict[str, Any]]:
    from cloud_sync.rollout import describe_rollout

    rows = registry.rollouts()[-limit:]
    return [describe_rollout(registry, r["id"]) for r in reversed(rows)]


def fl_tasks(state_dir: str | Path) -> list[dict[str, Any]]:
    """The federated tasks of <state_dir>/fl.sqlite: state, rounds (participants, bytes, metrics)."""
    path = Path(state_dir) / "fl.sqlite"
    if not path.exists():
        return []
    from cloud_sync.fl.store import RoundStore

    store = RoundStore(path)
    try:
        out = []
        for task in store.tasks():
            info = store.task(task) or {}
            rounds = []
            for r in store.rounds(task):
                res = r.get("result") or {}
                nbytes = store.one("SELECT COALESCE(SUM(nbytes), 0), COUNT(*) FROM updates WHERE task=? AND round=?",
                                   task, r["round"])
                rounds.append({
                    "round": r["round"], "attempt": r["attempt"], "state": r["state"], "selected": len(r["selected"]),
                    "participants": int(nbytes[1]) if nbytes else 0, "bytes": int(nbytes[0]) if nbytes else 0,
                    "started": r["started"], "closed": r["closed"],
                    "duration_s": (r["closed"] - r["started"]) if r["closed"] else None,
                    "metrics": {k: v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                })
            out.append({"task": task, "state": info.get("state"), "rounds": rounds})
        return out
    finally:
        store.close()


def fleet_status(registry: Registry, state_dir: str | Path | None = None) -> dict[str, Any]:
    """The fleet at a glance: devices online/offline by group and version, active rollouts, FL tasks."""
    groups: dict[str, dict[str, Any]] = {}
    for d in registry.query("SELECT grp, online, active_name, active_version, COUNT(*) AS n FROM devices "
                            "GROUP BY grp, online, active_name, active_version"):
        g = groups.setdefault(d["grp"], {"group": d["grp"], "devices": 0, "online": 0, "offline": 0, "versions": {}})
        state = "online" if d["online"] else "offline"
        g["devices"] += d["n"]
        g[state] += d["n"]
        key = f"{d['active_name']} v{d['active_version']}" if d["active_name"] else "(none)"
        g["versions"].setdefault(key, {"online": 0, "offline": 0})[state] += d["n"]
    active = []
    for r in registry.rollouts(ACTIVE_STATES):
        from cloud_sync.rollout import describe_rollout

        d = describe_rollout(registry, r["id"])
        active.append({k: d.get(k) for k in ("rollout_id", "state", "group", "name", "version", "counts", "reason",
                                             "stage", "stages")})
    tasks = fl_tasks(state_dir) if state_dir is not None else []
    total = sum(g["devices"] for g in groups.values())
    online = sum(g["online"] for g in groups.values())
    return {"devices": total, "online": online, "offline": total - online,
            "groups": sorted(groups.values(), key=lambda g: g["group"]), "active_rollouts": active,
            "fl_tasks": [{"task": t["task"], "state": t["state"], "rounds": len(t["rounds"])} for t in tasks]}
