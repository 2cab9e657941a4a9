"""Central differential privacy at the aggregator: per-update L2 clipping, Gaussian noise on the sum,
and a privacy accountant (Google's `dp-accounting`, RDP) that reports epsilon for delta after each round.

DP-FedAvg (McMahan et al. 2018): each update is clipped to L2 norm C, the clipped updates are summed,
N(0, (z·C)²) noise is added to the sum, and the sum is divided by the number of updates received.
Each round is accounted as a Poisson-subsampled Gaussian mechanism with noise multiplier z and sampling
rate q = (updates actually aggregated) / (population): a round in which devices dropped out is
charged for the participation it really had, and an abandoned round (nothing released) costs nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import tensors as T
from .errors import FLError
from .strategy import ClientResult, Strategy

RDP_ORDERS = [2 + i / 4 for i in range(0, 40)] + [12, 14, 16, 20, 24, 28, 32, 48, 64, 128, 256]


@dataclass
class DPConfig:
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clip_norm <= 0 or self.noise_multiplier < 0 or not 0 < self.delta < 1:
            raise FLError(f"dp: need clip_norm > 0, noise_multiplier >= 0, 0 < delta < 1; got {asdict(self)}")


def clip(delta: T.Weights, clip_norm: float) -> tuple[T.Weights, float]:
    """Scale `delta` to L2 norm <= clip_norm; returns (clipped, original norm)."""
    norm = T.l2_norm(delta)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (v * np.float32(factor)).astype(np.float32) for k, v in delta.items()}, norm


@dataclass
class PrivacyAccountant:
    """Composes one subsampled Gaussian event per released round; `epsilon()` for the configured delta."""

    population: int
    noise_multiplier: float
    delta: float
    rates: list[float] = field(default_factory=list)

    def record_round(self, participants: int) -> float:
        """Charge a released round with `participants` aggregated updates; returns the new epsilon."""
        if participants < 0 or participants > self.population:
            raise FLError(f"dp: {participants} participants for a population of {self.population}")
        self.rates.append(participants / self.population)
        return self.epsilon()

    def epsilon(self) -> float:
        if not self.rates:
            return 0.0
        if self.noise_multiplier == 0:
            return float("inf")
        import dp_accounting
        from dp_accounting import rdp

        acc = rdp.RdpAccountant(orders=RDP_ORDERS)
        for q, count in sorted(Counter(q for q in self.rates if q > 0).items()):
            event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(self.noise_multiplier))
            acc.compose(dp_accounting.SelfComposedDpEvent(event, count))
        return float(acc.get_epsilon(self.delta))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DPStrategy(Strategy):
    """Wraps a strategy: its selection and server update, with a clipped, noised uniform mean as combine."""

    def __init__(self, inner: Strategy, config: DPConfig, population: int) -> None:
        self.__dict__.update(inner.__dict__)
        self.inner, self.dp = inner, config
        self.name = f"dp-{inner.name}"
        self.accountant = PrivacyAccountant(population, config.noise_multiplier, config.delta)
        self.last_norms: list[float] = []

    def configure_round(self, round: int, available: Sequence[str]):  # noqa: ANN201
        plan = self.inner.configure_round(round, available)
        plan.config["strategy"] = self.name
        return plan

    def combine(self, results: Sequence[ClientResult]) -> T.Weights:
        clipped = [clip(r.delta, self.dp.clip_norm) for r in results]
        self.last_norms = [n for _, n in clipped]
        total = T.zeros_like(results[0].delta)
        for c, _ in clipped:
            for k in total:
                total[k] += c[k]
        rng = np.random.default_rng([self.dp.seed, len(self.accountant.rates)])
        std = self.dp.noise_multiplier * self.dp.clip_norm
        n = len(results)
        return {k: ((v + rng.normal(0.0, std, v.shape)) / n).astype(np.float32) for k, v in total.items()}

    def server_update(self, current: T.Weights, delta: T.Weights) -> T.Weights:
        return self.inner.server_update(current, delta)

    def aggregate(self, round: int, results: Sequence[ClientResult], current: T.Weights) -> T.Weights:
        new = super().aggregate(round, results, current)
        self.accountant.record_round(len(results))
        return new

    def state(self) -> T.Weights:
        return self.inner.state()

    def load_state(self, state: Any) -> None:
        self.inner.load_state(state)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "name": self.name, "dp": asdict(self.dp),
                "epsilon": self.accountant.epsilon(), "rounds_accounted": len(self.accountant.rates)}
