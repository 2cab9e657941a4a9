"""The cloud's durable state in SQLite (WAL): accounts, devices, presence, telemetry, releases, rollouts.

One file shared by every cloud worker process and by the CLI (`pocketfleet release`, `rollout status`).
Every handler that acknowledges an MQTT message first commits here (synchronous=FULL), so a kill -9 of a
worker loses nothing the broker considers delivered. Writes that can arrive twice (MQTT redelivery) or
out of order (two workers on a shared subscription) are idempotent or ordered by the device's `seq`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud_sync.broker_files import Account

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts(
    username TEXT PRIMARY KEY, role TEXT NOT NULL, grp TEXT, pw_hash TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS devices(
    id TEXT PRIMARY KEY, grp TEXT NOT NULL, created REAL NOT NULL,
    online INTEGER NOT NULL DEFAULT 0, conn TEXT, online_since REAL, last_seen REAL,
    active_name TEXT, active_version INTEGER, status_seq INTEGER NOT NULL DEFAULT 0, status TEXT);
CREATE TABLE IF NOT EXISTS telemetry(
    device TEXT NOT NULL, record_id TEXT NOT NULL, kind TEXT NOT NULL, created REAL, received REAL NOT NULL,
    body TEXT NOT NULL, PRIMARY KEY(device, record_id));
CREATE TABLE IF NOT EXISTS releases(
    id TEXT PRIMARY KEY, name TEXT NOT NULL, version INTEGER NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL, package_path TEXT NOT NULL, index_path TEXT NOT NULL, index_sha256 TEXT NOT NULL,
    index_size INTEGER NOT NULL, chunks INTEGER NOT NULL, chunking TEXT NOT NULL, rollback_auth TEXT,
    created REAL NOT NULL, manifest TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts(
    id TEXT PRIMARY KEY, release_id TEXT NOT NULL, grp TEXT NOT NULL, canary REAL NOT NULL,
    gates TEXT NOT NULL, state TEXT NOT NULL, reason TEXT, created REAL NOT NULL, updated REAL NOT NULL,
    promoted REAL, finished REAL, prev_release_id TEXT);
CREATE TABLE IF NOT EXISTS rollout_devices(
    rollout_id TEXT NOT NULL, device TEXT NOT NULL, phase TEXT NOT NULL, state TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0, sent_at REAL, sends INTEGER NOT NULL DEFAULT 0, cmd_id TEXT,
    progress TEXT, probe TEXT, error TEXT, updated REAL NOT NULL, PRIMARY KEY(rollout_id, device));
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, rollout_id TEXT, device TEXT, kind TEXT NOT NULL,
    detail TEXT);
CREATE TABLE IF NOT EXISTS dead_letters(
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, topic TEXT NOT NULL, device TEXT, error TEXT NOT NULL,
    payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS leases(name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS rollouts_state ON rollouts(state);
CREATE INDEX IF NOT EXISTS devices_grp ON devices(grp);
"""

ACTIVE_ROLLOUT_STATES = ("canary", "promoted", "rolling_back", "staged", "paused")  # superseded by a new one
# device states in a rollout: pending -> sent -> accepted/downloading -> installed | failed | refused;
# after a failed canary: rollback_sent -> rolled_back
DEVICE_TERMINAL = ("installed", "failed", "refused", "rolled_back")


@dataclass
class Release:
    id: str
    name: str
    version: int
    size: int
    sha256: str
    package_path: str
    index_path: str
    index_sha256: str
    index_size: int
    chunks: int
    chunking: dict[str, Any]
    rollback_auth: str | None
    created: float
    manifest: dict[str, Any]

    def descriptor(self) -> dict[str, Any]:
        """The `release` object of a pf.cmd.update/1 command."""
        return {
            "release_id": self.id, "name": self.name, "version": self.version, "size": self.size,
            "sha256": self.sha256, "chunks": self.chunks, "index_sha256": self.index_sha256,
            "index_size": self.index_size, "chunking": self.chunking, "rollback_auth": self.rollback_auth,
        }


class Registry:
    """Thread-safe access to the SQLite state (one connection, one lock; WAL for the other processes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One immediate (write-locked) transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------------------------------ accounts

    def put_account(self, account: Account) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO accounts(username, role, grp, pw_hash, created) VALUES(?,?,?,?,?) "
                "ON CONFLICT(username) DO UPDATE SET role=excluded.role, grp=excluded.grp, pw_hash=excluded.pw_hash",
                (account.username, account.role, account.group, account.pw_hash, time.time()),
            )
            if account.role == "device" and account.group:
                self._ensure_device(db, account.username, account.group, move=True)

    def accounts(self) -> list[Account]:
        return [Account(r["username"], r["role"], r["pw_hash"], r["grp"])
                for r in self.query("SELECT * FROM accounts ORDER BY username")]

    # ------------------------------------------------------------------------------------------- devices

    @staticmethod
    def _ensure_device(db: sqlite3.Connection, device: str, group: str, move: bool = False) -> None:
        db.execute("INSERT INTO devices(id, grp, created) VALUES(?,?,?) ON CONFLICT(id) DO NOTHING",
                   (device, group, time.time()))
        if move:
            db.execute("UPDATE devices SET grp=? WHERE id=?", (group, device))

    def ensure_device(self, device: str, group: str, move: bool = False) -> None:
        with self.tx() as db:
            self._ensure_device(db, device, group, move)

    def device(self, device: str) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM devices WHERE id=?", (device,))
        return rows[0] if rows else None

    def devices(self, group: str | None = None) -> list[sqlite3.Row]:
        if group is None:
            return self.query("SELECT * FROM devices ORDER BY id")
        return self.query("SELECT * FROM devices WHERE grp=? ORDER BY id", (group,))

    def record_status(self, device: str, msg: dict[str, Any], auto_group: str | None) -> bool:
        """Apply a pf.status/1 message. Returns False when the device is unknown and not auto-registered.

        Presence is keyed by the connection id `conn`: a last will from an older connection that arrives
        after the device reconnected does not mark it offline.
        """
        now = time.time()
        conn = msg.get("conn")
        with self.tx() as db:
            row = db.execute("SELECT * FROM devices WHERE id=?", (device,)).fetchone()
            if row is None:
                if not auto_group:
                    return False
                self._ensure_device(db, device, auto_group)
                row = db.execute("SELECT * FROM devices WHERE id=?", (device,)).fetchone()
            active = msg.get("active") or {}
            if msg["online"]:
                if msg["seq"] < row["status_seq"] and conn == row["conn"]:
                    return True  # an older message of this connection
                since = row["online_since"] if (row["online"] and row["conn"] == conn) else now
                db.execute(
                    "UPDATE devices SET online=1, conn=?, online_since=?, last_seen=?, active_name=?, "
                    "active_version=?, status_seq=?, status=? WHERE id=?",
                    (conn, since, now, active.get("name"), active.get("version"), msg["seq"],
                     json.dumps(msg), device),
                )
            elif conn is None or conn == row["conn"]:
                db.execute("UPDATE devices SET online=0, last_seen=?, status=? WHERE id=?",
                           (now, json.dumps(msg), device))
        return True

    def touch(self, device: str, active: dict[str, Any] | None = None) -> None:
        with self.tx() as db:
            if active:
                db.execute("UPDATE devices SET last_seen=?, active_name=?, active_version=? WHERE id=?",
                           (time.time(), active["name"], active["version"], device))
            else:
                db.execute("UPDATE devices SET last_seen=? WHERE id=?", (time.time(), device))

    # ----------------------------------------------------------------------------------------- telemetry

    def add_telemetry(self, device: str, msg: dict[str, Any]) -> bool:
        """Store one outbox record; False if it was already stored (redelivery)."""
        return self.add_telemetry_batch([(device, msg)]) == 1

    def add_telemetry_batch(self, items: list[tuple[str, dict[str, Any]]],
                            on_new: Callable[[sqlite3.Connection, str, dict[str, Any], float], None] | None = None,
                            ) -> int:
        """Store many outbox records in one transaction (one fsync); returns how many were new.

        `on_new(db, device, msg, now)` runs inside the transaction for each record stored for the first time
        (the telemetry rollups fold it there, so a redelivery is never counted twice)."""
        now = time.time()
        with self.tx() as db:
            new = 0
            for device, msg in items:
                added = db.execute(
                    "INSERT INTO telemetry(device, record_id, kind, created, received, body) VALUES(?,?,?,?,?,?) "
                    "ON CONFLICT(device, record_id) DO NOTHING",
                    (device, str(msg["id"]), msg["kind"], msg["created"], now, json.dumps(msg["body"])),
                ).rowcount
                new += added
                if added and on_new is not None:
                    on_new(db, device, msg, now)
            db.executemany("UPDATE devices SET last_seen=? WHERE id=?", [(now, d) for d in {d for d, _ in items}])
            return new

    def add_dead_letter(self, topic: str, device: str | None, payload: bytes, error: str) -> None:
        """Set aside a message that passed validation but cannot be stored (kept as received, for a person)."""
        with self.tx() as db:
            db.execute("INSERT INTO dead_letters(ts, topic, device, error, payload) VALUES(?,?,?,?,?)",
                       (time.time(), topic, device, error[:2000], payload))

    def dead_letters(self, limit: int = 1000) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM dead_letters ORDER BY id DESC LIMIT ?", (limit,))

    def telemetry(self, device: str | None = None, kind: str | None = None) -> list[sqlite3.Row]:
        sql, args = "SELECT * FROM telemetry WHERE 1=1", []
        if device:
            sql += " AND device=?"
            args.append(device)
        if kind:
            sql += " AND kind=?"
            args.append(kind)
        return self.query(sql + " ORDER BY received", tuple(args))

    # ------------------------------------------------------------------------------------------ releases

    def add_release(self, rel: Release) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO releases VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (rel.id, rel.name, rel.version, rel.size, rel.sha256, rel.package_path, rel.index_path,
                 rel.index_sha256, rel.index_size, rel.chunks, json.dumps(rel.chunking), rel.rollback_auth,
                 rel.created, json.dumps(rel.manifest)),
            )

    def release(self, release_id: str) -> Release | None:
        rows = self.query("SELECT * FROM releases WHERE id=?", (release_id,))
        if not rows:
            return None
        r = dict(rows[0])
        r["chunking"] = json.loads(r["chunking"])
        r["manifest"] = json.loads(r["manifest"])
        return Release(**r)

    # ------------------------------------------------------------------------------------------ rollouts

    def add_rollout(self, rollout_id: str, release_id: str, group: str, canary: float, gates: list[str],
                    prev_release_id: str | None, canary_devices: list[str] | None = None,
                    main_devices: list[str] | None = None) -> list[str]:
        """Create a rollout with its devices in ONE transaction (a controller tick in another worker must never
        see it without them) and supersede the group's active rollouts; returns the superseded ids.

        With canary devices it starts in 'canary'; without, in 'promoted' with `main_devices`.
        """
        now = time.time()
        state = "canary" if canary_devices else "promoted"
        with self.tx() as db:
            old = [r["id"] for r in db.execute(
                f"SELECT id FROM rollouts WHERE grp=? AND state IN ({','.join('?' * len(ACTIVE_ROLLOUT_STATES))})",
                (group, *ACTIVE_ROLLOUT_STATES))]
            for rid in old:
                db.execute("UPDATE rollouts SET state='superseded', reason=?, updated=?, finished=? WHERE id=?",
                           (f"superseded by rollout {rollout_id}", now, now, rid))
            db.execute(
                "INSERT INTO rollouts(id, release_id, grp, canary, gates, state, reason, created, updated, promoted, "
                "prev_release_id) VALUES(?,?,?,?,?,?,?,?,?,?,?)",
                (rollout_id, release_id, group, canary, json.dumps(gates), state,
                 None if canary_devices else "no canary phase", now, now, None if canary_devices else now,
                 prev_release_id),
            )
            phase, devices = ("canary", canary_devices) if canary_devices else ("main", main_devices or [])
            db.executemany(
                "INSERT INTO rollout_devices(rollout_id, device, phase, state, updated) VALUES(?,?,?,?,?) "
                "ON CONFLICT DO NOTHING", [(rollout_id, d, phase, "pending", now) for d in devices])
            self._event(db, rollout_id, None, "created", {"release": release_id, "group": group, "state": state,
                                                          "superseded": old})
        return old

    def rollout(self, rollout_id: str) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM rollouts WHERE id=?", (rollout_id,))
        return rows[0] if rows else None

    def rollouts(self, states: tuple[str, ...] | None = None) -> list[sqlite3.Row]:
        if states is None:
            return self.query("SELECT * FROM rollouts ORDER BY created")
        marks = ",".join("?" * len(states))
        return self.query(f"SELECT * FROM rollouts WHERE state IN ({marks}) ORDER BY created", states)

    def failed_with_pending_rollbacks(self) -> list[sqlite3.Row]:
        """Failed rollouts where some canary device has not confirmed its rollback yet."""
        return self.query(
            "SELECT * FROM rollouts WHERE state='failed' AND id IN "
            "(SELECT rollout_id FROM rollout_devices WHERE phase='canary' AND state != 'rolled_back') ORDER BY created")

    def set_rollout_state(self, rollout_id: str, state: str, reason: str | None = None, expect: str | None = None,
                          **stamps: float) -> bool:
        """Move a rollout to `state` (only from `expect` when given); returns whether it moved."""
        now = time.time()
        cols = "".join(f", {k}=?" for k in stamps)
        with self.tx() as db:
            sql = f"UPDATE rollouts SET state=?, reason=COALESCE(?, reason), updated=?{cols} WHERE id=?"
            args: list[Any] = [state, reason, now, *stamps.values(), rollout_id]
            if expect is not None:
                sql += " AND state=?"
                args.append(expect)
            moved = db.execute(sql, args).rowcount == 1
            if moved:
                self._event(db, rollout_id, None, f"rollout_{state}", {"reason": reason})
            return moved

    def group_release(self, group: str) -> Release | None:
        """The release the whole group should run: the newest rollout that was promoted (or completed)."""
        rows = self.query(
            "SELECT release_id FROM rollouts WHERE grp=? AND state IN ('promoted','complete') "
            "ORDER BY COALESCE(promoted, created) DESC LIMIT 1", (group,))
        return self.release(rows[0]["release_id"]) if rows else None

    def add_rollout_devices(self, rollout_id: str, devices: list[str], phase: str) -> int:
        now = time.time()
        with self.tx() as db:
            n = 0
            for d in devices:
                n += db.execute(
                    "INSERT INTO rollout_devices(rollout_id, device, phase, state, updated) VALUES(?,?,?,?,?) "
                    "ON CONFLICT DO NOTHING", (rollout_id, d, phase, "pending", now)).rowcount
            return n

    def rollout_devices(self, rollout_id: str, phase: str | None = None) -> list[sqlite3.Row]:
        if phase is None:
            return self.query("SELECT * FROM rollout_devices WHERE rollout_id=? ORDER BY device", (rollout_id,))
        return self.query("SELECT * FROM rollout_devices WHERE rollout_id=? AND phase=? ORDER BY device",
                          (rollout_id, phase))

    def mark_sent(self, rollout_id: str, device: str, cmd_id: str, state: str) -> None:
        with self.tx() as db:
            db.execute(
                "UPDATE rollout_devices SET state=CASE WHEN state IN ('pending','sent','rollback_sent') THEN ? "
                "ELSE state END, sent_at=?, sends=sends+1, cmd_id=?, updated=? WHERE rollout_id=? AND device=?",
                (state, time.time(), cmd_id, time.time(), rollout_id, device))

    def set_device_state(self, rollout_id: str, device: str, state: str, error: str | None = None) -> None:
        with self.tx() as db:
            db.execute("UPDATE rollout_devices SET state=?, error=COALESCE(?, error), updated=? "
                       "WHERE rollout_id=? AND device=?", (state, error, time.time(), rollout_id, device))
            self._event(db, rollout_id, device, state, {"error": error})

    def record_report(self, device: str, msg: dict[str, Any]) -> bool:
        """Apply a pf.ota.report/1 message (ignored if older than the last one applied); True if applied."""
        rollout_id = msg.get("rollout_id")
        with self.tx() as db:
            if msg.get("active"):
                db.execute("UPDATE devices SET last_seen=?, active_name=?, active_version=? WHERE id=?",
                           (time.time(), msg["active"]["name"], msg["active"]["version"], device))
            if not rollout_id:
                return False
            row = db.execute("SELECT * FROM rollout_devices WHERE rollout_id=? AND device=?",
                             (rollout_id, device)).fetchone()
            if row is None or msg["seq"] <= row["seq"]:
                return False
            state = msg["state"]
            if row["state"] in ("rollback_sent", "rolled_back") and state not in ("rolled_back", "failed"):
                state = row["state"]  # a late progress report must not undo a rollback in flight
            db.execute(
                "UPDATE rollout_devices SET state=?, seq=?, progress=COALESCE(?, progress), "
                "probe=COALESCE(?, probe), error=COALESCE(?, error), updated=? WHERE rollout_id=? AND device=?",
                (state, msg["seq"], _j(msg.get("progress")), _j(msg.get("probe")), msg.get("error"), time.time(),
                 rollout_id, device))
            if state != row["state"] and state != "downloading":
                self._event(db, rollout_id, device, state, {"error": msg.get("error"), "probe": msg.get("probe")})
            return True

    def device_release_allowed(self, device: str, release_id: str) -> bool:
        return self.device_release_group(device, release_id) is not None

    def device_release_group(self, device: str, release_id: str) -> str | None:
        """The group of a rollout that assigns `release_id` to `device` (None: not assigned to it)."""
        rows = self.query(
            "SELECT r.grp AS grp FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id "
            "WHERE rd.device=? AND r.release_id=? ORDER BY r.created DESC LIMIT 1", (device, release_id))
        return rows[0]["grp"] if rows else None

    # -------------------------------------------------------------------------------------------- events

    @staticmethod
    def _event(db: sqlite3.Connection, rollout_id: str | None, device: str | None, kind: str,
               detail: dict[str, Any] | None) -> None:
        db.execute("INSERT INTO events(ts, rollout_id, device, kind, detail) VALUES(?,?,?,?,?)",
                   (time.time(), rollout_id, device, kind, json.dumps(detail or {})))

    def event(self, rollout_id: str | None, device: str | None, kind: str, detail: dict[str, Any] | None = None) -> None:
        with self.tx() as db:
            self._event(db, rollout_id, device, kind, detail)

    def events(self, rollout_id: str) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM events WHERE rollout_id=? ORDER BY id", (rollout_id,))

    # -------------------------------------------------------------------------------------------- leases

    def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew a named lease (the rollout controller runs in one worker at a time)."""
        now = time.time()
        with self.tx() as db:
            db.execute("INSERT INTO leases(name, holder, expires) VALUES(?,?,?) ON CONFLICT(name) DO UPDATE SET "
                       "holder=excluded.holder, expires=excluded.expires WHERE leases.holder=excluded.holder "
                       "OR leases.expires < ?", (name, holder, now + ttl_s, now))
            row = db.execute("SELECT holder FROM leases WHERE name=?", (name,)).fetchone()
            return row is not None and row["holder"] == holder

    def release_lease(self, name: str, holder: str) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM leases WHERE name=? AND holder=?", (name, holder))


def _j(value: Any) -> str | None:
    return None if value is None else json.dumps(value)
