"""OTA over MQTT: fleet update times, bytes on the wire, resume after a disconnect, head-only releases,
a 100-device publish burst, and a bad canary - on a real mosquitto over loopback.

    python benchmarks/ota.py                 # everything (several minutes on 2 cores)
    python benchmarks/ota.py --devices 20    # a smaller fleet
    python benchmarks/ota.py --skip 20mb     # leave out the 20 MB fleet update

How the devices are simulated: each device is a real `cloud_sync.DeviceLink` (its own MQTT connection,
persistent session, last will and OTA client) bound to its own agent state directory with a real
`edge_agent.store.ModelStore` (verify, extract, health check on onnxruntime, atomic switch). The 100
devices share 4 worker processes (25 per process, each device a paho network thread plus an OTA thread).
The cloud is 2 `pocketfleet cloud run` worker processes sharing one SQLite state directory through MQTT 5
shared subscriptions. The broker is mosquitto 2.0 on loopback with the configuration
`cloud_sync.broker_files.mosquitto_conf` writes. Everything runs on this machine's cores at once.

Wire bytes are MQTT packet bytes (fixed header, topic, packet id, properties, payload, PUBACKs) counted
by each device's client; TCP/IP headers are not included.

Writes a table to stdout and JSON to benchmarks/results/ota.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUP = "bench"
MB = 1 << 20
BYTES_PER_HIDDEN = 302  # make_digits_package: ~302 bytes of package per hidden unit


def hidden_for(size: int) -> int:
    return max(16, size // BYTES_PER_HIDDEN)


# ------------------------------------------------------------------------------------ device runner


def device_runner(spec_path: str) -> None:
    """Subprocess: run the DeviceLinks of `spec`, answer stats requests, stop on request."""
    import logging

    from cloud_sync.config import MqttConfig
    from cloud_sync.device import DeviceConfig, DeviceLink
    from cloud_sync.ota_client import OtaSettings
    from edge_agent.store import ModelStore

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s runner %(name)s %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    control = Path(spec["control"])
    links: dict[str, DeviceLink] = {}
    install_slots = threading.BoundedSemaphore(2)  # the devices of this process install two at a time
    for d in spec["devices"]:
        state = Path(spec["root"]) / d
        store = ModelStore(state, spec["trust"])
        if spec.get("seed") and not store.read_state():
            store.install(spec["seed"])
        mqtt = MqttConfig(host="127.0.0.1", port=spec["port"], client_id=d, username=d, password=f"pw-{d}",
                          reconnect_min_s=0.2, reconnect_max_s=5.0)
        cfg = DeviceConfig(device_id=d, state_dir=str(state), trust=spec["trust"], group=GROUP, mqtt=mqtt,
                           ota=OtaSettings(**spec.get("ota", {})))
        links[d] = DeviceLink(cfg, store=store, install_slots=install_slots).start()
    deadline = time.monotonic() + 120
    while not all(link.client.connected for link in links.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    (control / f"ready-{spec['name']}").write_text("ok")
    answered: set[str] = set()
    while not (control / "stop").exists():
        for req in control.glob("dump-*"):
            if req.name in answered:
                continue
            answered.add(req.name)
            stats = {d: {"mqtt": link.client.counters.snapshot(), "ota": link.ota.counters.snapshot()}
                     for d, link in links.items()}
            out = control / f"stats-{req.name[5:]}-{spec['name']}.json"
            out.with_suffix(".tmp").write_text(json.dumps(stats))
            os.replace(out.with_suffix(".tmp"), out)
        time.sleep(0.1)
    for link in links.values():
        link.stop()


class Runners:
    """K device-runner processes over one device list."""

    def __init__(self, work: Path, devices: list[str], port: int, trust: Path, seed: Path | None, procs: int,
                 ota: dict[str, Any] | None = None) -> None:
        self.control = work / "control"
        shutil.rmtree(self.control, ignore_errors=True)
        self.control.mkdir(parents=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names = []
        for k in range(procs):
            part = devices[k::procs]
            if not part:
                continue
            name = f"r{k}"
            spec = {"name": name, "devices": part, "root": str(work / "devices"), "port": port, "trust": str(trust),
                    "seed": str(seed) if seed else None, "control": str(self.control), "ota": ota or {}}
            path = work / f"runner-{name}.json"
            path.write_text(json.dumps(spec))
            log = open(work / f"runner-{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
            self.procs.append(subprocess.Popen([sys.executable, __file__, "--device-runner", str(path)],
                                               stdout=log, stderr=log))
            self.names.append(name)
        self.dumps = 0

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not all((self.control / f"ready-{n}").exists() for n in self.names):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError("device runners did not come up (see runner-*.log)")
            time.sleep(0.2)

    def stats(self) -> dict[str, Any]:
        self.dumps += 1
        tag = str(self.dumps)
        (self.control / f"dump-{tag}").write_text("")
        out: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        for n in self.names:
            path = self.control / f"stats-{tag}-{n}.json"
            while not path.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"runner {n} did not answer a stats request")
                time.sleep(0.05)
            out.update(json.loads(path.read_text()))
        return out

    def stop(self) -> None:
        (self.control / "stop").write_text("")
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()


class CloudWorkers:
    """`pocketfleet cloud run` worker processes on one state directory."""

    def __init__(self, work: Path, state: Path, port: int, trust: Path, n: int = 2) -> None:
        self.procs = []
        for i in range(1, n + 1):
            wid = f"cloud-{i}"
            cfg = work / f"{wid}.toml"
            cfg.write_text(
                f'[cloud]\nstate_dir = "{state}"\nworker_id = "{wid}"\ntrust = "{trust}"\nshared_group = "pfcloud"\n'
                f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nusername = "{wid}"\npassword = "pw-{wid}"\n'
                f"max_inflight = 128\n"
                f"[rollout]\ntick_s = 0.2\nresend_s = 30.0\ncanary_timeout_s = 600.0\nprobe_runs = 5\n"
            )
            log = open(work / f"{wid}.log", "ab")  # noqa: SIM115
            cmd = [str(Path(sys.executable).parent / "pocketfleet"), "cloud", "run", "--config", str(cfg),
                   "--log-level", "warning"]
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=log))

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


# ----------------------------------------------------------------------------------------- helpers


def start_broker(work: Path, accounts: dict[str, tuple[str, str | None]], **kw: Any) -> Any:
    from tests.mosquitto import Mosquitto

    return Mosquitto(work, accounts=accounts, persistence=False, **kw).start()


def registry_for(state: Path, devices: list[str]) -> Any:
    from cloud_sync.broker_files import Account
    from cloud_sync.registry import Registry

    reg = Registry(state / "registry.sqlite")
    for d in devices:
        reg.put_account(Account(d, "device", "$7$101$AAAA$AAAA", GROUP))
    return reg


def wait_rollout(reg: Any, rollout_id: str, timeout: float) -> dict[str, Any]:
    from cloud_sync.rollout import describe_rollout

    deadline = time.monotonic() + timeout
    while True:
        r = describe_rollout(reg, rollout_id)
        if r["state"] in ("complete", "failed", "superseded"):
            return r
        if time.monotonic() > deadline:
            raise TimeoutError(f"rollout {rollout_id} still {r['state']} after {timeout}s: {r['counts']}")
        time.sleep(0.2)


def wire_bytes(before: dict[str, Any], after: dict[str, Any], device: str) -> int:
    b, a = before[device]["mqtt"], after[device]["mqtt"]
    return sum(a.get(k, 0) - b.get(k, 0) for k in ("bytes_in", "bytes_out"))


def pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else 0.0


# -------------------------------------------------------------------------------------- scenarios


def fleet_updates(work: Path, key: Path, trust: Path, n: int, procs: int, do_20mb: bool) -> dict[str, Any]:
    """100 devices: a 1 MB update, a bad canary (rolled back), a 20 MB update; canary 10% + gates."""
    from cloud_sync.releases import create_release
    from pocketfleet.sim.fleet import make_digits_package

    devices = [f"dev-{i:03d}" for i in range(n)]
    pk = work / "packages"
    seed = make_digits_package(pk / "v1.pfpkg", 1, key, hidden=32, seed=11)
    v2 = make_digits_package(pk / "v2-1mb.pfpkg", 2, key, hidden=hidden_for(MB), seed=12)
    v3 = make_digits_package(pk / "v3-broken.pfpkg", 3, key, hidden=hidden_for(MB), seed=12, broken=True)
    v4 = make_digits_package(pk / "v4-20mb.pfpkg", 4, key, hidden=hidden_for(20 * MB), seed=14) if do_20mb else None
    accounts = {d: ("device", GROUP) for d in devices} | {"cloud-1": ("cloud", None), "cloud-2": ("cloud", None)}
    broker = start_broker(work, accounts)
    state = work / "cloud"
    reg = registry_for(state, devices)
    workers = CloudWorkers(work, state, broker.port, trust)
    t_start = time.monotonic()
    runners = Runners(work, devices, broker.port, trust, seed, procs)
    results: dict[str, Any] = {"devices": n, "device_processes": procs, "cloud_workers": 2}
    try:
        runners.wait_ready()
        results["startup_s"] = round(time.monotonic() - t_start, 1)
        # gates: accuracy on the signed golden labels, probe errors, and a latency bound that fits the model
        # (the 20 MB MLP needs ~10 ms per call on an idle core; the probes run while 100 devices download)
        gates = ["golden>=0.9", "error_rate<=0.01"]
        plan = [("update_1mb", v2, [*gates, "p95_ms<=50"], "complete"), ("bad_canary", v3, ["golden>=0.9"], "failed")]
        if v4 is not None:
            plan.append(("update_20mb", v4, [*gates, "p95_ms<=1000"], "complete"))
        for label, pkg, gate, expect in plan:
            before = runners.stats()
            t0 = time.monotonic()
            out = create_release(reg, state / "artifacts", pkg, GROUP, str(trust), 0.10, gate)
            final = wait_rollout(reg, out["rollout_id"], 1800)
            elapsed = time.monotonic() - t0
            after = runners.stats()
            size = pkg.stat().st_size
            touched = [d["device"] for d in final["devices"]]
            wires = [wire_bytes(before, after, d) for d in touched]
            rx = [(d["progress"] or {}).get("bytes_rx", 0) for d in final["devices"]]
            canary = [d for d in final["devices"] if d["phase"] == "canary"]
            versions = {r["id"]: r["active_version"] for r in reg.devices(GROUP)}
            row = {
                "package_bytes": size, "state": final["state"], "expected": expect, "reason": final["reason"],
                "seconds": round(elapsed, 2),
                "canary_seconds": round((final["promoted"] or final["finished"] or time.time()) - final["created"], 2),
                "devices_touched": len(touched), "canary_devices": len(canary),
                "wire_bytes_per_device_mean": round(sum(wires) / max(1, len(wires))),
                "wire_bytes_per_device_p95": round(pct(wires, 95)),
                "wire_over_package": round(sum(wires) / max(1, len(wires)) / size, 4),
                "chunk_bytes_per_device_mean": round(sum(rx) / max(1, len(rx))),
                "duplicate_chunk_bytes": sum(after[d]["ota"].get("duplicate_bytes", 0)
                                             - before[d]["ota"].get("duplicate_bytes", 0) for d in touched),
                "gate_result": final["gate_result"],
                "versions": {str(v): sum(1 for x in versions.values() if x == v) for v in set(versions.values())},
            }
            if label == "bad_canary":
                row["canary_rolled_back"] = sum(1 for d in canary if d["state"] == "rolled_back")
                row["canary_on_previous_version"] = sum(1 for d in canary if versions[d["device"]] == 2)
            results[label] = row
            print(f"  {label}: {row['state']} in {row['seconds']} s, wire/device {row['wire_over_package']:.3f} x "
                  f"package", flush=True)
    finally:
        runners.stop()
        workers.stop()
        reg.close()
        broker.stop()
    return results


def resume_after_disconnect(work: Path, key: Path, keys_dir: Path, sizes: list[int]) -> dict[str, Any]:
    """One device; interrupt the download at 50% (link drop, or process restart), then let it finish."""
    from cloud_sync.ota_client import OtaSettings
    from pocketfleet.sim.fleet import Fleet, make_digits_package

    out: dict[str, Any] = {}
    for size_mb in sizes:
        v1 = make_digits_package(work / f"r{size_mb}-v1.pfpkg", 1, key, hidden=32, seed=21)
        v2 = make_digits_package(work / f"r{size_mb}-v2.pfpkg", 2, key, hidden=hidden_for(size_mb * MB), seed=22)
        size = v2.stat().st_size
        for mode in ("link_drop", "process_restart", "none"):
            sub = work / f"resume-{size_mb}-{mode}"
            broker = start_broker(sub, {"dev-000": ("device", "lab"), "cloud-1": ("cloud", None)})
            # a bandwidth cap of ~3 s per package makes "50%" a well-defined moment to cut the link
            fleet = Fleet(sub / "fleet", devices=1, mqtt_for=broker.mqtt_config, keys_dir=keys_dir,
                          ota=OtaSettings(bandwidth_bps=max(size // 3, 64 * 1024), chunk_timeout_s=10)).start()
            try:
                fleet.install_everywhere(v1)
                before_mqtt = fleet.devices["dev-000"].client.counters.snapshot()
                rel = fleet.release(v2, canary=0)
                at = None
                first_rx = first_wire = 0
                if mode != "none":
                    while True:
                        job = fleet.devices["dev-000"].ota._job
                        if job is not None and job.index is not None and len(job.missing) <= len(job.index) / 2:
                            at = 1 - len(job.missing) / len(job.index)
                            break
                        time.sleep(0.005)
                    link = fleet.devices["dev-000"]
                    if mode == "link_drop":
                        link.client.drop_connection()
                    else:
                        first_rx = job.bytes_rx
                        snap = link.client.counters.snapshot()
                        first_wire = sum(snap.get(k, 0) - before_mqtt.get(k, 0) for k in ("bytes_in", "bytes_out"))
                        fleet.stop_device("dev-000", clean=False)
                        time.sleep(1.0)
                        fleet.start_device("dev-000")
                        before_mqtt = {}
                final = fleet.wait(rel["rollout_id"], 600)
                snap = fleet.devices["dev-000"].client.counters.snapshot()
                wire = first_wire + sum(snap.get(k, 0) - before_mqtt.get(k, 0) for k in ("bytes_in", "bytes_out"))
                rx = first_rx + final["devices"][0]["progress"]["bytes_rx"]
                out[f"{size_mb}mb_{mode}"] = {
                    "package_bytes": size, "interrupted_at": round(at, 3) if at is not None else None,
                    "state": final["state"], "chunk_bytes": rx, "wire_bytes": wire,
                    "chunk_over_package": round(rx / size, 4), "wire_over_package": round(wire / size, 4),
                }
                print(f"  resume {size_mb} MB {mode}: {rx / size:.3f} x package (chunks), "
                      f"{wire / size:.3f} x (wire)", flush=True)
            finally:
                fleet.stop()
                broker.stop()
    return out


def fixed_block_bytes(old: Path, new: Path, block: int) -> int:
    """What a fixed-size block scheme (same average block size) would move: new blocks not in the old file."""
    import hashlib

    def blocks(path: Path) -> list[bytes]:
        data = path.read_bytes()
        return [data[i : i + block] for i in range(0, len(data), block)]

    have = {hashlib.sha256(b).digest() for b in blocks(old)}
    return sum(len(b) for b in blocks(new) if hashlib.sha256(b).digest() not in have)


def head_only(work: Path, key: Path, keys_dir: Path, mbnet: str | None = None) -> dict[str, Any]:
    """digits-mbnet v1 -> v2 where only the final Linear changed, both exported with `export`."""
    import torch
    from safetensors.torch import load_file, save_file

    from cloud_sync.chunks import choose_chunking
    from compress.zoo import load_model_dir, make_model_dir
    from export.pipeline import export_model
    from pocketfleet.sim.fleet import Fleet

    m1 = Path(mbnet) if mbnet else work / "mbnet-v1"
    if not (m1 / "weights.safetensors").exists():  # training takes minutes: reuse one with --mbnet DIR
        make_model_dir("digits-mbnet", m1, progress=False)
    m2 = work / "mbnet-v2"
    shutil.rmtree(m2, ignore_errors=True)
    shutil.copytree(m1, m2)
    weights = load_file(str(Path(m1) / "weights.safetensors"))
    gen = torch.Generator().manual_seed(0)
    changed = [k for k in weights if k.startswith("classifier.")]
    for k in changed:
        weights[k] = weights[k] + 0.01 * weights[k].std() * torch.randn(weights[k].shape, generator=gen)
    save_file(weights, str(m2 / "weights.safetensors"))
    p1 = work / "mbnet-v1.pfpkg"
    p2 = work / "mbnet-v2.pfpkg"
    export_model(load_model_dir(m1), "onnx", out=p1, name="digits-mbnet", version=1, key=key)
    export_model(load_model_dir(m2), "onnx", out=p2, name="digits-mbnet", version=2, key=key)
    size = p2.stat().st_size
    head_params = sum(weights[k].numel() for k in changed)
    for old in ("broker-run", "fleet-run"):
        shutil.rmtree(work / old, ignore_errors=True)
    broker = start_broker(work / "broker-run", {"dev-000": ("device", "lab"), "cloud-1": ("cloud", None)})
    fleet = Fleet(work / "fleet-run", devices=1, mqtt_for=broker.mqtt_config, keys_dir=keys_dir).start()
    try:
        fleet.install_everywhere(p1)
        before = fleet.devices["dev-000"].client.counters.snapshot()
        rel = fleet.release(p2, canary=0)
        final = fleet.wait(rel["rollout_id"], 300)
        snap = fleet.devices["dev-000"].client.counters.snapshot()
        wire = sum(snap.get(k, 0) - before.get(k, 0) for k in ("bytes_in", "bytes_out"))
    finally:
        fleet.stop()
        broker.stop()
    progress = final["devices"][0]["progress"]
    avg = choose_chunking(size).avg
    fixed = fixed_block_bytes(p1, p2, avg)
    result = {
        "package_bytes": size, "changed_tensors": changed, "head_param_bytes": head_params * 4,
        "state": final["state"], "chunk_bytes": progress["bytes_rx"], "reused_bytes": progress["bytes_reused"],
        "wire_bytes": wire, "chunk_over_package": round(progress["bytes_rx"] / size, 4),
        "wire_over_package": round(wire / size, 4), "chunk_avg": avg,
        "fixed_blocks_bytes": fixed, "fixed_blocks_over_package": round(fixed / size, 4),
    }
    print(f"  head-only: {result['wire_over_package']:.3f} x package on the wire "
          f"(fixed {avg // 1024} KiB blocks would move {result['fixed_blocks_over_package']:.3f} x)", flush=True)
    return result


def burst(work: Path, n: int, records: int) -> dict[str, Any]:
    """n devices drain `records` outbox records each at the same moment into a consumer at 2 ms/record;
    with this project's broker config and with mosquitto's defaults (max_queued_messages 1000, inflight 20)."""
    out: dict[str, Any] = {}
    for label, kw in (("ours", {}), ("mosquitto_defaults", {"max_queued_messages": 1000, "max_inflight_messages": 20})):
        out[label] = _burst_once(work / f"burst-{label}", [f"dev-{i:03d}" for i in range(n)], records, kw)
        b = out[label]
        print(f"  burst ({label}): {b['records']} published, {b['acked_by_broker']} acknowledged, "
              f"{b['stored_by_cloud']} stored, {b['lost']} lost", flush=True)
    return out


def _burst_once(sub: Path, devices: list[str], records: int, broker_kw: dict[str, Any]) -> dict[str, Any]:
    from cloud_sync.client import MqttClient
    from cloud_sync.cloud import Cloud, CloudConfig, CloudSettings
    from cloud_sync.device import MqttSink
    from edge_agent.outbox import Outbox

    accounts = {d: ("device", "lab") for d in devices} | {"cloud-1": ("cloud", None)}
    broker = start_broker(sub, accounts, **broker_kw)
    cloud = Cloud(CloudConfig(cloud=CloudSettings(state_dir=str(sub / "cloud"), worker_id="cloud-1"),
                              mqtt=broker.mqtt_config("cloud-1")))
    original = cloud.registry.add_telemetry_batch

    def slow(items: list) -> int:  # a consumer that spends 2 ms on each record
        time.sleep(0.002 * len(items))
        return original(items)

    cloud.registry.add_telemetry_batch = slow  # type: ignore[method-assign]
    cloud.start()
    for d in devices:
        cloud.registry.ensure_device(d, "lab")
    clients = [MqttClient(broker.mqtt_config(d)).start() for d in devices]
    outboxes = [Outbox(sub / "outbox" / f"{d}.sqlite") for d in devices]
    for c in clients:
        c.wait_connected(30)
    go, filled, lock = threading.Event(), threading.Semaphore(0), threading.Lock()
    acked = [0]

    def drain(client: MqttClient, ob: Outbox, device: str) -> None:
        for i in range(records):
            ob.put("telemetry", {"i": i})
        filled.release()
        sink = MqttSink(client, device, ack_timeout_s=120)
        go.wait()
        while ob.stats()["records"]:
            batch = ob.lease(64)
            ids = list(sink.send(batch))
            ob.ack(ids)
            ob.release(r.id for r in batch)
            with lock:
                acked[0] += len(ids)

    threads = [threading.Thread(target=drain, args=a) for a in zip(clients, outboxes, devices, strict=True)]
    for t in threads:
        t.start()
    for _ in threads:
        filled.acquire(timeout=120)
    t0 = time.monotonic()
    go.set()  # every device publishes at the same moment
    for t in threads:
        t.join(300)
    sent_s = time.monotonic() - t0
    expected = len(devices) * records
    last, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < 3 and last < expected:  # until everything arrived or nothing moves
        stored = len(cloud.registry.telemetry())
        if stored != last:
            last, stable_since = stored, time.monotonic()
        time.sleep(0.3)
    stored = len(cloud.registry.telemetry())
    for c in clients:
        c.stop()
    cloud.stop()
    for ob in outboxes:
        ob.close()
    broker.stop()
    return {"devices": len(devices), "records": expected, "acked_by_broker": acked[0], "stored_by_cloud": stored,
            "lost": acked[0] - stored, "publish_seconds": round(sent_s, 2),
            "broker_config": broker_kw or "pocketfleet (max_queued_messages 100000, inflight 64)"}


# ------------------------------------------------------------------------------------------- main


def render(res: dict[str, Any]) -> str:
    from pocketfleet import table

    rows = []
    fu = res.get("fleet", {})
    for label in ("update_1mb", "bad_canary", "update_20mb"):
        r = fu.get(label)
        if not r:
            continue
        rows.append({
            "scenario": f"{label} ({fu['devices']} devices)", "package": f"{r['package_bytes'] / MB:.2f} MB",
            "result": r["state"] + (f", {r['canary_rolled_back']}/{r['canary_devices']} canaries rolled back"
                                    if label == "bad_canary" else f", versions {r['versions']}"),
            "time_s": r["seconds"], "wire/device": f"{r['wire_bytes_per_device_mean'] / MB:.3f} MB",
            "wire/package": r["wire_over_package"],
        })
    for key, r in res.get("resume", {}).items():
        rows.append({"scenario": f"resume {key}", "package": f"{r['package_bytes'] / MB:.2f} MB",
                     "result": f"{r['state']}, cut at {r['interrupted_at']}", "time_s": "",
                     "wire/device": f"{r['wire_bytes'] / MB:.3f} MB", "wire/package": r["wire_over_package"]})
    h = res.get("head_only")
    if h:
        rows.append({"scenario": "head-only digits-mbnet", "package": f"{h['package_bytes'] / 1024:.0f} KiB",
                     "result": f"{h['state']}; fixed blocks: {h['fixed_blocks_over_package']}", "time_s": "",
                     "wire/device": f"{h['wire_bytes'] / 1024:.1f} KiB", "wire/package": h["wire_over_package"]})
    for label, b in res.get("burst", {}).items():
        rows.append({"scenario": f"burst {b['devices']} devices ({label})", "package": f"{b['records']} records",
                     "result": f"{b['stored_by_cloud']} stored, {b['lost']} lost", "time_s": b["publish_seconds"],
                     "wire/device": "", "wire/package": ""})
    return table(rows)


def goals(res: dict[str, Any]) -> dict[str, Any]:
    fu = res.get("fleet", {})
    g: dict[str, Any] = {}
    if "update_1mb" in fu:
        g["100_devices_1mb_le_60s"] = fu["devices"] >= 100 and fu["update_1mb"]["state"] == "complete" \
            and fu["update_1mb"]["seconds"] <= 60
    resume = [r for k, r in res.get("resume", {}).items() if not k.endswith("_none")]
    if resume:
        g["resume_at_50pct_le_1.1x"] = all(r["wire_over_package"] <= 1.1 for r in resume)
    if "head_only" in res:
        g["head_only_le_25pct"] = res["head_only"]["wire_over_package"] <= 0.25
    if "ours" in res.get("burst", {}):
        g["burst_zero_lost"] = res["burst"]["ours"]["lost"] == 0 and \
            res["burst"]["ours"]["stored_by_cloud"] == res["burst"]["ours"]["records"]
    if "bad_canary" in fu:
        b = fu["bad_canary"]
        g["bad_canary_rolled_back_everywhere"] = b["state"] == "failed" and \
            b["canary_rolled_back"] == b["canary_devices"] == b["canary_on_previous_version"]
    return g


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--procs", type=int, default=4, help="device runner processes")
    ap.add_argument("--skip", action="append", default=[], choices=["fleet", "20mb", "resume", "head", "burst"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ota.json"))
    ap.add_argument("--workdir", help="keep the working files here (default: a temp dir, removed)")
    ap.add_argument("--mbnet", metavar="MODEL_DIR",
                    help="an existing digits-mbnet model dir (pocketfleet zoo make digits-mbnet); default: train one")
    ap.add_argument("--device-runner", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device_runner:
        device_runner(args.device_runner)
        return 0
    from export.signing import generate_keys

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pf-ota-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    keys = work / "keys"
    if not (keys / "pocketfleet.key").exists():
        generate_keys(keys)
    key, trust = keys / "pocketfleet.key", keys / "pocketfleet.pub"
    res: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                           "broker": "mosquitto " + subprocess.run(["/usr/sbin/mosquitto", "-h"], capture_output=True,
                                                                    text=True).stdout.split("\n")[0].split()[-1]}
    started = time.monotonic()
    for name in ("fleet", "resume", "burst"):  # fresh state per run (the trained mbnet in head/ is kept)
        shutil.rmtree(work / name, ignore_errors=True)
    try:
        if "fleet" not in args.skip:
            print(f"fleet: {args.devices} devices in {args.procs} processes, 2 cloud workers", flush=True)
            res["fleet"] = fleet_updates(work / "fleet", key, trust, args.devices, args.procs, "20mb" not in args.skip)
        if "resume" not in args.skip:
            print("resume after a disconnect at 50%", flush=True)
            res["resume"] = resume_after_disconnect(work / "resume", key, keys, [1] + ([] if "20mb" in args.skip else [20]))
        if "head" not in args.skip:
            print("head-only release of digits-mbnet", flush=True)
            res["head_only"] = head_only(work / "head", key, keys, args.mbnet)
        if "burst" not in args.skip:
            print(f"burst: {args.devices} devices publish at once", flush=True)
            res["burst"] = burst(work / "burst", args.devices, 30)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    res["goals"] = goals(res)
    res["total_seconds"] = round(time.monotonic() - started, 1)
    print()
    print(render(res))
    print()
    print("goals: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in res["goals"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, sort_keys=True, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
