"""A device-behaviour model for simulated FL fleets, and a virtual-clock wire that applies it.

The model (parametric, its defaults set from published fleet measurements: FedScale's device traces
(Lai et al. 2022: compute and bandwidth spread over one to two orders of magnitude across phones),
Bonawitz et al. 2019 (6-10% of selected devices drop out during a round; devices train only while
idle, charging and on unmetered Wi-Fi, i.e. in daily windows)):

- compute speed: local training throughput in samples/s, log-normal (default median 400, sigma 0.8:
  the 5th to 95th percentile spread is 14x; clipped to [speed_min, speed_max]);
- availability: a daily cycle (`period_s`) with one online window per device, its length a uniform
  fraction of the period (default 0.3-0.9) and its start uniform; a device trains only while online;
- mid-round dropout: each task is lost with probability `dropout` (default 0.08), at a uniform point
  of its training;
- link bandwidth: uplink and downlink bytes/s, log-normal (default medians 250 kB/s up, 1 MB/s down);
  a transfer takes bytes / bandwidth plus `latency_s`.

`BehaviourHub` is a CloudTransport plus device links like `transport.InProcessHub`, on a virtual clock:
a device's update reaches the aggregator at (task arrival + download + training + upload) virtual
seconds; dropped or offline devices send nothing. Training itself runs for real (any FLClient trainer),
so accuracy is real and time-to-accuracy is in simulated wall-clock. Drive it with `run(aggregator,
task)`: it advances the clock event by event and ticks the aggregator.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import FLError


@dataclass(frozen=True)
class DeviceBehaviour:
    speed: float  # samples / s of local training
    up_bps: float
    down_bps: float
    period_s: float
    window_start_s: float
    window_s: float
    dropout: float
    latency_s: float = 0.05

    def _cycle(self, t: float) -> float:
        """Start of the online window of the cycle that t falls in (windows are [start, start + window))."""
        return self.window_start_s + math.floor((t - self.window_start_s) / self.period_s) * self.period_s

    def online(self, t: float) -> bool:
        return t < self._cycle(t) + self.window_s

    def next_online(self, t: float) -> float:
        """The first time >= t at which the device is online."""
        return t if self.online(t) else self._cycle(t) + self.period_s

    def offline_at(self, t: float) -> float:
        """When the online window that t falls in closes (t itself when offline)."""
        return max(t, self._cycle(t) + self.window_s)


@dataclass(frozen=True)
class BehaviourModel:
    speed_median: float = 400.0
    speed_sigma: float = 0.8
    speed_min: float = 20.0
    speed_max: float = 20000.0
    up_median_bps: float = 250e3
    down_median_bps: float = 1e6
    bandwidth_sigma: float = 0.7
    period_s: float = 86400.0
    window_frac: tuple[float, float] = (0.3, 0.9)
    dropout: float = 0.08
    latency_s: float = 0.05

    def __post_init__(self) -> None:
        lo, hi = self.window_frac
        if not (0 < lo <= hi <= 1) or not 0 <= self.dropout < 1 or self.speed_median <= 0 or self.period_s <= 0:
            raise FLError(f"behaviour model: invalid parameters {asdict(self)}")

    def sample(self, n: int, seed: int = 0) -> list[DeviceBehaviour]:
        rng = np.random.default_rng(seed)
        speed = np.clip(self.speed_median * rng.lognormal(0, self.speed_sigma, n), self.speed_min, self.speed_max)
        up = self.up_median_bps * rng.lognormal(0, self.bandwidth_sigma, n)
        down = self.down_median_bps * rng.lognormal(0, self.bandwidth_sigma, n)
        frac = rng.uniform(*self.window_frac, n)
        start = rng.uniform(0, self.period_s, n)
        return [DeviceBehaviour(float(speed[i]), float(up[i]), float(down[i]), self.period_s, float(start[i]),
                                float(frac[i] * self.period_s), self.dropout, self.latency_s) for i in range(n)]

    @staticmethod
    def summary(devices: list[DeviceBehaviour]) -> dict[str, float]:
        s = np.array([d.speed for d in devices])
        return {"devices": len(devices), "speed_p5": float(np.percentile(s, 5)), "speed_p95": float(np.percentile(s, 95)),
                "speed_spread_p95_p5": float(np.percentile(s, 95) / np.percentile(s, 5)),
                "speed_spread_max_min": float(s.max() / s.min()),
                "up_bps_median": float(np.median([d.up_bps for d in devices])),
                "online_frac_mean": float(np.mean([d.window_s / d.period_s for d in devices])),
                "dropout": float(np.mean([d.dropout for d in devices]))}


class VirtualClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class BehaviourHub:
    """The wire between an Aggregator and FLClients, on a virtual clock, with per-device behaviour.

    attach(device, client, behaviour, samples, epochs): `samples` x `epochs` / speed = training time.
    """

    def __init__(self, clock: VirtualClock, seed: int = 0) -> None:
        self.clock = clock
        self.events: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.clients: dict[str, Any] = {}
        self.behaviour: dict[str, DeviceBehaviour] = {}
        self.work: dict[str, float] = {}  # device -> sample passes per task (samples x epochs)
        self.groups: dict[str, str] = {}
        self.retained: dict[tuple[str, str], bytes] = {}
        self.busy_until: dict[str, float] = {}
        self.aggregator: Any = None
        self.rng = np.random.default_rng(seed)
        self.counters: Counter[str] = Counter()
        self._pending_update: dict[str, bytes] = {}

    def at(self, t: float, fn: Callable[..., Any], *args: Any) -> None:
        heapq.heappush(self.events, (t, next(self._seq), fn, args))

    # ---- wiring
    def attach(self, device: str, client: Any, behaviour: DeviceBehaviour, work: float, group: str = "default") -> None:
        self.clients[device], self.behaviour[device], self.work[device] = client, behaviour, work
        self.groups[device] = group
        now = self.clock()
        self.at(behaviour.next_online(now), self._came_online, device)

    def device_links(self, device: str) -> tuple[Callable[[bytes], None], Callable[[bytes], None]]:
        def checkin(data: bytes) -> None:
            b = self.behaviour[device]
            self.at(self.clock() + b.latency_s, self._to_cloud, "checkin", device, data)

        def update(data: bytes) -> None:  # called by FLClient.on_task right after (real) training
            self._pending_update[device] = data

        return checkin, update

    def _came_online(self, device: str) -> None:
        b, now = self.behaviour[device], self.clock()
        if not b.online(now):  # a window edge in floating point: look again a moment later, never spin
            self.at(max(b.next_online(now), now + 1e-3), self._came_online, device)
            return
        for (g, _), msg in self.retained.items():
            if g == self.groups[device]:
                self.clients[device].on_announce(msg)
        self.at(max(b.offline_at(now), now + 1e-3), self._went_offline, device)

    def _went_offline(self, device: str) -> None:
        b, now = self.behaviour[device], self.clock()
        self.at(max(b.next_online(now), now + 1e-3), self._came_online, device)

    def _to_cloud(self, kind: str, device: str, data: bytes) -> None:
        if kind == "checkin":
            self.aggregator.on_checkin(device, data)
        else:
            self.counters["updates_delivered"] += 1
            self.aggregator.on_update(device, data)

    # ---- CloudTransport
    def broadcast(self, group: str, task: str, announce: bytes) -> None:
        self.retained[(group, task)] = announce
        now = self.clock()
        for dev, client in self.clients.items():
            if self.groups[dev] == group and self.behaviour[dev].online(now) and self.busy_until.get(dev, 0) <= now:
                self.at(now + self.behaviour[dev].latency_s, client.on_announce, announce)

    def send_task(self, device: str, task: str, payload: bytes) -> None:
        if device not in self.clients:
            return
        b, now = self.behaviour[device], self.clock()
        self.counters["tasks_sent"] += 1
        start = max(now, self.busy_until.get(device, 0.0))
        arrive = start + b.latency_s + len(payload) / b.down_bps
        self.at(arrive, self._task_arrived, device, payload)
        self.busy_until[device] = arrive

    def send_secagg(self, device: str, task: str, payload: bytes) -> None:
        raise FLError("the behaviour simulator does not run secure aggregation")

    def _task_arrived(self, device: str, payload: bytes) -> None:
        b, now = self.behaviour[device], self.clock()
        if not b.online(now):
            self.counters["offline_at_task"] += 1
            return
        train_s = self.work[device] / b.speed
        self.clients[device].on_task(payload)  # trains now (real compute), stores the update to send
        data = self._pending_update.pop(device, None)
        if data is None:
            return
        done = now + train_s
        up_done = done + b.latency_s + len(data) / b.up_bps
        self.busy_until[device] = up_done
        if self.rng.random() < b.dropout:
            self.counters["dropped_mid_round"] += 1
            self.at(now + self.rng.uniform(0, up_done - now), self._dropped, device)
            return
        if b.offline_at(now) < up_done:
            self.counters["went_offline_mid_round"] += 1
            self.at(b.offline_at(now), self._dropped, device)
            return
        self.at(up_done, self._to_cloud, "update", device, data)
        self.at(up_done + 1e-3, self._idle_again, device)

    def _dropped(self, device: str) -> None:
        self.busy_until[device] = self.clock()

    def _idle_again(self, device: str) -> None:  # read the (retained) announce again: async rounds re-check-in
        if self.behaviour[device].online(self.clock()):
            for (g, _), msg in self.retained.items():
                if g == self.groups[device]:
                    self.clients[device].on_announce(msg)

    # ---- driving
    def run(self, aggregator: Any, task: str, tick_s: float = 1.0, max_time: float = math.inf,
            on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Advance the virtual clock event by event (ticking the aggregator at least every `tick_s`)
        until the task is finished or failed, or `max_time` passes."""
        self.aggregator = aggregator
        next_tick = self.clock()
        while aggregator.store.task(task)["state"] == "running" and self.clock() < max_time:
            t_event = self.events[0][0] if self.events else math.inf
            if next_tick <= t_event:
                self.clock.t = max(self.clock.t, next_tick)
                aggregator.tick()
                next_tick = self.clock.t + tick_s
                continue
            t, _, fn, args = heapq.heappop(self.events)
            self.clock.t = max(self.clock.t, t)
            fn(*args)
        return aggregator.status(task)


def time_to_accuracy(status: dict[str, Any], target: float, key: str = "accuracy") -> float | None:
    """Simulated seconds from the task's first round to the first aggregation reaching `target`."""
    done = [r for r in status["rounds"] if r["state"] == "done" and r["result"]]
    for r in done:
        if (r["result"].get("metrics") or {}).get(key, -1) >= target:
            return float(r["result"]["closed_at"])
    return None


