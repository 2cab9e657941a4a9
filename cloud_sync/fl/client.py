"""The device side of a federated round (torch-free): check in when a round is announced, train when
given a task, encode the update (with error feedback kept in the agent's state dir) and upload it.

The client is transport-agnostic: it gets the two send functions, and the agent's MQTT layer feeds it
`on_announce(bytes)` and `on_task(bytes)`. A task that is delivered again (MQTT redelivery, aggregator
restart) is answered with the same stored update instead of training twice.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pocketfleet.fs import atomic_write_bytes

from . import messages as M
from . import tensors as T
from .codecs import CodecConfig, ErrorFeedback, encode_update
from .errors import FLError, SecAggError, UpdatePayloadError
from .secagg import quantize_fixed
from .secagg_round import SecAggParticipant

log = logging.getLogger("pocketfleet.fl.client")


@dataclass
class LocalResult:
    """What a local trainer returns (edge_agent.training.TrainResult has the same fields)."""

    weights: T.Weights
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


Trainer = Callable[[T.Weights, dict[str, Any]], Any]  # (global weights, train config) -> LocalResult-like
Send = Callable[[bytes], None]


class FLClient:
    """One device's FL participant. `num_samples`: how many local examples it would train on now."""

    def __init__(
        self,
        device: str,
        trainer: Trainer,
        num_samples: int | Callable[[], int],
        state_dir: str | Path,
        send_checkin: Send,
        send_update: Send,
        tamper: Callable[[T.Weights], T.Weights] | None = None,
        clock: Callable[[], float] = time.time,
        send_secagg: Send | None = None,
    ) -> None:
        self.device, self.trainer, self._num_samples = device, trainer, num_samples
        self.state_dir = Path(state_dir)
        self.send_checkin, self.send_update = send_checkin, send_update
        self.tamper, self.clock = tamper, clock
        self.counters: Counter[str] = Counter()
        self.last_metrics: dict[str, float] = {}
        self.secagg = SecAggParticipant(device, send_secagg) if send_secagg is not None else None

    @property
    def num_samples(self) -> int:
        return int(self._num_samples() if callable(self._num_samples) else self._num_samples)

    def _paths(self, task: str) -> tuple[Path, Path, Path]:
        base = self.state_dir / task
        return base.with_suffix(".json"), base.with_suffix(".ef.safetensors"), base.with_suffix(".update")

    def _state(self, task: str) -> dict[str, Any]:
        try:
            return json.loads(self._paths(task)[0].read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self, task: str, state: dict[str, Any]) -> None:
        atomic_write_bytes(self._paths(task)[0], json.dumps(state).encode())

    # ------------------------------------------------------------------------------------ messages

    def on_announce(self, payload: bytes) -> None:
        try:
            msg = M.decode(payload, M.ANNOUNCE)
        except UpdatePayloadError as exc:
            self.counters["malformed"] += 1
            log.warning("%s: bad announce: %s", self.device, exc)
            return
        if msg["state"] != "checkin" or self.clock() > msg["checkin_deadline"] or self.num_samples < 1:
            return
        task, rnd, attempt = M.key(msg)
        state = self._state(task)
        if state.get("checked_in") == [rnd, attempt]:
            return
        self.send_checkin(M.encode(M.CHECKIN, task=task, round=rnd, attempt=attempt, device=self.device,
                                   num_samples=self.num_samples))
        state["checked_in"] = [rnd, attempt]
        self._save_state(task, state)
        self.counters["checkins"] += 1

    def on_task(self, payload: bytes) -> None:
        try:
            header, weights = T.weights_from_bytes(payload)
            M.check(header, M.TASK)
        except UpdatePayloadError as exc:
            self.counters["malformed"] += 1
            log.warning("%s: bad task: %s", self.device, exc)
            return
        task, rnd, attempt = M.key(header)
        state_path, ef_path, update_path = self._paths(task)
        state = self._state(task)
        if state.get("uploaded") == [rnd, attempt] and update_path.exists():
            self.counters["reuploads"] += 1
            self.send_update(update_path.read_bytes())
            return
        if self.clock() > header["deadline"]:
            self.counters["late_tasks"] += 1
            return
        config = header["config"]
        out = self.trainer(weights, dict(config.get("train") or {}))
        delta = T.sub(out.weights, {k: weights[k] for k in out.weights})
        if set(delta) != set(weights):
            raise FLError(f"{self.device}: the trainer returned tensors {sorted(delta)[:3]}..., the task sent {sorted(weights)[:3]}...")
        if self.tamper is not None:
            delta = self.tamper(delta)
        if config.get("secagg"):
            self._secure_upload(task, rnd, attempt, delta, config["secagg"])
            state["uploaded"] = [rnd, attempt]
            self._save_state(task, state)
            return
        codec = CodecConfig.from_dict(config.get("codec"))
        ef = ErrorFeedback.load(ef_path) if codec.lossy and codec.error_feedback else None
        self.last_metrics = {k: float(v) for k, v in (out.metrics or {}).items() if np.isscalar(v)}
        data = encode_update(
            delta, codec,
            {"task": task, "round": rnd, "attempt": attempt, "device": self.device,
             "num_samples": int(out.num_samples), "metrics": self.last_metrics},
            ef, seed=zlib.crc32(f"{self.device}/{task}/{rnd}/{attempt}".encode()),
        )
        if ef is not None:
            ef.save(ef_path)
        atomic_write_bytes(update_path, data)
        state["uploaded"] = [rnd, attempt]
        self._save_state(task, state)
        self.counters["updates"] += 1
        self.counters["bytes_up"] += len(data)
        self.counters["bytes_down"] += len(payload)
        self.send_update(data)


    def _secure_upload(self, task: str, rnd: int, attempt: int, delta: T.Weights, cfg: Mapping[str, Any]) -> None:
        """Secure aggregation: the update leaves the device only as int8 values under pairwise masks."""
        if self.secagg is None:
            raise FLError(f"{self.device}: the round asks for secure aggregation but no secagg link is set")
        flat = T.flatten(delta, sorted(delta))
        if flat.size != int(cfg["length"]):
            raise FLError(f"{self.device}: update has {flat.size} values, the round expects {cfg['length']}")
        rng = np.random.default_rng(zlib.crc32(f"{self.device}/{task}/{rnd}/{attempt}".encode()))
        self.secagg.start((task, rnd, attempt), quantize_fixed(flat, float(cfg["clip"]), rng))
        self.counters["updates"] += 1

    def on_secagg(self, payload: bytes) -> None:
        if self.secagg is None:
            return
        try:
            self.secagg.on_message(payload)
        except (UpdatePayloadError, SecAggError) as exc:
            self.counters["secagg_errors"] += 1
            log.warning("%s: secure aggregation message refused: %s", self.device, exc)
