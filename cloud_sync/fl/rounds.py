"""The round engine (transport-agnostic): announce -> check-in -> over-selection -> training -> upload ->
aggregate at the target count, or at the deadline with at least the minimum count, else abandon and
retry. State lives in SQLite (store.py): a restarted aggregator resumes the round it was in, and an
update is counted once per (task, round, device) however often it is delivered.

Time is wall-clock (`clock`, default time.time) so deadlines survive a restart. Drive it with `tick()`
(called by `run()`); incoming messages arrive through `on_checkin()` / `on_update()` from any thread.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import messages as M
from . import tensors as T
from .codecs import DecodeLimits, decode_update
from .dp import DPConfig, DPStrategy, PrivacyAccountant
from .errors import FLError, UpdatePayloadError
from .store import RoundStore
from .strategy import ClientResult, Strategy, make_strategy

log = logging.getLogger("pocketfleet.fl")


class CloudTransport(Protocol):
    """What the aggregator needs from the wire (MQTT: cloud_sync.fl.mqtt; tests: transport.InProcessHub)."""

    def broadcast(self, group: str, task: str, announce: bytes) -> None: ...

    def send_task(self, device: str, task: str, payload: bytes) -> None: ...

    def send_secagg(self, device: str, task: str, payload: bytes) -> None: ...


@dataclass
class TaskConfig:
    """One federated task. `rounds` aggregations; strategy by name with `strategy_args`."""

    task: str
    rounds: int
    strategy: str = "fedavg"
    strategy_args: dict[str, Any] = field(default_factory=dict)
    clients_per_round: int = 10
    min_clients: int | None = None
    over_selection: float = 1.3
    checkin_target: int | None = None  # select as soon as this many checked in (default 2 x selection)
    checkin_s: float = 5.0
    round_s: float = 60.0
    max_attempts: int = 5
    # over-selection without bias: once `clients_per_round` updates are in, the round stays open for this
    # fraction of the time they took and aggregates every update that arrives by then (weighted by
    # samples), so the slower devices, which hold more data, are not cut; 0 = close at the target count
    # and keep only the first arrivals (which favours small-data devices)
    over_selection_grace: float = 0.5
    train: dict[str, Any] = field(default_factory=dict)
    codec: dict[str, Any] = field(default_factory=dict)
    dp: dict[str, Any] | None = None  # DPConfig fields + "population"
    secagg: dict[str, Any] | None = None  # {"threshold": fraction or count, "clip": float, "phase_s": s}
    group: str = "default"
    max_update_bytes: int = 64 << 20
    seed: int = 0

    def __post_init__(self) -> None:
        if not M._name(self.task):
            raise FLError(f"task name {self.task!r} must be 1-64 chars of [A-Za-z0-9._-]")
        if self.over_selection_grace < 0:
            raise FLError(f"task: over_selection_grace={self.over_selection_grace} must be >= 0")
        if self.rounds < 1 or self.checkin_s <= 0 or self.round_s <= 0 or self.max_attempts < 1:
            raise FLError("task: rounds, checkin_s, round_s and max_attempts must be positive")
        if self.secagg is not None:
            unknown = set(self.secagg) - {"threshold", "clip", "phase_s"}
            if unknown or float(self.secagg.get("clip", 0)) <= 0:
                raise FLError(f"task: secagg needs clip > 0 and takes threshold, clip, phase_s (got {self.secagg})")
            if self.dp or self.strategy not in ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"):
                raise FLError("task: secure aggregation gives the server only the sum: use a mean-based strategy "
                              "(fedavg, fedprox, fedadam, fedyogi, fedadagrad) and no central DP")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskConfig:
        try:
            return cls(**dict(data))
        except TypeError as exc:
            raise FLError(f"task config: {exc}") from exc

    def make_strategy(self) -> Strategy:
        s = make_strategy(
            self.strategy, clients_per_round=self.clients_per_round, min_clients=self.min_clients,
            over_selection=self.over_selection, train=self.train, codec=self.codec, seed=self.seed,
            **self.strategy_args,
        )
        if self.dp:
            dp = dict(self.dp)
            population = int(dp.pop("population"))
            s = DPStrategy(s, DPConfig(**dp), population)
        return s


@dataclass
class _Live:
    """In-memory cache of a running task (rebuilt from SQLite on restart)."""

    config: TaskConfig
    strategy: Strategy
    version: int
    weights: T.Weights
    shapes: dict[str, tuple[int, ...]]
    task_payload: bytes | None = None
    payload_key: tuple[int, int] | None = None
    bytes_received: int = 0  # every update payload that arrived since the last aggregation


class Aggregator:
    """Runs federated tasks over a CloudTransport with state in a RoundStore."""

    def __init__(
        self,
        store: RoundStore | str | Path,
        transport: CloudTransport,
        on_model: Callable[[str, int, T.Weights], None] | None = None,
        evaluate: Callable[[str, T.Weights], dict[str, float]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store if isinstance(store, RoundStore) else RoundStore(store)
        self.transport = transport
        self.on_model, self.evaluate, self.clock = on_model, evaluate, clock
        self.lock = threading.RLock()
        self.live: dict[str, _Live] = {}
        self.wake = threading.Event()
        from .secagg_round import SecAggCoordinator

        self.secagg = SecAggCoordinator(self.store, lambda dev, task, data: self.transport.send_secagg(dev, task, data))
        from .fedbuff import AsyncRounds

        self.asynchronous = AsyncRounds(self)

    # ------------------------------------------------------------------------------------ tasks

    def create_task(self, config: TaskConfig, initial: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Start a task with version-0 weights; if it already exists (a restart), resume it instead."""
        with self.lock:
            if self.store.task(config.task) is None:
                weights = T.copy(initial)
                now = self.clock()
                with self.store.transaction() as db:
                    db.execute("INSERT INTO tasks VALUES (?, ?, 'running', ?)",
                               (config.task, json.dumps(asdict(config)), now))
                    db.execute("INSERT INTO models VALUES (?, 0, ?, NULL, NULL, ?)",
                               (config.task, T.weights_to_bytes(weights), now))
                    self._insert_round(db, config, 0, 0, 0, now)
            self._load(config.task)
            self._announce(config.task)
            return self.status(config.task)

    def resume_all(self) -> list[str]:
        """After a restart: reload every running task, re-announce, re-send tasks still owed an update."""
        with self.lock:
            names = [t for t in self.store.tasks() if self.store.task(t)["state"] == "running"]
            for name in names:
                self._load(name)
                self._announce(name)
                rnd = self.store.current_round(name)
                if rnd and rnd["state"] == "training":
                    have = {d for d, *_ in self.store.updates(name, rnd["round"])}
                    if self.live[name].config.secagg:
                        have = set(self.secagg._msgs(name, rnd["round"], rnd["attempt"], "keys"))
                        self.secagg.resend(name, rnd)
                    for dev in rnd["selected"]:
                        if dev not in have:
                            self.transport.send_task(dev, name, self._task_payload(name, rnd))
            return names

    def _load(self, task: str) -> _Live:
        cfg = TaskConfig.from_dict(self.store.task(task)["config"])
        version, blob, state, accountant = self.store.latest_model(task)
        _, weights = T.weights_from_bytes(blob)
        strategy = cfg.make_strategy()
        if state:
            strategy.load_state(T.from_bytes(state, 1 << 34)[1])
        if accountant and isinstance(strategy, DPStrategy):
            strategy.accountant = PrivacyAccountant(**json.loads(accountant))
        live = _Live(cfg, strategy, version, weights, T.shapes(weights))
        self.live[task] = live
        return live

    def _is_async(self, task: str) -> bool:
        return task in self.live and self.live[task].config.strategy == "fedbuff"

    def _insert_round(self, db: Any, cfg: TaskConfig, rnd: int, attempt: int, version: int, now: float) -> None:
        if cfg.strategy == "fedbuff":
            strategy = self.live[cfg.task].strategy if cfg.task in self.live else cfg.make_strategy()
            self.asynchronous.insert_round(db, cfg.task, strategy, rnd, version, now)
            return
        db.execute(
            "INSERT INTO rounds (task, round, attempt, state, model_version, config, checkin_deadline, deadline, "
            "started) VALUES (?, ?, ?, 'checkin', ?, '{}', ?, ?, ?)",
            (cfg.task, rnd, attempt, version, now + cfg.checkin_s, now + cfg.checkin_s + cfg.round_s, now),
        )

    def _announce(self, task: str) -> None:
        rnd = self.store.current_round(task)
        state = self.store.task(task)["state"]
        if rnd is None:
            return
        msg = M.encode(
            M.ANNOUNCE, task=task, round=rnd["round"], attempt=rnd["attempt"], model_version=rnd["model_version"],
            state=state if state in ("finished", "failed") else "checkin" if self._is_async(task)
            else rnd["state"] if rnd["state"] in M.ROUND_STATES else "checkin",
            checkin_deadline=rnd["checkin_deadline"], deadline=rnd["deadline"],
        )
        self.transport.broadcast(self.live[task].config.group, task, msg)

    def _task_payload(self, task: str, rnd: dict[str, Any]) -> bytes:
        live = self.live[task]
        key = (rnd["round"], rnd["attempt"])
        if live.payload_key != key:
            header = {"schema": M.TASK, "task": task, "round": rnd["round"], "attempt": rnd["attempt"],
                      "model_version": rnd["model_version"], "deadline": rnd["deadline"], "config": rnd["config"]}
            live.task_payload, live.payload_key = T.weights_to_bytes(live.weights, header), key
        return live.task_payload  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------ incoming

    def on_checkin(self, device: str, payload: bytes | Mapping[str, Any]) -> None:
        """A device is ready for the announced round (counted, ignored when not in check-in)."""
        with self.lock:
            try:
                msg = M.decode(payload, M.CHECKIN) if isinstance(payload, (bytes, bytearray)) else M.check(dict(payload), M.CHECKIN)
            except UpdatePayloadError:
                self.store.count("_all", "checkin_malformed")
                return
            task, rnd_no, attempt = M.key(msg)
            if msg["device"] != device:
                self.store.count(task if task in self.live else "_all", "spoofed")
                return
            if self._is_async(task):
                self.asynchronous.on_checkin(task, device, msg)
                self.wake.set()
                return
            rnd = self.store.current_round(task) if task in self.live else None
            if rnd is None or (rnd["round"], rnd["attempt"]) != (rnd_no, attempt) or rnd["state"] != "checkin":
                self.store.count(task if rnd else "_all", "checkin_stale")
                return
            with self.store.lock:
                self.store.db.execute("INSERT OR IGNORE INTO checkins VALUES (?, ?, ?, ?, ?, ?)",
                                      (task, rnd_no, attempt, device, int(msg["num_samples"]), self.clock()))
            self.wake.set()

    def on_secagg(self, device: str, payload: bytes) -> str:
        """A secure-aggregation phase message from a device (counted like updates)."""
        from .secagg_round import UP_KINDS, decode

        with self.lock:
            try:
                msg = decode(payload, UP_KINDS)
            except UpdatePayloadError:
                self.store.count("_all", "secagg_malformed")
                return "secagg_malformed"
            task = msg["task"]
            if task not in self.live or not self.live[task].config.secagg:
                self.store.count("_all", "unknown_task")
                return "unknown_task"
            self.live[task].bytes_received += len(payload)
            if msg.get("device") != device:
                outcome = "spoofed"
            else:
                rnd = self.store.current_round(task)
                try:
                    outcome = self.secagg.on_message(task, rnd, device, msg) if rnd["state"] == "training" else "late"
                except UpdatePayloadError:
                    outcome = "secagg_malformed"
            if outcome != "accepted":
                self.store.count(task, outcome)
            self.wake.set()
            return outcome

    def on_update(self, device: str, payload: bytes) -> str:
        """Validate, dedupe and store an update; returns the outcome (the counter it went to)."""
        with self.lock:
            outcome, task = self._accept(device, payload)
            if task in self.live:
                self.live[task].bytes_received += len(payload)
            if outcome == "accepted":
                self.wake.set()
            else:
                self.store.count(task, outcome)
                log.info("fl: update from %s: %s", device, outcome)
            return outcome

    def _accept(self, device: str, payload: bytes) -> tuple[str, str]:
        try:
            header = T.peek_header(payload)
        except UpdatePayloadError as exc:
            return f"rejected_{exc.reason}", "_all"
        task = header.get("task")
        if not isinstance(task, str) or task not in self.live:
            return "unknown_task", "_all"
        live = self.live[task]
        try:
            upd = decode_update(payload, live.shapes, DecodeLimits(max_bytes=live.config.max_update_bytes))
        except UpdatePayloadError as exc:
            log.warning("fl: rejected update from %s: %s", device, exc)
            return f"rejected_{exc.reason}", task
        h = upd.header
        if h.get("device") != device:
            return "spoofed", task
        if self._is_async(task):
            return self.asynchronous.accept(task, device, upd, bytes(payload)), task
        rnd = self.store.current_round(task)
        r_no, attempt = h.get("round"), h.get("attempt")
        if not isinstance(r_no, int) or not isinstance(attempt, int):
            return "rejected_malformed", task
        if rnd is None or r_no < rnd["round"] or (r_no == rnd["round"] and attempt < rnd["attempt"]):
            return "late", task
        if (r_no, attempt) != (rnd["round"], rnd["attempt"]):
            return "rejected_malformed", task  # a round that has not started
        if rnd["state"] != "training" or self.clock() > rnd["deadline"]:
            return "late", task
        if device not in rnd["selected"]:
            return "unselected", task
        if self.store.one("SELECT 1 FROM updates WHERE task = ? AND round = ? AND device = ?", task, r_no, device):
            return "duplicate", task
        if self.store.update_count(task, r_no) >= rnd["target"] and self._closing(task, rnd) <= self.clock():
            return "surplus", task  # over-selection: the target was reached and its grace is over
        with self.store.transaction() as db:  # the update and its counters commit together
            cur = db.execute(
                "INSERT OR IGNORE INTO updates VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (task, r_no, device, attempt, payload, upd.num_samples, len(payload), self.clock()),
            )
            if cur.rowcount != 1:
                return "duplicate", task
            self.store.count(task, "accepted", conn=db)
            self.store.count(task, "bytes_up", len(payload), conn=db)
        return "accepted", task

    # ------------------------------------------------------------------------------------ progress

    def tick(self) -> None:
        """Advance every running task whose round can move on (selection, aggregation, abandonment)."""
        with self.lock:
            for task in list(self.live):
                if self.store.task(task)["state"] == "running":
                    self._advance(task)

    def _advance(self, task: str) -> None:
        live, now = self.live[task], self.clock()
        rnd = self.store.current_round(task)
        if self._is_async(task):
            self.asynchronous.advance(task, rnd, now)
        elif rnd["state"] == "checkin":
            ins = self.store.checkins(task, rnd["round"], rnd["attempt"])
            want = live.config.checkin_target or 2 * math.ceil(live.config.over_selection * live.config.clients_per_round)
            if len(ins) >= want or now >= rnd["checkin_deadline"]:
                self._select(task, rnd, ins, now)
        elif rnd["state"] == "training" and live.config.secagg:
            sa = live.config.secagg
            out = self.secagg.advance(task, rnd, now, float(sa.get("phase_s", live.config.round_s / 4)),
                                      float(sa.get("threshold", 0.6)))
            if isinstance(out, str):
                self._abandon(task, rnd, now, f"secure aggregation {out}")
            elif out is not None:
                self._aggregate(task, rnd, now, secure_sum=out)
        elif rnd["state"] == "training":
            got = self.store.update_count(task, rnd["round"])
            if (got >= len(rnd["selected"]) or (got >= rnd["target"] and now >= self._closing(task, rnd))
                    or (now >= rnd["deadline"] and got >= rnd["min_count"])):
                self._aggregate(task, rnd, now)
            elif now >= rnd["deadline"]:
                self._abandon(task, rnd, now, f"{got} updates by the deadline, minimum {rnd['min_count']}")

    def _closing(self, task: str, rnd: dict[str, Any]) -> float:
        """When a round that reached its target closes: the target-th arrival + grace x (its time since
        selection), capped at the deadline; +inf while the target is not reached."""
        grace = self.live[task].config.over_selection_grace
        row = self.store.one("SELECT received FROM updates WHERE task = ? AND round = ? ORDER BY received "
                             "LIMIT 1 OFFSET ?", task, rnd["round"], max(0, rnd["target"] - 1))
        if row is None:
            return math.inf
        selected_at = rnd["deadline"] - self.live[task].config.round_s
        return min(rnd["deadline"], row[0] + grace * max(0.0, row[0] - selected_at))

    def _select(self, task: str, rnd: dict[str, Any], ins: dict[str, int], now: float) -> None:
        live = self.live[task]
        plan = live.strategy.configure_round(rnd["round"], list(ins))
        if len(plan.devices) < max(1, plan.min_count) or len(ins) < (live.strategy.min_clients or 1):
            self._abandon(task, rnd, now, f"{len(ins)} check-ins, minimum {live.strategy.min_clients}")
            return
        deadline = now + live.config.round_s
        if live.config.secagg:
            plan.config["secagg"] = {"clip": float(live.config.secagg["clip"]),
                                     "length": int(sum(v.size for v in live.weights.values()))}
            plan.config["codec"] = {}
        with self.store.transaction() as db:
            if live.config.secagg:
                self.secagg.begin(db, task, rnd["round"], rnd["attempt"], deadline)
            db.execute(
                "UPDATE rounds SET state = 'training', selected = ?, config = ?, target = ?, min_count = ?, "
                "deadline = ? WHERE task = ? AND round = ? AND attempt = ?",
                (json.dumps(plan.devices), json.dumps(plan.config), plan.target, plan.min_count, deadline,
                 task, rnd["round"], rnd["attempt"]),
            )
            self.store.count(task, "selected", len(plan.devices), conn=db)
        rnd = self.store.current_round(task)
        payload = self._task_payload(task, rnd)
        for dev in plan.devices:
            self.transport.send_task(dev, task, payload)
        self.store.count(task, "bytes_down", len(payload) * len(plan.devices))
        self._announce(task)

    def _abandon(self, task: str, rnd: dict[str, Any], now: float, why: str) -> None:
        live = self.live[task]
        log.warning("fl: %s round %d attempt %d abandoned: %s", task, rnd["round"], rnd["attempt"], why)
        with self.store.transaction() as db:
            db.execute("UPDATE rounds SET state = 'abandoned', closed = ?, result = ? WHERE task = ? AND round = ? "
                       "AND attempt = ?", (now, json.dumps({"reason": why}), task, rnd["round"], rnd["attempt"]))
            db.execute("DELETE FROM updates WHERE task = ? AND round = ?", (task, rnd["round"]))
            self.secagg.clear(db, task, rnd["round"])
            self.store.count(task, "abandoned", conn=db)
            if rnd["attempt"] + 1 >= live.config.max_attempts:
                db.execute("UPDATE tasks SET state = 'failed' WHERE task = ?", (task,))
            else:
                self._insert_round(db, live.config, rnd["round"], rnd["attempt"] + 1, rnd["model_version"], now)
        self._announce(task)

    def _aggregate(self, task: str, rnd: dict[str, Any], now: float, secure_sum: Any = None) -> None:
        live = self.live[task]
        rows = self.store.updates(task, rnd["round"])
        results = []
        for device, payload, _, _ in rows:
            upd = decode_update(payload, live.shapes, DecodeLimits(max_bytes=live.config.max_update_bytes))
            results.append(ClientResult(device, upd.num_samples, upd.delta, upd.metrics))
        t0 = time.perf_counter()
        if secure_sum is not None:  # only the sum of the survivors' int8 updates is known here
            from .secagg import dequantize_sum

            total, survivors = secure_sum
            names = sorted(live.weights)
            mean = T.unflatten(dequantize_sum(total, rnd["config"]["secagg"]["clip"], len(survivors)), live.weights, names)
            new = live.strategy.server_update(live.weights, mean)
            results = [ClientResult(d, 1, {}) for d in survivors]
        else:
            new = live.strategy.aggregate(rnd["round"], results, live.weights)
        agg_s = time.perf_counter() - t0
        if not all(np.isfinite(v).all() for v in new.values()):
            self._abandon(task, rnd, now, "aggregation produced NaN/inf")
            return
        metrics = dict(self.evaluate(task, new)) if self.evaluate else {}
        result = {
            "participants": len(results), "devices": [r.device for r in results],
            "bytes_up": int(sum(r[3] for r in rows)) if secure_sum is None else live.bytes_received,
            "bytes_up_all": live.bytes_received,
            "bytes_down": len(self._task_payload(task, rnd)) * len(rnd["selected"]),
            "aggregate_s": agg_s, "round_s": now - rnd["started"], "closed_at": now,
            "metrics": metrics, "train_metrics": _mean_metrics(results),
        }
        if isinstance(live.strategy, DPStrategy):
            result["epsilon"] = live.strategy.accountant.epsilon()
        self._commit_model(task, rnd, new, result, now)
        log.info("fl: %s round %d aggregated %d updates -> version %d %s", task, rnd["round"], len(results),
                 rnd["model_version"] + 1, metrics)

    def _commit_model(self, task: str, rnd: dict[str, Any], new: T.Weights, result: dict[str, Any], now: float,
                      after: Callable[[Any], None] | None = None) -> None:
        """Store the new global model, close the round and open the next one, in one transaction."""
        live = self.live[task]
        version = rnd["model_version"] + 1
        accountant = json.dumps(live.strategy.accountant.to_dict()) if isinstance(live.strategy, DPStrategy) else None
        state = live.strategy.state()
        with self.store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?)",
                       (task, version, T.weights_to_bytes(new), T.to_bytes(state) if state else None, accountant, now))
            db.execute("UPDATE rounds SET state = 'done', closed = ?, result = ? WHERE task = ? AND round = ? AND attempt = ?",
                       (now, json.dumps(result), task, rnd["round"], rnd["attempt"]))
            self.store.count(task, "rounds_done", conn=db)
            if after is not None:
                after(db)
            if rnd["round"] + 1 >= live.config.rounds:
                db.execute("UPDATE tasks SET state = 'finished' WHERE task = ?", (task,))
            else:
                self._insert_round(db, live.config, rnd["round"] + 1, 0, version, now)
        live.weights, live.version, live.payload_key, live.bytes_received = new, version, None, 0
        if self.on_model:
            self.on_model(task, version, new)
        self._announce(task)

    # ------------------------------------------------------------------------------------ driving

    def run(self, task: str, timeout: float | None = None, poll: float = 0.05,
            progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Tick until the task is finished or failed (or `timeout` seconds pass); returns its status."""
        end = None if timeout is None else time.monotonic() + timeout
        seen = 0
        while True:
            self.tick()
            st = self.store.task(task)["state"]
            if progress:
                done = [r for r in self.store.rounds(task) if r["state"] == "done"]
                for r in done[seen:]:
                    progress(r)
                seen = len(done)
            if st != "running" or (end is not None and time.monotonic() > end):
                return self.status(task)
            self.wake.wait(poll)
            self.wake.clear()

    def weights(self, task: str) -> T.Weights:
        return T.copy(self.live[task].weights)

    def status(self, task: str) -> dict[str, Any]:
        t = self.store.task(task)
        if t is None:
            raise FLError(f"no federated task {task!r}")
        rounds = self.store.rounds(task)
        return {
            "task": task, "state": t["state"], "model_version": self.store.latest_model(task)[0],
            "counters": self.store.counters(task),
            "unattributed": self.store.counters("_all"),
            "rounds": [{k: r[k] for k in ("round", "attempt", "state", "model_version", "target", "min_count", "result")}
                       for r in rounds],
        }


def _mean_metrics(results: list[ClientResult]) -> dict[str, float]:
    keys = set().union(*(r.metrics for r in results)) if results else set()
    return {k: float(np.mean([r.metrics[k] for r in results if k in r.metrics])) for k in sorted(keys)}
