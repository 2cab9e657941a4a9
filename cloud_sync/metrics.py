"""Prometheus metrics of one cloud worker (`GET /metrics` on the console's listener).

Read at scrape time from the worker's counters (this process) and the registry (the whole fleet):

    pocketfleet_build_info{version,python}                        1
    pocketfleet_devices{group,state}                              devices online / offline (registry)
    pocketfleet_mqtt_messages_total{worker,direction,kind,result} messages in / out per topic kind; result ok,
                                                                  malformed (failed its schema) or rejected
                                                                  (well-formed but refused: unknown device,
                                                                  a chunk it may not have)
    pocketfleet_mqtt_bytes_total{worker,direction}
    pocketfleet_telemetry_records_total{worker,result}            stored / duplicate
    pocketfleet_chunks_served_total{worker}, pocketfleet_chunk_bytes_served_total{worker}
    pocketfleet_rollouts{state}                                   rollouts per state (registry)
    pocketfleet_fl_rounds_total{task,state}
    pocketfleet_fl_round_duration_seconds{task}                   summary (count, sum) of closed rounds
    pocketfleet_fl_last_round_participants{task}                  updates received in the latest round
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from typing import Any

REJECTED = {"status": ("unknown_device",), "req": ("requests_refused",)}


def build_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("pocketfleet")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class CloudCollector:
    """A prometheus_client collector over a running Cloud worker."""

    def __init__(self, cloud: Any) -> None:
        self.cloud = cloud

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only (no registration-time scrape of the registry)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
            SummaryMetricFamily,
        )

        cloud = self.cloud
        worker = cloud.config.cloud.worker_id
        c = cloud.counters.snapshot()
        yield InfoMetricFamily("pocketfleet_build", "pocketfleet build", value={
            "version": build_version(), "python": platform.python_version()})

        devices = GaugeMetricFamily("pocketfleet_devices", "registered devices by group and presence",
                                    labels=["group", "state"])
        for row in cloud.registry.query("SELECT grp, online, COUNT(*) AS n FROM devices GROUP BY grp, online"):
            devices.add_metric([row["grp"], "online" if row["online"] else "offline"], row["n"])
        yield devices

        msgs = CounterMetricFamily("pocketfleet_mqtt_messages", "MQTT messages by direction, topic kind and result",
                                   labels=["worker", "direction", "kind", "result"])
        kinds = sorted({k.split(":", 1)[1] for k in c if k.startswith(("in:", "out:", "malformed:"))} | set(REJECTED))
        for kind in kinds:
            received = c.get(f"in:{kind}", 0)
            malformed = c.get(f"malformed:{kind}", 0)
            rejected = sum(c.get(name, 0) for name in REJECTED.get(kind, ()))
            msgs.add_metric([worker, "in", kind, "ok"], max(0, received - malformed - rejected))
            msgs.add_metric([worker, "in", kind, "malformed"], malformed)
            msgs.add_metric([worker, "in", kind, "rejected"], rejected)
            msgs.add_metric([worker, "out", kind, "ok"], c.get(f"out:{kind}", 0))
        yield msgs

        nbytes = CounterMetricFamily("pocketfleet_mqtt_bytes", "MQTT bytes on the wire (estimated packet sizes)",
                                     labels=["worker", "direction"])
        nbytes.add_metric([worker, "in"], c.get("bytes_in", 0))
        nbytes.add_metric([worker, "out"], c.get("bytes_out", 0))
        yield nbytes

        tel = CounterMetricFamily("pocketfleet_telemetry_records", "outbox records committed",
                                  labels=["worker", "result"])
        tel.add_metric([worker, "stored"], c.get("telemetry_stored", 0))
        tel.add_metric([worker, "duplicate"], c.get("telemetry_duplicates", 0))
        yield tel

        chunks = CounterMetricFamily("pocketfleet_chunks_served", "artifact chunks published", labels=["worker"])
        chunks.add_metric([worker], c.get("chunks_sent", 0))
        yield chunks
        cbytes = CounterMetricFamily("pocketfleet_chunk_bytes_served", "artifact chunk bytes published",
                                     labels=["worker"])
        cbytes.add_metric([worker], c.get("chunk_bytes_sent", 0))
        yield cbytes

        rollouts = GaugeMetricFamily("pocketfleet_rollouts", "rollouts by state", labels=["state"])
        for row in cloud.registry.query("SELECT state, COUNT(*) AS n FROM rollouts GROUP BY state"):
            rollouts.add_metric([row["state"]], row["n"])
        yield rollouts

        yield from _fl_metrics(cloud.config.state_dir, GaugeMetricFamily, CounterMetricFamily, SummaryMetricFamily)


def _fl_metrics(state_dir: Any, gauge: Any, counter: Any, summary: Any) -> Iterator[Any]:
    from cloud_sync.fleet_view import fl_tasks

    try:
        tasks = fl_tasks(state_dir)
    except Exception:  # noqa: BLE001 - FL state being written by another process: skip this scrape
        tasks = []
    rounds = counter("pocketfleet_fl_rounds", "federated rounds by state", labels=["task", "state"])
    durations = summary("pocketfleet_fl_round_duration_seconds", "durations of closed federated rounds",
                        labels=["task"])
    last = gauge("pocketfleet_fl_last_round_participants", "updates received in the latest round", labels=["task"])
    for t in tasks:
        states: dict[str, int] = {}
        for r in t["rounds"]:
            states[r["state"]] = states.get(r["state"], 0) + 1
        for state, n in states.items():
            rounds.add_metric([t["task"], state], n)
        closed = [r["duration_s"] for r in t["rounds"] if r["duration_s"] is not None]
        durations.add_metric([t["task"]], count_value=len(closed), sum_value=float(sum(closed)))
        if t["rounds"]:
            last.add_metric([t["task"]], t["rounds"][-1]["participants"])
    yield rounds
    yield durations
    yield last


def render(cloud: Any) -> tuple[bytes, str]:
    """The text exposition of this worker's metrics: (body, content type)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    reg = CollectorRegistry(auto_describe=False)
    reg.register(CloudCollector(cloud))  # type: ignore[arg-type]
    return generate_latest(reg), CONTENT_TYPE_LATEST
