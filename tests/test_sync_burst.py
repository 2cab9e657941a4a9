"""A burst of telemetry reaches the registry whole: the broker config never drops what it acknowledged.

mosquitto acknowledges a device's QoS 1 publish (the device then deletes the record from its outbox) and
queues it for the cloud's shared-subscription session; with a queue limit (its default 1000, or any other)
it silently drops the overflow when the cloud falls behind. The project's config has a limit no backlog
reaches (10,000,000); the cloud's receive maximum and its acknowledge-after-commit are the back-pressure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cloud_sync.client import MqttClient
from cloud_sync.cloud import Cloud, CloudConfig, CloudSettings, wait_for
from cloud_sync.protocol import dev_topic
from tests.mosquitto import Mosquitto

ACCOUNTS = {"dev-b": ("device", "lab"), "cloud-1": ("cloud", None)}
BURST = 3000


def _record(i: int) -> bytes:
    body = {"schema": "pf.telemetry/1", "window_s": 10.0, "requests": 5, "errors": 0, "lat_ms": [1.0, 2.0, 3.0]}
    return json.dumps({"schema": "pf.outbox/1", "device": "dev-b", "id": i, "kind": "telemetry",
                       "created": 1.7e9 + i, "body": body}).encode()


def _cloud(tmp_path: Path, broker: Mosquitto) -> Cloud:
    cfg = CloudConfig(cloud=CloudSettings(state_dir=str(tmp_path / "cloud"), worker_id="cloud-1",
                                          shared_group="pfcloud"),
                      mqtt=broker.mqtt_config("cloud-1"))
    return Cloud(cfg).start()


def _burst(broker: Mosquitto) -> MqttClient:
    """Publish BURST records as fast as the device's in-flight window allows; returns once all are PUBACKed."""
    dev = MqttClient(broker.mqtt_config("dev-b")).start().wait_connected()
    acked: list[bool] = []
    for i in range(1, BURST + 1):
        dev.publish(dev_topic("dev-b", "telemetry"), _record(i), on_ack=lambda ok, _: acked.append(ok))
    wait_for(lambda: len(acked) == BURST, 120)
    assert all(acked)
    return dev


@pytest.mark.mosquitto
def test_a_burst_of_3000_telemetry_records_all_reach_the_registry(tmp_path: Path) -> None:
    with Mosquitto(tmp_path, accounts=dict(ACCOUNTS)) as broker:
        assert "max_queued_messages 10000000\n" in broker.conf.read_text()
        cloud = _cloud(tmp_path, broker)
        try:
            dev = _burst(broker)  # the cloud commits in batches of at most receive_maximum (64) records
            wait_for(lambda: cloud.counters.get("telemetry_stored") == BURST, 120)
            ids = {row["record_id"] for row in cloud.registry.telemetry("dev-b")}
            assert len(ids) == BURST
            assert "dropped" not in broker.log.read_text()
            dev.stop()
        finally:
            cloud.stop()


@pytest.mark.mosquitto
@pytest.mark.parametrize("limit", [10_000_000, 1000])
def test_a_burst_queued_for_an_offline_worker_is_kept_only_with_the_projects_queue_limit(tmp_path: Path, limit: int) -> None:
    """The worker's persistent session is offline during the burst (a restart): mosquitto queues all 3,000 for
    it with the project's config; with a limit it keeps `limit` and drops the rest it had acknowledged."""
    with Mosquitto(tmp_path, accounts=dict(ACCOUNTS), max_queued_messages=limit) as broker:
        cloud = _cloud(tmp_path, broker)
        cloud.stop()  # session kept: the shared subscription still gets its share, queued
        dev = _burst(broker)
        dev.stop()
        cloud = _cloud(tmp_path, broker)
        try:
            expected = min(BURST, limit)
            wait_for(lambda: cloud.counters.get("telemetry_stored") >= expected, 120)
            time.sleep(2.0)  # anything still on its way
            stored = cloud.counters.get("telemetry_stored")
            assert len(cloud.registry.telemetry("dev-b")) == stored
            if limit < BURST:
                assert stored < BURST, stored  # the broker acknowledged all 3,000 and dropped the rest
            else:
                assert stored == BURST
        finally:
            cloud.stop()


def test_the_routing_matcher_agrees_with_paho() -> None:
    import paho.mqtt.client as mqtt

    from cloud_sync.client import filter_matches

    filters = ["a/b", "a/+", "a/#", "#", "+", "+/+", "a/+/c", "$SYS/#", "+/b/#", "a/b/c/#", "a", "+/#", "a//b",
               "a/+/", "pf/v1/dev/+/telemetry"]
    topics = ["a", "a/b", "a/b/c", "a/b/c/d", "$SYS/x", "$SYS", "x/b", "x/b/c", "a//b", "a/", "/a", "b",
              "pf/v1/dev/d1/telemetry", "pf/v1/dev/d1/status"]
    for f in filters:
        for t in topics:
            assert filter_matches(tuple(f.split("/")), t.split("/")) == mqtt.topic_matches_sub(f, t), (f, t)
