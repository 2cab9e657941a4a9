"""`pocketfleet` subcommands contributed by the cloud_sync package: broker, cloud, release, rollout (and fl)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from pocketfleet import add_json_flag, emit, table

DEFAULT_CONFIG = os.environ.get("POCKETFLEET_CLOUD_CONFIG", "cloud.toml")


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="CLOUD_TOML",
                   help=f"cloud configuration (default: {DEFAULT_CONFIG}; env POCKETFLEET_CLOUD_CONFIG)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands (parsers only; handlers import lazily)."""
    broker = subparsers.add_parser("broker", help="MQTT brokers for development and production")
    bsub = broker.add_subparsers(dest="broker_command", metavar="ACTION")
    run = bsub.add_parser("run", help="run the embedded development broker (amqtt, MQTT 3.1.1, no auth)",
                          description="Run an embedded amqtt broker in the foreground for development and the "
                          "demo: anonymous, no ACL, no TLS. Clients use MQTT 3.1.1 on it. Use mosquitto in "
                          "production (see `pocketfleet broker mosquitto-conf`).")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=1883)
    run.set_defaults(func=_cmd_broker_run)
    conf = bsub.add_parser("mosquitto-conf", help="write a mosquitto.conf for the fleet (auth, ACL, queues)",
                           description="Write a mosquitto 2.x configuration that uses the password and ACL "
                           "files `pocketfleet cloud provision` maintains, raises max_queued_messages (the "
                           "default 1000 silently drops QoS 1 messages for slow subscribers) and enables TLS "
                           "when --tls-cert/--tls-key/--tls-ca are given.")
    _config_arg(conf)
    conf.add_argument("--port", type=int, default=1883)
    conf.add_argument("--host", default=None,
                      help="listener address (default 127.0.0.1; 0.0.0.0 or another address only with TLS, "
                      "or with --allow-plaintext)")
    conf.add_argument("--allow-plaintext", action="store_true",
                      help="allow a non-loopback listener without TLS (passwords travel in clear)")
    conf.add_argument("--tls-ca", help="CA certificate (PEM)")
    conf.add_argument("--tls-cert", help="server certificate (PEM)")
    conf.add_argument("--tls-key", help="server private key (PEM)")
    conf.add_argument("--persistence-dir", help="where mosquitto keeps sessions and queued messages")
    conf.add_argument("--out", required=True, help="mosquitto.conf path to write")
    add_json_flag(conf)
    conf.set_defaults(func=_cmd_mosquitto_conf)
    broker.set_defaults(func=lambda args: broker.print_help() or 2)

    cloud = subparsers.add_parser("cloud", help="the cloud side: workers, provisioning, fleet registry")
    csub = cloud.add_subparsers(dest="cloud_command", metavar="ACTION")
    crun = csub.add_parser("run", help="run a cloud worker (registry, artifact service, rollout controller)",
                           description="Run one cloud worker until SIGINT/SIGTERM. Several workers may share "
                           "one state directory and broker (MQTT 5 shared subscriptions); the rollout "
                           "controller runs in one of them at a time (SQLite lease).")
    _config_arg(crun)
    crun.add_argument("--worker-id", help="override [cloud] worker_id (also the MQTT client id / username)")
    crun.add_argument("--password-file", help="override [mqtt] password_file")
    crun.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    crun.add_argument("--retire", action="store_true",
                      help="drain what the broker queued for this worker, leave the shared subscriptions, exit "
                      "(for a worker that will not come back)")
    crun.set_defaults(func=_cmd_cloud_run)
    prov = csub.add_parser("provision", help="create a device's credentials, broker ACL entries and agent config",
                           description="Create (or renew) the MQTT account of a device: a random password "
                           "(written to OUT/mqtt.password, stored only hashed), the broker's password and ACL "
                           "files regenerated from the registry (and the broker reloaded when [broker] pid_file "
                           "is set), and OUT/agent.toml for the device. --cloud-worker creates a cloud worker "
                           "account instead.")
    prov.add_argument("name", metavar="DEVICE", help="device id (or worker id with --cloud-worker)")
    prov.add_argument("--group", help="the device's group (required for devices)")
    prov.add_argument("--cloud-worker", action="store_true", help="a cloud worker account (read/write pf/v1/#)")
    prov.add_argument("--out", help="directory for agent.toml and mqtt.password (default STATE/provisioned/NAME)")
    prov.add_argument("--change-role", action="store_true",
                      help="allow turning an existing device into a cloud worker or back (refused otherwise)")
    _config_arg(prov)
    add_json_flag(prov)
    prov.set_defaults(func=_cmd_provision)
    cnt = csub.add_parser("counters", help="each worker's counters (received, malformed, dead letters, refused ...)",
                          description="What every cloud worker counted (saved by the worker every 2 s and when it "
                          "stops): messages received, malformed, dead-lettered, duplicate or rate-limited chunk "
                          "requests, refused publishes, ... and the dead letters kept in the registry.")
    _config_arg(cnt)
    add_json_flag(cnt)
    cnt.set_defaults(func=_cmd_counters)
    from cloud_sync.ops_cli import register_ops

    register_ops(csub, _config_arg)
    cloud.set_defaults(func=lambda args: cloud.print_help() or 2)

    rel = subparsers.add_parser(
        "release", help="release a signed package to a device group (canary first, gated)",
        description="Verify the package against the cloud's trusted keys, store and chunk it, and start a "
        "rollout: the canary devices get it first; when every canary reported and the gates pass it goes to "
        "the whole group, otherwise every canary device is rolled back and the rollout fails with the reason. "
        "Needs the cloud's state directory (run it where the cloud runs); running workers pick it up.",
    )
    rel.add_argument("package", metavar="PKG")
    rel.add_argument("--group", required=True)
    rel.add_argument("--canary", default="10%", help="share of the group that gets it first (default 10%%; 0 = none)")
    rel.add_argument("--gate", action="append", default=[], metavar="METRIC<=VALUE",
                     help="canary gate, repeatable: error_rate<=0.01, p95_ms<=25, golden>=0.9, failures<=0")
    rel.add_argument("--stages", metavar="SHARES", help="staged rollout by cumulative shares, e.g. 5%%,25%%,100%%")
    rel.add_argument("--rate", metavar="BASE[,FACTOR]",
                     help="staged rollout, exponential: stages of BASE, BASE*FACTOR, ... devices (e.g. 2,2)")
    rel.add_argument("--soak", default="60s", help="staged: how long each finished stage runs before the next (60s)")
    rel.add_argument("--abort", action="append", default=[], metavar="METRIC>VALUE[@MIN]",
                     help="staged: abort criterion, repeatable: error_rate>0.05@3, p95_ratio>1.5@3, p95_ms>50@3, "
                     "drift>1@3, golden<0.9@1, failure_rate>0.2@1 (default failure_rate>0.2@1)")
    rel.add_argument("--rollback", action="store_true",
                     help="an explicitly signed rollback to an older version (needs --key)")
    rel.add_argument("--key", metavar="PRIVATE", help="Ed25519 private key that signs the rollback authorization")
    _config_arg(rel)
    add_json_flag(rel)
    rel.set_defaults(func=_cmd_release)

    ro = subparsers.add_parser("rollout", help="inspect, pause, resume or abort rollouts")
    rsub = ro.add_subparsers(dest="rollout_command", metavar="ACTION")
    st = rsub.add_parser("status", help="rollouts and their devices' states",
                         description="Without ROLLOUT: one line per rollout. With ROLLOUT: its devices, gates "
                         "and reason. --wait SECONDS waits until the rollout is complete, failed or superseded "
                         "(exit 1 if it failed or the wait timed out).")
    st.add_argument("rollout_id", nargs="?", metavar="ROLLOUT")
    st.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the rollout to finish")
    _config_arg(st)
    add_json_flag(st)
    st.set_defaults(func=_cmd_rollout_status)
    for verb, text in (("pause", "stop starting new stages (devices already sent keep going)"),
                       ("resume", "continue a paused staged rollout"),
                       ("abort", "stop and roll back every device that got the release")):
        vp = rsub.add_parser(verb, help=text)
        vp.add_argument("rollout_id", metavar="ROLLOUT")
        vp.add_argument("--reason", help="recorded with the rollout")
        _config_arg(vp)
        add_json_flag(vp)
        vp.set_defaults(func=_cmd_rollout_action, action=verb)
    ro.set_defaults(func=lambda args: ro.print_help() or 2)

    try:
        from cloud_sync.fl.cli import register_fl
    except ImportError:  # the federated-learning commands are optional
        return
    register_fl(subparsers)


# ------------------------------------------------------------------------------------------- handlers


def _load(args: argparse.Namespace) -> Any:
    from cloud_sync.cloud import CloudConfig
    from cloud_sync.errors import ConfigError

    if not os.path.exists(args.config):
        raise ConfigError(f"cloud config {args.config} does not exist (give --config CLOUD_TOML; see docs/operations.md)")
    return CloudConfig.load(args.config)


def _cmd_broker_run(args: argparse.Namespace) -> int:
    import logging

    from cloud_sync.broker import EmbeddedBroker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    broker = EmbeddedBroker(args.host, args.port)
    print(f"embedded broker (amqtt, MQTT 3.1.1, anonymous) on {args.host}:{broker.port}; Ctrl-C stops it",
          flush=True)
    broker.run_forever()
    return 0


def _cmd_mosquitto_conf(args: argparse.Namespace) -> int:
    import ipaddress
    from pathlib import Path

    from cloud_sync.broker_files import broker_owner, mosquitto_conf
    from cloud_sync.errors import ConfigError
    from cloud_sync.provision import write_broker_files

    config = _load(args)
    tls_parts = (args.tls_ca, args.tls_cert, args.tls_key)
    if any(tls_parts) and not all(tls_parts):
        raise ConfigError("--tls-ca, --tls-cert and --tls-key go together")
    tls = tuple(Path(p).resolve() for p in tls_parts) if all(tls_parts) else None
    host = args.host or "127.0.0.1"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and tls is None and not args.allow_plaintext:
        raise ConfigError(f"--host {host} without TLS would take passwords in clear from the network: "
                          "give --tls-ca/--tls-cert/--tls-key, or --allow-plaintext")
    registry = config.open_registry()
    try:
        files = write_broker_files(config, registry.accounts())
    finally:
        registry.close()
    persistence = Path(args.persistence_dir).resolve() if args.persistence_dir else None
    owner = broker_owner()
    if persistence is not None and owner is not None:  # mosquitto writes it after dropping to its user
        persistence.mkdir(parents=True, exist_ok=True)
        os.chown(persistence, *owner)
    try:
        text = mosquitto_conf(args.port, files["passwd"].resolve(), files["acl"].resolve(), host=host,
                              tls=tls, persistence_dir=persistence,  # type: ignore[arg-type]
                              dynsec_path=files["dynsec"].resolve())
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    Path(args.out).write_text(text)
    passwd, acl = files["passwd"], files["acl"]
    emit({"path": args.out, "passwd": str(passwd), "acl": str(acl), "dynsec": str(files["dynsec"]),
          "host": host, "tls": bool(tls)}, args.json,
         lambda r: f"wrote {r['path']} (passwords {r['passwd']}, ACL {r['acl']}, TLS {'on' if r['tls'] else 'off'})")
    return 0


def _cmd_cloud_run(args: argparse.Namespace) -> int:
    import logging

    from cloud_sync.cloud import run_cloud

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(name)s %(message)s")
    config = _load(args)
    if args.worker_id:
        config.cloud.worker_id = args.worker_id
        config.mqtt.client_id = args.worker_id
        if config.mqtt.username:
            config.mqtt.username = args.worker_id
    if args.password_file:
        config.mqtt.password_file = args.password_file
    run_cloud(config, retire=args.retire)
    return 0


def _cmd_provision(args: argparse.Namespace) -> int:
    from cloud_sync.provision import provision

    config = _load(args)
    result = provision(config, args.name, args.group, args.out, role="cloud" if args.cloud_worker else "device",
                       allow_role_change=args.change_role)

    def render(r: dict[str, Any]) -> str:
        lines = [f"{r['role']} {r['name']}" + (f" in group {r['group']}" if r["group"] else ""),
                 f"  password file  {r['password_file']} (shown nowhere else; the registry keeps a hash)",
                 f"  broker files   {r['broker_passwd']}, {r['broker_acl']}"
                 + (" (broker reloaded)" if r["reloaded"] else " (restart the broker, or set [broker] pid_file)")]
        if r.get("role_changed"):
            lines.append(f"  role changed   {r['role_changed']} (new password)")
        if r.get("reload_error"):
            lines.append(f"  not applied    {r['reload_error']}")
        if r.get("agent_config"):
            lines.append(f"  agent config   {r['agent_config']}")
        return "\n".join(lines)

    emit(result, args.json, render)
    return 0


def _cmd_counters(args: argparse.Namespace) -> int:
    import json
    import time

    config = _load(args)
    workers = []
    for path in sorted((config.state_dir / "workers").glob("*.json")):
        try:
            workers.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    registry = config.open_registry()
    try:
        letters = [{"ts": r["ts"], "topic": r["topic"], "device": r["device"], "error": r["error"]}
                   for r in registry.dead_letters(20)]
        total = registry.query("SELECT COUNT(*) AS n FROM dead_letters")[0]["n"]
    finally:
        registry.close()
    out = {"workers": workers, "dead_letters": total, "recent_dead_letters": letters}

    def render(r: dict[str, Any]) -> str:
        names = sorted({k for w in r["workers"] for k in w["counters"]})
        rows = [{"counter": k, **{w["worker"]: w["counters"].get(k, 0) for w in r["workers"]}} for k in names]
        head = [f"{w['worker']}: {'connected' if w['connected'] else 'DISCONNECTED'}"
                f"{', leader' if w['leader'] else ''}, saved {round(time.time() - w['ts'], 1)} s ago"
                for w in r["workers"]] or ["no worker has saved counters yet"]
        lines = head + ([table(rows)] if rows else []) + [f"dead letters: {r['dead_letters']}"]
        lines += [f"  {d['device']} {d['topic']}: {d['error']}" for d in r["recent_dead_letters"][:5]]
        return "\n".join(lines)

    emit(out, args.json, render)
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    from cloud_sync.errors import ReleaseError
    from cloud_sync.fleet_view import parse_since
    from cloud_sync.releases import create_release, parse_canary
    from cloud_sync.staged import parse_rate, parse_stages

    if args.stages and args.rate:
        raise ReleaseError("give --stages or --rate, not both")
    soak = parse_since(args.soak)
    plan = parse_stages(args.stages, soak) if args.stages else parse_rate(args.rate, soak) if args.rate else None
    config = _load(args)
    registry = config.open_registry()
    try:
        result = create_release(registry, config.artifacts_dir, args.package, args.group, config.cloud.trust,
                                parse_canary(args.canary), args.gate, rollback=args.rollback, rollback_key=args.key,
                                plan=plan, abort=args.abort)
    finally:
        registry.close()

    def render(r: dict[str, Any]) -> str:
        if r.get("stages"):
            return (f"rollout {r['rollout_id']}: {r['name']} v{r['version']} to group {r['group']} "
                    f"({r['size']} bytes in {r['chunks']} chunks)\n"
                    f"  stages: {' -> '.join(map(str, r['stages']))} devices ({r['plan']})\n"
                    f"  abort:  {', '.join(r['abort'])}")
        return (f"rollout {r['rollout_id']}: {r['name']} v{r['version']} to group {r['group']} "
                f"({r['size']} bytes in {r['chunks']} chunks)\n"
                f"  canary: {', '.join(r['canary']) or '(none: straight to the group)'}\n"
                f"  gates:  {', '.join(r['gates']) or '(install failures only)'}")

    emit(result, args.json, render)
    return 0


def _cmd_rollout_status(args: argparse.Namespace) -> int:
    import time

    from cloud_sync.rollout import describe_rollout

    config = _load(args)
    registry = config.open_registry()
    try:
        if args.rollout_id:
            deadline = time.monotonic() + (args.wait or 0)
            while True:
                result: Any = describe_rollout(registry, args.rollout_id)
                if not args.wait or result["state"] in ("complete", "failed", "superseded", "aborted") \
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        else:
            result = []
            for r in registry.rollouts():
                d = describe_rollout(registry, r["id"])
                result.append({k: d[k] for k in ("rollout_id", "state", "group", "name", "version", "counts", "reason")})
    finally:
        registry.close()
    emit(result, args.json, _render_rollouts)
    if args.rollout_id and args.wait:
        return 0 if result["state"] == "complete" else 1
    return 0


def _cmd_rollout_action(args: argparse.Namespace) -> int:
    from cloud_sync.staged import operator_action

    config = _load(args)
    registry = config.open_registry()
    try:
        result = operator_action(registry, args.rollout_id, args.action, args.reason)
    finally:
        registry.close()
    emit(result, args.json, lambda r: f"rollout {r['rollout_id']}: {r['action']} -> {r['state']}")
    return 0


def _render_rollouts(result: Any) -> str:
    if isinstance(result, list):
        return table([{**r, "counts": " ".join(f"{k}={v}" for k, v in sorted(r["counts"].items())),
                       "reason": (r["reason"] or "")[:80]} for r in result])
    head = (f"rollout {result['rollout_id']}: {result['name']} v{result['version']} -> group {result['group']}\n"
            f"  state:  {result['state']}" + (f" ({result['reason']})" if result["reason"] else "") + "\n"
            f"  gates:  {', '.join(result['gates']) or '(install failures only)'}")
    if result.get("stages"):
        head += (f"\n  stages: {' -> '.join(map(str, result['stages']))} devices, now stage {result['stage'] + 1}"
                 f"\n  abort:  {', '.join(result['criteria'])}")
    if result.get("gate_result"):
        obs = result["gate_result"]["observed"]
        head += "\n  observed: " + ", ".join(f"{k}={'n/a' if v is None else f'{v:.4g}'}" for k, v in obs.items())
    rows = [{"device": d["device"], "phase": d["phase"], "state": d["state"],
             "bytes_rx": (d["progress"] or {}).get("bytes_rx", ""),
             "reused": (d["progress"] or {}).get("bytes_reused", ""),
             "golden": "" if not d["probe"] or d["probe"].get("golden") is None else d["probe"]["golden"],
             "p95_ms": "" if not d["probe"] else d["probe"]["p95_ms"], "error": (d["error"] or "")[:60]}
            for d in result["devices"]]
    return head + "\n" + table(rows)
