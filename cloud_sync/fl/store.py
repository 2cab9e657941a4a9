"""The aggregator's durable state in SQLite (WAL): tasks, rounds, check-ins, updates, global models,
server-optimizer state and counters. Every state transition is one transaction, so a kill -9 at any
point leaves either the state before it or the state after it."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (task TEXT PRIMARY KEY, config TEXT NOT NULL, state TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (task TEXT, round INTEGER, attempt INTEGER, state TEXT NOT NULL,
    model_version INTEGER NOT NULL, config TEXT NOT NULL, selected TEXT NOT NULL DEFAULT '[]',
    target INTEGER NOT NULL DEFAULT 0, min_count INTEGER NOT NULL DEFAULT 0,
    checkin_deadline REAL NOT NULL, deadline REAL NOT NULL, started REAL NOT NULL, closed REAL,
    result TEXT, PRIMARY KEY (task, round, attempt));
CREATE TABLE IF NOT EXISTS checkins (task TEXT, round INTEGER, attempt INTEGER, device TEXT,
    num_samples INTEGER, ts REAL, PRIMARY KEY (task, round, attempt, device));
CREATE TABLE IF NOT EXISTS updates (task TEXT, round INTEGER, device TEXT, attempt INTEGER,
    payload BLOB NOT NULL, num_samples INTEGER NOT NULL, nbytes INTEGER NOT NULL, received REAL NOT NULL,
    PRIMARY KEY (task, round, device));
CREATE TABLE IF NOT EXISTS models (task TEXT, version INTEGER, weights BLOB NOT NULL, strategy_state BLOB,
    accountant TEXT, created REAL NOT NULL, PRIMARY KEY (task, version));
CREATE TABLE IF NOT EXISTS counters (task TEXT, name TEXT, value INTEGER NOT NULL, PRIMARY KEY (task, name));
"""


class RoundStore:
    """Thin, thread-safe access to the FL database. Methods named `tx_*` run inside `transaction()`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: a committed transaction survives kill -9
        self.db.executescript(SCHEMA)
        self.lock = threading.RLock()

    def close(self) -> None:
        with self.lock:
            self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def one(self, sql: str, *args: Any) -> tuple | None:
        with self.lock:
            return self.db.execute(sql, args).fetchone()

    def all(self, sql: str, *args: Any) -> list[tuple]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    # --- counters ---------------------------------------------------------------------------------

    def count(self, task: str, name: str, n: int = 1, conn: sqlite3.Connection | None = None) -> None:
        sql = ("INSERT INTO counters (task, name, value) VALUES (?, ?, ?) "
               "ON CONFLICT(task, name) DO UPDATE SET value = value + excluded.value")
        if conn is not None:
            conn.execute(sql, (task, name, n))
        else:
            with self.lock:
                self.db.execute(sql, (task, name, n))

    def counters(self, task: str) -> dict[str, int]:
        return {n: v for n, v in self.all("SELECT name, value FROM counters WHERE task = ?", task)}

    # --- reads ------------------------------------------------------------------------------------

    def task(self, task: str) -> dict[str, Any] | None:
        row = self.one("SELECT config, state, created FROM tasks WHERE task = ?", task)
        return None if row is None else {"task": task, "config": json.loads(row[0]), "state": row[1], "created": row[2]}

    def tasks(self) -> list[str]:
        return [r[0] for r in self.all("SELECT task FROM tasks ORDER BY created")]

    def current_round(self, task: str) -> dict[str, Any] | None:
        row = self.one(
            "SELECT round, attempt, state, model_version, config, selected, target, min_count, checkin_deadline, "
            "deadline, started, closed, result FROM rounds WHERE task = ? ORDER BY round DESC, attempt DESC LIMIT 1",
            task,
        )
        return None if row is None else _round(task, row)

    def rounds(self, task: str) -> list[dict[str, Any]]:
        rows = self.all(
            "SELECT round, attempt, state, model_version, config, selected, target, min_count, checkin_deadline, "
            "deadline, started, closed, result FROM rounds WHERE task = ? ORDER BY round, attempt",
            task,
        )
        return [_round(task, r) for r in rows]

    def latest_model(self, task: str) -> tuple[int, bytes, bytes | None, str | None] | None:
        return self.one(  # type: ignore[return-value]
            "SELECT version, weights, strategy_state, accountant FROM models WHERE task = ? ORDER BY version DESC LIMIT 1",
            task,
        )

    def model(self, task: str, version: int) -> bytes | None:
        row = self.one("SELECT weights FROM models WHERE task = ? AND version = ?", task, version)
        return None if row is None else row[0]

    def checkins(self, task: str, round: int, attempt: int) -> dict[str, int]:
        rows = self.all("SELECT device, num_samples FROM checkins WHERE task = ? AND round = ? AND attempt = ?",
                        task, round, attempt)
        return dict(rows)

    def updates(self, task: str, round: int) -> list[tuple[str, bytes, int, int]]:
        return self.all(
            "SELECT device, payload, num_samples, nbytes FROM updates WHERE task = ? AND round = ? ORDER BY device",
            task, round,
        )

    def update_count(self, task: str, round: int) -> int:
        return int(self.one("SELECT COUNT(*) FROM updates WHERE task = ? AND round = ?", task, round)[0])


def _round(task: str, row: tuple) -> dict[str, Any]:
    keys = ("round", "attempt", "state", "model_version", "config", "selected", "target", "min_count",
            "checkin_deadline", "deadline", "started", "closed", "result")
    out = dict(zip(keys, row, strict=True))
    out["task"] = task
    out["config"] = json.loads(out["config"])
    out["selected"] = json.loads(out["selected"])
    out["result"] = json.loads(out["result"]) if out["result"] else None
    return out


def now() -> float:
    return time.time()
