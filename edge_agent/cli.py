"""`pocketfleet agent run|install|rollback|status|predict` (parsers only; handlers import lazily)."""

from __future__ import annotations

import argparse
from typing import Any

from pocketfleet import add_json_flag


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's subcommands (parsers only; handlers import lazily)."""
    from edge_agent.config import add_config_flags

    agent = subparsers.add_parser("agent", help="the on-device agent: serve models offline, install, roll back")
    sub = agent.add_subparsers(dest="agent_command", metavar="COMMAND")
    agent.set_defaults(func=lambda args: agent.print_help() or 2)

    run = sub.add_parser("run", help="run the agent daemon (local API, model store, telemetry)")
    run.add_argument("--config", metavar="TOML", help="agent config file; flags override its keys")
    add_config_flags(run)
    run.set_defaults(func=_run)

    install = sub.add_parser("install", help="verify, health-check and activate a package (a running agent swaps to it)")
    install.add_argument("package", help="the .pfpkg file")
    _store_flags(install)
    install.add_argument("--allow-downgrade", action="store_true", help="accept an older version (you checked a signed rollback authorization)")
    install.add_argument("--no-activate", action="store_true", help="install and health-check only; do not switch")
    add_json_flag(install)
    install.set_defaults(func=_install)

    rollback = sub.add_parser("rollback", help="switch back to the previous known-good version (or --to VERSION)")
    _store_flags(rollback)
    rollback.add_argument("--model", help="model name (needed when the store holds several)")
    rollback.add_argument("--to", type=int, metavar="VERSION", help="an installed version to switch to")
    add_json_flag(rollback)
    rollback.set_defaults(func=_rollback)

    status = sub.add_parser("status", help="the store (active versions, quarantine, events) and the running agent")
    _store_flags(status)
    add_json_flag(status)
    status.set_defaults(func=_status)

    predict = sub.add_parser("predict", help="send .npy inputs to a running agent and print the outputs")
    predict.add_argument("--input", action="append", required=True, metavar="[NAME=]FILE.npy", help="an input tensor (repeat for several inputs)")
    predict.add_argument("--url", help="agent URL: http://HOST:PORT or unix:/path (default: from --state-dir, else http://127.0.0.1:8470)")
    predict.add_argument("--state-dir", metavar="DIR", help="find the running agent of this store")
    predict.add_argument("--model", help="model name (needed when the agent serves several)")
    add_json_flag(predict)
    predict.set_defaults(func=_predict)

    slim = sub.add_parser("slim", help="remove what a serving agent never loads from this device's runtime wheels")
    slim.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    slim.add_argument("--force", action="store_true", help="slim even an environment with torch (breaks compress)")
    add_json_flag(slim)
    slim.set_defaults(func=_slim)


def _store_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", metavar="DIR", help="the agent's state directory")
    p.add_argument("--trust", metavar="PATH", help="trusted public key file or directory")
    p.add_argument("--config", metavar="TOML", help="read state_dir/trust (and threads) from the agent config")


def _config(args: argparse.Namespace, **extra: Any) -> Any:
    from edge_agent.config import flag_overrides, load_config

    overrides = flag_overrides(args)
    for key in ("state_dir", "trust"):
        if getattr(args, key, None):
            overrides[key] = getattr(args, key)
    return load_config(getattr(args, "config", None), {**overrides, **extra})


def _run(args: argparse.Namespace) -> int:
    import logging

    from edge_agent.daemon import Agent

    config = _config(args)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = Agent(config).start()
    agent.serve_forever()
    return 0


def _store(config: Any, must_exist: bool = False) -> Any:
    from pathlib import Path

    from edge_agent.errors import StoreError
    from edge_agent.store import ModelStore

    if must_exist and not (Path(config.state_dir) / "versions").is_dir():
        raise StoreError(f"{config.state_dir} holds no model store (install a package first)")
    return ModelStore(config.state_dir, config.trust or None, config.threads, keep=config.keep_versions)


def _notify(config: Any, want: dict[str, int]) -> dict[str, Any] | None:
    """Ask a running agent to swap now and wait (bounded) until it serves `want`."""
    import time

    from edge_agent.client import Client
    from edge_agent.daemon import running_agent
    from pocketfleet import PocketfleetError

    info = running_agent(config.state_dir)
    if not info or not info.get("urls"):
        return None
    result: dict[str, Any] = {"pid": info["pid"], "url": info["urls"][0]}
    try:
        with Client(info["urls"][0], timeout=60) as client:
            result["reload"] = client.reload()
            failed = {(f.get("model"), f.get("version")) for f in result["reload"].get("failed", [])}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                served = {n: m["version"] for n, m in client.health()["models"].items()}
                if all(served.get(n) == v for n, v in want.items()) or any(w in failed for w in want.items()):
                    break  # serving it, or the agent said it cannot
                if _reverted(config, want):
                    break  # the agent's watcher tried first, failed, and pointed the store back
                time.sleep(0.1)
            result["serving"] = served
    except PocketfleetError as exc:
        result["error"] = str(exc)
    if result.get("serving") is not None and any(result["serving"].get(n) != v for n, v in want.items()):
        failed = [f"{f['model']} v{f['version']}: {f['error']}" for f in (result.get("reload") or {}).get("failed", [])]
        failed += _swap_failures(config, want)
        result["error"] = "; ".join(dict.fromkeys(failed)) or "it did not switch within 30 s"
    return result


def _reverted(config: Any, want: dict[str, int]) -> bool:
    from edge_agent.store import ModelStore
    from pocketfleet import PocketfleetError

    try:
        models = ModelStore(config.state_dir).read_state()
    except PocketfleetError:
        return False
    return any(n in models and models[n].active != v for n, v in want.items())


def _swap_failures(config: Any, want: dict[str, int]) -> list[str]:
    """Why the running agent did not swap, from the store's event log."""
    from edge_agent.store import ModelStore

    events = ModelStore(config.state_dir).events(50)
    return [f"{e['model']} v{e['version']}: {e.get('reason', '')}" for e in events
            if e.get("event") in ("quarantine",) and (e.get("model"), e.get("version")) in want.items()][-1:]


def _check_served(agent: dict[str, Any] | None, want: dict[str, int]) -> None:
    """Exit non-zero when a running agent does not end up serving what was installed (and say why)."""
    from edge_agent.errors import AgentError

    if agent is None:
        return  # no agent runs on this state directory: it serves the version when it starts
    serving = agent.get("serving")
    if serving is None or any(serving.get(n) != v for n, v in want.items()):
        wanted = ", ".join(f"{n} v{v}" for n, v in want.items())
        raise AgentError(f"the running agent (pid {agent.get('pid')}) does not serve {wanted}: it serves "
                         f"{serving if serving is not None else 'nothing we could see'} ({agent.get('error', 'no answer')})")


def _install(args: argparse.Namespace) -> int:
    from pocketfleet import emit

    config = _config(args)
    res = _store(config).install(args.package, allow_downgrade=args.allow_downgrade, activate=not args.no_activate)
    out = res.to_dict()
    out["agent"] = _notify(config, {res.name: res.version}) if not args.no_activate else None

    def render(r: dict[str, Any]) -> str:
        prev = f" (was v{r['previous']})" if r["previous"] is not None and r["previous"] != r["version"] else ""
        line = f"{r['status']}: {r['name']} v{r['version']}{prev} in {r['path']}"
        agent = r.get("agent")
        if agent:
            line += f"\nrunning agent (pid {agent['pid']}) serves {agent.get('serving', agent.get('error'))}"
        return line

    emit(out, args.json, render)
    if not args.no_activate:
        _check_served(out["agent"], {res.name: res.version})
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from pocketfleet import emit

    config = _config(args)
    out = _store(config, must_exist=True).rollback(args.model, args.to)
    out["agent"] = _notify(config, {out["model"]: out["version"]})
    emit(out, args.json, lambda r: f"rolled back {r['model']}: v{r['previous']} -> v{r['version']}")
    _check_served(out["agent"], {out["model"]: out["version"]})
    return 0


def _slim(args: argparse.Namespace) -> int:
    from edge_agent.slim import slim
    from pocketfleet import emit

    result = slim(dry_run=args.dry_run, force=args.force)

    def render(r: Any) -> str:
        verb = "would remove" if r.dry_run else "removed"
        lines = [f"{verb} {len(files)} files of {dist}" for dist, files in r.removed.items()]
        lines.append(f"{verb} {r.bytes_removed / 1e6:.1f} MB in all")
        if r.checked:
            lines.append(f"still import: {', '.join(r.checked)}")
        return "\n".join(lines)

    emit(result.to_dict() if args.json else result, args.json, render)
    return 0


def _status(args: argparse.Namespace) -> int:
    from edge_agent.client import Client
    from edge_agent.daemon import running_agent
    from pocketfleet import PocketfleetError, emit, table

    config = _config(args)
    out = _store(config, must_exist=True).status()
    info = running_agent(config.state_dir)
    out["agent"] = None
    if info:
        out["agent"] = {**info}
        try:
            with Client(info["urls"][0], timeout=5) as client:
                out["agent"]["health"] = client.health()
        except (PocketfleetError, IndexError) as exc:
            out["agent"]["error"] = str(exc)

    def render(s: dict[str, Any]) -> str:
        rows = [{"model": n, "active": m["active"], "known good": m["good"], "installed": m["installed"]} for n, m in s["models"].items()]
        lines = [table(rows)]
        if s["state_error"]:
            lines.append(f"state: {s['state_error']}")
        agent = s["agent"]
        lines.append(f"agent: pid {agent['pid']} on {', '.join(agent['urls'])}" if agent else "agent: not running")
        for q in s["quarantine"]:
            lines.append(f"quarantined: {q.get('name')} v{q.get('version')}: {q.get('reason')}")
        for e in s["events"][-5:]:
            lines.append(f"{e['ts']} {e['event']} {e.get('model', '')} v{e.get('version', '')} {e.get('reason', '')}".rstrip())
        return "\n".join(lines)

    emit(out, args.json, render)
    return 0


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from edge_agent.client import DEFAULT_URL, Client
    from edge_agent.daemon import running_agent
    from edge_agent.errors import AgentError
    from pocketfleet import emit

    url = args.url
    if not url and args.state_dir:
        info = running_agent(args.state_dir)
        if not info:
            raise AgentError(f"no agent is running on {args.state_dir}")
        url = info["urls"][0]
    inputs: dict[str, Any] = {}
    for spec in args.input:
        name, sep, path = spec.rpartition("=")
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise AgentError(f"cannot read --input {path}: {exc}") from exc
        inputs[name if sep else f"_{len(inputs)}"] = arr
    with Client(url or DEFAULT_URL) as client:
        if len(inputs) == 1 and next(iter(inputs)).startswith("_"):
            pred = client.predict(next(iter(inputs.values())), model=args.model)
        else:
            pred = client.predict(inputs, model=args.model)
    out = {"model": pred.model, "outputs": {k: v.tolist() for k, v in pred.outputs.items()}}

    def render(r: dict[str, Any]) -> str:
        lines = [f"model {r['model']['name']} v{r['model']['version']}"]
        for k, v in pred.outputs.items():
            top = f"  argmax {np.argmax(v.reshape(v.shape[0], -1), axis=1).tolist()}" if v.ndim >= 2 and v.dtype.kind == "f" else ""
            lines.append(f"{k} {list(v.shape)} {v.dtype}{top}\n{np.array2string(v, precision=4, threshold=50)}")
        return "\n".join(lines)

    emit(out, args.json, render)
    return 0
