"""Federated task files (TOML) and task control: run (detached or in the foreground), ls, log, stop.

A task file (docs/federated.md):

    [task]
    name = "digits-head"          # the task id (resume key)
    rounds = 20
    strategy = "fedavg"           # fedavg, fedprox, fedadam, fedyogi, fedadagrad, median, trimmed_mean,
                                  # multikrum, fedbuff
    clients_per_round = 10
    over_selection = 1.3
    round_s = 120
    [task.strategy_args]          # e.g. lr_decay = 0.95, or buffer_size = 10 for fedbuff
    [model]
    weights = "init.safetensors"  # or package = "model.pfpkg" (its trainable head)
    [data]
    group = "default"             # the devices (and their local data) the task runs on
    [train]                       # local training: epochs, lr, batch_size, momentum, mu ...
    [codec]                       # topk, int8, error_feedback, min_sparse
    [dp]                          # clip_norm, noise_multiplier, delta, population
    [cloud]
    config = "cloud.toml"         # the MQTT connection and state_dir (relative to this file)

Control state lives in the FL database: `fl stop` marks a task stopped (a running aggregator sees it
on its next tick and exits); a detached run writes `<state_dir>/fl-tasks/<task>.pid` and `.log`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import FLError
from .rounds import TaskConfig
from .store import RoundStore

_TASK_KEYS = {f.name for f in fields(TaskConfig)} - {"task", "train", "codec", "dp", "secagg", "group"}
SECTIONS = {"task", "model", "data", "train", "codec", "dp", "secagg", "cloud"}


@dataclass
class TaskFile:
    path: Path
    config: TaskConfig
    weights: Path | None
    package: Path | None
    cloud_config: Path | None

    @classmethod
    def load(cls, path: str | Path) -> TaskFile:
        from cloud_sync.config import load_toml

        path = Path(path)
        data = load_toml(path)
        unknown = set(data) - SECTIONS
        if unknown:
            raise FLError(f"{path}: unknown section(s) {sorted(unknown)}; use {sorted(SECTIONS)}")
        task = dict(data.get("task") or {})
        if "name" not in task or "rounds" not in task:
            raise FLError(f"{path}: [task] needs name and rounds")
        bad = set(task) - _TASK_KEYS - {"name"}
        if bad:
            raise FLError(f"{path}: [task] has unknown field(s) {sorted(bad)}")
        model = dict(data.get("model") or {})
        if bool(model.get("weights")) == bool(model.get("package")):
            raise FLError(f"{path}: [model] needs exactly one of weights or package")
        data_sec = dict(data.get("data") or {})
        if set(data_sec) - {"group"}:
            raise FLError(f"{path}: [data] takes only group (the devices hold their own data)")
        base = path.parent
        name = task.pop("name")
        cfg = TaskConfig.from_dict({**task, "task": name, "train": dict(data.get("train") or {}),
                                    "codec": dict(data.get("codec") or {}), "dp": data.get("dp"),
                                    "secagg": data.get("secagg"), "group": data_sec.get("group", "default")})
        cfg.make_strategy()  # a bad strategy or strategy_args fails here, naming the field
        resolve = lambda v: None if not v else (base / v if not Path(v).is_absolute() else Path(v))  # noqa: E731
        cloud = resolve((data.get("cloud") or {}).get("config"))
        for p in (resolve(model.get("weights")), resolve(model.get("package")), cloud):
            if p is not None and not p.exists():
                raise FLError(f"{path}: {p} does not exist")
        return cls(path, cfg, resolve(model.get("weights")), resolve(model.get("package")), cloud)


def control_dir(state_dir: Path) -> Path:
    d = Path(state_dir) / "fl-tasks"
    d.mkdir(parents=True, exist_ok=True)
    return d


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie child of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def read_pid(state_dir: Path, task: str) -> int | None:
    try:
        return int((control_dir(state_dir) / f"{task}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def detach(argv: list[str], state_dir: Path, task: str, cwd: Path) -> int:
    """Start `argv` (a foreground `fl run`) in its own session, output to <task>.log; returns its pid."""
    d = control_dir(state_dir)
    with open(d / f"{task}.log", "ab") as log:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    (d / f"{task}.pid").write_text(str(proc.pid))
    return proc.pid


def list_tasks(store: RoundStore, state_dir: Path) -> list[dict[str, Any]]:
    out = []
    for name in store.tasks():
        t = store.task(name)
        rounds = store.rounds(name)
        done = [r for r in rounds if r["state"] == "done"]
        last = (done[-1]["result"] or {}).get("metrics", {}) if done else {}
        pid = read_pid(state_dir, name)
        out.append({"task": name, "state": t["state"], "strategy": t["config"].get("strategy"),
                    "rounds_done": len(done), "rounds": t["config"].get("rounds"), "last_metrics": last,
                    "pid": pid if pid_alive(pid) else None, "created": t["created"]})
    return out


def task_log(store: RoundStore, task: str) -> dict[str, Any]:
    t = store.task(task)
    if t is None:
        raise FLError(f"no federated task {task!r} (see `pocketfleet fl ls`)")
    lines = []
    for r in store.rounds(task):
        res = r["result"] or {}
        lines.append({"round": r["round"], "attempt": r["attempt"], "state": r["state"],
                      "participants": res.get("participants"), "bytes_up": res.get("bytes_up"),
                      "metrics": res.get("metrics") or {}, "reason": res.get("reason"),
                      "staleness": res.get("staleness"), "closed": r["closed"]})
    return {"task": task, "state": t["state"], "rounds": lines, "counters": store.counters(task)}


def stop_task(store: RoundStore, state_dir: Path, task: str, wait_s: float = 10.0) -> dict[str, Any]:
    """Mark a running task stopped; its aggregator exits on its next tick (SIGTERM after `wait_s`)."""
    t = store.task(task)
    if t is None:
        raise FLError(f"no federated task {task!r} (see `pocketfleet fl ls`)")
    was = t["state"]
    if was == "running":
        with store.transaction() as db:
            db.execute("UPDATE tasks SET state = 'stopped' WHERE task = ?", (task,))
            store.count(task, "stopped", conn=db)
    pid = read_pid(state_dir, task)
    end = time.monotonic() + wait_s
    while pid_alive(pid) and time.monotonic() < end:
        time.sleep(0.1)
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
    return {"task": task, "was": was, "state": store.task(task)["state"], "process_alive": pid_alive(pid)}


def python_argv() -> list[str]:
    return [sys.executable, "-m", "cloud_sync.fl"]
