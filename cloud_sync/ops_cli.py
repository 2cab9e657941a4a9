"""Handlers of `pocketfleet cloud status | devices | telemetry` and `rollout pause | resume | abort`."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from pocketfleet import add_json_flag, emit, table


def register_ops(csub: argparse._SubParsersAction, config_arg: Any) -> None:
    st = csub.add_parser("status", help="the fleet at a glance: devices by group and version, rollouts, FL tasks")
    config_arg(st)
    add_json_flag(st)
    st.set_defaults(func=cmd_status)
    devs = csub.add_parser("devices", help="the fleet registry: presence, version, telemetry, health, link",
                           description="One row per device: online, group, model and version, and over --since "
                           "(default 1h) the telemetry of the version it runs: requests, errors, error rate, "
                           "p50/p95 latency (ms), input drift, health, link state, last seen.")
    devs.add_argument("--group")
    devs.add_argument("--since", default="1h", help="telemetry window (90s, 15m, 2h, 7d; default 1h)")
    config_arg(devs)
    add_json_flag(devs)
    devs.set_defaults(func=cmd_devices)
    tel = csub.add_parser("telemetry", help="telemetry of one device or a group, bucket by bucket",
                          description="Rollup buckets (60 s within the last day, 1 h beyond) per model version: "
                          "requests, errors, error rate, p50/p95 latency, drift.")
    tel.add_argument("device", nargs="?", metavar="DEVICE")
    tel.add_argument("--group")
    tel.add_argument("--since", default="1h", help="how far back (default 1h)")
    config_arg(tel)
    add_json_flag(tel)
    tel.set_defaults(func=cmd_telemetry)


def _open(args: argparse.Namespace) -> tuple[Any, Any]:
    from cloud_sync.cli import _load

    config = _load(args)
    return config, config.open_registry()


def cmd_status(args: argparse.Namespace) -> int:
    from cloud_sync.fleet_view import fleet_status

    config, registry = _open(args)
    try:
        result = fleet_status(registry, config.state_dir)
    finally:
        registry.close()

    def render(r: dict[str, Any]) -> str:
        lines = [f"devices: {r['devices']} ({r['online']} online, {r['offline']} offline)"]
        for g in r["groups"]:
            vers = ", ".join(f"{k}: {v['online']} on/{v['offline']} off" for k, v in sorted(g["versions"].items()))
            lines.append(f"  group {g['group']}: {g['online']}/{g['devices']} online; {vers}")
        lines.append(f"active rollouts: {len(r['active_rollouts'])}")
        for ro in r["active_rollouts"]:
            counts = " ".join(f"{k}={v}" for k, v in sorted(ro["counts"].items()))
            stage = f" stage {ro['stage'] + 1}/{len(ro['stages'])}" if ro.get("stages") else ""
            lines.append(f"  {ro['rollout_id']} {ro['name']} v{ro['version']} -> {ro['group']}: {ro['state']}{stage} "
                         f"({counts})")
        lines.append(f"FL tasks: {len(r['fl_tasks'])}")
        lines += [f"  {t['task']}: {t['state']}, {t['rounds']} round(s)" for t in r["fl_tasks"]]
        return "\n".join(lines)

    emit(result, args.json, render)
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from cloud_sync.fleet_view import device_rows, parse_since

    config, registry = _open(args)
    try:
        rows = device_rows(registry, args.group, parse_since(args.since), config.telemetry)
    finally:
        registry.close()
    cols = ["device", "group", "online", "model", "version", "requests", "errors", "error_rate", "p50_ms", "p95_ms",
            "drift", "health", "link", "last_seen_s"]
    emit(rows, args.json, lambda r: table(r, cols))
    return 0


def cmd_telemetry(args: argparse.Namespace) -> int:
    from cloud_sync.errors import ConfigError
    from cloud_sync.fleet_view import parse_since, telemetry_series

    if bool(args.device) == bool(args.group):
        raise ConfigError("give one DEVICE or --group GROUP")
    config, registry = _open(args)
    try:
        rows = telemetry_series(registry, args.device, args.group, parse_since(args.since), config.telemetry)
    finally:
        registry.close()

    def render(r: list[dict[str, Any]]) -> str:
        if not r:
            return "no telemetry in that window"
        shown = [{**x, "bucket": dt.datetime.fromtimestamp(x["bucket"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M")}
                 for x in r]
        return table(shown, ["bucket", "model", "version", "requests", "errors", "error_rate", "p50_ms", "p95_ms",
                             "drift"])

    emit(rows, args.json, render)
    return 0
