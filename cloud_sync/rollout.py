"""The rollout controller: drives every active rollout from SQLite, one step per tick (cloud side).

It keeps no state of its own between ticks, so a worker killed with -9 and started again (or another
worker taking over the lease) continues exactly where the database says the rollout is.

    canary ──gates pass──> promoted ──every device terminal──> complete
       │
       └──gates fail / canary timeout──> rolling_back ──every canary device rolled back──> failed

Commands are re-sent to a device that came back online since the last send, or after `resend_s`
without an answer; devices treat a repeated command as a no-op, so re-sending is always safe.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloud_sync.protocol import encode, multicast_topic
from cloud_sync.registry import DEVICE_TERMINAL, Registry, Release
from cloud_sync.releases import Gate, new_id, parse_gate

log = logging.getLogger("pocketfleet.rollout")

Send = Callable[[str, bytes, int], None]  # (device, payload, expiry seconds)


@dataclass
class RolloutConfig:
    """Timing of the controller (seconds)."""

    tick_s: float = 0.5
    resend_s: float = 30.0
    canary_timeout_s: float = 600.0
    rollback_timeout_s: float = 300.0
    cmd_ttl_s: int = 7 * 86400
    probe_runs: int = 20
    multicast: bool = True  # update commands name the group's multicast topic for the release's chunks


def evaluate_gates(gates: list[Gate], rows: list[Any]) -> tuple[bool, str, dict[str, Any]]:
    """Gate the canary on its devices' reports: (pass, reason, observed metrics)."""
    failed = [r["device"] for r in rows if r["state"] in ("failed", "refused")]
    probes = [json.loads(r["probe"]) for r in rows if r["state"] == "installed" and r["probe"]]
    requests = sum(p["requests"] for p in probes)
    errors = sum(p["errors"] for p in probes)
    goldens = [p.get("golden") for p in probes]
    observed = {
        "failures": float(len(failed)),
        "error_rate": (errors / requests) if requests else (1.0 if failed else None),
        "p95_ms": max((p["p95_ms"] for p in probes), default=None),
        "golden": None if not probes or any(g is None for g in goldens) else min(goldens),
    }
    reasons = []
    if failed:
        errs = {r["device"]: r["error"] for r in rows if r["device"] in failed}
        first = next(iter(errs.items()))
        reasons.append(f"{len(failed)} canary device(s) failed the install (e.g. {first[0]}: {first[1]})")
    for gate in gates:
        if gate.metric == "failures" and failed:
            continue
        value = observed[gate.metric]
        if not gate.passes(value):
            shown = "unavailable" if value is None else f"{value:.4g}"
            reasons.append(f"gate {gate} failed: observed {gate.metric} = {shown}")
    return not reasons, "; ".join(reasons) or "all gates passed", observed


class RolloutController:
    def __init__(self, registry: Registry, send: Send, config: RolloutConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.send = send
        self.config = config or RolloutConfig()
        self.clock = clock
        from cloud_sync.staged import StagedController

        self.staged = StagedController(self)

    # -------------------------------------------------------------------------------------------- ticking

    def tick(self) -> None:
        self.staged.tick()
        active = self.registry.rollouts(("canary", "promoted", "rolling_back"))
        for r in active + self.registry.failed_with_pending_rollbacks():
            try:
                if r["state"] == "failed":
                    self._chase_rollbacks(r)
                else:
                    getattr(self, f"_step_{r['state']}")(r)
            except Exception:  # noqa: BLE001 - one bad rollout must not stop the others
                log.exception("rollout %s: step failed", r["id"])

    def _devices_by_id(self, group: str) -> dict[str, Any]:
        return {d["id"]: d for d in self.registry.devices(group)}

    def _should_send(self, row: Any, dev: Any, now: float) -> bool:
        if dev is None:
            return False
        if row["sent_at"] is None:
            return True  # first send, even to an offline device: its persistent session queues it
        if not dev["online"]:
            return False
        if dev["online_since"] and dev["online_since"] > row["sent_at"]:
            return True  # it came back since the last send
        if row["state"] in ("accepted", "downloading") and now - row["updated"] < self.config.resend_s:
            return False  # it is working on it and reporting progress
        return now - row["sent_at"] > self.config.resend_s

    def _send_update(self, rollout: Any, rel: Release, row: Any) -> None:
        now = self.clock()
        cmd_id = new_id()
        payload = encode(
            "pf.cmd.update/1", cmd_id=cmd_id, rollout_id=rollout["id"], phase=row["phase"], issued=now,
            expires=now + self.config.cmd_ttl_s, release=rel.descriptor(),
            probe={"runs": self.config.probe_runs} if row["phase"] == "canary" else None,
            multicast=multicast_topic(rollout["grp"], rel.id) if self.config.multicast else None,
        )
        self.send(row["device"], payload, self.config.cmd_ttl_s)
        self.registry.mark_sent(rollout["id"], row["device"], cmd_id, "sent")

    def _send_rollback(self, rollout: Any, rel: Release, row: Any) -> None:
        now = self.clock()
        cmd_id = new_id()
        payload = encode(
            "pf.cmd.rollback/1", cmd_id=cmd_id, rollout_id=rollout["id"], release_id=rel.id, name=rel.name,
            version=rel.version, issued=now, expires=now + self.config.cmd_ttl_s,
        )
        self.send(row["device"], payload, self.config.cmd_ttl_s)
        self.registry.mark_sent(rollout["id"], row["device"], cmd_id, "rollback_sent")

    def _drive(self, rollout: Any, rel: Release, rows: list[Any]) -> None:
        """Send the update to every device of `rows` that has not finished and is due."""
        devs = self._devices_by_id(rollout["grp"])
        now = self.clock()
        for row in rows:
            if row["state"] in DEVICE_TERMINAL:
                continue
            dev = devs.get(row["device"])
            if dev is not None and dev["active_name"] == rel.name and dev["active_version"] == rel.version \
                    and row["state"] in ("pending", "sent") and row["phase"] == "main":
                self.registry.set_device_state(rollout["id"], row["device"], "installed")
                continue
            if self._should_send(row, dev, now):
                self._send_update(rollout, rel, row)

    # ------------------------------------------------------------------------------------------- states

    def _step_canary(self, rollout: Any) -> None:
        rel = self.registry.release(rollout["release_id"])
        assert rel is not None
        rows = self.registry.rollout_devices(rollout["id"], "canary")
        if not rows:
            return  # never judge a canary without devices
        self._drive(rollout, rel, rows)
        rows = self.registry.rollout_devices(rollout["id"], "canary")
        # a canary is finished when it failed/refused, or installed and sent its probe results
        waiting = [r for r in rows if not (r["state"] in ("failed", "refused") or (r["state"] == "installed" and r["probe"]))]
        gates = [parse_gate(g) for g in json.loads(rollout["gates"])]
        if waiting:
            if self.clock() - rollout["created"] > self.config.canary_timeout_s:
                names = ", ".join(r["device"] for r in waiting)
                self._start_rollback(rollout, f"canary timeout after {self.config.canary_timeout_s:g}s: "
                                              f"no result from {names}")
            return
        ok, reason, observed = evaluate_gates(gates, rows)
        self.registry.event(rollout["id"], None, "gates", {"pass": ok, "reason": reason, "observed": observed})
        if not ok:
            self._start_rollback(rollout, reason)
            return
        canary = {r["device"] for r in rows}
        rest = [d for d in self._devices_by_id(rollout["grp"]) if d not in canary]
        self.registry.add_rollout_devices(rollout["id"], rest, "main")
        if self.registry.set_rollout_state(rollout["id"], "promoted", f"canary passed: {reason}", expect="canary",
                                           promoted=self.clock()):
            log.info("rollout %s: canary passed (%s); promoting to %d more device(s)", rollout["id"], reason, len(rest))

    def _step_promoted(self, rollout: Any) -> None:
        rel = self.registry.release(rollout["release_id"])
        assert rel is not None
        known = {r["device"] for r in self.registry.rollout_devices(rollout["id"])}
        new = [d for d in self._devices_by_id(rollout["grp"]) if d not in known]
        if new:  # devices that joined the group after the promotion get it too
            self.registry.add_rollout_devices(rollout["id"], new, "main")
        rows = self.registry.rollout_devices(rollout["id"])
        self._drive(rollout, rel, rows)
        rows = self.registry.rollout_devices(rollout["id"])
        if all(r["state"] in DEVICE_TERMINAL for r in rows):
            bad = [r["device"] for r in rows if r["state"] != "installed"]
            reason = "every device installed it" if not bad else f"{len(bad)} device(s) did not install: {', '.join(bad)}"
            self.registry.set_rollout_state(rollout["id"], "complete", reason, expect="promoted", finished=self.clock())

    def _start_rollback(self, rollout: Any, reason: str) -> None:
        if self.registry.set_rollout_state(rollout["id"], "rolling_back", reason, expect="canary"):
            log.warning("rollout %s: canary failed (%s); rolling back", rollout["id"], reason)
            self._step_rolling_back(self.registry.rollout(rollout["id"]))

    def _step_rolling_back(self, rollout: Any) -> None:
        pending = self._chase_rollbacks(rollout)
        if not pending:
            self.registry.set_rollout_state(rollout["id"], "failed", None, expect="rolling_back", finished=self.clock())
        elif self.clock() - rollout["updated"] > self.config.rollback_timeout_s:
            self.registry.set_rollout_state(
                rollout["id"], "failed",
                f"{rollout['reason']}; rollback not yet confirmed by {', '.join(pending)} (retried when they return)",
                expect="rolling_back", finished=self.clock())

    def _chase_rollbacks(self, rollout: Any) -> list[str]:
        """Send rollback commands to canary devices that have not confirmed; returns those still pending."""
        rel = self.registry.release(rollout["release_id"])
        assert rel is not None
        devs = self._devices_by_id(rollout["grp"])
        now = self.clock()
        pending = []
        for row in self.registry.rollout_devices(rollout["id"], "canary"):
            if row["state"] == "rolled_back":
                continue
            dev = devs.get(row["device"])
            pending.append(row["device"])
            if row["state"] != "rollback_sent" or self._should_send(row, dev, now):
                self._send_rollback(rollout, rel, row)
        return pending


def describe_rollout(registry: Registry, rollout_id: str) -> dict[str, Any]:
    """A rollout as a plain dict: state, reason, release, per-state counts, devices, last gate decision."""
    from cloud_sync.errors import RolloutError

    r = registry.rollout(rollout_id)
    if r is None:
        raise RolloutError(f"no rollout {rollout_id!r} (see `pocketfleet rollout status`)")
    rel = registry.release(r["release_id"])
    rows = registry.rollout_devices(rollout_id)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    gates_event = [e for e in registry.events(rollout_id) if e["kind"] == "gates"]
    from cloud_sync.staged import describe_plan

    return {
        **describe_plan(registry, rollout_id),
        "rollout_id": r["id"], "state": r["state"], "reason": r["reason"], "group": r["grp"],
        "release_id": r["release_id"], "name": rel.name if rel else None, "version": rel.version if rel else None,
        "rollback": bool(rel and rel.rollback_auth), "canary": r["canary"], "gates": json.loads(r["gates"]),
        "created": r["created"], "promoted": r["promoted"], "finished": r["finished"], "counts": counts,
        "gate_result": json.loads(gates_event[-1]["detail"]) if gates_event else None,
        "devices": [
            {"device": row["device"], "phase": row["phase"], "state": row["state"], "sends": row["sends"],
             "error": row["error"], "probe": json.loads(row["probe"]) if row["probe"] else None,
             "progress": json.loads(row["progress"]) if row["progress"] else None}
            for row in rows
        ],
    }
