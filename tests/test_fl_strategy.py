"""cloud_sync.fl.strategy and dp: selection, FedAvg weighting, server optimizers, robust rules against
Byzantine updates, DP clipping/noise and the dp-accounting accountant with dropouts."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_sync.fl import tensors as T
from cloud_sync.fl.dp import DPConfig, DPStrategy, PrivacyAccountant, clip
from cloud_sync.fl.errors import FLError
from cloud_sync.fl.strategy import (
    ClientResult,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    Median,
    MultiKrum,
    TrimmedMean,
    make_strategy,
)

CUR = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(3, np.float32)}


def _res(i: int, value: float, n: int = 10) -> ClientResult:
    return ClientResult(f"d{i}", n, {k: np.full_like(v, value) for k, v in CUR.items()})


def test_configure_round_over_selects_and_is_seeded():
    s = FedAvg(clients_per_round=10, over_selection=1.3, train={"lr": 0.1}, codec={"int8": True})
    devs = [f"dev{i:02d}" for i in range(50)]
    plan = s.configure_round(4, devs)
    assert len(plan.devices) == 13 and len(set(plan.devices)) == 13 and set(plan.devices) <= set(devs)
    assert plan.target == 10 and plan.min_count == 5
    assert plan.config["codec"] == {"int8": True} and plan.config["train"]["lr"] == 0.1
    assert plan.devices == s.configure_round(4, list(reversed(devs))).devices
    assert plan.devices != s.configure_round(5, devs).devices
    small = s.configure_round(1, devs[:4])
    assert len(small.devices) == 4 and small.target == 4 and small.min_count == 4
    assert FedProx(mu=0.1).configure_round(0, devs).config["train"]["mu"] == 0.1


def test_fedavg_is_sample_weighted():
    new = FedAvg().aggregate(0, [_res(0, 1.0, n=10), _res(1, 4.0, n=30)], CUR)
    assert np.allclose(new["w"], 3.25) and np.allclose(new["b"], 3.25)


def test_server_optimizers_move_toward_the_update_and_keep_state():
    for cls in (FedAdam, FedYogi):
        s = cls(server_lr=0.1)
        w = T.copy(CUR)
        for r in range(3):
            w = s.aggregate(r, [_res(0, 1.0), _res(1, 1.0)], w)
        assert (w["w"] > 0.2).all()
        restored = cls(server_lr=0.1)
        restored.load_state(s.state())
        a = s.aggregate(3, [_res(0, 1.0)], w)
        b = restored.aggregate(3, [_res(0, 1.0)], w)
        assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", [Median(), TrimmedMean(beta=0.2), MultiKrum(byzantine=0.2)])
def test_robust_rules_ignore_20_percent_byzantine(strategy):
    rng = np.random.default_rng(0)
    honest = [ClientResult(f"h{i}", 10, {k: (1.0 + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in CUR.items()}) for i in range(8)]
    attackers = [_res(90, -100.0), _res(91, 50.0)]  # sign-flipped and scaled
    robust = strategy.aggregate(0, honest + attackers, CUR)
    plain = FedAvg().aggregate(0, honest + attackers, CUR)
    assert np.abs(robust["w"] - 1.0).max() < 0.3
    assert np.abs(plain["w"] - 1.0).max() > 5
    if isinstance(strategy, MultiKrum):
        assert not {8, 9} & set(strategy.select(honest + attackers))


def test_make_strategy_by_name():
    assert isinstance(make_strategy("trimmed_mean", beta=0.1), TrimmedMean)
    with pytest.raises(FLError, match="unknown strategy"):
        make_strategy("fedsgd")
    with pytest.raises(FLError, match="beta"):
        make_strategy("trimmed_mean", beta=0.7)


def test_dp_clipping_and_noise():
    big = {"w": np.full((3, 4), 10.0, np.float32), "b": np.zeros(3, np.float32)}
    clipped, norm = clip(big, 1.0)
    assert norm == pytest.approx(np.sqrt(12) * 10) and T.l2_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    small = {"w": np.full((3, 4), 0.01, np.float32), "b": np.zeros(3, np.float32)}
    assert np.array_equal(clip(small, 1.0)[0]["w"], small["w"])
    results = [ClientResult(f"d{i}", 5, big) for i in range(20)]
    quiet = DPStrategy(FedAvg(), DPConfig(clip_norm=1.0, noise_multiplier=0.0), population=100)
    mean = quiet.aggregate(0, results, CUR)
    assert T.l2_norm(mean) == pytest.approx(1.0, rel=1e-5)  # every update clipped to norm 1
    noisy = DPStrategy(FedAvg(), DPConfig(clip_norm=1.0, noise_multiplier=1.0), population=100)
    out = noisy.aggregate(0, results, CUR)
    noise = T.flatten(T.sub(out, mean)) * 20  # noise on the sum has std z*C = 1
    assert 0.4 < float(noise.std()) < 1.8
    assert noisy.accountant.rates == [0.2] and noisy.describe()["epsilon"] > 0


def test_accountant_uses_actual_participation():
    full = PrivacyAccountant(population=50, noise_multiplier=1.1, delta=1e-5)
    dropped = PrivacyAccountant(population=50, noise_multiplier=1.1, delta=1e-5)
    eps_full = [full.record_round(10) for _ in range(10)]
    eps_drop = [dropped.record_round(6) for _ in range(10)]
    assert all(a < b for a, b in zip(eps_full, eps_full[1:], strict=False))  # grows every round
    assert eps_drop[-1] < eps_full[-1]  # fewer participants, smaller sampling rate, less privacy spent
    assert dropped.record_round(0) == pytest.approx(eps_drop[-1])  # a round with nobody costs nothing
    assert 0.5 < eps_full[-1] < 10
    assert PrivacyAccountant(50, 0.0, 1e-5).record_round(10) == float("inf")
