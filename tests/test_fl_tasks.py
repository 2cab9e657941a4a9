"""Task control like Flower's: `fl run TASK.toml` (detached aggregator process), `fl ls`, `fl log`,
`fl stop`, `--json` everywhere and errors as JSON, over a real mosquitto with real head-training devices."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cloud_sync.client import MqttClient
from cloud_sync.fl import tensors as T
from cloud_sync.fl.client import FLClient
from cloud_sync.fl.errors import FLError
from cloud_sync.fl.mqtt import MqttDeviceTransport, wait_until
from cloud_sync.fl.tasks import TaskFile, pid_alive
from edge_agent.fl import head_trainer_fn
from edge_agent.training import DenseLayer, Head, HeadTrainer, LocalDataset
from tests.fl_helpers import digits_flat
from tests.mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parents[1]
HEAD = Head([DenseLayer("w", "b")])
DEVICES = [f"dev{i:02d}" for i in range(4)]

TASK = """
[task]
name = "{name}"
rounds = {rounds}
strategy = "{strategy}"
clients_per_round = 3
over_selection = 1.0
checkin_s = 1
round_s = 20
[task.strategy_args]
{args}
[model]
weights = "init.safetensors"
[data]
group = "lab"
[train]
epochs = 2
lr = 0.1
[codec]
topk = 0.2
int8 = true
min_sparse = 1
[cloud]
config = "cloud.toml"
"""


def _fl(*args: str, timeout: float = 60) -> tuple[int, dict]:
    p = subprocess.run([sys.executable, "-m", "cloud_sync.fl", *args, "--json"], cwd=ROOT, capture_output=True,
                       timeout=timeout)
    return p.returncode, json.loads(p.stdout) if p.stdout.strip() else {}


def test_task_file_errors_name_the_field(tmp_path):
    (tmp_path / "init.safetensors").write_bytes(T.weights_to_bytes(HEAD.init([64, 10])))
    (tmp_path / "cloud.toml").write_text("[cloud]\nstate_dir = 'state'\n")
    good = TASK.format(name="t", rounds=2, strategy="fedavg", args="lr_decay = 0.9")
    (tmp_path / "t.toml").write_text(good)
    tf = TaskFile.load(tmp_path / "t.toml")
    assert tf.config.strategy_args == {"lr_decay": 0.9} and tf.config.codec["topk"] == 0.2 and tf.config.group == "lab"
    for bad, msg in ((good.replace('strategy = "fedavg"', 'strategy = "fedfoo"'), "unknown strategy"),
                     (good.replace("rounds = 2", "roundz = 2"), "needs name and rounds"),
                     (good.replace("lr_decay = 0.9", "lr_decay = 3"), "lr_decay"),
                     (good + "\n[extra]\n", "unknown section")):
        (tmp_path / "b.toml").write_text(bad)
        with pytest.raises(FLError, match=msg):
            TaskFile.load(tmp_path / "b.toml")
    rc, out = _fl("run", str(tmp_path / "b.toml"))
    assert rc == 2 and out["type"] == "FLError" and "unknown section" in out["error"]
    rc, out = _fl("ls", "--config", str(tmp_path / "cloud.toml"))
    assert rc == 2 and "no FL database" in out["error"]


@pytest.mark.mosquitto
def test_fl_run_ls_log_stop_over_mosquitto(tmp_path):
    accounts = {"flagg": ("cloud", None), **{d: ("device", "lab") for d in DEVICES}}
    x, y = digits_flat("train")
    parts = np.array_split(np.random.default_rng(2).permutation(len(y)), len(DEVICES))
    with Mosquitto(tmp_path, accounts=accounts) as broker:
        cfg = broker.mqtt_config("flagg")
        (tmp_path / "cloud.toml").write_text(
            f'[cloud]\nstate_dir = "state"\nworker_id = "flagg"\n'
            f'[mqtt]\nhost = "{cfg.host}"\nport = {cfg.port}\nusername = "flagg"\npassword = "{cfg.password}"\n')
        (tmp_path / "init.safetensors").write_bytes(T.weights_to_bytes(HEAD.init([64, 10], seed=0)))
        (tmp_path / "short.toml").write_text(TASK.format(name="short", rounds=3, strategy="fedavg", args="lr_decay = 0.9"))
        (tmp_path / "long.toml").write_text(TASK.format(name="long", rounds=10_000, strategy="fedbuff",
                                                        args="buffer_size = 2\nconcurrency = 2"))
        links = []
        for dev, p in zip(DEVICES, parts, strict=True):
            mc = MqttClient(broker.mqtt_config(dev), name=dev)
            link = MqttDeviceTransport(mc, dev, group="lab")
            link.bind(FLClient(dev, head_trainer_fn(HeadTrainer(HEAD), LocalDataset({"features": x[p]}, y[p])), len(p),
                               tmp_path / dev, link.send_checkin, link.send_update))
            mc.start()
            links.append(link)
        for link in links:
            link.client.wait_connected(10)
        conf = str(tmp_path / "cloud.toml")
        pids = []
        try:
            rc, out = _fl("run", str(tmp_path / "short.toml"))
            assert rc == 0 and out["detached"] and pid_alive(out["pid"])
            pids.append(out["pid"])
            follow = subprocess.run([sys.executable, "-m", "cloud_sync.fl", "log", "short", "--config", conf, "--follow",
                                     "--json"], cwd=ROOT, capture_output=True, timeout=120)
            lines = [json.loads(line) for line in follow.stdout.decode().splitlines()]
            assert [ln["round"] for ln in lines[:-1]] == [0, 1, 2] and lines[-1]["state"] == "finished"
            assert all(ln["participants"] == 3 and ln["metrics"] == {} for ln in lines[:-1])
            rc, out = _fl("run", str(tmp_path / "long.toml"))
            assert rc == 0
            pids.append(out["pid"])
            rc, again = _fl("run", str(tmp_path / "long.toml"))
            assert rc == 2 and "already running" in again["error"]
            assert wait_until(lambda: _fl("log", "long", "--config", conf)[1].get("counters", {}).get("rounds_done", 0) >= 2,
                              60, 0.5)
            rc, ls = _fl("ls", "--config", conf)
            by = {t["task"]: t for t in ls["tasks"]}
            assert by["short"]["state"] == "finished" and by["short"]["rounds_done"] == 3 and by["short"]["pid"] is None
            assert by["long"]["state"] == "running" and by["long"]["pid"] == out["pid"]
            rc, stopped = _fl("stop", "long", "--config", conf)
            assert rc == 0 and stopped["was"] == "running" and stopped["state"] == "stopped"
            assert not stopped["process_alive"]
            rc, log = _fl("log", "long", "--config", conf)
            assert log["state"] == "stopped" and log["counters"]["stopped"] == 1
            assert all(r["staleness"] is not None for r in log["rounds"] if r["state"] == "done")
            rc, err = _fl("log", "nosuch", "--config", conf)
            assert rc == 2 and "no federated task" in err["error"]
        finally:
            for pid in pids:
                if pid_alive(pid):
                    import os
                    import signal

                    os.kill(pid, signal.SIGKILL)
            for link in links:
                link.stop()
                link.client.stop()
