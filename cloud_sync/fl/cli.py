"""`pocketfleet fl ...`: run a federated task on the cloud side (parsers here; handlers import lazily).

Registration (cloud_sync/cli.py): `from cloud_sync.fl.cli import register_fl; register_fl(subparsers)`.
Also runnable as `python -m cloud_sync.fl start ...`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def register_fl(subparsers: argparse._SubParsersAction) -> None:
    from pocketfleet import add_json_flag

    fl = subparsers.add_parser("fl", help="federated learning: run and inspect tasks",
                               description="Federated learning over MQTT (see docs/federated.md).")
    sub = fl.add_subparsers(dest="fl_command", metavar="FL_COMMAND")
    start = sub.add_parser("start", help="start (or resume) a federated task and run it to the end",
                           description="Announce rounds to a device group, aggregate their updates, and keep "
                           "the task state in SQLite (a restart with the same --task resumes it).")
    start.add_argument("--task", required=True, help="task name (also the resume key)")
    start.add_argument("--rounds", type=int, required=True, help="number of aggregations")
    start.add_argument("--strategy", default="fedavg",
                       help="fedavg, fedprox, fedadam, fedyogi, fedadagrad, median, trimmed_mean, multikrum")
    start.add_argument("--config", required=True, help="cloud.toml (its [mqtt] and [cloud] state_dir are used)")
    src = start.add_mutually_exclusive_group(required=True)
    src.add_argument("--package", help="a .pfpkg with a trainable_head: start from its head weights")
    src.add_argument("--weights", help="a safetensors file of initial weights")
    start.add_argument("--group", default="default", help="device group the rounds are announced to")
    start.add_argument("--clients-per-round", type=int, default=10)
    start.add_argument("--min-clients", type=int, default=None)
    start.add_argument("--over-selection", type=float, default=1.3)
    start.add_argument("--over-selection-grace", type=float, default=0.5,
                       help="after the target count, keep the round open this fraction of the time it took and "
                       "aggregate every update that arrives (0 = keep only the first arrivals)")
    start.add_argument("--checkin-s", type=float, default=10.0, help="check-in window per round")
    start.add_argument("--round-s", type=float, default=120.0, help="training deadline after selection")
    start.add_argument("--train", default="", help="local training, e.g. 'epochs=2,lr=0.05,mu=0.01'")
    start.add_argument("--codec", default="", help="update codec, e.g. 'topk=0.05,int8=1'")
    start.add_argument("--dp", default="", help="central DP, e.g. 'clip_norm=1,noise_multiplier=1,population=50'")
    start.add_argument("--secagg", default="", help="secure aggregation, e.g. 'threshold=0.6,clip=0.05,phase_s=30'")
    start.add_argument("--db", default=None, help="FL state database (default: <state_dir>/fl.sqlite)")
    start.add_argument("--release-key", default=None,
                       help="with --package: sign a head-only package of every new global model with this key")
    start.add_argument("--release-dir", default=None, help="where those packages go (default: <state_dir>/fl-releases)")
    add_json_flag(start)
    start.set_defaults(func=_json_errors(cmd_fl_start))
    status = sub.add_parser("status", help="rounds and counters of a task")
    status.add_argument("--task", required=True)
    status.add_argument("--config", required=True)
    status.add_argument("--db", default=None)
    add_json_flag(status)
    status.set_defaults(func=_json_errors(cmd_fl_status))
    run = sub.add_parser("run", help="run a task file (TOML): detached by default, like `flwr run`",
                         description="Start (or resume) the federated task a TOML file describes (model, strategy, "
                         "codec, DP, rounds; see docs/federated.md). Returns at once with the aggregator running in "
                         "the background; follow it with `fl log TASK --follow`, end it with `fl stop TASK`.")
    run.add_argument("taskfile", help="the task file (TOML)")
    run.add_argument("--config", default=None, help="cloud.toml (default: the task file's [cloud] config)")
    run.add_argument("--db", default=None, help="FL state database (default: <state_dir>/fl.sqlite)")
    run.add_argument("--foreground", action="store_true", help="run here until the task ends")
    add_json_flag(run)
    run.set_defaults(func=_json_errors(cmd_fl_run))
    for name, helptext in (("ls", "list the tasks, their state, progress and aggregator process"),
                           ("log", "rounds of a task: devices, bytes, metrics, counters"),
                           ("stop", "stop a running task (its aggregator exits at its next tick)")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        if name != "ls":
            p.add_argument("task", help="task name")
        p.add_argument("--config", required=True, help="cloud.toml (its [cloud] state_dir holds the FL database)")
        p.add_argument("--db", default=None)
        if name == "log":
            p.add_argument("--follow", action="store_true", help="keep printing new rounds until the task ends")
        add_json_flag(p)
        p.set_defaults(func=_json_errors({"ls": cmd_fl_ls, "log": cmd_fl_log, "stop": cmd_fl_stop}[name]))


def _json_errors(func: Any) -> Any:
    """With --json, an error the user can act on is printed as one JSON document on stdout."""
    import functools
    import json

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        from pocketfleet import PocketfleetError

        try:
            return func(args)
        except PocketfleetError as exc:
            if not getattr(args, "json", False):
                raise
            print(json.dumps({"error": str(exc), "type": type(exc).__name__, "exit_code": exc.exit_code}))
            return exc.exit_code

    return run


def _kv(text: str, what: str) -> dict[str, Any]:
    from .errors import FLError

    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise FLError(f"--{what}: {item!r} is not key=value")
        try:
            out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError as exc:
            raise FLError(f"--{what}: {key}={value!r} is not a number") from exc
    return out


def initial_weights(package: str | None, weights: str | None) -> dict[str, Any]:
    """Head weights from a package's trainable_head member, or a safetensors file."""
    from safetensors.numpy import load

    from .errors import FLError

    if weights:
        from . import tensors as T

        return T.weights_from_bytes(Path(weights).read_bytes())[1]
    from export.package import open_package

    with open_package(package) as reader:
        manifest = reader.manifest
        head = manifest.trainable_head or {}
        member = head.get("weights")
        if not member or member not in manifest.files:
            raise FLError(f"{package}: trainable_head.weights names no file of the package")
        return {k: v for k, v in load(reader.read(member, manifest.files[member].size)).items()}


def _open(args: argparse.Namespace) -> tuple[Any, Path]:
    from cloud_sync.cloud import CloudConfig

    cfg = CloudConfig.load(args.config)
    return cfg, Path(args.db) if args.db else cfg.state_dir / "fl.sqlite"


def _render(status: dict[str, Any]) -> str:
    from pocketfleet import table

    rows = [{"round": r["round"], "attempt": r["attempt"], "state": r["state"],
             "devices": (r["result"] or {}).get("participants", ""),
             "bytes_up": (r["result"] or {}).get("bytes_up", ""),
             **{k: v for k, v in ((r["result"] or {}).get("metrics") or {}).items()}}
            for r in status["rounds"]]
    return f"task {status['task']}: {status['state']}, model version {status['model_version']}\n" + table(rows) + \
        f"\ncounters: {status['counters']}"


def cmd_fl_start(args: argparse.Namespace) -> int:
    from cloud_sync.client import MqttClient
    from pocketfleet import emit

    from .mqtt import MqttCloudTransport
    from .rounds import Aggregator, TaskConfig

    cfg, db = _open(args)
    task = TaskConfig(
        task=args.task, rounds=args.rounds, strategy=args.strategy, clients_per_round=args.clients_per_round,
        min_clients=args.min_clients, over_selection=args.over_selection,
        over_selection_grace=args.over_selection_grace, checkin_s=args.checkin_s,
        round_s=args.round_s, train=_kv(args.train, "train"), codec=_kv(args.codec, "codec"),
        dp=_kv(args.dp, "dp") or None, secagg=_kv(args.secagg, "secagg") or None, group=args.group,
    )
    init = initial_weights(args.package, args.weights)
    client = MqttClient(cfg.mqtt, client_id=f"{cfg.cloud.worker_id}-fl", name=f"{cfg.cloud.worker_id}-fl")
    transport = MqttCloudTransport(client, cfg.cloud.shared_group or None)
    on_model = None
    if args.release_key:
        from .errors import FLError
        from .release import release_hook

        if not args.package:
            raise FLError("--release-key needs --package (the base of the head-only releases)")
        on_model = release_hook(args.package, args.release_key, args.release_dir or cfg.state_dir / "fl-releases")
    agg = Aggregator(db, transport, on_model=on_model)
    transport.bind(agg)
    client.start().wait_connected(30)

    def progress(r: dict[str, Any]) -> None:
        res = r["result"] or {}
        print(f"round {r['round']}: {res.get('participants')} devices, {res.get('bytes_up')} bytes up, "
              f"{res.get('metrics') or res.get('train_metrics')}", file=sys.stderr)

    try:
        agg.resume_all()
        agg.create_task(task, init)
        status = agg.run(task.task, progress=progress)
    finally:
        client.stop()
        agg.store.close()
    emit(status, args.json, _render)
    return 0 if status["state"] == "finished" else 1


def _store_for(config: str | Path, db: str | None) -> tuple[Any, Path]:
    from cloud_sync.cloud import CloudConfig

    from .errors import FLError
    from .store import RoundStore

    if not Path(config).exists():
        raise FLError(f"cloud config {config} does not exist")
    cfg = CloudConfig.load(config)
    path = Path(db) if db else cfg.state_dir / "fl.sqlite"
    if not path.exists():
        raise FLError(f"no FL database at {path} (no task has run with this config)")
    return RoundStore(path), cfg.state_dir


def _wait_registered(db: Path, task: str, pid: int, log: Path, timeout_s: float = 120.0) -> None:
    """Return once the detached aggregator has registered `task` in its database; FLError with the tail of
    its log if it exits first or takes longer than `timeout_s`."""
    import time

    from . import tasks
    from .errors import FLError
    from .store import RoundStore

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if db.exists():
            store = RoundStore(db)
            try:
                if store.task(task) is not None:
                    return
            finally:
                store.close()
        if not tasks.pid_alive(pid):
            break
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
    state = "exited" if not tasks.pid_alive(pid) else f"did not register the task within {timeout_s:.0f} s"
    raise FLError(f"the aggregator for task {task!r} {state}; its log ({log}) ends:\n{tail}")


def cmd_fl_run(args: argparse.Namespace) -> int:
    from cloud_sync.client import MqttClient
    from cloud_sync.cloud import CloudConfig
    from pocketfleet import emit

    from . import tasks
    from .errors import FLError
    from .mqtt import MqttCloudTransport
    from .rounds import Aggregator

    tf = tasks.TaskFile.load(args.taskfile)
    config = args.config or tf.cloud_config
    if config is None:
        raise FLError(f"{args.taskfile}: no cloud config: give --config or [cloud] config in the task file")
    cfg = CloudConfig.load(config)
    db = Path(args.db) if args.db else cfg.state_dir / "fl.sqlite"
    name = tf.config.task
    if not args.foreground:
        pid = tasks.read_pid(cfg.state_dir, name)
        if tasks.pid_alive(pid):
            raise FLError(f"task {name!r} is already running (pid {pid}); `fl stop {name}` first")
        argv = [*tasks.python_argv(), "run", str(Path(args.taskfile).resolve()), "--config",
                str(Path(config).resolve()), "--db", str(db.resolve()), "--foreground"]
        pid = tasks.detach(argv, cfg.state_dir, name, Path.cwd())
        log = tasks.control_dir(cfg.state_dir) / f"{name}.log"
        _wait_registered(db, name, pid, log)  # `fl log/ls` right after this see the task
        out = {"task": name, "pid": pid, "detached": True, "db": str(db), "log": str(log)}
        emit(out, args.json, lambda o: f"task {o['task']} running in the background (pid {o['pid']}); "
             f"follow it with: pocketfleet fl log {o['task']} --follow --config {config}")
        return 0
    init = initial_weights(str(tf.package) if tf.package else None, str(tf.weights) if tf.weights else None)
    client = MqttClient(cfg.mqtt, client_id=f"{cfg.cloud.worker_id}-fl-{name}", name=f"{cfg.cloud.worker_id}-fl")
    transport = MqttCloudTransport(client, cfg.cloud.shared_group or None)
    agg = Aggregator(db, transport)
    transport.bind(agg)
    client.start().wait_connected(30)
    try:
        t = agg.store.task(name)
        if t is not None and t["state"] == "stopped":  # `fl run` again resumes a stopped task
            with agg.store.transaction() as conn:
                conn.execute("UPDATE tasks SET state = 'running' WHERE task = ?", (name,))
        agg.create_task(tf.config, init)
        status = agg.run(name, progress=lambda r: print(f"round {r['round']}: {(r['result'] or {}).get('metrics')}",
                                                        file=sys.stderr, flush=True))
    finally:
        client.stop()
        agg.store.close()
    emit(status, args.json, _render)
    return 0 if status["state"] in ("finished", "stopped") else 1


def cmd_fl_ls(args: argparse.Namespace) -> int:
    from pocketfleet import emit, table

    from . import tasks

    store, state_dir = _store_for(args.config, args.db)
    rows = tasks.list_tasks(store, state_dir)
    emit({"tasks": rows}, args.json, lambda o: table([{**r, "last_metrics": r["last_metrics"] or ""}
                                                      for r in o["tasks"]]) if o["tasks"] else "no tasks")
    return 0


def cmd_fl_log(args: argparse.Namespace) -> int:
    import json
    import time

    from pocketfleet import emit

    from . import tasks

    store, _ = _store_for(args.config, args.db)
    if not args.follow:
        emit(tasks.task_log(store, args.task), args.json, _render_log)
        return 0
    seen = 0
    while True:  # --follow: one line (or JSON line) per round as it closes
        out = tasks.task_log(store, args.task)
        closed = [r for r in out["rounds"] if r["state"] in ("done", "abandoned")]
        for r in closed[seen:]:
            print(json.dumps(r) if args.json else _render_round(r), flush=True)
        seen = len(closed)
        if out["state"] != "running":
            print(json.dumps({"task": args.task, "state": out["state"]}) if args.json else f"task {out['state']}")
            return 0
        time.sleep(0.5)


def _render_round(r: dict[str, Any]) -> str:
    extra = f" staleness {r['staleness']}" if r.get("staleness") else ""
    return (f"round {r['round']} attempt {r['attempt']}: {r['state']}, {r['participants']} devices, "
            f"{r['bytes_up']} bytes up, {r['metrics'] or r.get('reason') or ''}{extra}")


def _render_log(out: dict[str, Any]) -> str:
    return "\n".join([f"task {out['task']}: {out['state']}", *map(_render_round, out["rounds"]),
                      f"counters: {out['counters']}"])


def cmd_fl_stop(args: argparse.Namespace) -> int:
    from pocketfleet import emit

    from . import tasks

    store, state_dir = _store_for(args.config, args.db)
    out = tasks.stop_task(store, state_dir, args.task)
    emit(out, args.json, lambda o: f"task {o['task']}: {o['was']} -> {o['state']}")
    return 0


def cmd_fl_status(args: argparse.Namespace) -> int:
    from pocketfleet import emit

    from .store import RoundStore

    _, db = _open(args)
    from .rounds import Aggregator

    agg = Aggregator(RoundStore(db), transport=None)  # type: ignore[arg-type]
    emit(agg.status(args.task), args.json, _render)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from pocketfleet import PocketfleetError

    parser = argparse.ArgumentParser(prog="python -m cloud_sync.fl")
    register_fl(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fl", *(argv if argv is not None else sys.argv[1:])])
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PocketfleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
