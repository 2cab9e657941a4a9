"""The durable outbox: records wait in SQLite (WAL, synchronous=FULL) until a sink acknowledges them.

- Bounded in bytes (payload + kind + a fixed per-record overhead; `max_bytes`).
- Priority classes, delivered in this order: ACK, UPDATE (federated updates), EVENT, TELEMETRY.
  Only TELEMETRY may be dropped: when the outbox is full the oldest telemetry goes first, and every drop
  is counted in the database. A record of another class is never dropped: when the outbox is full of
  such records, `put` refuses it with OutboxFullError (the caller decides: retry later, skip a round).
- `lease(n)` hands out the next records for `lease_s` seconds; `ack(ids)` deletes them (only then);
  `release(ids)` puts them back. Ids never repeat (AUTOINCREMENT), so a receiver can de-duplicate.
- kill -9 safe: a record whose `put` returned is on disk; an acknowledged one never comes back.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Protocol

from edge_agent.errors import OutboxFullError

log = logging.getLogger("pocketfleet.outbox")

RECORD_OVERHEAD = 64


class Priority(IntEnum):
    ACK = 0
    UPDATE = 1
    EVENT = 2
    TELEMETRY = 3


DROPPABLE = frozenset({Priority.TELEMETRY})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    priority INTEGER NOT NULL,
    kind TEXT NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_until REAL NOT NULL DEFAULT 0,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_order ON records(priority, id);
CREATE TABLE IF NOT EXISTS counters(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Record:
    id: int
    priority: Priority
    kind: str
    created: float
    payload: bytes
    attempts: int = 0

    def json(self) -> Any:
        return json.loads(self.payload)


class Sink(Protocol):
    """Where records go. `send` returns the ids the receiver acknowledged (a subset is fine)."""

    def send(self, records: Sequence[Record]) -> Iterable[int]: ...


class Outbox:
    """A bounded, prioritized, crash-safe queue in one SQLite file. Thread-safe."""

    def __init__(self, path: str | Path, max_bytes: int = 16 << 20) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        with self._tx():
            # leases belonged to the previous process; the byte total is re-derived (self-healing)
            self._db.execute("UPDATE records SET lease_until = 0 WHERE lease_until != 0")
            total = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM records").fetchone()[0]
            self._set("bytes", total)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------------ internals

    def _tx(self) -> _Tx:
        return _Tx(self._db, self._lock)

    def _get(self, name: str) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def _set(self, name: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO counters(name, value) VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    def _add(self, name: str, delta: int) -> None:
        self._set(name, self._get(name) + delta)

    # ------------------------------------------------------------------------------------------ API

    def put(self, kind: str, payload: bytes | str | dict | list, priority: Priority = Priority.TELEMETRY) -> int | None:
        """Store a record; returns its id, or None when a TELEMETRY record was dropped for lack of room.

        Raises OutboxFullError for a non-droppable record that does not fit even after dropping all telemetry.
        """
        priority = Priority(priority)
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload, separators=(",", ":"), allow_nan=False)
        if isinstance(payload, str):
            payload = payload.encode()
        size = len(payload) + len(kind.encode()) + RECORD_OVERHEAD
        droppable = priority in DROPPABLE
        with self._tx() as db:
            total = self._get("bytes")
            free = self.max_bytes - total
            victims: list[tuple[int, int]] = []
            if free < size <= self.max_bytes:
                marks = ",".join(str(int(p)) for p in DROPPABLE)
                for rid, rsize in db.execute(f"SELECT id, size FROM records WHERE priority IN ({marks}) ORDER BY id"):
                    if free >= size:
                        break
                    victims.append((rid, rsize))
                    free += rsize
            if size > free and droppable:
                self._add("dropped_records", 1)
                self._add("dropped_bytes", size)
                log.warning("outbox full: dropped a new %s record of %d bytes", kind, size)
                return None
            if size > free:
                self._add("refused_records", 1)  # committed: the refusal is counted, nothing else changes
            else:
                if victims:
                    db.executemany("DELETE FROM records WHERE id = ?", [(rid,) for rid, _ in victims])
                    dropped = sum(s for _, s in victims)
                    self._add("dropped_records", len(victims))
                    self._add("dropped_bytes", dropped)
                    log.warning("outbox full: dropped the %d oldest telemetry records (%d bytes)", len(victims), dropped)
                    total -= dropped
                cur = db.execute(
                    "INSERT INTO records(priority, kind, created, size, payload) VALUES(?, ?, ?, ?, ?)",
                    (int(priority), kind, time.time(), size, payload),
                )
                self._set("bytes", total + size)
                return int(cur.lastrowid)
        raise OutboxFullError(
            f"outbox {self.path} is full: {total} of {self.max_bytes} bytes are held by records that are never "
            f"dropped before the cloud acknowledges them; a {priority.name} record of {size} bytes was refused "
            "(drain the outbox or raise outbox_max_bytes)"
        )

    def lease(self, limit: int = 64, lease_s: float = 30.0) -> list[Record]:
        """The next records (priority order, then age) not leased by someone else, leased for `lease_s`."""
        now = time.time()
        with self._tx() as db:
            rows = db.execute(
                "SELECT id, priority, kind, created, payload, attempts FROM records WHERE lease_until <= ? "
                "ORDER BY priority, id LIMIT ?",
                (now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE records SET lease_until = ?, attempts = attempts + 1 WHERE id = ?",
                [(now + lease_s, r[0]) for r in rows],
            )
        return [Record(r[0], Priority(r[1]), r[2], r[3], bytes(r[4]), r[5] + 1) for r in rows]

    def peek(self, limit: int = 64) -> list[Record]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, priority, kind, created, payload, attempts FROM records ORDER BY priority, id LIMIT ?",
                (limit,),
            ).fetchall()
        return [Record(r[0], Priority(r[1]), r[2], r[3], bytes(r[4]), r[5]) for r in rows]

    def ack(self, ids: Iterable[int]) -> int:
        """Delete acknowledged records; returns how many were still there."""
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        with self._tx() as db:
            freed, count = 0, 0
            for i in range(0, len(ids), 500):
                part = ids[i : i + 500]
                marks = ",".join("?" * len(part))
                row = db.execute(f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM records WHERE id IN ({marks})", part).fetchone()
                db.execute(f"DELETE FROM records WHERE id IN ({marks})", part)
                count, freed = count + row[0], freed + row[1]
            self._add("bytes", -freed)
            self._add("acked_records", count)
            return count

    def release(self, ids: Iterable[int]) -> None:
        """Give leased records back (the send failed): they are handed out again at once."""
        with self._tx() as db:
            db.executemany("UPDATE records SET lease_until = 0 WHERE id = ?", [(int(i),) for i in ids])

    def stats(self) -> dict[str, Any]:
        with self._lock:
            rows = self._db.execute("SELECT priority, COUNT(*), SUM(size) FROM records GROUP BY priority").fetchall()
            counters = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
        by_class = {Priority(p).name.lower(): {"records": n, "bytes": b} for p, n, b in rows}
        return {
            "path": str(self.path),
            "max_bytes": self.max_bytes,
            "bytes": counters.get("bytes", 0),
            "records": sum(n for _, n, _ in rows),
            "by_class": by_class,
            "dropped_records": counters.get("dropped_records", 0),
            "dropped_bytes": counters.get("dropped_bytes", 0),
            "refused_records": counters.get("refused_records", 0),
            "acked_records": counters.get("acked_records", 0),
        }


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) under the outbox's thread lock."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, exc_type: Any, *rest: object) -> None:
        try:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.lock.release()


# ---------------------------------------------------------------------------------------------- draining


class JsonlSink:
    """Appends records as JSON lines to a file and fsyncs: a real local sink for development and audits."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def send(self, records: Sequence[Record]) -> list[int]:
        import base64
        import os

        lines = []
        for r in records:
            try:
                body: Any = r.json()
            except (UnicodeDecodeError, ValueError):
                body = {"base64": base64.b64encode(r.payload).decode()}
            lines.append(json.dumps({"id": r.id, "kind": r.kind, "priority": r.priority.name, "created": r.created, "body": body}))
        with open(self.path, "a") as fh:
            fh.write("".join(line + "\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())
        return [r.id for r in records]


class Drainer:
    """A thread that leases batches, hands them to the sink, and acks what the sink acknowledged."""

    def __init__(self, outbox: Outbox, sink: Sink, interval_s: float = 5.0, batch: int = 64) -> None:
        self.outbox, self.sink, self.interval_s, self.batch = outbox, sink, interval_s, batch
        self.sent = self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def drain_once(self) -> int:
        """One batch: returns how many records were acknowledged."""
        records = self.outbox.lease(self.batch)
        if not records:
            return 0
        try:
            acked = {int(i) for i in self.sink.send(records)} & {r.id for r in records}
        except Exception as exc:  # a failing sink must never lose records or stop the loop
            self.failures += 1
            log.warning("outbox sink failed (%s: %s); %d records stay queued", type(exc).__name__, exc, len(records))
            self.outbox.release(r.id for r in records)
            raise
        self.outbox.ack(acked)
        self.outbox.release(r.id for r in records if r.id not in acked)
        self.sent += len(acked)
        return len(acked)

    def _run(self) -> None:
        delay = self.interval_s
        while not self._stop.is_set():
            try:
                n = self.drain_once()
                delay = self.interval_s
            except Exception:
                n, delay = 0, min(delay * 2, 300.0)
            if n < self.batch:
                self._stop.wait(delay)

    def start(self) -> Drainer:
        self._thread = threading.Thread(target=self._run, name="outbox-drain", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)


def make_sink(spec: str) -> Sink | None:
    """'none' -> None (records wait for the sync client), 'jsonl:PATH' -> JsonlSink."""
    if spec == "none":
        return None
    if spec.startswith("jsonl:"):
        return JsonlSink(spec[len("jsonl:") :])
    raise ValueError(f"unknown sink {spec!r}")
