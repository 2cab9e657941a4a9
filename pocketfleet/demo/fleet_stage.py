"""The fleet stage of `pocketfleet demo`: an embedded broker, a cloud worker and several real agents.

1. Every agent (an in-process `edge_agent.Agent` with its own local API, model store and MQTT link)
   starts on version 1 of a package that declares a trainable head.
2. A canary rollout of version 2 (the golden-set gate judges the canary) reaches every agent over MQTT.
3. Each agent gets a non-IID share of the digits training data through `POST /v1/samples`; federated
   rounds retrain the head from scratch on the agents (features from the served model, NumPy SGD), with
   top-k + int8 compressed updates; the data never leaves the agents.
4. The federated head becomes version 3 (only the head member changes), rolled out like any release:
   the agents fetch only the chunks they lack, and then answer with the federated head.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pocketfleet.sim.fleet import Fleet

Say = Callable[[str], None]


def run_fleet_stage(
    workdir: Path, keys_dir: Path, v1: Path, v2: Path, devices: int = 4, rounds: int = 3, say: Say = print,
) -> dict[str, Any]:
    from compress.zoo.digits_data import digits_split
    from edge_agent import Agent, AgentConfig, Client

    shutil.rmtree(workdir, ignore_errors=True)
    ids = [f"edge-{i}" for i in range(devices)]
    fleet = Fleet(workdir, group="demo", keys_dir=keys_dir,
                  device_dirs={d: workdir / "agents" / d for d in ids}).start(start_devices=False)
    agents: dict[str, Agent] = {}
    try:
        say(f"embedded broker on {fleet.broker.host}:{fleet.broker.port}; starting {devices} agents on v1")
        for d in ids:
            mqtt = {**dataclasses.asdict(fleet.mqtt_for(d)), "group": fleet.group}
            cfg = AgentConfig(state_dir=str(fleet.state_dir(d)), trust=str(fleet.trust), listen="127.0.0.1:0",
                              device_id=d, watch_interval_s=0.1, drain_interval_s=0.5, mqtt=mqtt)
            agent = Agent(cfg)
            agent.store.install(v1)
            agents[d] = agent.start()
        fleet.wait_online()

        canary = _rollout(fleet, v2, "25%", ["golden>=0.75"], say)

        x, y = digits_split("train")
        xt, yt = digits_split("test")
        from cloud_sync.fl.partition import dirichlet_split

        for d, part in zip(ids, dirichlet_split(y, devices, 0.5, seed=0), strict=True):
            with Client(agents[d].urls()[0]) as client:
                for chunk in np.array_split(part, -(-len(part) // 200)):  # batches of at most 200
                    client.add_samples({"image": x[chunk]}, y[chunk])
        say("posted a Dirichlet(0.5) share of the digits training data to each agent (POST /v1/samples)")
        fl = _federated(fleet, v2, xt, yt, rounds, devices, say)

        final = _rollout(fleet, fl.pop("package"), "25%", ["golden>=0.75"], say)
        accuracy = _served_accuracy(agents, xt, yt)
        return {
            "devices": ids,
            "canary_rollout": canary,
            "federated": fl,
            "head_rollout": final,
            "served_accuracy": accuracy,
            "device_rows": [{"device": d, "model": n, "version": v, "test_top1": accuracy[d]}
                            for d in ids for n, v in agents[d].served().items()],
        }
    finally:
        for agent in agents.values():
            agent.stop()
        fleet.stop()


def _rollout(fleet: Fleet, package: Path, canary: str, gates: list[str], say: Say) -> dict[str, Any]:
    out = fleet.release(package, canary=canary, gates=gates)
    say(f"release {out['release_id']}: canary {canary} with gates {gates}, then the whole group")
    final = fleet.wait(out["rollout_id"], timeout=300)
    if final["state"] != "complete":
        from pocketfleet import PocketfleetError

        raise PocketfleetError(f"rollout {out['rollout_id']} ended {final['state']}: {final.get('reason')}")
    versions = fleet.versions()
    say(f"rollout {final['state']}: " + ", ".join(f"{d} v{v}" for d, v in versions.items()))
    return {"rollout_id": out["rollout_id"], "state": final["state"], "versions": versions,
            "bytes": _bytes(final)}


def _bytes(rollout: dict[str, Any]) -> dict[str, int]:
    """Package bytes the devices received over MQTT and reused from what they had, as they reported it."""
    progress = [d["progress"] or {} for d in rollout["devices"]]
    return {"received": sum(p.get("bytes_rx", 0) for p in progress),
            "reused": sum(p.get("bytes_reused", 0) for p in progress)}


def _federated(fleet: Fleet, base: Path, xt: np.ndarray, yt: np.ndarray, rounds: int, devices: int,
               say: Say) -> dict[str, Any]:
    from cloud_sync.client import MqttClient
    from cloud_sync.fl.mqtt import MqttCloudTransport
    from cloud_sync.fl.release import head_release
    from cloud_sync.fl.rounds import Aggregator, TaskConfig
    from edge_agent.training import HeadTrainer, LocalDataset
    from export import extract_package

    with tempfile.TemporaryDirectory(prefix="pf-demo-head-") as tmp:
        extract_package(base, Path(tmp) / "pkg", trust=fleet.trust)
        trainer = HeadTrainer.from_package_dir(Path(tmp) / "pkg")
        test_features = trainer.features(LocalDataset({"image": xt}, yt))
    head, served = trainer.head, trainer.initial
    dims = [served[head.layers[0].weight].shape[1], served[head.layers[-1].weight].shape[0]]

    def accuracy(weights: dict[str, np.ndarray]) -> float:
        return float((head.predict(weights, test_features) == yt).mean())

    cloud = MqttClient(fleet.mqtt_for("cloud-fl"), name="cloud-fl")
    transport = MqttCloudTransport(cloud, shared_group=None)  # the embedded broker speaks MQTT 3.1.1
    agg = Aggregator(fleet.workdir / "cloud" / "fl.sqlite", transport, evaluate=lambda t, w: {"accuracy": accuracy(w)})
    transport.bind(agg)
    start = head.init(dims, seed=0)  # the head is retrained from scratch on the agents
    rows: list[dict[str, Any]] = []
    try:
        cloud.start().wait_connected(20)
        task = TaskConfig(task="demo-head", rounds=rounds, clients_per_round=devices, over_selection=1.0,
                          min_clients=max(1, devices // 2), checkin_target=devices, checkin_s=5.0, round_s=60.0,
                          group=fleet.group, train={"epochs": 5, "lr": 0.1},
                          codec={"topk": 0.25, "int8": True, "min_sparse": 1})
        agg.create_task(task, start)
        say(f"federated rounds: head retrained from scratch (test top-1 {accuracy(start):.3f} before)")

        def progress(r: dict[str, Any]) -> None:
            res = r["result"]
            rows.append({"round": r["round"] + 1, "devices": res["participants"],
                         "test_top1": round(res["metrics"]["accuracy"], 4), "bytes_up": res["bytes_up"]})
            say(f"round {r['round'] + 1}/{rounds}: {res['participants']} agents, test top-1 "
                f"{res['metrics']['accuracy']:.3f}, {res['bytes_up']} bytes up")

        status = agg.run(task.task, timeout=600, progress=progress)
        weights = agg.weights(task.task)
    finally:
        cloud.stop()
        agg.store.close()
    from export.package import read_manifest

    version = read_manifest(base).version + 1
    out = fleet.workdir / f"federated-head-v{version}.pfpkg"
    head_release(base, weights, version, fleet.key, out, trust=fleet.trust, note={"task": "demo-head"})
    return {"state": status["state"], "rounds": rows, "served_head_top1": round(accuracy(served), 4),
            "federated_head_top1": round(accuracy(weights), 4), "package": out}


def _served_accuracy(agents: dict[str, Any], xt: np.ndarray, yt: np.ndarray) -> dict[str, float]:
    """Test top-1 of what each agent's local API answers now."""
    from edge_agent import Client

    out = {}
    for d, agent in agents.items():
        with Client(agent.urls()[0]) as client:
            answers = [client.predict({"image": xt[i : i + 200]}).outputs for i in range(0, len(xt), 200)]
        logits = np.concatenate([a["logits"] for a in answers])
        out[d] = round(float((logits.argmax(1) == yt).mean()), 4)
    return out
