"""Federated learning on the digits data: ours (FedAvg dense / top-k+int8+error feedback, robust rules,
NumPy head-only training) against centralized training and Flower's FedAvg, in one run.

    python benchmarks/federated.py                    # full run (about 10 minutes on 2 cores)
    python benchmarks/federated.py --quick            # fewer rounds, for a smoke test

How devices are simulated: every device is an `FLClient` (the device-side FL code of the agent) with its
own data partition and its own state directory (error-feedback residuals, last upload). In the runs
marked transport=mqtt each device also has its own MQTT connection (its own account, ACL-confined to its
topics) to a real mosquitto on loopback, and the aggregator is the real `Aggregator` with SQLite state
bound to MQTT; devices are threads of this process, except the head-only run whose 50 devices run in a
separate process where `import torch` fails (NumPy + onnxruntime only). Runs marked transport=inproc use
the same aggregator and device code over the in-process wire (same bytes, no broker) to save time.
Flower's FedAvg runs its own `FedAvg.aggregate_fit` over `NumPyClient.fit` results in-process (its
simulation engine needs Ray, which is not installed), with the same partitions, model, initial weights,
local trainer and hyper-parameters.

Writes benchmarks/results/federated.json and benchmarks/results/federated.png.
"""

from __future__ import annotations

import sys

if "--device-worker" in sys.argv:  # the head-only devices: prove that no torch is needed on the device
    sys.modules["torch"] = None  # type: ignore[assignment]

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud_sync.fl import tensors as T  # noqa: E402
from cloud_sync.fl.client import FLClient  # noqa: E402
from cloud_sync.fl.partition import dirichlet_split, shard_split  # noqa: E402
from cloud_sync.fl.rounds import Aggregator, TaskConfig  # noqa: E402
from cloud_sync.fl.transport import InProcessHub  # noqa: E402
from edge_agent.training import DenseLayer, Head, HeadTrainer, LocalDataset, TrainConfig  # noqa: E402

OUT = ROOT / "benchmarks" / "results"


@dataclass
class Setup:
    rounds: int = 30
    devices: int = 50
    per_round: int = 10
    # 1.0 = wait for every selected device, as Flower does: the like-for-like comparison. Over-selection
    # (1.3: aggregate the first 10 of 13) guards against dropouts, but keeps the devices that finish
    # first, i.e. those with less data: on Dirichlet(0.5) FedAvg's last-5 mean fell to 0.901 (vs 0.984)
    over_selection: float = 1.0
    alpha: float = 0.5
    local: dict[str, Any] = field(default_factory=lambda: {"epochs": 2, "batch_size": 10, "lr": 0.05, "momentum": 0.9})
    codec: dict[str, Any] = field(default_factory=lambda: {"topk": 0.2, "int8": True})
    byzantine: float = 0.2
    head_rounds: int = 20
    head_local: dict[str, Any] = field(default_factory=lambda: {"epochs": 5, "batch_size": 16, "lr": 0.05, "momentum": 0.9})
    seed: int = 0
    # our FedAvg's round-wise local learning-rate decay (Strategy.lr_decay): the fix for the late-round
    # oscillation (see the gap group); 1.0 = exactly Flower's FedAvg
    lr_decay: float = 0.95
    seeds: tuple[int, ...] = (0, 1, 2)
    # the device-behaviour model (cloud_sync.fl.behaviour) for the behaviour group: a digits-cnn update is
    # ~270 kB dense; training speed in samples/s of this model; the daily cycle is compressed to 30 min
    # so that a task sees devices come and go
    behaviour: dict[str, Any] = field(default_factory=lambda: {"speed_median": 20.0, "speed_sigma": 0.8,
                                                                "speed_min": 1.0, "period_s": 1800.0, "dropout": 0.08})
    round_s: float = 60.0
    behaviour_rounds: int = 20
    behaviour_cases: tuple[str, ...] = ()
    scale_devices: int = 1000
    scale_per_round: int = 100
    scale_rounds: int = 5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- data / model


def digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from compress.zoo.digits_data import digits_split

    return {s: digits_split(s) for s in ("train", "val", "test")}


def new_model(seed: int) -> Any:
    import torch

    from compress.zoo import get_workload

    torch.manual_seed(seed)
    return get_workload("digits-cnn").build(pretrained=False)


def accuracy_of(model: Any, weights: T.Weights, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    from edge_agent.training import load_module_weights

    load_module_weights(model, weights)
    model.eval()
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def centralized(setup: Setup, data: dict, init: T.Weights) -> dict[str, Any]:
    """The same model, initial weights, optimizer and hyper-parameters, on all training data at once,
    for as many sample passes as the federated run makes (rounds x per_round x local epochs / devices)."""
    from edge_agent.training import finetune_torch

    model = new_model(setup.seed)
    x, y = data["train"]
    epochs = max(1, round(setup.rounds * setup.per_round * setup.local["epochs"] / setup.devices))
    t0 = time.perf_counter()
    res = finetune_torch(model, LocalDataset({"image": x}, y), TrainConfig(**{**setup.local, "epochs": epochs}), init)
    acc = accuracy_of(model, res.weights, *data["test"])
    return {"accuracy": acc, "epochs": epochs, "seconds": time.perf_counter() - t0, "optimizer": "SGD+momentum, same as local"}


# --------------------------------------------------------------------------------------------- our engine


def _attack(kind: str):  # noqa: ANN202
    if kind == "sign_flip":
        return lambda d: {k: (-3.0 * v).astype(np.float32) for k, v in d.items()}
    return lambda d: {k: (10.0 * v).astype(np.float32) for k, v in d.items()}


def run_ours(name: str, setup: Setup, data: dict, parts: list[np.ndarray], init: T.Weights, workdir: Path,  # noqa: PLR0913
             strategy: str = "fedavg", codec: dict | None = None, attackers: dict[str, str] | None = None,
             broker: Any = None, strategy_args: dict | None = None, draws: list[list[int]] | None = None,
             train: dict | None = None) -> dict[str, Any]:
    """Our engine on `parts`. draws: force the devices of each round (indices; the gap experiment)."""
    from edge_agent.fl import torch_trainer_fn

    work = workdir / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    x, y = data["train"]
    eval_model = new_model(setup.seed)
    xt, yt = data["test"]
    task = TaskConfig(
        task=name, rounds=setup.rounds, strategy=strategy, strategy_args=strategy_args or {},
        clients_per_round=setup.per_round, over_selection=setup.over_selection, checkin_target=setup.devices,
        checkin_s=5.0, round_s=120.0, train=dict(train or setup.local), codec=codec or {}, group="bench",
        seed=setup.seed,
    )
    devices = [f"dev{i:02d}" for i in range(setup.devices)]
    attackers = attackers or {}
    shared = new_model(setup.seed) if broker is None else None

    def make_client(dev: str, i: int, checkin: Any, update: Any) -> FLClient:
        ds = LocalDataset({"image": x[parts[i]]}, y[parts[i]])
        module = shared if shared is not None else new_model(setup.seed)
        return FLClient(dev, torch_trainer_fn(module, ds, ["image"]), len(parts[i]), work / dev, checkin, update,
                        tamper=_attack(attackers[dev]) if dev in attackers else None)

    evaluate = lambda t, w: {"accuracy": accuracy_of(eval_model, w, xt, yt)}  # noqa: E731
    t0 = time.perf_counter()
    if broker is None:
        hub = InProcessHub()
        agg = Aggregator(work / "fl.sqlite", hub, evaluate=evaluate)
        hub.aggregator = agg
        for i, dev in enumerate(devices):
            hub.attach(dev, make_client(dev, i, *hub.device_links(dev)), group="bench")
        agg.create_task(task, init)
        if draws is not None:
            _force_draws(agg.live[name].strategy, draws, devices)
        while agg.store.task(name)["state"] == "running":
            hub.pump()
            agg.tick()
        transport = "inproc"
    else:
        agg = _run_mqtt(broker, task, init, devices, make_client, evaluate, work)
        transport = "mqtt"
    status = agg.status(name)
    agg.store.close()
    out = _summary(name, status, transport, time.perf_counter() - t0, strategy, codec, attackers)
    out["strategy_args"] = strategy_args or {}
    out["draws"] = [sorted(devices.index(d) for d in r["result"]["devices"]) for r in status["rounds"]
                    if r["state"] == "done"]
    if attackers:
        out["attackers_per_round"] = [sum(d in attackers for d in r["result"]["devices"])
                                      for r in status["rounds"] if r["state"] == "done"]
    return out


def _force_draws(strategy: Any, draws: list[list[int]], devices: list[str]) -> None:
    """Make `strategy` select exactly draws[round] (same train config as its own plan)."""
    own = strategy.configure_round

    def configure_round(rnd: int, available: Any) -> Any:
        plan = own(rnd, available)
        plan.devices = [devices[i] for i in draws[rnd]]
        plan.target = min(plan.target, len(plan.devices))
        return plan

    strategy.configure_round = configure_round


def _run_mqtt(broker: Any, task: TaskConfig, init: T.Weights, devices: list[str], make_client: Any,
              evaluate: Any, work: Path) -> Aggregator:
    from cloud_sync.client import MqttClient
    from cloud_sync.fl.mqtt import MqttCloudTransport, MqttDeviceTransport

    links = []
    for i, dev in enumerate(devices):
        mc = MqttClient(broker.mqtt_config(dev), name=dev)
        link = MqttDeviceTransport(mc, dev, group=task.group)
        link.bind(make_client(dev, i, link.send_checkin, link.send_update))
        mc.start()
        links.append(link)
    for link in links:
        link.client.wait_connected(20)
    cloud = MqttClient(broker.mqtt_config("flbench"), name="flbench")
    transport = MqttCloudTransport(cloud, "pffl")
    agg = Aggregator(work / "fl.sqlite", transport, evaluate=evaluate)
    transport.bind(agg)
    cloud.start().wait_connected(20)
    try:
        agg.create_task(task, init)
        agg.run(task.task, progress=lambda r: log(f"  {task.task} round {r['round']}: {r['result']['metrics']}"))
    finally:
        for link in links:
            link.stop()
            link.client.stop()
        cloud.stop()
    return agg


def _summary(name: str, status: dict, transport: str, seconds: float, strategy: str, codec: dict | None,
             attackers: dict) -> dict[str, Any]:
    done = [r for r in status["rounds"] if r["state"] == "done"]
    acc = [r["result"]["metrics"].get("accuracy") for r in done]
    out = {
        "name": name, "transport": transport, "strategy": strategy, "codec": codec or {}, "attackers": len(attackers),
        "accuracy": acc, "final_accuracy": acc[-1] if acc else None,
        "bytes_up": [r["result"]["bytes_up"] for r in done],
        "bytes_up_all": [r["result"].get("bytes_up_all") for r in done],
        "bytes_down": [r["result"].get("bytes_down") for r in done],
        "round_s": [round(r["result"]["round_s"], 3) for r in done],
        "participants": [r["result"]["participants"] for r in done],
        "bytes_per_update": float(np.mean([r["result"]["bytes_up"] / r["result"]["participants"] for r in done])),
        "counters": status["counters"], "seconds": round(seconds, 1),
    }
    log(f"{name:28s} final acc {out['final_accuracy']:.4f}  up/update {out['bytes_per_update']:.0f} B  "
        f"{out['seconds']}s ({transport})")
    return out


# --------------------------------------------------------------------------------------------- Flower


def run_flower(name: str, setup: Setup, data: dict, parts: list[np.ndarray], init: T.Weights,
               draws: list[list[int]] | None = None, seeds: list[int] | None = None) -> dict[str, Any]:
    """Flower's FedAvg.aggregate_fit over NumPyClient.fit. draws / seeds: force each round's devices and
    local-training seed (the gap experiment); by default Flower-style: uniform draws from rng(seed),
    local seed = the 1-based round number."""
    import flwr
    from flwr.client import NumPyClient
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    from edge_agent.training import finetune_torch

    names = sorted(init)
    x, y = data["train"]
    xt, yt = data["test"]
    module, eval_model = new_model(setup.seed), new_model(setup.seed)

    class DigitsClient(NumPyClient):
        def __init__(self, ds: LocalDataset, seed: int) -> None:
            self.ds, self.seed = ds, seed

        def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
            cfg = TrainConfig(**{**setup.local, "seed": int(config["seed"])})
            res = finetune_torch(module, self.ds, cfg, dict(zip(names, parameters, strict=True)), ["image"])
            return [res.weights[n] for n in names], res.num_samples, {}

    clients = [DigitsClient(LocalDataset({"image": x[p]}, y[p]), i) for i, p in enumerate(parts)]
    strategy = FedAvg(fraction_fit=setup.per_round / setup.devices, min_fit_clients=setup.per_round,
                      min_available_clients=setup.devices, fraction_evaluate=0.0)
    params = ndarrays_to_parameters([init[n] for n in names])
    rng = np.random.default_rng(setup.seed)
    acc, up, down, secs, drawn = [], [], [], [], []
    t_all = time.perf_counter()
    for rnd in range(1, setup.rounds + 1):
        t0 = time.perf_counter()
        chosen = rng.choice(setup.devices, size=setup.per_round, replace=False)
        if draws is not None:
            chosen = draws[rnd - 1]
        drawn.append(sorted(int(c) for c in chosen))
        results, b_up, b_down = [], 0, 0
        for c in chosen:
            b_down += sum(len(t) for t in params.tensors)
            seed = seeds[rnd - 1] if seeds is not None else rnd
            nd, n, metrics = clients[c].fit(parameters_to_ndarrays(params), {"seed": seed})
            fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(nd), n, metrics)
            b_up += sum(len(t) for t in fit.parameters.tensors)
            results.append((None, fit))
        params, _ = strategy.aggregate_fit(rnd, results, [])
        secs.append(round(time.perf_counter() - t0, 3))
        acc.append(accuracy_of(eval_model, dict(zip(names, parameters_to_ndarrays(params), strict=True)), xt, yt))
        up.append(b_up)
        down.append(b_down)
    out = {"name": name, "transport": "inproc (Flower API)", "flwr_version": flwr.__version__, "accuracy": acc,
           "final_accuracy": acc[-1], "bytes_up": up, "bytes_down": down, "round_s": secs,
           "bytes_per_update": float(np.mean(up)) / setup.per_round, "seconds": round(time.perf_counter() - t_all, 1),
           "draws": drawn}
    log(f"{name:28s} final acc {acc[-1]:.4f}  up/update {out['bytes_per_update']:.0f} B  {out['seconds']}s")
    return out


# --------------------------------------------------------------------------------------------- head-only


def head_only(setup: Setup, data: dict, workdir: Path, broker: Any) -> dict[str, Any]:
    """Frozen backbone pretrained on a class-skewed subset; the head is then trained federatedly in NumPy
    (features from onnxruntime) on held-out non-IID data by torch-free device processes."""
    import torch

    from edge_agent.training import finetune_torch, module_weights
    from export.onnx import export_onnx
    from export.runtimes import load_runtime
    from export.specs import TensorSpec

    work = workdir / "head"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    x, y = data["train"]
    rng = np.random.default_rng(setup.seed)
    keep = (y < 5) | (rng.random(len(y)) < 0.05)  # pretraining sees few examples of digits 5-9
    model = new_model(setup.seed)
    finetune_torch(model, LocalDataset({"image": x[keep]}, y[keep]), TrainConfig(epochs=15, batch_size=16, lr=0.05), None, ["image"])
    model.eval()

    class Split(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, image: Any) -> Any:
            f = torch.flatten(self.m.features(image), 1)
            return f, self.m.classifier(f)

    feat_dim = model.classifier.in_features
    export_onnx(Split(model), [TensorSpec("image", ("batch", 1, 8, 8), "float32")],
                [TensorSpec("features", ("batch", feat_dim), "float32"), TensorSpec("logits", ("batch", 10), "float32")],
                [torch.from_numpy(x[:2])], work / "model.onnx")
    head = Head([DenseLayer("classifier.weight", "classifier.bias")], features="features")
    init = {k: v for k, v in module_weights(model).items() if k.startswith("classifier.")}
    held_x = np.concatenate([x[~keep], data["val"][0]])
    held_y = np.concatenate([y[~keep], data["val"][1]])
    parts = dirichlet_split(held_y, setup.devices, setup.alpha, seed=setup.seed + 1)
    np.savez(work / "held.npz", image=held_x, label=held_y)
    (work / "parts.json").write_text(json.dumps([p.tolist() for p in parts]))
    rt = load_runtime(work / "model.onnx")
    xt, yt = data["test"]
    test_feats = HeadTrainer(head, rt).features(LocalDataset({"image": xt}, yt))
    acc = lambda w: float((head.predict(w, test_feats) == yt).mean())  # noqa: E731
    before = acc(init)
    log(f"head-only: frozen backbone + initial head {before:.4f} on test; {len(held_y)} held-out samples")
    # the devices: a separate process with torch blocked
    cfg = {"broker": {"host": "127.0.0.1", "port": broker.port}, "devices": setup.devices, "work": str(work),
           "head": head.to_manifest(), "group": "bench"}
    (work / "worker.json").write_text(json.dumps(cfg))
    import subprocess

    worker = subprocess.Popen([sys.executable, __file__, "--device-worker", str(work / "worker.json")],
                              cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        _wait_file(work / "worker.ready", 120, worker)
        task = TaskConfig(task="head", rounds=setup.head_rounds, clients_per_round=setup.per_round,
                          over_selection=setup.over_selection, checkin_target=setup.devices, checkin_s=5.0,
                          round_s=120.0, train=dict(setup.head_local), group="bench", seed=setup.seed)
        t0 = time.perf_counter()
        agg = _run_mqtt_cloud(broker, task, init, lambda t, w: {"accuracy": acc(w)}, work)
        status = agg.status("head")
        agg.store.close()
    finally:
        (work / "worker.stop").touch()
        out, err = worker.communicate(timeout=60)
    worker_report = json.loads(out or b"{}")
    res = _summary("head_only_numpy", status, "mqtt (devices in a torch-free process)", time.perf_counter() - t0,
                   "fedavg", {}, {})
    res.update({"accuracy_before": before, "device_process_torch": worker_report.get("torch"),
                "device_updates": worker_report.get("updates"), "held_out_samples": int(len(held_y))})
    if worker.returncode:
        res["device_worker_error"] = err.decode()[-2000:]
    return res


def _wait_file(path: Path, timeout: float, proc: Any) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"device worker exited: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > end:
            raise RuntimeError("device worker did not start")
        time.sleep(0.2)


def _run_mqtt_cloud(broker: Any, task: TaskConfig, init: T.Weights, evaluate: Any, work: Path) -> Aggregator:
    from cloud_sync.client import MqttClient
    from cloud_sync.fl.mqtt import MqttCloudTransport

    cloud = MqttClient(broker.mqtt_config("flbench"), name="flbench-head")
    transport = MqttCloudTransport(cloud, "pffl")
    agg = Aggregator(work / "fl.sqlite", transport, evaluate=evaluate)
    transport.bind(agg)
    cloud.start().wait_connected(20)
    try:
        agg.create_task(task, init)
        agg.run(task.task, progress=lambda r: log(f"  head round {r['round']}: {r['result']['metrics']}"))
    finally:
        cloud.stop()
    return agg


def device_worker(cfg_path: str) -> None:
    """Runs the head-only devices (torch is blocked in this process)."""
    from cloud_sync.client import MqttClient
    from cloud_sync.config import MqttConfig
    from cloud_sync.fl.mqtt import MqttDeviceTransport
    from edge_agent.fl import head_trainer_fn
    from export.runtimes import load_runtime

    cfg = json.loads(Path(cfg_path).read_text())
    work = Path(cfg["work"])
    head = Head.from_manifest(cfg["head"])
    with np.load(work / "held.npz", allow_pickle=False) as npz:
        hx, hy = npz["image"], npz["label"]
    parts = json.loads((work / "parts.json").read_text())
    runtime = load_runtime(work / "model.onnx", threads=1)
    links, clients = [], []
    for i, p in enumerate(parts):
        dev = f"dev{i:02d}"
        mc = MqttClient(MqttConfig(host=cfg["broker"]["host"], port=cfg["broker"]["port"], client_id=dev, username=dev,
                                   password=f"pw-{dev}", reconnect_min_s=0.1, reconnect_max_s=1.0), name=dev)
        link = MqttDeviceTransport(mc, dev, group=cfg["group"])
        ds = LocalDataset({"image": hx[p]}, hy[p])
        fl = FLClient(dev, head_trainer_fn(HeadTrainer(head, runtime), ds), len(p), work / "dev" / dev,
                      link.send_checkin, link.send_update)
        link.bind(fl)
        mc.start()
        links.append(link)
        clients.append(fl)
    for link in links:
        link.client.wait_connected(20)
    (work / "worker.ready").touch()
    while not (work / "worker.stop").exists():
        time.sleep(0.2)
    for link in links:
        link.stop()
        link.client.stop()
    print(json.dumps({"torch": "torch" in sys.modules and sys.modules["torch"] is not None,
                      "updates": sum(c.counters["updates"] for c in clients)}))


# --------------------------------------------------------------------------------------------- the gap to Flower


def _splits(setup: Setup, y: np.ndarray, seed: int) -> dict[str, list[np.ndarray]]:
    return {"dirichlet": dirichlet_split(y, setup.devices, setup.alpha, seed=seed),
            "shards": shard_split(y, setup.devices, 2, seed=seed)}


def _init(seed: int) -> T.Weights:
    from edge_agent.training import module_weights

    return module_weights(new_model(seed))


def _mean_std(values: list[float]) -> dict[str, Any]:
    return {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4),
            "per_seed": [round(v, 4) for v in values]}


def gap_group(setup: Setup, data: dict, workdir: Path) -> dict[str, Any]:
    """Ours vs Flower's FedAvg over `setup.seeds` (each seed: its own partitions, initial model, draws).

    flower: Flower's FedAvg (its own uniform draws, local seed = round number); ours_same_config: our
    engine with exactly Flower's algorithm and hyper-parameters (constant local lr); ours: our FedAvg
    with lr_decay; flower_on_our_draws (first seed): Flower given our engine's draws and local seeds,
    the control that isolates the engine from the draw."""
    from dataclasses import replace

    y = data["train"][1]
    runs: dict[str, dict[str, list[float]]] = {}
    curves: dict[str, Any] = {}
    control: dict[str, Any] = {}
    for seed in setup.seeds:
        s = replace(setup, seed=seed)
        init, splits = _init(seed), _splits(s, y, seed)
        for split, parts in splits.items():
            fl = run_flower(f"flower_{split}_s{seed}", s, data, parts, init)
            same = run_ours(f"ours_same_config_{split}_s{seed}", s, data, parts, init, workdir)
            ours = run_ours(f"ours_{split}_s{seed}", s, data, parts, init, workdir,
                            strategy_args={"lr_decay": s.lr_decay})
            for key, run in (("flower", fl), ("ours_same_config", same), ("ours", ours)):
                runs.setdefault(f"{key}_{split}", {}).setdefault("last5", []).append(last5(run))
                curves[f"{key}_{split}_s{seed}"] = {"accuracy": run["accuracy"], "draws": run["draws"]}
            if seed == 0:  # the control (one seed)
                fo = run_flower(f"flower_on_our_draws_{split}", s, data, parts, init, draws=same["draws"],
                                seeds=list(range(s.rounds)))
                diff = [abs(a - b) for a, b in zip(fo["accuracy"], same["accuracy"], strict=True)]
                control[split] = {"flower_on_our_draws_last5": round(last5(fo), 4),
                                  "ours_same_config_last5": round(last5(same), 4),
                                  "flower_own_draws_last5": round(last5(fl), 4),
                                  "max_round_accuracy_diff": round(max(diff), 4),
                                  "rounds_identical": int(sum(d == 0 for d in diff)), "rounds": len(diff),
                                  "accuracy_flower_on_our_draws": fo["accuracy"]}
    summary = {k: _mean_std(v["last5"]) for k, v in runs.items()}
    for k, v in summary.items():
        log(f"gap {k:28s} last-5 mean {v['mean']:.4f} +- {v['std']:.4f}  {v['per_seed']}")
    return {"seeds": list(setup.seeds), "lr_decay": setup.lr_decay, "last5": summary, "same_draws_control": control,
            "curves": curves}


def _merge_gap(a: dict | None, b: dict | None) -> dict | None:
    """The gap group run one seed per process: concatenate the seeds."""
    if not a or not b:
        return a or b
    out = {**a, "seeds": a["seeds"] + b["seeds"], "curves": {**a["curves"], **b["curves"]},
           "same_draws_control": {**a["same_draws_control"], **b["same_draws_control"]}}
    out["last5"] = {k: _mean_std(a["last5"][k]["per_seed"] + b["last5"][k]["per_seed"]) for k in a["last5"]}
    return out


def byz_auto_group(setup: Setup, data: dict, workdir: Path) -> dict[str, Any]:
    """Multi-Krum with f adapting to each round's draw, clean vs 20% attackers, over `setup.seeds`."""
    from dataclasses import replace

    y = data["train"][1]
    n_bad = int(setup.byzantine * setup.devices)
    bad = {f"dev{i:02d}": ("sign_flip" if i % 2 else "scaled") for i in range(0, setup.devices, setup.devices // n_bad)}
    kw = {"byzantine": "auto", "lr_decay": setup.lr_decay}
    out: dict[str, Any] = {"strategy_args": kw, "per_seed": []}
    for seed in setup.seeds:
        s = replace(setup, seed=seed)
        init, parts = _init(seed), _splits(s, y, seed)["dirichlet"]
        clean = run_ours(f"clean_multikrum_auto_s{seed}", s, data, parts, init, workdir, strategy="multikrum",
                         strategy_args=kw)
        byz = run_ours(f"byz_multikrum_auto_s{seed}", s, data, parts, init, workdir, strategy="multikrum",
                       strategy_args=kw, attackers=bad)
        row = {"seed": seed, "clean_last5": round(last5(clean), 4), "byz_last5": round(last5(byz), 4),
               "diff_pt": round(100 * (last5(clean) - last5(byz)), 2),
               "attackers_per_round": byz["attackers_per_round"], "max_attackers_in_a_round": max(byz["attackers_per_round"])}
        log(f"multikrum auto seed {seed}: {row}")
        out["per_seed"].append(row)
    return out


# --------------------------------------------------------------------------------------------- device behaviour


def run_behaviour(name: str, setup: Setup, data: dict, parts: list[np.ndarray], init: T.Weights, workdir: Path,
                  task_kw: dict[str, Any], codec: dict | None = None) -> dict[str, Any]:
    """Our engine on the virtual-clock wire with the device-behaviour model (real training, simulated time)."""
    from cloud_sync.fl.behaviour import BehaviourHub, BehaviourModel, VirtualClock
    from edge_agent.fl import torch_trainer_fn

    work = workdir / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    x, y = data["train"]
    xt, yt = data["test"]
    eval_model, shared = new_model(setup.seed), new_model(setup.seed)
    clock = VirtualClock(0.0)
    hub = BehaviourHub(clock, seed=setup.seed)
    evaluate = lambda t, w: {"accuracy": accuracy_of(eval_model, w, xt, yt)}  # noqa: E731
    agg = Aggregator(work / "fl.sqlite", hub, evaluate=evaluate, clock=clock)
    hub.aggregator = agg
    behaviour = BehaviourModel(**setup.behaviour).sample(setup.devices, seed=setup.seed)
    for i, p in enumerate(parts):
        dev = f"dev{i:02d}"
        checkin, update = hub.device_links(dev)
        ds = LocalDataset({"image": x[p]}, y[p])
        fl = FLClient(dev, torch_trainer_fn(shared, ds, ["image"]), len(p), work / dev, checkin, update, clock=clock)
        hub.attach(dev, fl, behaviour[i], work=len(p) * setup.local["epochs"])
    task_kw = {"rounds": setup.rounds, **task_kw}
    task = TaskConfig(task=name, clients_per_round=setup.per_round, train=dict(setup.local),
                      codec=codec or {}, round_s=setup.round_s, checkin_s=5.0, seed=setup.seed, **task_kw)
    t0 = time.perf_counter()
    agg.create_task(task, init)
    status = hub.run(agg, name, tick_s=1.0, max_time=200_000)
    agg.store.close()
    out = _summary(name, status, "virtual clock + behaviour model", time.perf_counter() - t0, task.strategy, codec, {})
    done = [r for r in status["rounds"] if r["state"] == "done"]
    out.update({"sim_time": [round(r["result"]["closed_at"], 1) for r in done], "task": {**task_kw},
                "hub": dict(hub.counters), "behaviour": BehaviourModel.summary(behaviour),
                "staleness_mean": float(np.mean([s for r in done for s in r["result"].get("staleness", [0])]))})
    return out


def run_flower_behaviour(name: str, setup: Setup, data: dict, parts: list[np.ndarray], init: T.Weights) -> dict[str, Any]:
    """Flower's FedAvg (its aggregate_fit) with Flower's synchronous semantics under the same behaviour
    model: each round samples per_round of the devices online at its start and waits for all of them;
    a device that drops out (or goes offline) is a failure that only the round timeout (= our
    round_s) ends; the failures are left out of the aggregate (accept_failures=True)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    from cloud_sync.fl.behaviour import BehaviourModel
    from edge_agent.training import finetune_torch

    names = sorted(init)
    x, y = data["train"]
    xt, yt = data["test"]
    module, eval_model = new_model(setup.seed), new_model(setup.seed)
    behaviour = BehaviourModel(**setup.behaviour).sample(setup.devices, seed=setup.seed)
    rng = np.random.default_rng(setup.seed)
    strategy = FedAvg(fraction_fit=setup.per_round / setup.devices, min_fit_clients=1, min_available_clients=1,
                      fraction_evaluate=0.0, accept_failures=True)
    params = ndarrays_to_parameters([init[n] for n in names])
    nbytes = sum(len(t) for t in params.tensors)
    t, acc, sim = 0.0, [], []
    for rnd in range(1, setup.rounds + 1):
        online = [i for i in range(setup.devices) if behaviour[i].online(t)]
        chosen = rng.choice(online, size=min(setup.per_round, len(online)), replace=False)
        results, times, failed = [], [], 0
        for c in chosen:
            b = behaviour[c]
            dur = 2 * b.latency_s + nbytes / b.down_bps + len(parts[c]) * setup.local["epochs"] / b.speed + nbytes / b.up_bps
            if rng.random() < b.dropout or b.offline_at(t) < t + dur:
                failed += 1
                continue
            cfg = TrainConfig(**{**setup.local, "seed": rnd})
            res = finetune_torch(module, LocalDataset({"image": x[parts[c]]}, y[parts[c]]), cfg,
                                 dict(zip(names, parameters_to_ndarrays(params), strict=True)), ["image"])
            fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([res.weights[n] for n in names]), res.num_samples, {})
            results.append((None, fit))
            times.append(dur)
        t += setup.round_s if failed or not times else max(times)
        if results:
            params, _ = strategy.aggregate_fit(rnd, results, [None] * failed)
        acc.append(accuracy_of(eval_model, dict(zip(names, parameters_to_ndarrays(params), strict=True)), xt, yt))
        sim.append(round(t, 1))
    log(f"{name:28s} final acc {acc[-1]:.4f}  sim time {t:.0f} s")
    return {"name": name, "transport": "Flower API, simulated timing", "accuracy": acc, "final_accuracy": acc[-1],
            "sim_time": sim, "bytes_per_update": float(nbytes), "bytes_up": [nbytes * setup.per_round] * len(acc),
            "bytes_down": [nbytes * setup.per_round] * len(acc), "round_s": list(np.diff([0.0, *sim]))}


def behaviour_group(setup: Setup, data: dict, workdir: Path, central: float) -> dict[str, Any]:
    """Sync FedAvg (over-selection 1.0, 1.3 first arrivals, 1.3 with the grace rule) vs FedBuff (dense and
    top-k + int8) vs Flower's FedAvg, all under the device-behaviour model, seed setup.seed, Dirichlet."""
    from dataclasses import replace

    setup = replace(setup, rounds=setup.behaviour_rounds)
    parts = _splits(setup, data["train"][1], setup.seed)["dirichlet"]
    init = _init(setup.seed)
    dec = {"lr_decay": setup.lr_decay}
    k = setup.per_round
    # FedBuff aggregates as often as K updates arrive (no straggler wait): it gets twice the aggregations
    # of the synchronous runs and is compared on simulated time; lr_decay per aggregation is set so the
    # rate falls over its run as it does over the synchronous one
    fedbuff = {"strategy": "fedbuff", "rounds": 2 * setup.rounds,
               "strategy_args": {"lr_decay": setup.lr_decay ** 0.5, "buffer_size": k,
                                 "concurrency": k + k // 2, "max_staleness": 5}}
    cases = {
        "sync_os1.0": ({"over_selection": 1.0, "strategy_args": dec}, None),
        "sync_os1.3_first_k": ({"over_selection": 1.3, "over_selection_grace": 0.0, "strategy_args": dec}, None),
        "sync_os1.3": ({"over_selection": 1.3, "over_selection_grace": 0.5, "strategy_args": dec}, None),
        "fedbuff": (fedbuff, None),
        "fedbuff_compressed": (fedbuff, setup.codec),
    }
    only = set(setup.behaviour_cases) if setup.behaviour_cases else {*cases, "flower"}
    runs = {name: run_behaviour(f"beh_{name}", setup, data, parts, init, workdir, kw, codec)
            for name, (kw, codec) in cases.items() if name in only}
    if "flower" in only:
        runs["flower"] = run_flower_behaviour("beh_flower", setup, data, parts, init)
    return _behaviour_table(runs, central, setup)


def _behaviour_table(runs: dict[str, Any], central: float, setup: Setup) -> dict[str, Any]:
    k = setup.per_round
    target = 0.97 * central
    table = {}
    for name, run in runs.items():
        hit = [t for a, t in zip(run["accuracy"], run["sim_time"], strict=True) if a >= target]
        table[name] = {"last5": round(last5(run), 4), "final": round(run["accuracy"][-1], 4),
                       "sim_time_total_s": run["sim_time"][-1], "sim_round_s_mean": round(run["sim_time"][-1] / len(run["sim_time"]), 1),
                       "time_to_97pct_central_s": hit[0] if hit else None,
                       "bytes_per_update": round(run["bytes_per_update"]),
                       "participants_mean": float(np.mean(run.get("participants", [k]))),
                       "staleness_mean": run.get("staleness_mean")}
        log(f"behaviour {name:22s} {table[name]}")
    first = next((r for r in runs.values() if "behaviour" in r), {})
    return {"target_accuracy": target, "central": central, "table": table, "runs": runs,
            "model": {**setup.behaviour, "note": "parametric model, see cloud_sync/fl/behaviour.py"},
            "rounds": setup.rounds, "behaviour_summary": first.get("behaviour")}


# --------------------------------------------------------------------------------------------- 1,000 devices


def _rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scale_group(setup: Setup, data: dict, workdir: Path) -> dict[str, Any]:
    """A task across `scale_devices` registered devices (one MQTT connection and account each, over a real
    mosquitto; lightweight: a NumPy head on frozen random features, one selector thread for all), with
    `scale_per_round` per round: time and memory per round, and every update accounted for."""
    from cloud_sync.client import MqttClient
    from cloud_sync.fl.lightfleet import LightFleet
    from cloud_sync.fl.mqtt import MqttCloudTransport
    from tests.mosquitto import Mosquitto

    n, k = setup.scale_devices, setup.scale_per_round
    names = [f"d{i:04d}" for i in range(n)]
    x, y = data["train"]
    xt, yt = data["test"]
    flat, flat_t = x.reshape(len(x), -1), xt.reshape(len(xt), -1)
    head = Head([DenseLayer("w", "b")])
    rng = np.random.default_rng(setup.seed)
    work = workdir / "scale"
    work.mkdir(parents=True, exist_ok=True)
    accounts = {"flagg": ("cloud", None), **{d: ("device", "big") for d in names}}
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    broker = Mosquitto(work, accounts=accounts, persistence=False).start()
    try:
        def factory(dev: str):  # noqa: ANN202
            idx = rng.choice(len(y), 20, replace=False)
            ds = LocalDataset({"features": flat[idx]}, y[idx])
            return lambda checkin, update: FLClient(dev, _head_fit(head, ds), 20, work / "dev" / dev, checkin, update)

        fleet = LightFleet(broker.mqtt_config, {d: factory(d) for d in names}, group="big").start(timeout=600)
        connect_s = time.perf_counter() - t0
        rss_fleet = _rss_mb()
        log(f"scale: {n} devices connected in {connect_s:.1f} s, process RSS {rss_fleet:.0f} MB")
        cloud = MqttClient(broker.mqtt_config("flagg"), name="flagg")
        transport = MqttCloudTransport(cloud, "pffl")
        evaluate = lambda t, w: {"accuracy": float((head.predict(w, flat_t) == yt).mean())}  # noqa: E731
        agg = Aggregator(work / "fl.sqlite", transport, evaluate=evaluate)
        transport.bind(agg)
        cloud.start().wait_connected(20)
        rss_round: list[float] = []
        task = TaskConfig(task="thousand", rounds=setup.scale_rounds, clients_per_round=k, over_selection=1.3,
                          checkin_s=30, round_s=120, train={"epochs": 2, "lr": 0.1}, group="big", seed=setup.seed)
        try:
            agg.create_task(task, head.init([64, 10], seed=setup.seed))
            st = agg.run("thousand", timeout=1800, progress=lambda r: (rss_round.append(_rss_mb()), log(
                f"  scale round {r['round']}: {r['result']['participants']} updates, {r['result']['round_s']:.1f} s, "
                f"{r['result']['metrics']}")))
        finally:
            fleet.stop()
            cloud.stop()
            agg.store.close()
        broker_rss = _rss_mb(broker.proc.pid) if broker.proc else None
    finally:
        broker.stop()
    done = [r for r in st["rounds"] if r["state"] == "done"]
    c = st["counters"]
    counted = sum(v for key, v in c.items() if key in ("accepted", "surplus", "late", "duplicate", "unselected")
                  or key.startswith("rejected_"))
    sent = fleet.sent()
    out = {"devices": n, "per_round": k, "over_selection": 1.3, "rounds": len(done), "state": st["state"],
           "connect_s": round(connect_s, 1), "round_s": [round(r["result"]["round_s"], 2) for r in done],
           "participants": [r["result"]["participants"] for r in done],
           "accuracy": [r["result"]["metrics"]["accuracy"] for r in done],
           "checkins_sent": fleet.sent("fl/up/checkin"), "updates_sent": sent, "updates_counted": counted,
           "lost_updates": sent - counted, "counters": c, "device_errors": fleet.errors,
           "rss_mb": {"before": round(rss0, 1), "fleet_connected": round(rss_fleet, 1),
                      "per_round": [round(v, 1) for v in rss_round], "broker": broker_rss},
           "note": "devices, aggregator and mosquitto on one loaded 2-core machine; the process RSS includes torch "
                   "and the benchmark's data"}
    log(f"scale: {json.dumps({k2: v for k2, v in out.items() if k2 != 'counters'})}")
    return out


def _head_fit(head: Head, ds: LocalDataset):  # noqa: ANN202
    """A NumPy head on raw pixels (the lightweight device: no runtime, no torch)."""
    trainer = HeadTrainer(head)

    def fit(weights: Any, train: dict[str, Any]) -> Any:
        return trainer.fit(weights, ds, TrainConfig.from_dict(train))

    return fit


# --------------------------------------------------------------------------------------------- main


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    panels = [("Dirichlet(0.5)", "dirichlet"), ("2 shards per device", "shards"), ("20% Byzantine, Dirichlet(0.5)", "byz"),
              ("head-only (NumPy, frozen backbone)", "head")]
    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
    for ax, (title, key) in zip(axes, panels, strict=True):
        for name, run in runs.items():
            if key == "byz" and not (name.startswith("byz_") or name.startswith("clean_")):
                continue
            if key in ("dirichlet", "shards") and not name.endswith(key):
                continue
            if key == "head" and not name.startswith("head"):
                continue
            ax.plot(range(1, len(run["accuracy"]) + 1), run["accuracy"], label=name)
        if key in ("dirichlet", "shards"):
            ax.axhline(result["centralized"]["accuracy"], ls="--", c="k", label="centralized")
        if key == "head" and "head_only_numpy" in runs:
            ax.axhline(runs["head_only_numpy"]["accuracy_before"], ls="--", c="k", label="before (frozen backbone)")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if "--device-worker" in sys.argv:
        device_worker(sys.argv[sys.argv.index("--device-worker") + 1])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 rounds instead of 30 (smoke test)")
    ap.add_argument("--out", default=str(OUT / "federated.json"))
    ap.add_argument("--no-mqtt", action="store_true", help="run everything over the in-process wire")
    ap.add_argument("--only", default="", help="comma list of run groups: main,flower,byz,head,gap,byz_auto,behaviour,"
                    "scale (default: all)")
    ap.add_argument("--merge", action="store_true", help="update the groups run in an existing --out JSON, keep the rest")
    ap.add_argument("--behaviour-cases", default="", help="subset of the behaviour group: sync_os1.0,"
                    "sync_os1.3_first_k,sync_os1.3,fedbuff,fedbuff_compressed,flower")
    ap.add_argument("--seeds", default="", help="comma list of seeds for the gap and byz_auto groups (default 0,1,2)")
    ap.add_argument("--over-selection", type=float, default=None, help="devices selected per round / needed (default 1.0)")
    ap.add_argument("--summarize", default="", help="recompute goals and the plot of an existing JSON result")
    ap.add_argument("--combine", default="", help="comma list of JSON results (groups run in separate processes) "
                    "merged into --out: later files win per top-level key, runs are merged by name")
    args = ap.parse_args()
    if args.combine:
        result = {"runs": {}}
        for part in args.combine.split(","):
            data = json.loads(Path(part).read_text())
            runs = {**result["runs"], **data.get("runs", {})}
            gap = _merge_gap(result.get("gap"), data.get("gap"))
            beh = result.get("behaviour"), data.get("behaviour")
            result.update(data)
            result["runs"] = runs
            if gap:
                result["gap"] = gap
            if beh[0] and beh[1]:  # behaviour cases run in separate processes: later runs win by name
                merged = {**beh[0]["runs"], **beh[1]["runs"]}
                result["behaviour"] = {**beh[1], **_behaviour_table(merged, beh[1]["central"],
                                                                    Setup(rounds=beh[1]["rounds"]))}
        result["goals"] = goals(result)
        Path(args.out).write_text(json.dumps(result, indent=1))
        if result["runs"]:
            plot(result, Path(args.out).with_suffix(".png"))
        print(json.dumps(_digest(result), indent=1))
        return
    if args.summarize:
        result = json.loads(Path(args.summarize).read_text())
        result["goals"] = goals(result)
        Path(args.summarize).write_text(json.dumps(result, indent=1))
        plot(result, Path(args.summarize).with_suffix(".png"))
        print(json.dumps(_digest(result), indent=1))
        return
    setup = Setup()
    if args.over_selection is not None:
        setup.over_selection = args.over_selection
    if args.quick:
        setup.rounds, setup.head_rounds = 8, 6
        setup.scale_devices, setup.scale_per_round, setup.scale_rounds = 200, 20, 2
        setup.behaviour_rounds = 8
    if args.behaviour_cases:
        setup.behaviour_cases = tuple(args.behaviour_cases.split(","))
    if args.seeds:
        setup.seeds = tuple(int(v) for v in args.seeds.split(","))
    groups = set(filter(None, args.only.split(","))) or {"main", "flower", "byz", "head", "gap", "byz_auto",
                                                         "behaviour", "scale"}
    import torch

    torch.set_num_threads(1)
    data = digits()
    y = data["train"][1]
    splits = {"dirichlet": dirichlet_split(y, setup.devices, setup.alpha, seed=setup.seed),
              "shards": shard_split(y, setup.devices, 2, seed=setup.seed)}
    from edge_agent.training import module_weights

    init = module_weights(new_model(setup.seed))
    result: dict[str, Any] = {"setup": asdict(setup), "model": "digits-cnn", "params": int(sum(v.size for v in init.values())),
                              "devices_simulated": __doc__.split("How devices are simulated: ")[1].split("\n\n")[0]
                              .replace("\n", " "), "runs": {}}
    out = Path(args.out)
    if args.merge and out.exists():
        old = json.loads(out.read_text())
        result = {**old, "setup": asdict(setup), "runs": old.get("runs", {})}
    if ("centralized" not in result or not args.merge) and groups - {"gap", "byz_auto", "scale"}:
        result["centralized"] = centralized(setup, data, init)
        log(f"centralized: {result['centralized']}")
    # simulated devices write their FL state durably (fsync) like real ones: on a tmpfs when there is one,
    # so a loaded disk does not set the pace of a simulation
    shm = Path("/dev/shm")
    workdir = Path(tempfile.mkdtemp(prefix="pf-fl-bench-", dir=shm if shm.is_dir() else None))
    broker = None
    if not args.no_mqtt:
        from tests.mosquitto import Mosquitto

        accounts = {"flbench": ("cloud", None), **{f"dev{i:02d}": ("device", "bench") for i in range(setup.devices)}}
        broker = Mosquitto(workdir, accounts=accounts, persistence=False).start()
    runs = result["runs"]
    try:
        if "main" in groups:
            for split in ("dirichlet", "shards"):
                b = broker if split == "dirichlet" else None
                runs[f"fedavg_{split}"] = run_ours(f"fedavg_{split}", setup, data, splits[split], init, workdir, broker=b)
                runs[f"compressed_{split}"] = run_ours(f"compressed_{split}", setup, data, splits[split], init, workdir,
                                                       codec=setup.codec, broker=b)
        if "flower" in groups:
            try:
                import flwr  # noqa: F401
            except ImportError:
                result["flower"] = "not installed (pip install flwr): Flower runs skipped"
                log(result["flower"])
            else:
                for split in ("dirichlet", "shards"):
                    runs[f"flower_{split}"] = run_flower(f"flower_{split}", setup, data, splits[split], init)
        if "byz" in groups:
            n_bad = int(setup.byzantine * setup.devices)
            bad = {f"dev{i:02d}": ("sign_flip" if i % 2 else "scaled") for i in range(0, setup.devices, setup.devices // n_bad)}
            # 20% of the fleet is Byzantine, but a round's 10 draws can hold 3-5 of them: the robust rules
            # are set for up to 30% per round (trimmed mean drops 3 per side; Multi-Krum assumes f = 3 and
            # averages the n - f = 7 best-scored updates)
            robust = {"fedavg": {}, "median": {}, "trimmed_mean": {"beta": 0.3}, "multikrum": {"byzantine": 0.3}}
            for strat, kw in robust.items():
                if strat != "fedavg":
                    runs[f"clean_{strat}"] = run_ours(f"clean_{strat}", setup, data, splits["dirichlet"], init, workdir,
                                                      strategy=strat, strategy_args=kw)
                runs[f"byz_{strat}"] = run_ours(f"byz_{strat}", setup, data, splits["dirichlet"], init, workdir,
                                                strategy=strat, strategy_args=kw, attackers=bad)
        if "head" in groups and broker is not None:
            runs["head_only_numpy"] = head_only(setup, data, workdir, broker)
    finally:
        if broker is not None:
            broker.stop()
    later = {"gap": ("gap", lambda: gap_group(setup, data, workdir)),
             "byz_auto": ("byzantine_auto", lambda: byz_auto_group(setup, data, workdir)),
             "behaviour": ("behaviour", lambda: behaviour_group(setup, data, workdir, result["centralized"]["accuracy"])),
             "scale": ("scale", lambda: scale_group(setup, data, workdir))}
    for group, (key, fn) in later.items():
        if group in groups:
            try:
                result[key] = fn()
            except Exception as exc:  # noqa: BLE001 - keep the other groups' results
                import traceback

                traceback.print_exc()
                result[key + "_error"] = f"{type(exc).__name__}: {exc}"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))  # partial results survive a later failure
    result["machine_note"] = "2 shared cores, loaded by other jobs: wall-clock seconds are noisy; accuracy and " \
                             "simulated (virtual-clock) times are not"
    result["goals"] = goals(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if result["runs"]:
        plot(result, out.with_suffix(".png"))
    print(json.dumps(_digest(result), indent=1))
    shutil.rmtree(workdir, ignore_errors=True)


def last5(run: dict[str, Any]) -> float:
    """Mean test accuracy of the last 5 rounds: single-round accuracy on non-IID data is noisy."""
    return float(np.mean(run["accuracy"][-5:]))


def _digest(result: dict[str, Any]) -> dict[str, Any]:
    runs = result["runs"]
    extra = {}
    if "gap" in result:
        extra["gap_last5_mean_std"] = result["gap"]["last5"]
        extra["gap_same_draws_control"] = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("accuracy")}
                                           for k, v in result["gap"]["same_draws_control"].items()}
    if "behaviour" in result:
        extra["behaviour"] = result["behaviour"]["table"]
    if "scale" in result:
        extra["scale"] = {k: v for k, v in result["scale"].items() if k not in ("counters",)}
    if "byzantine_auto" in result:
        extra["byzantine_auto"] = [{k: v for k, v in r.items() if k != "attackers_per_round"}
                                   for r in result["byzantine_auto"]["per_seed"]]
    return {**extra, "goals": result["goals"], "centralized": result.get("centralized", {}).get("accuracy"),
            "accuracy_last5": {k: round(last5(v), 4) for k, v in runs.items()},
            "bytes_up_per_update": {k: round(v["bytes_per_update"]) for k, v in runs.items()},
            "bytes_down_per_round": {k: round(float(np.mean(v["bytes_down"]))) for k, v in runs.items()},
            "round_s_median": {k: round(float(np.median(v["round_s"])), 3) for k, v in runs.items()}}


def goals(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals. 'final' accuracy = mean of the last 5 rounds (see last5)."""
    runs, central = result["runs"], result.get("centralized", {}).get("accuracy", 1.0)
    for run in runs.values():
        run["final_accuracy_last5"] = last5(run)
    g: dict[str, Any] = {}
    fed = runs.get("fedavg_dirichlet")
    if fed:
        within = [i + 1 for i, a in enumerate(fed["accuracy"]) if a >= 0.97 * central]
        g["fedavg_reaches_97pct_of_centralized"] = {"first_round": within[0] if within else None,
                                                     "ok": bool(within) and within[0] <= 30}
    comp = runs.get("compressed_dirichlet")
    if fed and comp:
        ratio = fed["bytes_per_update"] / comp["bytes_per_update"]
        g["compressed_10x_fewer_bytes_up"] = {"ratio": round(ratio, 2), "ok": ratio >= 10}
        diff = last5(fed) - last5(comp)
        g["compressed_within_1pt"] = {"diff_pt": round(100 * diff, 2), "ok": diff <= 0.01}
        if "fedavg_shards" in runs and "compressed_shards" in runs:
            d2 = last5(runs["fedavg_shards"]) - last5(runs["compressed_shards"])
            g["compressed_within_1pt_shards"] = {"diff_pt": round(100 * d2, 2), "ok": d2 <= 0.01}
    head = runs.get("head_only_numpy")
    if head:
        g["head_only_improves"] = {"before": head["accuracy_before"], "after": last5(head),
                                   "ok": last5(head) > head["accuracy_before"] and not head["device_process_torch"]}
    clean = runs.get("fedavg_dirichlet")
    if clean:
        for strat in ("median", "trimmed_mean", "multikrum"):
            if f"byz_{strat}" in runs and f"clean_{strat}" in runs:
                own = last5(runs[f"clean_{strat}"]) - last5(runs[f"byz_{strat}"])
                g[f"byzantine_{strat}_within_2pt_of_its_clean_run"] = {"diff_pt": round(100 * own, 2), "ok": own <= 0.02}
                diff = last5(clean) - last5(runs[f"byz_{strat}"])
                g[f"byzantine_{strat}_vs_clean_fedavg_pt"] = round(100 * diff, 2)
        if "byz_fedavg" in runs:
            g["byzantine_fedavg_degradation_pt"] = round(100 * (last5(clean) - last5(runs["byz_fedavg"])), 2)
    gap = result.get("gap")
    if gap:
        for split in ("dirichlet", "shards"):
            o, f = gap["last5"][f"ours_{split}"], gap["last5"][f"flower_{split}"]
            g[f"ours_ge_flower_last5_3seeds_{split}"] = {"ours": o, "flower": f, "ok": o["mean"] >= f["mean"]}
    byz = result.get("byzantine_auto")
    if byz:
        g["multikrum_auto_within_2pt_of_clean_every_seed"] = {"diff_pt": [r["diff_pt"] for r in byz["per_seed"]],
                                                             "ok": all(r["diff_pt"] <= 2 for r in byz["per_seed"])}
    beh = result.get("behaviour")
    if beh:
        t = beh["table"]
        os_diff = 100 * (t["sync_os1.0"]["last5"] - t["sync_os1.3"]["last5"])
        g["over_selection_1.3_within_0.5pt_of_1.0_and_faster"] = {
            "diff_pt": round(os_diff, 2), "first_k_diff_pt": round(100 * (t["sync_os1.0"]["last5"] - t["sync_os1.3_first_k"]["last5"]), 2),
            "round_s": {k: t[k]["sim_round_s_mean"] for k in ("sync_os1.0", "sync_os1.3", "sync_os1.3_first_k")},
            "ok": os_diff <= 0.5 and t["sync_os1.3"]["sim_round_s_mean"] < t["sync_os1.0"]["sim_round_s_mean"]}
        sync, fb, fbc = t["sync_os1.3"], t["fedbuff"], t["fedbuff_compressed"]
        speed = (sync["time_to_97pct_central_s"] / fb["time_to_97pct_central_s"]
                 if sync["time_to_97pct_central_s"] and fb["time_to_97pct_central_s"] else None)
        g["fedbuff_within_1pt_of_sync_final"] = {"sync": sync["last5"], "fedbuff": fb["last5"],
                                                  "ok": 100 * (sync["last5"] - fb["last5"]) <= 1}
        ttas = {k: t[k]["time_to_97pct_central_s"] for k in t}
        vs = {f"vs_{k}": round(ttas[k] / ttas["fedbuff"], 2) for k in ("sync_os1.0", "flower", "sync_os1.3_first_k")
              if ttas.get(k) and ttas.get("fedbuff")}
        g["fedbuff_1.3x_faster_to_97pct_central"] = {"speedup_vs_sync_os1.3": round(speed, 2) if speed else None,
                                                     **vs, "time_to_97pct_s": ttas,
                                                     "ok": bool(speed and speed >= 1.3)}
        ratio = fb["bytes_per_update"] / max(1, fbc["bytes_per_update"])
        g["fedbuff_compressed_10x_fewer_bytes_up"] = {"ratio": round(ratio, 2), "ok": ratio >= 10}
    sc = result.get("scale")
    if sc:
        g["scale_1000_devices_0_lost"] = {"devices": sc["devices"], "rounds": sc["rounds"],
                                          "lost_updates": sc["lost_updates"],
                                          "ok": sc["state"] == "finished" and sc["lost_updates"] == 0}
    return g


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
