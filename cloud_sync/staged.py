"""Staged rollouts that stop themselves on what the devices report while serving.

A staged rollout sends a release to a growing part of the group, stage by stage:

- rate stages (exponential, like AWS IoT Jobs' baseRate / incrementFactor): `--rate 2,2` gives stages of
  2, 4, 8, 16, ... devices (each stage `factor` times the last) until the whole group has it;
- share stages: `--stages 5%,25%,100%` (cumulative shares of the group).

A stage starts when the previous one is finished (every device installed, failed or refused) and has
soaked for `--soak` seconds. All the while, every controller tick checks the abort criteria on the
devices that run the new version, each `METRIC OP VALUE[@MIN_DEVICES]` and judged only once at least
MIN_DEVICES devices (default 3) contribute to it:

    error_rate     errors / requests of the new version (devices with >= min_requests requests)
    p95_ratio      median over devices of p95(new version) / p95(previous version on the same device)
    p95_ms         median over devices of the new version's p95 latency
    drift          mean input-drift score of the new version's telemetry (cloud_sync.telemetry_rollup)
    golden         the worst golden-set accuracy of the install probes
    failure_rate   failed or refused installs / finished installs

When one is breached the rollout goes to `aborting`: every device that got the release is sent a
rollback (back to its previous version), then it is `aborted`, with the breach (metric, observed value,
threshold, devices) recorded as its reason. `rollout pause | resume | abort` act on it by hand.

    staged ──stage done + soak, no breach──> next stage ... ──last stage soaked──> complete
      │  ↑
      │  └── resume ── paused <── pause
      └── breach / abort ──> aborting ──every device rolled back──> aborted
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sqlite3
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from cloud_sync.errors import ReleaseError, RolloutError
from cloud_sync.registry import DEVICE_TERMINAL, Registry
from cloud_sync.telemetry_rollup import summary

log = logging.getLogger("pocketfleet.rollout.staged")

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollout_plans(
    rollout_id TEXT PRIMARY KEY, plan TEXT NOT NULL, counts TEXT NOT NULL, criteria TEXT NOT NULL,
    device_order TEXT NOT NULL, stage INTEGER NOT NULL DEFAULT 0, stage_started REAL, stage_done REAL,
    paused_from TEXT, abort TEXT);
"""
STAGED_STATES = ("staged", "paused", "aborting")
METRICS = ("error_rate", "p95_ratio", "p95_ms", "drift", "golden", "failure_rate")
_CRIT_RE = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*(?:@\s*(\d+))?\s*$")
DEFAULT_CRITERIA = ("failure_rate>0.2@1",)


@dataclass(frozen=True)
class AbortCriterion:
    metric: str
    op: str
    value: float
    min_devices: int = 3

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}@{self.min_devices}"

    def breached(self, observed: float | None, n: int) -> bool:
        if observed is None or n < self.min_devices:
            return False
        return {"<=": observed <= self.value, ">=": observed >= self.value,
                "<": observed < self.value, ">": observed > self.value}[self.op]


def parse_criterion(text: str) -> AbortCriterion:
    m = _CRIT_RE.match(text)
    if not m or m.group(1) not in METRICS:
        raise ReleaseError(f"abort criterion {text!r} must look like METRIC>VALUE[@MIN_DEVICES] with METRIC one of "
                           f"{', '.join(METRICS)} (e.g. error_rate>0.05@3, p95_ratio>1.5@3, golden<0.9@1)")
    try:
        value = float(m.group(3))
    except ValueError as exc:
        raise ReleaseError(f"abort criterion {text!r}: {m.group(3)!r} is not a number") from exc
    n = int(m.group(4)) if m.group(4) else 3
    if n < 1:
        raise ReleaseError(f"abort criterion {text!r}: the minimum device count must be at least 1")
    return AbortCriterion(m.group(1), m.group(2), value, n)


@dataclass(frozen=True)
class StagePlan:
    """kind 'rate' (base devices, x factor per stage) or 'share' (cumulative shares); soak per stage."""

    kind: str
    base: int = 1
    factor: float = 2.0
    shares: tuple[float, ...] = ()
    soak_s: float = 60.0
    min_requests: int = 10

    def counts(self, n: int) -> list[int]:
        """Cumulative device counts of the stages for a group of n devices (the last is always n)."""
        if n <= 0:
            return []
        out: list[int] = []
        if self.kind == "rate":
            size, total = float(self.base), 0
            while total < n:
                total = min(n, total + max(1, int(round(size))))
                out.append(total)
                size *= self.factor
            return out
        for share in self.shares:
            c = min(n, max(1, math.ceil(share * n - 1e-9)))
            if not out or c > out[-1]:
                out.append(c)
        if out[-1] != n:
            out.append(n)
        return out

    def describe(self) -> str:
        if self.kind == "rate":
            return f"rate {self.base} x{self.factor:g}, soak {self.soak_s:g}s"
        return f"stages {','.join(f'{s:.4g}' for s in self.shares)}, soak {self.soak_s:g}s"


def parse_rate(text: str, soak_s: float = 60.0) -> StagePlan:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        base = int(parts[0])
        factor = float(parts[1]) if len(parts) > 1 else 2.0
    except (ValueError, IndexError) as exc:
        raise ReleaseError(f"--rate {text!r} must be BASE[,FACTOR] (e.g. 2,2: stages of 2, 4, 8, ... devices)") from exc
    if len(parts) > 2 or base < 1 or factor < 1:
        raise ReleaseError(f"--rate {text!r}: BASE must be >= 1 device and FACTOR >= 1")
    return StagePlan("rate", base=base, factor=factor, soak_s=soak_s)


def parse_stages(text: str, soak_s: float = 60.0) -> StagePlan:
    from cloud_sync.releases import parse_canary

    try:
        shares = tuple(parse_canary(p) for p in str(text).split(","))
    except ReleaseError as exc:
        raise ReleaseError(f"--stages {text!r}: {exc}") from exc
    if not shares or any(s <= 0 for s in shares) or list(shares) != sorted(shares):
        raise ReleaseError(f"--stages {text!r} must be increasing shares above 0, e.g. 5%,25%,100%")
    return StagePlan("share", shares=shares, soak_s=soak_s)


def ensure_schema(registry: Registry) -> None:
    with registry.tx() as db:
        db.execute(SCHEMA.strip().rstrip(";"))


def plan_of(registry: Registry, rollout_id: str) -> dict[str, Any] | None:
    try:
        rows = registry.query("SELECT * FROM rollout_plans WHERE rollout_id=?", (rollout_id,))
    except sqlite3.OperationalError:  # no staged rollout was ever created in this registry
        return None
    if not rows:
        return None
    r = dict(rows[0])
    for k in ("plan", "counts", "criteria", "device_order", "abort"):
        r[k] = json.loads(r[k]) if r[k] else None
    return r


def add_staged_rollout(registry: Registry, rollout_id: str, release_id: str, group: str, plan: StagePlan,
                       criteria: list[AbortCriterion], prev_release_id: str | None) -> dict[str, Any]:
    """Create a staged rollout (superseding the group's active rollouts) with its device order and stages."""
    from cloud_sync.registry import ACTIVE_ROLLOUT_STATES

    ensure_schema(registry)
    devices = registry.devices(group)
    if not devices:
        raise ReleaseError(f"group {group!r} has no devices (provision some with `pocketfleet cloud provision`)")
    order = [d["id"] for d in sorted(
        devices, key=lambda d: (-int(d["online"]), hashlib.sha256(f"{rollout_id}/{d['id']}".encode()).digest()))]
    counts = plan.counts(len(order))
    now = time.time()
    active = tuple(dict.fromkeys((*ACTIVE_ROLLOUT_STATES, "staged", "paused")))
    with registry.tx() as db:
        old = [r["id"] for r in db.execute(
            f"SELECT id FROM rollouts WHERE grp=? AND state IN ({','.join('?' * len(active))})", (group, *active))]
        for rid in old:
            db.execute("UPDATE rollouts SET state='superseded', reason=?, updated=?, finished=? WHERE id=?",
                       (f"superseded by rollout {rollout_id}", now, now, rid))
        db.execute(
            "INSERT INTO rollouts(id, release_id, grp, canary, gates, state, reason, created, updated, prev_release_id) "
            "VALUES(?,?,?,?,?,?,?,?,?,?)",
            (rollout_id, release_id, group, 0.0, "[]", "staged", f"stage 1 of {len(counts)}", now, now,
             prev_release_id))
        db.execute("INSERT INTO rollout_plans(rollout_id, plan, counts, criteria, device_order, stage, stage_started) "
                   "VALUES(?,?,?,?,?,0,?)",
                   (rollout_id, json.dumps(asdict(plan)), json.dumps(counts), json.dumps([str(c) for c in criteria]),
                    json.dumps(order), now))
        db.executemany("INSERT INTO rollout_devices(rollout_id, device, phase, state, updated) VALUES(?,?,?,?,?) "
                       "ON CONFLICT DO NOTHING", [(rollout_id, d, "canary", "pending", now) for d in order[:counts[0]]])
        db.execute("INSERT INTO events(ts, rollout_id, device, kind, detail) VALUES(?,?,?,?,?)",
                   (now, rollout_id, None, "created", json.dumps({"release": release_id, "group": group,
                                                                  "state": "staged", "stages": counts,
                                                                  "superseded": old})))
    return {"stages": counts, "order": order, "superseded": old, "criteria": [str(c) for c in criteria]}


# --------------------------------------------------------------------------------------------- observing


def observe(registry: Registry, rollout: Any, rel: Any, min_requests: int = 10,
            baseline_s: float = 3600.0) -> dict[str, tuple[float | None, int]]:
    """metric -> (value, devices contributing) over the rollout's devices that run the new version."""
    rows = registry.rollout_devices(rollout["id"])
    installed = [r["device"] for r in rows if r["state"] == "installed"]
    finished = [r for r in rows if r["state"] in DEVICE_TERMINAL]
    failed = [r for r in finished if r["state"] in ("failed", "refused")]
    out: dict[str, tuple[float | None, int]] = {
        "failure_rate": ((len(failed) / len(finished)) if finished else None, len(finished))}
    probes = [json.loads(r["probe"]) for r in rows if r["state"] == "installed" and r["probe"]]
    goldens = [p["golden"] for p in probes if p.get("golden") is not None]
    out["golden"] = (min(goldens) if goldens else None, len(goldens))
    if not installed:
        for m in ("error_rate", "p95_ratio", "p95_ms", "drift"):
            out[m] = (None, 0)
        return out
    created = rollout["created"]
    new = [t for t in summary(registry, after=created, name=rel.name, version=rel.version, devices=installed)
           if t["requests"] >= min_requests]
    req = sum(t["requests"] for t in new)
    out["error_rate"] = ((sum(t["errors"] for t in new) / req) if req else None, len(new))
    p95s = [t["p95_ms"] for t in new if t["p95_ms"] is not None]
    out["p95_ms"] = (statistics.median(p95s) if p95s else None, len(p95s))
    drifts = [t["drift"] for t in new if t["drift"] is not None]
    out["drift"] = (statistics.fmean(drifts) if drifts else None, len(drifts))
    before = {}
    for t in summary(registry, after=created - baseline_s, before=created, name=rel.name,
                     devices=[t["device"] for t in new]):
        if t["version"] != rel.version and t["p95_ms"] and t["requests"] >= min_requests:
            prev = before.get(t["device"])
            if prev is None or t["last"] > prev["last"]:
                before[t["device"]] = t
    ratios = [t["p95_ms"] / before[t["device"]]["p95_ms"] for t in new
              if t["p95_ms"] is not None and t["device"] in before]
    out["p95_ratio"] = (statistics.median(ratios) if ratios else None, len(ratios))
    return out


def breaches(criteria: list[AbortCriterion], observed: dict[str, tuple[float | None, int]]) -> list[dict[str, Any]]:
    out = []
    for c in criteria:
        value, n = observed.get(c.metric, (None, 0))
        if c.breached(value, n):
            out.append({"criterion": str(c), "metric": c.metric, "observed": value, "devices": n,
                        "threshold": c.value, "op": c.op})
    return out


# ------------------------------------------------------------------------------------------- controller


class StagedController:
    """Drives the staged rollouts; one step per tick, all state in SQLite (like RolloutController)."""

    def __init__(self, controller: Any, check_every_s: float = 0.5) -> None:
        self.c = controller
        self.registry: Registry = controller.registry
        self.check_every_s = check_every_s
        self._checked: dict[str, float] = {}
        ensure_schema(self.registry)

    def tick(self) -> None:
        for r in self.registry.rollouts(("staged", "aborting")):
            try:
                if r["state"] == "staged":
                    self._step_staged(r)
                else:
                    self._step_aborting(r)
            except Exception:  # noqa: BLE001 - one bad rollout must not stop the others
                log.exception("staged rollout %s: step failed", r["id"])

    def _step_staged(self, rollout: Any) -> None:
        rel = self.registry.release(rollout["release_id"])
        plan = plan_of(self.registry, rollout["id"])
        assert rel is not None and plan is not None
        now = self.c.clock()
        order, counts, stage = plan["device_order"], plan["counts"], plan["stage"]
        group_ids = [d["id"] for d in self.registry.devices(rollout["grp"])]
        joined = [d for d in group_ids if d not in set(order)]
        if joined:  # devices that joined the group meanwhile come last (the last stage covers the group)
            order = order + joined
            counts = counts[:-1] + [len(order)] if counts[-1] >= len(order) - len(joined) else counts
            with self.registry.tx() as db:
                db.execute("UPDATE rollout_plans SET device_order=?, counts=? WHERE rollout_id=?",
                           (json.dumps(order), json.dumps(counts), rollout["id"]))
        rows = self.registry.rollout_devices(rollout["id"])
        self.c._drive(rollout, rel, rows)
        if now - self._checked.get(rollout["id"], 0.0) >= self.check_every_s:
            self._checked[rollout["id"]] = now
            criteria = [parse_criterion(c) for c in plan["criteria"]]
            observed = observe(self.registry, rollout, rel, plan["plan"].get("min_requests", 10))
            hit = breaches(criteria, observed)
            if hit:
                self._abort(rollout, plan, hit, observed)
                return
        rows = self.registry.rollout_devices(rollout["id"])
        if len(rows) < counts[stage] or not all(r["state"] in DEVICE_TERMINAL for r in rows):
            return
        if plan["stage_done"] is None:
            with self.registry.tx() as db:
                db.execute("UPDATE rollout_plans SET stage_done=? WHERE rollout_id=?", (now, rollout["id"]))
            self.registry.event(rollout["id"], None, "stage_done", {"stage": stage + 1, "devices": counts[stage]})
            return
        if now - plan["stage_done"] < plan["plan"]["soak_s"]:
            return
        if stage + 1 >= len(counts):
            bad = [r["device"] for r in rows if r["state"] != "installed"]
            reason = (f"all {len(counts)} stages passed; every device installed it" if not bad else
                      f"all {len(counts)} stages passed; {len(bad)} device(s) did not install: {', '.join(bad[:10])}")
            self.registry.set_rollout_state(rollout["id"], "complete", reason, expect="staged", finished=now,
                                            promoted=now)
            log.info("rollout %s: complete (%s)", rollout["id"], reason)
            return
        nxt = stage + 1
        with self.registry.tx() as db:
            moved = db.execute("UPDATE rollout_plans SET stage=?, stage_started=?, stage_done=NULL "
                               "WHERE rollout_id=? AND stage=?", (nxt, now, rollout["id"], stage)).rowcount
            if not moved:
                return
            db.executemany("INSERT INTO rollout_devices(rollout_id, device, phase, state, updated) VALUES(?,?,?,?,?) "
                           "ON CONFLICT DO NOTHING",
                           [(rollout["id"], d, "canary", "pending", now) for d in order[counts[stage]:counts[nxt]]])
            db.execute("UPDATE rollouts SET reason=?, updated=? WHERE id=?",
                       (f"stage {nxt + 1} of {len(counts)}", now, rollout["id"]))
        self.registry.event(rollout["id"], None, "stage", {"stage": nxt + 1, "devices": counts[nxt]})
        log.info("rollout %s: stage %d of %d (%d devices)", rollout["id"], nxt + 1, len(counts), counts[nxt])

    def _abort(self, rollout: Any, plan: dict[str, Any], hit: list[dict[str, Any]],
               observed: dict[str, tuple[float | None, int]], by: str = "telemetry") -> None:
        parts = [f"{h['metric']} = {h['observed']:.4g} on {h['devices']} device(s) breached {h['criterion']}" for h in hit]
        reason = f"aborted at stage {plan['stage'] + 1} by {by}: " + "; ".join(parts)
        detail = {"by": by, "stage": plan["stage"] + 1, "breaches": hit,
                  "observed": {k: {"value": v, "devices": n} for k, (v, n) in observed.items()}}
        abort_rollout(self.registry, rollout["id"], reason, detail, expect=("staged",))
        log.warning("rollout %s: %s; rolling back", rollout["id"], reason)

    def _step_aborting(self, rollout: Any) -> None:
        rel = self.registry.release(rollout["release_id"])
        assert rel is not None
        devs = {d["id"]: d for d in self.registry.devices(rollout["grp"])}
        now = self.c.clock()
        pending = []
        for row in self.registry.rollout_devices(rollout["id"]):
            if row["state"] in ("rolled_back", "cancelled"):
                continue
            if row["state"] == "pending":  # never sent: nothing to undo
                self.registry.set_device_state(rollout["id"], row["device"], "cancelled")
                continue
            pending.append(row["device"])
            if row["state"] != "rollback_sent" or self.c._should_send(row, devs.get(row["device"]), now):
                self.c._send_rollback(rollout, rel, row)
        if not pending:
            self.registry.set_rollout_state(rollout["id"], "aborted", None, expect="aborting", finished=now)
        elif now - rollout["updated"] > self.c.config.rollback_timeout_s:
            self.registry.set_rollout_state(
                rollout["id"], "aborted",
                f"{rollout['reason']}; rollback not yet confirmed by {', '.join(pending[:10])}",
                expect="aborting", finished=now)


# ----------------------------------------------------------------------------------------- operator verbs


def abort_rollout(registry: Registry, rollout_id: str, reason: str, detail: dict[str, Any] | None = None,
                  expect: tuple[str, ...] = ("staged", "paused")) -> None:
    ensure_schema(registry)
    now = time.time()
    with registry.tx() as db:
        marks = ",".join("?" * len(expect))
        moved = db.execute(f"UPDATE rollouts SET state='aborting', reason=?, updated=? WHERE id=? AND state IN ({marks})",
                           (reason, now, rollout_id, *expect)).rowcount
        if not moved:
            raise RolloutError(f"rollout {rollout_id} is not {' or '.join(expect)}; it cannot be aborted")
        db.execute("UPDATE rollout_plans SET abort=? WHERE rollout_id=?",
                   (json.dumps({"reason": reason, **(detail or {})}), rollout_id))
        db.execute("INSERT INTO events(ts, rollout_id, device, kind, detail) VALUES(?,?,?,?,?)",
                   (now, rollout_id, None, "abort", json.dumps({"reason": reason, **(detail or {})})))


def operator_action(registry: Registry, rollout_id: str, action: str, reason: str | None = None) -> dict[str, Any]:
    """`rollout pause | resume | abort` on a staged rollout (abort on a canary rollout rolls its canary back)."""
    ensure_schema(registry)
    r = registry.rollout(rollout_id)
    if r is None:
        raise RolloutError(f"no rollout {rollout_id!r} (see `pocketfleet rollout status`)")
    staged = plan_of(registry, rollout_id) is not None
    note = reason or f"{action} by operator"
    if action == "pause":
        if not registry.set_rollout_state(rollout_id, "paused", f"paused: {note}", expect="staged"):
            raise RolloutError(f"rollout {rollout_id} is {r['state']}; only a staged rollout can be paused")
    elif action == "resume":
        if not registry.set_rollout_state(rollout_id, "staged", f"resumed: {note}", expect="paused"):
            raise RolloutError(f"rollout {rollout_id} is {r['state']}, not paused")
    elif action == "abort":
        if staged:
            abort_rollout(registry, rollout_id, f"aborted by operator: {note}", {"by": "operator"})
        elif not registry.set_rollout_state(rollout_id, "rolling_back", f"aborted by operator: {note}",
                                            expect="canary"):
            raise RolloutError(f"rollout {rollout_id} is {r['state']}: a canary rollout can be aborted while in "
                               "canary, a staged one while staged or paused; otherwise release a signed rollback")
    else:
        raise RolloutError(f"unknown action {action!r}")
    return {"rollout_id": rollout_id, "action": action, "state": registry.rollout(rollout_id)["state"]}


def describe_plan(registry: Registry, rollout_id: str) -> dict[str, Any]:
    """The stage part of describe_rollout: plan, stages, current stage, criteria, the abort and why, stage log."""
    plan = plan_of(registry, rollout_id)
    if plan is None:
        return {}
    stage_log = [{"ts": e["ts"], "kind": e["kind"], **json.loads(e["detail"] or "{}")}
                 for e in registry.events(rollout_id) if e["kind"] in ("stage", "stage_done", "abort")]
    return {"plan": plan["plan"], "stages": plan["counts"], "stage": plan["stage"], "criteria": plan["criteria"],
            "abort": plan["abort"], "stage_log": stage_log}
