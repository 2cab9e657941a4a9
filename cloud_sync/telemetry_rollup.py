"""Telemetry an operator can read: time-bucket rollups per device and model version, with bounded retention.

Every pf.telemetry/1 record an agent sends (one per model version per interval: requests, errors,
p50/p95 latency, per-feature input mean/variance) is folded, in the same transaction that stores it, into

- `telemetry_rollup`: one row per (bucket width, bucket start, device, model name, version) with the
  request and error counts, request-weighted p50/p95 (and the worst p95), and the input-drift score;
  60 s buckets are kept for a day, 1 h buckets for 30 days (`RollupSettings`);
- `telemetry_ref`: the input reference of each model name: the running per-feature mean and variance of
  the first `reference_samples` inputs the fleet served with it, frozen after that.

The drift score of one record is, per input, the mean over features of |mean - reference mean| divided by
(reference std + 0.1 x the input's average reference std), less the sampling noise expected of a window
of n inputs (0.8 / sqrt(n)), the largest over the record's inputs: about 0 on the reference distribution,
1 when the features moved by about one standard deviation on average.

The raw records are pruned after `raw_retention_s` (an hour; they only serve as the redelivery de-duplication
key by then), so storage grows with the number of devices and models, not with time.
Percentiles of a bucket are request-weighted means of the devices' window percentiles, not exact
percentiles of the merged requests (the agents send percentiles, not histograms).
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from cloud_sync.registry import Registry

SCHEMA = """
CREATE TABLE IF NOT EXISTS telemetry_rollup(
    width INTEGER NOT NULL, bucket REAL NOT NULL, device TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    records INTEGER NOT NULL DEFAULT 0, requests INTEGER NOT NULL DEFAULT 0, errors INTEGER NOT NULL DEFAULT 0,
    lat_n INTEGER NOT NULL DEFAULT 0, p50_sum REAL NOT NULL DEFAULT 0, p95_sum REAL NOT NULL DEFAULT 0,
    p95_max REAL, drift_n INTEGER NOT NULL DEFAULT 0, drift_sum REAL NOT NULL DEFAULT 0, drift_max REAL,
    first REAL NOT NULL, last REAL NOT NULL,
    PRIMARY KEY(width, bucket, device, name, version));
CREATE INDEX IF NOT EXISTS telemetry_rollup_model ON telemetry_rollup(name, version, width, bucket);
CREATE INDEX IF NOT EXISTS telemetry_rollup_time ON telemetry_rollup(width, bucket);
CREATE TABLE IF NOT EXISTS telemetry_ref(
    name TEXT NOT NULL, input TEXT NOT NULL, count INTEGER NOT NULL, mean TEXT NOT NULL, m2 TEXT NOT NULL,
    PRIMARY KEY(name, input));
CREATE INDEX IF NOT EXISTS telemetry_received ON telemetry(received);
"""

TELEMETRY_SCHEMA = "pf.telemetry/1"
log = logging.getLogger("pocketfleet.telemetry")


@dataclass
class RollupSettings:
    """Bucket widths and how long each is kept (seconds); `[telemetry]` in cloud.toml."""

    fine_s: int = 60
    fine_keep_s: float = 86400.0
    coarse_s: int = 3600
    coarse_keep_s: float = 30 * 86400.0
    raw_retention_s: float = 3600.0  # raw records only de-duplicate redeliveries by then
    reference_samples: int = 2000
    prune_every_s: float = 60.0

    @property
    def widths(self) -> tuple[tuple[int, float], ...]:
        return ((self.fine_s, self.fine_keep_s), (self.coarse_s, self.coarse_keep_s))


def ensure_schema(registry: Registry) -> None:
    with registry.tx() as db:
        for stmt in SCHEMA.split(";"):
            if stmt.strip():
                db.execute(stmt)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


Prepared = dict[str, tuple[list[float], list[float], float]]  # input -> (mean, std, floor)


def prepare(ref: dict[str, tuple[int, list[float], list[float]]]) -> Prepared:
    """Reference {input: (count, mean, M2)} -> {input: (mean, std, floor)} for drift_score."""
    out: Prepared = {}
    for iname, (count, mean, m2) in ref.items():
        if count < 2 or not mean:
            continue
        std = [math.sqrt(max(v / count, 0.0)) for v in m2]
        out[iname] = (mean, std, 0.1 * (sum(std) / len(std)) + 1e-9)
    return out


def drift_score(ref: Prepared, inputs: dict[str, Any]) -> float | None:
    """The record's drift against the prepared reference; None without a usable reference."""
    scores = []
    for iname, stats in inputs.items():
        r = ref.get(iname)
        if r is None or not isinstance(stats, dict):
            continue
        rmean, std, floor = r
        mean = stats.get("mean")
        if not isinstance(mean, list) or len(mean) != len(rmean):
            continue
        try:
            raw = sum(abs(float(m) - rm) / (sd + floor) for m, rm, sd in zip(mean, rmean, std, strict=True)) / len(mean)
        except (TypeError, ValueError):
            continue
        n = stats.get("count")
        noise = 0.8 / math.sqrt(n) if isinstance(n, int) and n > 0 else 0.0  # E|mean - mu| / sigma of n samples
        scores.append(max(0.0, raw - noise))
    return max(scores) if scores else None


class Rollups:
    """Folds telemetry records into the rollup tables (use `fold` as Registry.add_telemetry_batch's on_new)."""

    def __init__(self, registry: Registry, settings: RollupSettings | None = None) -> None:
        self.registry = registry
        self.settings = settings or RollupSettings()
        ensure_schema(registry)
        self._last_prune = 0.0
        self._frozen: dict[str, Prepared] = {}  # references that reached reference_samples never change
        self.fold_errors = 0

    # ------------------------------------------------------------------------------------------ ingest

    def _reference(self, db: sqlite3.Connection, name: str, inputs: dict[str, Any]) -> Prepared:
        """The reference of `name`, these inputs folded into it while it has fewer than the target."""
        frozen = self._frozen.get(name)
        if frozen is not None and all(i in frozen for i in inputs):
            return frozen
        ref: dict[str, tuple[int, list[float], list[float]]] = {}
        for row in db.execute("SELECT * FROM telemetry_ref WHERE name=?", (name,)):
            ref[row["input"]] = (row["count"], json.loads(row["mean"]), json.loads(row["m2"]))
        target = self.settings.reference_samples
        for iname, stats in inputs.items():
            if not isinstance(stats, dict):
                continue
            n, mean, var = stats.get("count"), stats.get("mean"), stats.get("var")
            if not (isinstance(n, int) and n > 0 and isinstance(mean, list) and isinstance(var, list)
                    and len(mean) == len(var) and 0 < len(mean) <= 4096):
                continue
            try:
                mean_f, m2_f = [float(v) for v in mean], [float(v) * n for v in var]
            except (TypeError, ValueError):
                continue
            cur = ref.get(iname)
            if cur is not None and (cur[0] >= target or len(cur[1]) != len(mean_f)):
                continue
            if cur is None:
                new = (n, mean_f, m2_f)
            else:  # Chan et al. merge of two (count, mean, M2)
                c, cm, cm2 = cur
                tot = c + n
                new = (tot, [a + (b - a) * n / tot for a, b in zip(cm, mean_f, strict=True)],
                       [a2 + b2 + (b - a) ** 2 * c * n / tot for a, b, a2, b2 in zip(cm, mean_f, cm2, m2_f, strict=True)])
            ref[iname] = new
            db.execute("INSERT INTO telemetry_ref(name, input, count, mean, m2) VALUES(?,?,?,?,?) ON CONFLICT(name, input) "
                       "DO UPDATE SET count=excluded.count, mean=excluded.mean, m2=excluded.m2",
                       (name, iname, new[0], json.dumps(new[1]), json.dumps(new[2])))
        prepared = prepare(ref)
        if ref and all(r[0] >= target for r in ref.values()) and all(i in ref for i in inputs):
            self._frozen[name] = prepared
        return prepared

    def fold(self, db: sqlite3.Connection, device: str, msg: dict[str, Any], now: float) -> None:
        """Fold one newly stored outbox record (inside the storing transaction); non-telemetry is ignored.

        A record the rollups cannot fold is still stored: its partial rollup writes are undone (a
        savepoint), it is counted in `fold_errors` and logged, never raised into the storing transaction."""
        db.execute("SAVEPOINT rollup_fold")
        try:
            self._fold(db, device, msg, now)
        except Exception:  # noqa: BLE001 - the record itself is fine: keep it, skip its rollup
            db.execute("ROLLBACK TO rollup_fold")
            self.fold_errors += 1
            log.exception("telemetry record %s of %s not rolled up", msg.get("id"), device)
        db.execute("RELEASE rollup_fold")

    def _fold(self, db: sqlite3.Connection, device: str, msg: dict[str, Any], now: float) -> None:
        body = msg.get("body")
        if msg.get("kind") != "telemetry" or not isinstance(body, dict) or body.get("schema") != TELEMETRY_SCHEMA:
            return
        model = body.get("model") or {}
        name, version = model.get("name"), model.get("version")
        if not isinstance(name, str) or not isinstance(version, int):
            return
        requests = body.get("requests")
        errors = body.get("error_count")
        requests = requests if isinstance(requests, int) and requests >= 0 else 0
        errors = errors if isinstance(errors, int) and 0 <= errors <= max(requests, errors) else 0
        lat = body.get("latency_ms") or {}
        p50, p95 = _num(lat.get("p50")), _num(lat.get("p95"))
        lat_n = max(requests - errors, 1) if p50 is not None and p95 is not None else 0
        inputs = body.get("inputs") if isinstance(body.get("inputs"), dict) else {}
        ref = self._reference(db, name, inputs)
        drift = drift_score(ref, inputs) if inputs else None
        end = _num((body.get("window") or {}).get("end"))
        ts = end if end is not None and now - self.settings.coarse_keep_s < end <= now + 300 else now
        for width, _ in self.settings.widths:
            bucket = math.floor(ts / width) * width
            db.execute(
                "INSERT INTO telemetry_rollup(width, bucket, device, name, version, records, requests, errors, lat_n, "
                "p50_sum, p95_sum, p95_max, drift_n, drift_sum, drift_max, first, last) "
                "VALUES(?,?,?,?,?,1,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(width, bucket, device, name, version) DO UPDATE SET "
                "records=records+1, requests=requests+excluded.requests, errors=errors+excluded.errors, "
                "lat_n=lat_n+excluded.lat_n, p50_sum=p50_sum+excluded.p50_sum, p95_sum=p95_sum+excluded.p95_sum, "
                "p95_max=MAX(COALESCE(p95_max, excluded.p95_max), COALESCE(excluded.p95_max, p95_max)), "
                "drift_n=drift_n+excluded.drift_n, drift_sum=drift_sum+excluded.drift_sum, "
                "drift_max=MAX(COALESCE(drift_max, excluded.drift_max), COALESCE(excluded.drift_max, drift_max)), "
                "first=MIN(first, excluded.first), last=MAX(last, excluded.last)",
                (width, bucket, device, name, version, requests, errors, lat_n,
                 (p50 or 0.0) * lat_n, (p95 or 0.0) * lat_n, p95,
                 0 if drift is None else 1, drift or 0.0, drift, ts, ts))

    # ---------------------------------------------------------------------------------------- retention

    def prune(self, now: float | None = None, force: bool = False) -> dict[str, int]:
        """Delete rollups past their retention and raw telemetry past raw_retention_s (at most once a minute)."""
        now = time.time() if now is None else now
        if not force and now - self._last_prune < self.settings.prune_every_s:
            return {}
        self._last_prune = now
        out = {}
        with self.registry.tx() as db:
            for width, keep in self.settings.widths:
                out[f"rollup_{width}s"] = db.execute("DELETE FROM telemetry_rollup WHERE width=? AND bucket + width < ?",
                                                     (width, now - keep)).rowcount
            out["raw"] = db.execute("DELETE FROM telemetry WHERE kind='telemetry' AND received < ?",
                                    (now - self.settings.raw_retention_s,)).rowcount
        return out


# ----------------------------------------------------------------------------------------------- reading


def _width_for(settings: RollupSettings, since_s: float) -> int:
    return settings.fine_s if since_s <= settings.fine_keep_s else settings.coarse_s


def _finish(acc: dict[str, Any]) -> dict[str, Any]:
    req, err, lat_n = acc.pop("requests"), acc.pop("errors"), acc.pop("lat_n")
    p50_sum, p95_sum, drift_n, drift_sum = acc.pop("p50_sum"), acc.pop("p95_sum"), acc.pop("drift_n"), acc.pop("drift_sum")
    return {**acc, "requests": req, "errors": err, "error_rate": (err / req) if req else None,
            "p50_ms": (p50_sum / lat_n) if lat_n else None, "p95_ms": (p95_sum / lat_n) if lat_n else None,
            "drift": (drift_sum / drift_n) if drift_n else None}


_SUM_COLS = ", ".join(f"{fn}(r.{c}) AS {c}" for fn, c in (
    ("SUM", "records"), ("SUM", "requests"), ("SUM", "errors"), ("SUM", "lat_n"), ("SUM", "p50_sum"),
    ("SUM", "p95_sum"), ("MAX", "p95_max"), ("SUM", "drift_n"), ("SUM", "drift_sum"), ("MAX", "drift_max"),
    ("MIN", "first"), ("MAX", "last")))


def summary(registry: Registry, since_s: float = 3600.0, device: str | None = None, group: str | None = None,
            name: str | None = None, version: int | None = None, by: tuple[str, ...] = ("device", "name", "version"),
            settings: RollupSettings | None = None, after: float | None = None, before: float | None = None,
            devices: list[str] | None = None) -> list[dict[str, Any]]:
    """Aggregates over the last `since_s` seconds (or [after, before)), grouped by `by` (a subset of
    device, name, version, bucket): requests, errors, error_rate, p50_ms, p95_ms, p95_max, drift, drift_max."""
    settings = settings or RollupSettings()
    now = time.time()
    start = after if after is not None else now - since_s
    width = _width_for(settings, now - start)
    keys = [k for k in by if k in ("device", "name", "version", "bucket")]
    where, args = ["r.width=?", "r.bucket >= ?"], [width, math.floor(start / width) * width]
    if before is not None:
        where.append("r.bucket < ?")
        args.append(before)
    for col, val in (("r.device", device), ("r.name", name), ("r.version", version), ("d.grp", group)):
        if val is not None:
            where.append(f"{col}=?")
            args.append(val)
    if devices is not None:
        where.append(f"r.device IN ({','.join('?' * len(devices))})")
        args.extend(devices)
    cols = ", ".join(f"r.{k}" for k in keys)
    sql = (f"SELECT {cols + ', ' if cols else ''}{_SUM_COLS} "
           f"FROM telemetry_rollup r LEFT JOIN devices d ON d.id = r.device WHERE {' AND '.join(where)}"
           + (f" GROUP BY {cols} ORDER BY {cols}" if cols else ""))
    try:
        rows = registry.query(sql, tuple(args))
    except sqlite3.OperationalError:  # no cloud worker has created the rollup tables yet
        return []
    out = []
    for r in rows:
        acc = dict(r)
        if acc.get("records") is None:
            continue
        item = _finish(acc)
        if "bucket" in item:
            item["width_s"] = width
        out.append(item)
    return out
