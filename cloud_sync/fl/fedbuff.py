"""Asynchronous rounds (FedBuff, Nguyen et al. 2022) inside the round engine, over the same wire.

The aggregator keeps one open "round" per model version (state training). Every announce invites the
group to check in; a device that checks in is sent the newest model at once while fewer than
`concurrency` devices are training (else it waits in line for a free slot). Its update carries the
round (= model version) it was trained from; the engine stores it in the buffer unless it is more than
`max_staleness` versions old, a duplicate, or from a device it never asked. Every `buffer_size` (K)
buffered updates make one aggregation: each delta is scaled by s(staleness) = (1 + staleness)^-a and
the strategy's rule (sample-weighted mean, or a robust rule; central DP wraps it as in synchronous
rounds) combines them; then the version moves on and the next announce goes out. Devices use the
unchanged FLClient: an announce of a new version is a new (round, attempt) to check in for.

The same SQLite tables hold it: `rounds` (one row per version; `selected` = the devices dispatched
while it was current), `updates` (a consumed update keeps its row with an empty payload, so a
redelivered copy is still a duplicate), `models`, `counters`. The training slots are in memory; after
a restart they are rebuilt from the dispatches of the last `max_staleness` versions that sent nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import messages as M
from . import tensors as T
from .codecs import DecodeLimits, decode_update
from .dp import DPStrategy
from .strategy import ClientResult, FedBuff

if TYPE_CHECKING:
    from .rounds import Aggregator

log = logging.getLogger("pocketfleet.fl.fedbuff")

FAR = 10 * 365 * 86400.0  # an asynchronous check-in window never closes


@dataclass
class _Slots:
    training: dict[str, tuple[int, float]] = field(default_factory=dict)  # device -> (round sent, deadline)
    waiting: deque[str] = field(default_factory=deque)


def fedbuff_of(strategy: Any) -> FedBuff:
    inner = strategy.inner if isinstance(strategy, DPStrategy) else strategy
    if not isinstance(inner, FedBuff):
        raise TypeError(f"{type(inner).__name__} is not asynchronous")
    return inner


class AsyncRounds:
    """The asynchronous mode of an `Aggregator` (it calls in here for tasks whose strategy is fedbuff)."""

    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg
        self.slots: dict[str, _Slots] = {}

    def _slots(self, task: str) -> _Slots:
        if task not in self.slots:  # first use or after a restart: dispatches still owed an update
            slots = _Slots()
            cur = self.agg.store.current_round(task)
            fb = fedbuff_of(self.agg.live[task].strategy)
            now = self.agg.clock()
            for r in self.agg.store.rounds(task):
                if cur is not None and r["round"] >= cur["round"] - fb.max_staleness:
                    sent = {d for d, *_ in self.agg.store.updates(task, r["round"])}
                    for dev in r["selected"]:
                        if dev not in sent:
                            slots.training[dev] = (r["round"], now + self.agg.live[task].config.round_s)
            self.slots[task] = slots
        return self.slots[task]

    # ------------------------------------------------------------------------------ rounds

    @staticmethod
    def insert_round(db: Any, task: str, strategy: Any, rnd: int, version: int, now: float) -> None:
        """The open row of version `version` (round `rnd`), with this version's train / codec config."""
        k = fedbuff_of(strategy).buffer_size
        config = strategy.configure_round(rnd, ["_"]).config
        db.execute(
            "INSERT INTO rounds (task, round, attempt, state, model_version, config, target, min_count, "
            "checkin_deadline, deadline, started) VALUES (?, ?, 0, 'training', ?, ?, ?, ?, ?, ?, ?)",
            (task, rnd, version, json.dumps(config), k, k, now + FAR, now + FAR, now),
        )

    # ------------------------------------------------------------------------------ incoming

    def on_checkin(self, task: str, device: str, msg: dict[str, Any]) -> None:
        rnd = self.agg.store.current_round(task)
        if rnd is None or rnd["state"] != "training":
            self.agg.store.count(task, "checkin_stale")
            return
        with self.agg.store.lock:
            self.agg.store.db.execute("INSERT OR IGNORE INTO checkins VALUES (?, ?, ?, ?, ?, ?)",
                                      (task, rnd["round"], 0, device, int(msg["num_samples"]), self.agg.clock()))
        slots = self._slots(task)
        if device in slots.training or device in slots.waiting:
            return
        slots.waiting.append(device)
        self._dispatch(task)

    def _dispatch(self, task: str) -> None:
        slots, live = self._slots(task), self.agg.live[task]
        fb = fedbuff_of(live.strategy)
        if self.agg.store.task(task)["state"] != "running":
            return
        rnd = self.agg.store.current_round(task)
        while slots.waiting and len(slots.training) < fb.concurrency:
            dev = slots.waiting.popleft()
            now = self.agg.clock()
            deadline = now + live.config.round_s
            header = {"schema": M.TASK, "task": task, "round": rnd["round"], "attempt": 0,
                      "model_version": rnd["model_version"], "deadline": deadline, "config": rnd["config"]}
            payload = T.weights_to_bytes(live.weights, header)
            slots.training[dev] = (rnd["round"], deadline)
            with self.agg.store.transaction() as db:
                sel = json.loads(db.execute("SELECT selected FROM rounds WHERE task = ? AND round = ? AND attempt = 0",
                                            (task, rnd["round"])).fetchone()[0])
                db.execute("UPDATE rounds SET selected = ? WHERE task = ? AND round = ? AND attempt = 0",
                           (json.dumps([*sel, dev]), task, rnd["round"]))
                self.agg.store.count(task, "selected", conn=db)
                self.agg.store.count(task, "bytes_down", len(payload), conn=db)
            self.agg.transport.send_task(dev, task, payload)

    def accept(self, task: str, device: str, upd: Any, payload: bytes) -> str:
        """Outcome of an update for an asynchronous task (stored in the buffer when 'accepted')."""
        h, live = upd.header, self.agg.live[task]
        fb = fedbuff_of(live.strategy)
        r_no, attempt = h.get("round"), h.get("attempt")
        if not isinstance(r_no, int) or attempt != 0:
            return "rejected_malformed"
        rnd = self.agg.store.current_round(task)
        if self.agg.store.task(task)["state"] != "running":
            return "late"
        if r_no > rnd["round"]:
            return "rejected_malformed"  # a version that does not exist yet
        if rnd["round"] - r_no > fb.max_staleness:
            self._slots(task).training.pop(device, None)
            self._dispatch(task)
            return "stale"
        sent = self.agg.store.one("SELECT selected FROM rounds WHERE task = ? AND round = ? AND attempt = 0", task, r_no)
        if sent is None or device not in json.loads(sent[0]):
            return "unselected"
        if self.agg.store.one("SELECT 1 FROM updates WHERE task = ? AND round = ? AND device = ?", task, r_no, device):
            return "duplicate"
        with self.agg.store.transaction() as db:
            db.execute("INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (task, r_no, device, 0, payload, upd.num_samples, len(payload), self.agg.clock()))
            self.agg.store.count(task, "accepted", conn=db)
            self.agg.store.count(task, "bytes_up", len(payload), conn=db)
        self._slots(task).training.pop(device, None)
        self._dispatch(task)
        return "accepted"

    # ------------------------------------------------------------------------------ progress

    def buffered(self, task: str) -> list[tuple[str, int, bytes]]:
        return self.agg.store.all("SELECT device, round, payload FROM updates WHERE task = ? AND length(payload) > 0 "
                                  "ORDER BY received, device", task)

    def advance(self, task: str, rnd: dict[str, Any], now: float) -> None:
        live, slots = self.agg.live[task], self._slots(task)
        fb = fedbuff_of(live.strategy)
        for dev, (_, deadline) in list(slots.training.items()):
            if now > deadline:  # gone silent: free its slot
                del slots.training[dev]
                self.agg.store.count(task, "timed_out")
        buf = self.buffered(task)
        if len(buf) >= fb.buffer_size:
            self._aggregate(task, rnd, buf[: fb.buffer_size], now)
        self._dispatch(task)

    def _aggregate(self, task: str, rnd: dict[str, Any], buf: list[tuple[str, int, bytes]], now: float) -> None:
        live = self.agg.live[task]
        fb = fedbuff_of(live.strategy)
        results, nbytes, values = [], 0, []
        bases: dict[int, T.Weights] = {}
        for device, r_no, payload in buf:
            upd = decode_update(payload, live.shapes, DecodeLimits(max_bytes=live.config.max_update_bytes))
            tau = rnd["round"] - r_no
            s = np.float32(fb.staleness_weight(tau))
            stats = [k for k in upd.delta if fb.is_statistic(k)]
            if stats:  # the device's own statistics = its base model's + its delta
                if r_no not in bases:
                    row = self.agg.store.one("SELECT model_version FROM rounds WHERE task = ? AND round = ? "
                                             "AND attempt = 0", task, r_no)
                    bases[r_no] = T.weights_from_bytes(self.agg.store.model(task, row[0]))[1]
                values.append((upd.num_samples, {k: bases[r_no][k] + upd.delta[k] for k in stats}))
            results.append(ClientResult(device, upd.num_samples,
                                        {k: v * s for k, v in upd.delta.items() if k not in stats},
                                        upd.metrics, staleness=tau))
            nbytes += len(payload)
        t0 = time.perf_counter()
        new = live.strategy.aggregate(rnd["round"], results, {k: v for k, v in live.weights.items()
                                                               if not fb.is_statistic(k)})
        if values:
            total = float(sum(n for n, _ in values))
            for k in values[0][1]:
                new[k] = sum(np.float32(n / total) * v[k] for n, v in values).astype(np.float32)
        for k in live.weights:
            new.setdefault(k, live.weights[k])
        agg_s = time.perf_counter() - t0
        if not all(np.isfinite(v).all() for v in new.values()):
            log.warning("fl: %s async aggregation %d produced NaN/inf: buffer dropped", task, rnd["round"])
            self._consume(task, buf)
            self.agg.store.count(task, "aggregation_nonfinite")
            return
        from .rounds import _mean_metrics

        metrics = dict(self.agg.evaluate(task, new)) if self.agg.evaluate else {}
        result = {"participants": len(results), "devices": [r.device for r in results],
                  "staleness": [r.staleness for r in results], "bytes_up": nbytes, "bytes_up_all": nbytes,
                  "bytes_down": 0, "aggregate_s": agg_s, "round_s": now - rnd["started"], "metrics": metrics,
                  "train_metrics": _mean_metrics(results), "closed_at": now}
        if isinstance(live.strategy, DPStrategy):
            result["epsilon"] = live.strategy.accountant.epsilon()
        self.agg._commit_model(task, rnd, new, result, now, after=lambda db: self._consume(task, buf, db))
        log.info("fl: %s async aggregation %d of %d updates (staleness %s) %s", task, rnd["round"], len(results),
                 result["staleness"], metrics)

    def _consume(self, task: str, buf: list[tuple[str, int, bytes]], db: Any = None) -> None:
        rows = [(task, r_no, dev) for dev, r_no, _ in buf]
        sql = "UPDATE updates SET payload = x'' WHERE task = ? AND round = ? AND device = ?"
        if db is not None:
            db.executemany(sql, rows)
        else:
            with self.agg.store.transaction() as conn:
                conn.executemany(sql, rows)

