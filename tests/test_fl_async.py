"""FedBuff (asynchronous buffered rounds), unbiased over-selection and the device-behaviour model, on the
virtual-clock wire (cloud_sync.fl.behaviour) with real NumPy head training on digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloud_sync.fl.behaviour import BehaviourHub, BehaviourModel, VirtualClock, time_to_accuracy
from cloud_sync.fl.client import FLClient
from cloud_sync.fl.errors import FLError
from cloud_sync.fl.partition import dirichlet_split
from cloud_sync.fl.rounds import Aggregator, TaskConfig
from cloud_sync.fl.strategy import ClientResult, FedBuff, make_strategy
from edge_agent.fl import head_trainer_fn
from edge_agent.training import DenseLayer, Head, HeadTrainer, LocalDataset
from tests.fl_helpers import digits_flat

HEAD = Head([DenseLayer("w", "b")])
X, Y = digits_flat("train")
XT, YT = digits_flat("test")
TRAIN = {"epochs": 2, "lr": 0.1, "batch_size": 16}


def _acc(w) -> float:
    return float((HEAD.predict(w, XT) == YT).mean())


def _sim(tmp: Path, n: int = 30, model: BehaviourModel | None = None, seed: int = 0):
    clock = VirtualClock(1000.0)
    hub = BehaviourHub(clock, seed=seed)
    agg = Aggregator(tmp / "fl.db", hub, evaluate=lambda t, w: {"accuracy": _acc(w)}, clock=clock)
    hub.aggregator = agg
    parts = dirichlet_split(Y, n, 0.5, seed=seed)
    behaviour = (model or BehaviourModel(speed_median=40, period_s=3600, dropout=0.08)).sample(n, seed=seed)
    for i, p in enumerate(parts):
        dev = f"dev{i:02d}"
        checkin, update = hub.device_links(dev)
        fl = FLClient(dev, head_trainer_fn(HeadTrainer(HEAD), LocalDataset({"features": X[p]}, Y[p])), len(p),
                      tmp / dev, checkin, update, clock=clock)
        hub.attach(dev, fl, behaviour[i], work=len(p) * TRAIN["epochs"])
    return agg, hub, clock


def test_behaviour_model_has_the_spread_windows_and_dropout_it_claims():
    devs = BehaviourModel().sample(1000, seed=1)
    s = BehaviourModel.summary(devs)
    assert s["speed_spread_p95_p5"] >= 10 and 0.06 <= s["dropout"] <= 0.10
    d = devs[0]
    t = d.window_start_s + 1
    assert d.online(t) and not d.online(d.offline_at(t) + 1) and d.online(d.next_online(d.offline_at(t) + 1))
    with pytest.raises(FLError, match="behaviour model"):
        BehaviourModel(dropout=1.5)


def test_fedbuff_aggregates_every_k_updates_with_staleness_weights(tmp_path):
    agg, hub, clock = _sim(tmp_path)
    agg.create_task(TaskConfig(task="fb", rounds=12, strategy="fedbuff", strategy_args={"buffer_size": 5},
                               train=TRAIN, round_s=600), HEAD.init([64, 10], seed=0))
    st = hub.run(agg, "fb", max_time=clock() + 20_000)
    assert st["state"] == "finished" and st["model_version"] == 12
    done = [r for r in st["rounds"] if r["state"] == "done"]
    assert all(r["result"]["participants"] == 5 for r in done)
    stale = [s for r in done for s in r["result"]["staleness"]]
    assert max(stale) >= 1 and max(stale) <= 10  # asynchronous: some updates were trained on older models
    assert done[-1]["result"]["metrics"]["accuracy"] > _acc(HEAD.init([64, 10], seed=0)) + 0.3
    c = st["counters"]
    assert c["accepted"] >= 60 and c["rounds_done"] == 12
    assert time_to_accuracy(st, 0.5) is not None


def test_fedbuff_staleness_weight_and_rules():
    fb = FedBuff(buffer_size=3, staleness_exponent=0.5, rule="median")
    assert fb.staleness_weight(0) == 1.0 and fb.staleness_weight(3) == pytest.approx(0.5)
    res = [ClientResult(f"d{i}", 1, {"w": np.full(2, v, np.float32)}) for i, v in enumerate([1.0, 2.0, 100.0])]
    assert fb.combine(res)["w"].tolist() == [2.0, 2.0]  # the robust rule applies to the buffer
    with pytest.raises(FLError, match="rule"):
        make_strategy("fedbuff", rule="fedbuff")
    with pytest.raises(FLError, match="concurrency"):
        FedBuff(buffer_size=5, concurrency=2)


def test_over_selection_grace_aggregates_the_late_large_devices_not_only_the_first(tmp_path):
    out = {}
    for grace in (0.0, 1.0):
        d = tmp_path / str(grace)
        agg, hub, clock = _sim(d, model=BehaviourModel(speed_median=40, period_s=3600, dropout=0.0))
        agg.create_task(TaskConfig(task="os", rounds=4, clients_per_round=6, over_selection=1.5, checkin_target=30,
                                   train=TRAIN, round_s=600, over_selection_grace=grace), HEAD.init([64, 10]))
        st = hub.run(agg, "os", max_time=clock() + 20_000)
        done = [r for r in st["rounds"] if r["state"] == "done"]
        out[grace] = [r["result"]["participants"] for r in done]
        if grace == 0.0:
            assert st["counters"]["surplus"] > 0
    assert out[0.0] == [6, 6, 6, 6]
    assert sum(out[1.0]) > sum(out[0.0])  # with a grace window the slower (larger) devices still count


class _Wire:
    def __init__(self) -> None:
        self.tasks: list[tuple[str, bytes]] = []

    def broadcast(self, group, task, announce) -> None:  # noqa: ANN001
        pass

    def send_task(self, device, task, payload) -> None:  # noqa: ANN001
        self.tasks.append((device, payload))

    def send_secagg(self, device, task, payload) -> None:  # noqa: ANN001
        pass


def test_fedbuff_averages_batchnorm_statistics_as_values_and_steps_weights_by_staleness(tmp_path):
    from cloud_sync.fl import messages as M
    from cloud_sync.fl.codecs import CodecConfig, encode_update

    wire, clock = _Wire(), VirtualClock(10.0)
    agg = Aggregator(tmp_path / "fl.db", wire, clock=clock)
    init = {"w": np.zeros(4, np.float32), "bn.running_var": np.ones(4, np.float32)}
    agg.create_task(TaskConfig(task="bn", rounds=3, strategy="fedbuff",
                               strategy_args={"buffer_size": 2, "staleness_exponent": 1.0}), init)

    def checkin(dev: str) -> None:
        agg.on_checkin(dev, M.encode(M.CHECKIN, task="bn", round=0, attempt=0, device=dev, num_samples=1))

    def upload(dev: str, rnd: int, dw: float, var: float) -> str:
        delta = {"w": np.full(4, dw, np.float32), "bn.running_var": np.full(4, var, np.float32)}
        data = encode_update(delta, CodecConfig(), {"task": "bn", "round": rnd, "attempt": 0, "device": dev,
                                                     "num_samples": 1, "metrics": {}}, None, seed=0)
        return agg.on_update(dev, data)

    for dev in ("a", "b", "c"):
        checkin(dev)
    assert [d for d, _ in wire.tasks] == ["a", "b", "c"]
    assert upload("a", 0, 1.0, -0.5) == "accepted" and upload("b", 0, 1.0, 1.0) == "accepted"
    agg.tick()
    w1 = agg.weights("bn")
    assert np.allclose(w1["w"], 1.0) and np.allclose(w1["bn.running_var"], 1.25)  # mean of 0.5 and 2.0
    checkin("a")
    # c trained on version 0 (staleness 1): its step is halved; its variance is taken as its own value
    assert upload("c", 0, 2.0, -0.9) == "accepted" and upload("a", 1, 0.0, 0.0) == "accepted"
    assert upload("a", 1, 0.0, 0.0) == "duplicate"
    agg.tick()
    w2 = agg.weights("bn")
    assert np.allclose(w2["w"], 1.0 + (2.0 * 0.5 + 0.0) / 2)
    assert np.allclose(w2["bn.running_var"], (0.1 + 1.25) / 2) and (w2["bn.running_var"] > 0).all()
    st = agg.status("bn")
    assert [sorted(r["result"]["staleness"]) for r in st["rounds"] if r["state"] == "done"] == [[0, 0], [0, 1]]
