"""The durable outbox: byte bound, priority classes (telemetry dropped oldest-first and counted, durable
classes refused rather than dropped), leases and acks, draining through a sink, and kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from edge_agent.errors import OutboxFullError
from edge_agent.outbox import RECORD_OVERHEAD, Drainer, JsonlSink, Outbox, Priority, Record
from tests.agent_fixtures import ROOT

PAYLOAD = b"p" * (100 - RECORD_OVERHEAD - len("telemetry"))  # 100 bytes per telemetry record


def test_bound_is_respected_and_telemetry_drops_oldest_first(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_bytes=1000)
    ids = []
    for _ in range(30):
        ids.append(box.put("telemetry", PAYLOAD))
        assert box.stats()["bytes"] <= 1000
    assert None not in ids  # each new record fits once older telemetry made room
    kept = [r.id for r in box.peek(100)]
    assert kept == ids[-10:]  # the newest ten, the oldest dropped first
    box.close()
    again = Outbox(tmp_path / "o.sqlite", max_bytes=1000)  # the drop count is persistent
    stats = again.stats()
    assert (stats["records"], stats["bytes"], stats["dropped_records"], stats["dropped_bytes"]) == (10, 1000, 20, 2000)


def test_durable_classes_are_never_dropped_but_refused_when_full(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_bytes=1000)
    box.put("telemetry", PAYLOAD)
    durable = [box.put("fl_update", b"u" * 200, Priority.UPDATE) for _ in range(3)]
    durable.append(box.put("ack", b"a" * 100, Priority.ACK))
    # the telemetry record had to go to make room for the durable ones
    assert {r.id for r in box.peek(100)} == set(durable)
    assert box.put("telemetry", PAYLOAD) is None  # no room and nothing droppable: the new one is dropped
    with pytest.raises(OutboxFullError, match=r"UPDATE record of \d+ bytes was refused"):
        box.put("fl_update", b"u" * 200, Priority.UPDATE)
    stats = box.stats()
    assert (stats["refused_records"], stats["dropped_records"]) == (1, 2)
    assert {r.id for r in box.peek(100)} == set(durable)  # nothing durable was lost
    box.ack(durable[:2])
    assert box.put("fl_update", b"u" * 200, Priority.UPDATE) is not None


def test_a_record_larger_than_the_bound_is_refused(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_bytes=500)
    with pytest.raises(OutboxFullError):
        box.put("event", b"x" * 600, Priority.EVENT)
    assert box.put("telemetry", b"x" * 600) is None and box.stats()["records"] == 0


def test_delivery_order_is_priority_then_age(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    t1 = box.put("telemetry", {"n": 1})
    ev = box.put("event", {"n": 2}, Priority.EVENT)
    up = box.put("fl_update", b"\x00\x01", Priority.UPDATE)
    ack = box.put("ack", {"n": 3}, Priority.ACK)
    t2 = box.put("telemetry", {"n": 4})
    assert [r.id for r in box.lease(10)] == [ack, up, ev, t1, t2]
    assert box.peek(1)[0].json() == {"n": 3}


def test_leases_acks_and_release(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    ids = [box.put("event", {"i": i}, Priority.EVENT) for i in range(4)]
    first = box.lease(2, lease_s=0.3)
    assert [r.id for r in first] == ids[:2] and all(r.attempts == 1 for r in first)
    assert [r.id for r in box.lease(10, lease_s=0.3)] == ids[2:]  # leased ones are not handed out twice
    assert box.lease(10) == []
    assert box.ack([ids[0], 12345]) == 1
    box.release([ids[1]])
    assert [r.id for r in box.lease(10, lease_s=0.3)] == [ids[1]]
    time.sleep(0.35)  # leases expire: the records come back
    assert [r.id for r in box.lease(10)] == ids[1:]
    box.close()
    reopened = Outbox(tmp_path / "o.sqlite")  # a new process owns no leases
    assert [r.id for r in reopened.lease(10)] == ids[1:]
    assert reopened.stats()["acked_records"] == 1


class HalfSink:
    """Acknowledges only even ids (a broker that acked part of a batch)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def send(self, records: Sequence[Record]) -> list[int]:
        self.seen += [r.id for r in records]
        return [r.id for r in records if r.id % 2 == 0]


class DownSink:
    def send(self, records: Sequence[Record]) -> list[int]:
        raise ConnectionError("broker unreachable")


def test_drainer_acks_only_what_the_sink_acknowledged(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    ids = [box.put("event", {"i": i}, Priority.EVENT) for i in range(6)]
    assert Drainer(box, HalfSink()).drain_once() == 3
    assert [r.id for r in box.peek(10)] == [i for i in ids if i % 2]
    down = Drainer(box, DownSink())
    with pytest.raises(ConnectionError):
        down.drain_once()
    assert down.failures == 1 and [r.id for r in box.lease(10)] == [i for i in ids if i % 2]  # released again


def test_jsonl_sink_drains_everything_in_order(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    box.put("telemetry", {"t": 1})
    box.put("fl_update", b"\xff\x00binary", Priority.UPDATE)
    drainer = Drainer(box, JsonlSink(tmp_path / "sink.jsonl"), interval_s=0.05).start()
    deadline = time.monotonic() + 10
    while box.stats()["records"] and time.monotonic() < deadline:
        time.sleep(0.02)
    drainer.stop()
    lines = [json.loads(x) for x in (tmp_path / "sink.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["fl_update", "telemetry"]
    assert lines[0]["body"] == {"base64": "/wBiaW5hcnk="} and lines[1]["body"] == {"t": 1}


WRITER = """
import sys
from edge_agent.outbox import Outbox, Priority
box = Outbox(sys.argv[1], max_bytes=1 << 30)
i = 0
while True:
    rid = box.put("fl_update" if i % 2 else "telemetry", f"record-{i}".encode(), Priority.UPDATE if i % 2 else Priority.TELEMETRY)
    print("put", rid, i, flush=True)
    if i % 5 == 4:
        oldest = box.peek(1)[0].id
        print("acking", oldest, flush=True)  # from here until "acked", the record may or may not be gone
        box.ack([oldest])
        print("acked", oldest, flush=True)
    i += 1
"""


def test_kill_9_mid_writes_loses_nothing_put_and_resurrects_nothing_acked(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    put: dict[int, int] = {}
    acked: set[int] = set()
    acking: set[int] = set()
    assert proc.stdout is not None

    def note(line: str) -> None:
        kind, rid, *rest = line.split()
        if kind == "put":
            put[int(rid)] = int(rest[0])
        elif kind == "acking":
            acking.add(int(rid))
        else:
            acked.add(int(rid))

    for line in proc.stdout:
        note(line)
        if len(put) >= 150:
            os.kill(proc.pid, signal.SIGKILL)
            break
    for line in proc.stdout.read().splitlines():  # what it wrote before the kill landed (whole lines)
        note(line)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    box = Outbox(path, max_bytes=1 << 30)
    stored = {r.id: r.payload for r in box.peek(10_000)}
    assert acked and not (acked & set(stored))  # nothing acknowledged came back
    assert len(acking - acked) <= 1  # at most the ack in flight when the kill came
    for rid, i in put.items():  # every put that returned is there, intact
        if rid not in acking:
            assert stored[rid] == f"record-{i}".encode()
    assert box.stats()["bytes"] == sum(len(p) + len(k) + RECORD_OVERHEAD for k, p in ((r.kind, r.payload) for r in box.peek(10_000)))
