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
    start.set_defaults(func=cmd_fl_start)
    status = sub.add_parser("status", help="rounds and counters of a task")
    status.add_argument("--task", required=True)
    status.add_argument("--config", required=True)
    status.add_argument("--db", default=None)
    add_json_flag(status)
    status.set_defaults(func=cmd_fl_status)


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
        min_clients=args.min_clients, over_selection=args.over_selection, checkin_s=args.checkin_s,
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
