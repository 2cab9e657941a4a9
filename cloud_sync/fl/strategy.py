"""Aggregation strategies: `configure_round()` picks devices and their config, `aggregate()` makes the
next global weights from the devices' updates (numpy only).

Updates are deltas (local weights - global weights). A strategy = a combine rule over the deltas
(weighted mean, median, trimmed mean, Multi-Krum) + a server update (plain step, or Adam/Yogi/Adagrad).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import tensors as T
from .errors import FLError


@dataclass
class ClientResult:
    """One device's decoded update for a round."""

    device: str
    num_samples: int
    delta: T.Weights
    metrics: dict[str, float] = field(default_factory=dict)
    staleness: int = 0  # asynchronous rounds: aggregations since the model this update was trained from


@dataclass
class RoundPlan:
    """Who is asked to train this round, and the config they get."""

    devices: list[str]
    config: dict[str, Any]
    target: int
    min_count: int


class Strategy:
    """FedAvg by default: sample-weighted mean of the deltas, applied with `server_lr`.

    clients_per_round: the target count aggregated per round; over_selection: how many more are asked
    (1.3 = 130%) since some drop out; min_clients: a round closes at its deadline with at least this many.
    lr_decay: the devices' local learning rate in round r is train["lr"] x lr_decay**r (1.0 = constant).
    """

    name = "fedavg"
    asynchronous = False  # True: the engine runs buffered asynchronous rounds (FedBuff)

    def __init__(
        self,
        clients_per_round: int = 10,
        min_clients: int | None = None,
        over_selection: float = 1.3,
        train: Mapping[str, Any] | None = None,
        codec: Mapping[str, Any] | None = None,
        server_lr: float = 1.0,
        seed: int = 0,
        lr_decay: float = 1.0,
    ) -> None:
        if not 0.0 < lr_decay <= 1.0:
            raise FLError(f"strategy: lr_decay={lr_decay} must lie in (0, 1]")
        if clients_per_round < 1 or over_selection < 1.0:
            raise FLError(f"strategy: clients_per_round={clients_per_round} must be >= 1 and over_selection >= 1")
        self.clients_per_round = clients_per_round
        self.min_clients = min_clients if min_clients is not None else max(1, math.ceil(0.5 * clients_per_round))
        if not 1 <= self.min_clients <= clients_per_round:
            raise FLError(f"strategy: min_clients={self.min_clients} must lie in [1, {clients_per_round}]")
        self.over_selection = over_selection
        self.train = dict(train or {})
        self.codec = dict(codec or {})
        self.server_lr = server_lr
        self.seed = seed
        self.lr_decay = lr_decay

    # --- selection ------------------------------------------------------------------------------

    def configure_round(self, round: int, available: Sequence[str]) -> RoundPlan:
        """Sample (seeded by round) ceil(over_selection x target) of the available devices."""
        pool = sorted(set(available))
        want = min(len(pool), math.ceil(self.over_selection * self.clients_per_round))
        rng = np.random.default_rng([self.seed, round])
        # random order, not sorted: tasks go out (and, on a fair link, updates come back) in this order,
        # so the first `target` arrivals are a uniform sample, not the lowest device ids
        chosen = rng.choice(len(pool), size=want, replace=False).tolist() if want else []
        train = dict(self.train)
        train["seed"] = int(train.get("seed", 0)) * 1_000_003 + round
        if self.lr_decay != 1.0 and "lr" in train:
            train["lr"] = float(train["lr"]) * self.lr_decay**round
        return RoundPlan(
            [pool[i] for i in chosen],
            {"train": train, "codec": dict(self.codec), "strategy": self.name},
            min(self.clients_per_round, want),
            min(self.min_clients, want) if want else self.min_clients,
        )

    # --- aggregation ----------------------------------------------------------------------------

    def combine(self, results: Sequence[ClientResult]) -> T.Weights:
        """Sample-weighted mean of the deltas."""
        total = float(sum(r.num_samples for r in results))
        out = T.zeros_like(results[0].delta)
        for r in results:
            w = np.float32(r.num_samples / total)
            for k in out:
                out[k] += w * r.delta[k]
        return out

    def server_update(self, current: T.Weights, delta: T.Weights) -> T.Weights:
        return T.add(current, delta, self.server_lr)

    def aggregate(self, round: int, results: Sequence[ClientResult], current: T.Weights) -> T.Weights:
        if not results:
            raise FLError(f"round {round}: nothing to aggregate")
        return self.server_update(current, self.combine(results))

    # --- persistence (server optimizer state survives an aggregator restart) --------------------

    def state(self) -> T.Weights:
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what `state()` returned."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "clients_per_round": self.clients_per_round, "min_clients": self.min_clients,
                "over_selection": self.over_selection, "server_lr": self.server_lr, "lr_decay": self.lr_decay}


class FedAvg(Strategy):
    """McMahan et al. 2017: the sample-weighted mean of the local models."""


class FedProx(Strategy):
    """Li et al. 2020: FedAvg aggregation; devices add (mu/2)||w - w_global||² to their local loss."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01, **kw: Any) -> None:
        super().__init__(**kw)
        if mu < 0:
            raise FLError(f"fedprox: mu={mu} must be >= 0")
        self.train["mu"] = mu


class FedOpt(Strategy):
    """Reddi et al. 2021: the weighted mean delta is a pseudo-gradient for a server optimizer."""

    name = "fedadam"
    rule = "adam"

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, **kw: Any):
        super().__init__(server_lr=server_lr, **kw)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.m: T.Weights = {}
        self.v: T.Weights = {}

    def server_update(self, current: T.Weights, delta: T.Weights) -> T.Weights:
        if not self.m:
            self.m = T.zeros_like(delta)
            self.v = {k: np.full_like(d, self.tau**2) for k, d in delta.items()}
        out = {}
        for k, d in delta.items():
            self.m[k] = self.beta1 * self.m[k] + (1 - self.beta1) * d
            d2 = d * d
            if self.rule == "adam":
                self.v[k] = self.beta2 * self.v[k] + (1 - self.beta2) * d2
            elif self.rule == "yogi":
                self.v[k] = self.v[k] - (1 - self.beta2) * d2 * np.sign(self.v[k] - d2)
            else:  # adagrad
                self.v[k] = self.v[k] + d2
            out[k] = (current[k] + self.server_lr * self.m[k] / (np.sqrt(self.v[k]) + self.tau)).astype(np.float32)
        return out

    def state(self) -> T.Weights:
        return {**{f"m/{k}": v for k, v in self.m.items()}, **{f"v/{k}": v for k, v in self.v.items()}}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.m = {k[2:]: np.array(v, np.float32) for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: np.array(v, np.float32) for k, v in state.items() if k.startswith("v/")}


class FedAdam(FedOpt):
    name, rule = "fedadam", "adam"


class FedYogi(FedOpt):
    name, rule = "fedyogi", "yogi"


class FedAdagrad(FedOpt):
    name, rule = "fedadagrad", "adagrad"


def _stack(results: Sequence[ClientResult]) -> tuple[np.ndarray, list[str]]:
    names = sorted(results[0].delta)
    return np.stack([T.flatten(r.delta, names) for r in results]), names


class Median(Strategy):
    """Coordinate-wise median of the deltas (Yin et al. 2018); ignores sample counts."""

    name = "median"

    def combine(self, results: Sequence[ClientResult]) -> T.Weights:
        mat, names = _stack(results)
        return T.unflatten(np.median(mat, axis=0), results[0].delta, names)


class TrimmedMean(Strategy):
    """Coordinate-wise mean after dropping the `beta` fraction largest and smallest values."""

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.2, **kw: Any) -> None:
        super().__init__(**kw)
        if not 0 <= beta < 0.5:
            raise FLError(f"trimmed_mean: beta={beta} must lie in [0, 0.5)")
        self.beta = beta

    def combine(self, results: Sequence[ClientResult]) -> T.Weights:
        mat, names = _stack(results)
        n = len(results)
        cut = min(int(math.floor(self.beta * n)), (n - 1) // 2)
        kept = np.sort(mat, axis=0)[cut : n - cut]
        return T.unflatten(kept.mean(axis=0), results[0].delta, names)


class MultiKrum(Strategy):
    """Blanchard et al. 2017: score each delta by its summed squared distance to its n-f-2 nearest
    neighbours; average the `m` best (m=None: n - f). f = assumed Byzantine devices (default 20%).

    byzantine="auto": f adapts to the round's draw. The scores use the most neighbours Krum allows
    for the round (f_max = (n-3)//2), and the deltas kept are those scoring at most `ratio` x the median
    score of the best half (an honest majority keeps honest updates in the best half, whose scores are
    alike; a round that drew more attackers than a fixed f would allow still drops every far-off one).
    `last_f` reports the f a round used."""

    name = "multikrum"

    def __init__(self, byzantine: float | str = 0.2, m: int | None = None, ratio: float = 3.0, **kw: Any) -> None:
        super().__init__(**kw)
        if byzantine != "auto" and not (isinstance(byzantine, (int, float)) and 0 <= byzantine < 0.5):
            raise FLError(f"multikrum: byzantine={byzantine!r} must be 'auto' or a fraction in [0, 0.5)")
        if ratio <= 1:
            raise FLError(f"multikrum: ratio={ratio} must be > 1")
        self.byzantine, self.m, self.ratio = byzantine, m, ratio
        self.last_f = 0

    def select(self, results: Sequence[ClientResult]) -> list[int]:
        mat, _ = _stack(results)
        n = len(results)
        f_max = max(0, (n - 3) // 2)
        auto = self.byzantine == "auto"
        f = f_max if auto else min(int(math.ceil(float(self.byzantine) * n)), f_max)
        sq = (mat * mat).sum(axis=1)
        dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * mat @ mat.T, 0.0)
        k = max(1, n - f - 2)
        scores = np.array([np.sort(np.delete(dist[i], i))[:k].sum() for i in range(n)])
        order = np.argsort(scores, kind="stable")
        if auto:
            anchor = float(np.median(scores[order[: max(1, (n + 1) // 2)]]))
            keep = [int(i) for i in order if scores[i] <= self.ratio * anchor] or [int(order[0])]
            self.last_f = n - len(keep)
            return sorted(keep)
        m = self.m if self.m is not None else n - f
        self.last_f = f
        return sorted(order[: max(1, min(m, n))].tolist())

    def combine(self, results: Sequence[ClientResult]) -> T.Weights:
        return super().combine([results[i] for i in self.select(results)])


class FedBuff(Strategy):
    """Nguyen et al. 2022 (buffered asynchronous aggregation): devices train whenever they are available
    on the newest model they were given; the server aggregates every `buffer_size` (K) updates that
    arrive, each delta first scaled by s(staleness) = (1 + staleness) ** -staleness_exponent, and drops
    updates more than `max_staleness` versions old. `concurrency`: devices training at once (default
    2K). `rule`: how the K scaled deltas are combined (fedavg = sample-weighted mean, or a robust rule
    with `rule_args`). `statistics`: tensor-name suffixes averaged as values (see is_statistic). Run by
    the round engine's asynchronous mode (cloud_sync.fl.fedbuff)."""

    name = "fedbuff"
    asynchronous = True

    def __init__(self, buffer_size: int = 10, concurrency: int | None = None, max_staleness: int = 10,
                 staleness_exponent: float = 0.5, rule: str = "fedavg", rule_args: Mapping[str, Any] | None = None,
                 statistics: Sequence[str] = ("running_mean", "running_var"), **kw: Any) -> None:
        super().__init__(**kw)
        if buffer_size < 1 or max_staleness < 0 or staleness_exponent < 0:
            raise FLError(f"fedbuff: buffer_size={buffer_size} must be >= 1, max_staleness and staleness_exponent >= 0")
        if rule == "fedbuff" or rule not in STRATEGIES:
            raise FLError(f"fedbuff: rule {rule!r} must be one of {', '.join(sorted(set(STRATEGIES) - {'fedbuff'}))}")
        self.buffer_size, self.max_staleness, self.staleness_exponent = buffer_size, max_staleness, staleness_exponent
        self.concurrency = concurrency if concurrency is not None else 2 * buffer_size
        if self.concurrency < buffer_size:
            raise FLError(f"fedbuff: concurrency={self.concurrency} must be >= buffer_size={buffer_size}")
        self.min_clients = min(self.min_clients, buffer_size)
        self.rule = make_strategy(rule, **dict(rule_args or {}))
        self.statistics = tuple(statistics)

    def is_statistic(self, name: str) -> bool:
        """Tensors that are estimates, not trained weights (BatchNorm running mean / variance): they are
        averaged as the devices' values (base + delta), not stepped by stale deltas, which could push a
        variance below zero."""
        return name.rsplit(".", 1)[-1] in self.statistics

    def staleness_weight(self, staleness: int) -> float:
        return float((1.0 + max(0, staleness)) ** -self.staleness_exponent)

    def combine(self, results: Sequence[ClientResult]) -> T.Weights:
        return self.rule.combine(results)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "buffer_size": self.buffer_size, "concurrency": self.concurrency,
                "max_staleness": self.max_staleness, "staleness_exponent": self.staleness_exponent,
                "rule": self.rule.name}


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad, Median, TrimmedMean, MultiKrum, FedBuff)
}


def make_strategy(name: str, **kw: Any) -> Strategy:
    """A strategy by its name (fedavg, fedprox, fedadam, fedyogi, fedadagrad, median, trimmed_mean, multikrum,
    fedbuff)."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise FLError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}")
    try:
        return cls(**kw)
    except TypeError as exc:
        raise FLError(f"strategy {name!r}: {exc}") from exc
