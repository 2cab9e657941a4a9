"""Fleet scale on one box, against a real mosquitto: many connected devices, a staged rollout to a large
fleet of full devices, and a telemetry abort.

    python benchmarks/fleet_scale.py                                  # the full run (10,000 + 1,000 devices)
    python benchmarks/fleet_scale.py --light 2000 --hold 60 --full 200    # reduced
    python benchmarks/fleet_scale.py --skip rollout --skip abort          # connections only

(a) `--light N` lightweight devices (default 10,000) speaking the real protocol over raw MQTT 3.1.1 sockets,
    many per process (asyncio, `--light-procs` processes): CONNECT with the retained last will, SUBSCRIBE to
    their cmd topic, a retained pf.status/1, then a pf.outbox/1 telemetry record (a pf.telemetry/1 body
    with 16-feature input statistics) every `--interval` s (10) for `--hold` s (300), QoS 1, each
    acknowledged by the broker. `--light-workers` (2) `pocketfleet cloud run` workers on MQTT 5 shared
    subscriptions store presence and telemetry (and fold the rollups). Measured: connect-storm time, time until the registry shows every device online,
    broker and cloud RSS and CPU, messages/s, records acknowledged vs stored (lost), bytes per device.
(b) `--full N` full devices (default 1,000): real `DeviceLink`s with a real model store (verify, unpack,
    health check on onnxruntime), in `--full-procs` processes, each also serving requests with its active
    version through the agent's telemetry and outbox (pocketfleet.sim.traffic), 2 cloud workers. A 1 MB
    release goes out in share stages 1%,10%,100% (goal: the whole fleet in <= 45 s); then a release 3x
    slower than the one it replaces (5 -> 15 ms of service time per request, same 1 MB model) goes out in
    rate stages (base 2% of the fleet, factor 2, soak 60 s) with the abort criterion p95_ratio>1.5@5:
    goal, stopped at <= 5% of the fleet and rolled back.

Everything shares this machine's cores (the broker, the cloud workers, every device): timings taken on a
loaded machine are upper bounds. Writes a table to stdout and JSON to benchmarks/results/fleet_scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUP = "scale"
MB = 1 << 20
BYTES_PER_HIDDEN = 302


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (children, mosquitto included, inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def proc_stats(pid: int) -> dict[str, float]:
    """CPU seconds (user+system) and RSS (MB) of a process from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / tick
    rss = 0.0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return {"cpu_s": cpu, "rss_mb": rss}


# ------------------------------------------------------------------------------ raw MQTT 3.1.1 client


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _s(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack(">H", len(b)) + b


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + _varint(len(body)) + body


def connect_packet(client_id: str, username: str, password: str, will_topic: str, will: bytes,
                   keepalive: int = 60) -> bytes:
    flags = 0x80 | 0x40 | 0x20 | 0x08 | 0x04  # username, password, will retain, will QoS 1, will; persistent
    return _packet(0x10, _s("MQTT") + bytes([4, flags]) + struct.pack(">H", keepalive) + _s(client_id)
                   + _s(will_topic) + _s(will) + _s(username) + _s(password))


def publish_packet(topic: str, payload: bytes, pid: int, retain: bool = False) -> bytes:
    return _packet(0x32 | (0x01 if retain else 0), _s(topic) + struct.pack(">H", pid) + payload)


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(1)
    mult, n = 1, 0
    while True:
        b = (await reader.readexactly(1))[0]
        n += (b & 0x7F) * mult
        if not b & 0x80:
            break
        mult *= 128
    return head[0], await reader.readexactly(n) if n else b""


class LightStats:
    def __init__(self) -> None:
        self.connect_s: list[float] = []
        self.connected = self.failed = self.sent = self.acked = self.status_acked = 0
        self.bytes_out = self.bytes_in = 0
        self.first_start = self.last_connack = 0.0


async def light_device(dev: str, port: int, interval: float, stop_at: float, stats: LightStats,
                       gate: asyncio.Semaphore, features: int = 16) -> None:
    from cloud_sync.protocol import dev_topic, encode

    conn = f"{random.getrandbits(64):016x}"  # one per connection: the will and the statuses share it

    def status(online: bool) -> bytes:
        return encode("pf.status/1", device=dev, online=online, ts=time.time(), seq=int(time.time() * 1000),
                      conn=conn, group=GROUP,
                      active={"name": "digits-mlp", "version": 1}, models={"digits-mlp": 1},
                      agent="pocketfleet-light/0.1", reason=None if online else "will")

    async with gate:
        t0 = time.monotonic()
        stats.first_start = stats.first_start or time.time()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 60)
            pkt = connect_packet(dev, dev, f"pw-{dev}", dev_topic(dev, "status"), status(False))
            writer.write(pkt)
            stats.bytes_out += len(pkt)
            kind, body = await asyncio.wait_for(read_packet(reader), 60)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            stats.failed += 1
            return
        if kind >> 4 != 2 or body[1] != 0:
            stats.failed += 1
            return
        stats.bytes_in += 4
        stats.connect_s.append(time.monotonic() - t0)
        stats.connected += 1
        stats.last_connack = time.time()
    pending: set[int] = set()
    status_pid = 1

    async def read_loop() -> None:
        try:
            while True:
                kind, body = await read_packet(reader)
                stats.bytes_in += 2 + len(body)
                if kind >> 4 == 4:  # PUBACK
                    pid = struct.unpack(">H", body[:2])[0]
                    if pid == status_pid:
                        stats.status_acked += 1
                    elif pid in pending:
                        pending.discard(pid)
                        stats.acked += 1
        except (OSError, asyncio.IncompleteReadError):
            return

    reading = asyncio.create_task(read_loop())
    sub = _packet(0x82, struct.pack(">H", 2) + _s(dev_topic(dev, "cmd")) + b"\x01")
    pkt = publish_packet(dev_topic(dev, "status"), status(True), status_pid, retain=True)
    writer.write(sub + pkt)
    stats.bytes_out += len(sub) + len(pkt)
    topic = dev_topic(dev, "telemetry")
    rid, pid = 0, 10
    rng = random.Random(dev)
    await asyncio.sleep(rng.random() * interval)
    while time.time() < stop_at:
        rid += 1
        pid = pid + 1 if pid < 65000 else 10
        now = time.time()
        n = rng.randint(40, 60)
        body = {"schema": "pf.telemetry/1", "device": dev, "model": {"name": "digits-mlp", "version": 1},
                "window": {"start": now - interval, "end": now}, "requests": n, "errors": {}, "error_count": 0,
                "latency_ms": {"p50": round(rng.uniform(0.8, 1.2), 3), "p95": round(rng.uniform(1.5, 2.5), 3),
                               "max": 4.0},
                "inputs": {"image": {"count": n, "mean": [round(rng.uniform(0.2, 0.4), 4)] * features,
                                     "var": [0.05] * features, "pooled": False}}, "unsampled": 0}
        payload = encode("pf.outbox/1", device=dev, id=rid, kind="telemetry", created=now, body=body)
        pkt = publish_packet(topic, payload, pid)
        pending.add(pid)
        writer.write(pkt)
        stats.bytes_out += len(pkt)
        stats.sent += 1
        try:
            await writer.drain()
        except OSError:
            break
        await asyncio.sleep(interval)
    await asyncio.sleep(min(5.0, interval))  # the last acknowledgements
    try:
        pkt = publish_packet(dev_topic(dev, "status"), status(False), 3, retain=True) + b"\xe0\x00"
        writer.write(pkt)
        await writer.drain()
        writer.close()
    except OSError:
        pass
    reading.cancel()


def light_runner(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    raise_nofile()
    stats = LightStats()

    async def main() -> None:
        gate = asyncio.Semaphore(spec["concurrent_connects"])
        await asyncio.gather(*(light_device(d, spec["port"], spec["interval"], spec["stop_at"], stats, gate)
                               for d in spec["devices"]))

    asyncio.run(main())
    out = {k: v for k, v in vars(stats).items()}
    out["rss_mb"] = proc_stats(os.getpid())["rss_mb"]
    out["cpu_s"] = proc_stats(os.getpid())["cpu_s"]
    Path(spec["out"]).write_text(json.dumps(out))


# ----------------------------------------------------------------------------------- full devices


def full_runner(spec_path: str) -> None:
    """Subprocess: real DeviceLinks + model stores + serving traffic; stats on request, stop on request."""
    import logging

    from cloud_sync.config import MqttConfig
    from cloud_sync.device import DeviceConfig, DeviceLink
    from cloud_sync.ota_client import OtaSettings
    from edge_agent.store import ModelStore
    from pocketfleet.sim.traffic import DeviceTraffic, TrafficPool, TrafficSettings, digits_inputs

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s runner %(name)s %(message)s")
    raise_nofile()
    spec = json.loads(Path(spec_path).read_text())
    control = Path(spec["control"])
    inputs = digits_inputs()
    traffic = TrafficSettings(**spec["traffic"])
    slots = threading.BoundedSemaphore(2)
    links, served = {}, {}
    pool = TrafficPool(traffic)  # two threads serve every device of this process (not five per device)
    for i, d in enumerate(spec["devices"]):
        state = Path(spec["root"]) / d
        store = ModelStore(state, spec["trust"])
        if not store.read_state():
            store.install(spec["seed"])
        mqtt = MqttConfig(host="127.0.0.1", port=spec["port"], client_id=d, username=d, password=f"pw-{d}",
                          reconnect_min_s=0.5, reconnect_max_s=10.0)
        cfg = DeviceConfig(device_id=d, state_dir=str(state), trust=spec["trust"], group=GROUP, mqtt=mqtt,
                           ota=OtaSettings(window=32, chunk_timeout_s=20.0))
        link = DeviceLink(cfg, store=store, install_slots=slots)
        if traffic.rate_hz > 0:  # 0: rollout-only devices (the lightest full device: link + store, no serving)
            served[d] = pool.add(DeviceTraffic(d, store, state, traffic, inputs, seed=i), link.sink)
        links[d] = link.start()
    if served:
        pool.start()
    deadline = time.monotonic() + 300
    while not all(link.client.connected for link in links.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    (control / f"ready-{spec['name']}").write_text("ok")
    while not (control / "stop").exists():
        time.sleep(0.2)
    (control / f"stats-{spec['name']}.json").write_text(json.dumps({
        "rss_mb": proc_stats(os.getpid())["rss_mb"], "cpu_s": proc_stats(os.getpid())["cpu_s"],
        "devices": len(links), "served": pool.served}))
    if served:
        pool.stop()
    for d in links:
        links[d].stop()


class Procs:
    """Runner subprocesses over a device list."""

    def __init__(self, work: Path, kind: str, devices: list[str], procs: int, spec: dict[str, Any]) -> None:
        self.control = work / "control"
        shutil.rmtree(self.control, ignore_errors=True)
        self.control.mkdir(parents=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names: list[str] = []
        self.outs: list[Path] = []
        for k in range(procs):
            part = devices[k::procs]
            if not part:
                continue
            name = f"{kind}{k}"
            out = work / f"{name}.out.json"
            path = work / f"{name}.json"
            path.write_text(json.dumps({**spec, "name": name, "devices": part, "control": str(self.control),
                                        "out": str(out)}))
            log = open(work / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
            self.procs.append(subprocess.Popen([sys.executable, __file__, f"--{kind}-runner", str(path)],
                                               stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": str(ROOT)}))
            self.names.append(name)
            self.outs.append(out)

    def wait_ready(self, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while not all((self.control / f"ready-{n}").exists() for n in self.names):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError("device runners did not come up (see *.log in the work dir)")
            time.sleep(0.5)

    def wait(self, timeout: float) -> None:
        for p in self.procs:
            p.wait(timeout)

    def stop(self) -> list[dict[str, Any]]:
        (self.control / "stop").write_text("")
        for p in self.procs:
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
        out = []
        for n in self.names:
            f = self.control / f"stats-{n}.json"
            if f.exists():
                out.append(json.loads(f.read_text()))
        return out


def cloud_workers(work: Path, state: Path, port: int, trust: Path, n: int, shared: bool) -> list[subprocess.Popen]:
    procs = []
    for i in range(1, n + 1):
        wid = f"cloud-{i}"
        cfg = work / f"{wid}.toml"
        cfg.write_text(
            f'[cloud]\nstate_dir = "{state}"\nworker_id = "{wid}"\ntrust = "{trust}"\n'
            f'shared_group = "{"pfcloud" if shared else ""}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nusername = "{wid}"\npassword = "pw-{wid}"\nmax_inflight = 256\n'
            f"[rollout]\ntick_s = 0.5\nresend_s = 60.0\ncanary_timeout_s = 900.0\nrollback_timeout_s = 300.0\n"
            f"probe_runs = 3\n")
        log = open(work / f"{wid}.log", "ab")  # noqa: SIM115
        cmd = [str(Path(sys.executable).parent / "pocketfleet"), "cloud", "run", "--config", str(cfg),
               "--log-level", "warning"]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": str(ROOT)}))
    return procs


def stop_procs(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


def start_broker(work: Path, devices: list[str], workers: int) -> Any:
    from tests.mosquitto import Mosquitto

    accounts = {d: ("device", GROUP) for d in devices} | {f"cloud-{i}": ("cloud", None) for i in range(1, workers + 1)}
    return Mosquitto(work, accounts=accounts, persistence=False).start(timeout=60)


def open_registry(state: Path, devices: list[str]) -> Any:
    from cloud_sync.registry import Registry

    reg = Registry(state / "registry.sqlite")
    with reg.tx() as db:
        for d in devices:
            db.execute("INSERT INTO accounts(username, role, grp, pw_hash, created) VALUES(?,?,?,?,?) "
                       "ON CONFLICT DO NOTHING", (d, "device", GROUP, "$7$101$AAAA$AAAA", time.time()))
            reg._ensure_device(db, d, GROUP)
    return reg


def pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else 0.0


# -------------------------------------------------------------------------------------- scenarios


def _sum_stats(pids: list[int]) -> dict[str, float]:
    stats = [proc_stats(p) for p in pids]
    return {"cpu_s": sum(s["cpu_s"] for s in stats), "rss_mb": sum(s["rss_mb"] for s in stats)}


def scenario_light(work: Path, trust: Path, n: int, procs: int, hold: float, interval: float,
                   n_workers: int = 1) -> dict[str, Any]:
    devices = [f"l{i:05d}" for i in range(n)]
    t = time.monotonic()
    broker = start_broker(work, devices, n_workers)
    setup_s = time.monotonic() - t
    state = work / "cloud"
    reg = open_registry(state, devices)
    workers = cloud_workers(work, state, broker.port, trust, n_workers, shared=n_workers > 1)
    time.sleep(3)
    bpid, cpids = broker.proc.pid, [w.pid for w in workers]
    b0, c0 = proc_stats(bpid), _sum_stats(cpids)
    start = time.time()
    stop_at = start + hold
    runners = Procs(work, "light", devices, procs, {"port": broker.port, "interval": interval, "stop_at": stop_at,
                                                     "concurrent_connects": 500})
    res: dict[str, Any] = {"devices": n, "processes": procs, "hold_s": hold, "interval_s": interval,
                           "cloud_workers": n_workers, "broker_setup_s": round(setup_s, 1)}
    try:
        online_at = None
        peak_b, peak_c = b0["rss_mb"], c0["rss_mb"]
        mid = None
        while any(p.poll() is None for p in runners.procs):
            now = time.time()
            if online_at is None:
                row = reg.query("SELECT COUNT(*) AS n FROM devices WHERE grp=? AND online=1", (GROUP,))[0]
                if row["n"] >= n:
                    online_at = now
            b, c = proc_stats(bpid), _sum_stats(cpids)
            peak_b, peak_c = max(peak_b, b["rss_mb"]), max(peak_c, c["rss_mb"])
            if mid is None and now > start + hold / 2:
                mid = b
            time.sleep(1.0)
        b1, c1 = proc_stats(bpid), _sum_stats(cpids)
        outs = [json.loads(p.read_text()) for p in runners.outs if p.exists()]
        sent = sum(o["sent"] for o in outs)
        acked = sum(o["acked"] for o in outs)
        # the cloud catches up: every record the broker acknowledged must end up in the registry
        deadline = time.monotonic() + 300
        stored = last = -1
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            stored = reg.query("SELECT COUNT(*) AS n FROM telemetry WHERE kind='telemetry'")[0]["n"]
            if stored >= acked:
                break
            if stored != last:
                last, stable_since = stored, time.monotonic()
            elif time.monotonic() - stable_since > 30:
                break
            time.sleep(1.0)
        drained = time.time()
        connects = [s for o in outs for s in o["connect_s"]]
        first = min(o["first_start"] for o in outs if o["first_start"])
        last_ack = max(o["last_connack"] for o in outs)
        msgs = sent + sum(o["connected"] for o in outs)  # telemetry + one status each (plus the wills)
        res.update({
            "connected": sum(o["connected"] for o in outs), "connect_failed": sum(o["failed"] for o in outs),
            "connect_storm_s": round(last_ack - first, 2), "connect_p50_ms": round(1000 * pct(connects, 50), 1),
            "connect_p95_ms": round(1000 * pct(connects, 95), 1),
            "registry_all_online_s": None if online_at is None else round(online_at - first, 1),
            "telemetry_sent": sent, "telemetry_acked": acked, "telemetry_stored": stored,
            "lost": max(0, acked - stored), "cloud_drain_s_after_hold": round(max(0.0, drained - stop_at), 1),
            "messages_per_s": round(msgs / max(1.0, hold), 1),
            "broker_rss_mb_peak": round(peak_b, 1), "broker_rss_mb_mid": round((mid or b1)["rss_mb"], 1),
            "broker_kb_per_connection": round(1024 * ((mid or b1)["rss_mb"] - b0["rss_mb"]) / max(1, n), 2),
            "broker_cpu_s": round(b1["cpu_s"] - b0["cpu_s"], 2),
            "broker_cpu_us_per_message": round(1e6 * (b1["cpu_s"] - b0["cpu_s"]) / max(1, msgs), 1),
            "cloud_rss_mb_peak": round(peak_c, 1), "cloud_cpu_s": round(c1["cpu_s"] - c0["cpu_s"], 2),
            "cloud_cpu_us_per_message": round(1e6 * (c1["cpu_s"] - c0["cpu_s"]) / max(1, msgs), 1),
            "device_side_kb_per_connection": round(1024 * sum(o["rss_mb"] for o in outs) / max(1, n), 1),
            "device_side_cpu_s": round(sum(o["cpu_s"] for o in outs), 1),
            "bytes_per_device_per_hour": round((sum(o["bytes_out"] + o["bytes_in"] for o in outs) / max(1, n))
                                               * 3600 / max(1.0, hold)),
            "registry_bytes": os.path.getsize(state / "registry.sqlite")
            + (os.path.getsize(state / "registry.sqlite-wal") if (state / "registry.sqlite-wal").exists() else 0),
        })
        log = broker.log.read_text(errors="replace") if broker.log.exists() else ""
        res["broker_dropped_warnings"] = log.count("Outgoing messages are being dropped")
        rows = reg.query("SELECT COUNT(*) AS n FROM telemetry_rollup")
        res["rollup_rows"] = rows[0]["n"]
        with contextlib.suppress(Exception):  # bytes per table (SQLite's dbstat, where compiled in)
            res["table_bytes"] = {r["name"]: r["bytes"] for r in reg.query(
                "SELECT name, SUM(pgsize) AS bytes FROM dbstat GROUP BY name ORDER BY bytes DESC LIMIT 8")}
    finally:
        for p in runners.procs:
            if p.poll() is None:
                p.kill()
        stop_procs(workers)
        reg.close()
        broker.stop()
    return res


def wait_rollout(reg: Any, rollout_id: str, timeout: float, states: tuple[str, ...]) -> dict[str, Any]:
    from cloud_sync.rollout import describe_rollout

    deadline = time.monotonic() + timeout
    while True:
        r = describe_rollout(reg, rollout_id)
        if r["state"] in states:
            return r
        if time.monotonic() > deadline:
            raise TimeoutError(f"rollout {rollout_id} still {r['state']} after {timeout}s: {r['counts']}")
        time.sleep(0.5)


def scenario_full(work: Path, key: Path, trust: Path, n: int, procs: int, skip: list[str],
                  traffic_hz: float = 1.0, telemetry_s: float = 2.0, service_ms: float = 5.0,
                  baseline_s: float = 8.0) -> dict[str, Any]:
    from cloud_sync.releases import create_release
    from cloud_sync.staged import parse_rate, parse_stages
    from pocketfleet.sim.fleet import make_digits_package

    devices = [f"dev-{i:04d}" for i in range(n)]
    pk = work / "packages"
    sim = {"service_ms": service_ms}  # per-request service time: the part a 3x slower model triples
    v1 = make_digits_package(pk / "v1.pfpkg", 1, key, hidden=32, seed=11, extra={"sim": sim})
    v2 = make_digits_package(pk / "v2-1mb.pfpkg", 2, key, hidden=max(16, MB // BYTES_PER_HIDDEN), seed=12,
                             extra={"sim": sim})
    v3 = make_digits_package(pk / "v3-slow.pfpkg", 3, key, hidden=max(16, MB // BYTES_PER_HIDDEN), seed=12,
                             head_seed=3, extra={"sim": {"service_ms": 3 * sim["service_ms"]}})
    broker = start_broker(work, devices, 2)
    state = work / "cloud"
    reg = open_registry(state, devices)
    workers = cloud_workers(work, state, broker.port, trust, 2, shared=True)
    t0 = time.monotonic()
    runners = Procs(work, "full", devices, procs, {
        "port": broker.port, "root": str(work / "devices"), "trust": str(trust), "seed": str(v1),
        "traffic": {"rate_hz": traffic_hz, "telemetry_interval_s": telemetry_s, "drain_interval_s": 1.0,
                    "fold_s": 1.0}})
    res: dict[str, Any] = {"devices": n, "processes": procs, "cloud_workers": 2, "traffic_hz": traffic_hz,
                           "telemetry_interval_s": telemetry_s, "service_ms": service_ms,
                           "baseline_s": baseline_s}
    if traffic_hz <= 0 and "abort" not in skip:
        raise SystemExit("--full-traffic-hz 0 serves no requests, so there is no telemetry to abort on: add --skip abort")
    try:
        runners.wait_ready()
        res["startup_s"] = round(time.monotonic() - t0, 1)
        time.sleep(baseline_s)  # v1 telemetry: the p95 baseline of every device
        abort = ["error_rate>0.05@5", "failure_rate>0.2@3"]
        pids = {"broker": [broker.proc.pid], "cloud": [w.pid for w in workers], "devices": [p.pid for p in runners.procs]}
        if "rollout" not in skip:
            cpu0 = {k: _sum_stats(v)["cpu_s"] for k, v in pids.items()}
            t, load0 = time.monotonic(), os.getloadavg()
            out = create_release(reg, state / "artifacts", v2, GROUP, str(trust), plan=parse_stages("1%,10%", 1.0),
                                 abort=abort)
            final = wait_rollout(reg, out["rollout_id"], 1800, ("complete", "aborted", "failed"))
            elapsed = time.monotonic() - t
            cpu = {k: round(_sum_stats(v)["cpu_s"] - cpu0[k], 1) for k, v in pids.items()}
            stages = [e for e in final["stage_log"] if e["kind"] == "stage_done"]
            mb_moved = n * v2.stat().st_size / MB
            res["staged_1mb"] = {
                "package_bytes": v2.stat().st_size, "state": final["state"], "reason": final["reason"],
                "seconds": round(elapsed, 1), "stages": final["stages"],
                "stage_done_at_s": [round(e["ts"] - final["created"], 1) for e in stages],
                "installed": final["counts"].get("installed", 0), "goal_s": 45,
                "cpu_s": cpu, "cpu_ms_per_device_mb": {k: round(1000 * v / mb_moved, 1) for k, v in cpu.items()},
                "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg(),
                "bytes_rx_mean": round(sum((d["progress"] or {}).get("bytes_rx", 0) for d in final["devices"])
                                       / max(1, len(final["devices"]))),
            }
            print(f"  staged 1 MB: {final['state']} in {elapsed:.1f} s", flush=True)
            time.sleep(8)  # v2 telemetry: the new baseline
        if "abort" not in skip:
            base = max(1, round(0.02 * n))
            t, load0 = time.monotonic(), os.getloadavg()
            out = create_release(reg, state / "artifacts", v3, GROUP, str(trust),
                                 plan=parse_rate(f"{base},2", 60.0),
                                 abort=[f"p95_ratio>1.5@{min(5, base)}", *abort])
            aborting = wait_rollout(reg, out["rollout_id"], 900, ("aborting", "aborted", "complete"))
            t_abort = time.monotonic() - t
            final = wait_rollout(reg, out["rollout_id"], 900, ("aborted", "complete"))
            reached = len(final["devices"])
            got = sum(1 for d in final["devices"] if d["state"] in ("installed", "rolled_back", "rollback_sent"))
            res["telemetry_abort"] = {
                "state": final["state"], "reason": final["reason"], "stages": final["stages"],
                "stage_reached": final["stage"] + 1, "devices_assigned": reached, "devices_got_it": got,
                "share_of_fleet": round(reached / n, 4), "goal_share": 0.05,
                "seconds_to_abort": round(t_abort, 1), "seconds_to_rolled_back": round(time.monotonic() - t, 1),
                "rolled_back": final["counts"].get("rolled_back", 0),
                "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg(),
                "abort": aborting.get("abort"),
            }
            print(f"  telemetry abort: {final['state']} at {reached}/{n} devices in {t_abort:.1f} s", flush=True)
    finally:
        stats = runners.stop()
        stop_procs(workers)
        reg.close()
        broker.stop()
    if stats:
        res["device_side_mb_per_device"] = round(sum(s["rss_mb"] for s in stats) / max(1, n), 2)
        res["requests_served"] = sum(s["served"] for s in stats)
    return res


# ------------------------------------------------------------------------------------------ output


def render(res: dict[str, Any]) -> str:
    lines = [f"{'scenario':<34} {'figure':<34} value"]

    def row(s: str, k: str, v: Any) -> None:
        lines.append(f"{s:<34} {k:<34} {v}")

    if "light" in res:
        r = res["light"]
        s = f"(a) {r['devices']} light devices, {r['hold_s']:g} s"
        for k in ("connected", "connect_failed", "connect_storm_s", "connect_p95_ms", "registry_all_online_s",
                  "messages_per_s", "telemetry_acked", "telemetry_stored", "lost", "cloud_drain_s_after_hold",
                  "broker_rss_mb_peak", "broker_kb_per_connection", "broker_cpu_us_per_message", "cloud_rss_mb_peak",
                  "cloud_cpu_us_per_message", "device_side_kb_per_connection", "bytes_per_device_per_hour",
                  "registry_bytes", "rollup_rows"):
            row(s, k, r.get(k))
    for key in [k for k in res if k.startswith("full") and isinstance(res[k], dict) and "devices" in res[k]]:
        r = res[key]
        s = f"(b) {key}: {r['devices']} full devices"
        row(s, "startup_s", r.get("startup_s"))
        row(s, "device_side_mb_per_device", r.get("device_side_mb_per_device"))
        if "staged_1mb" in r:
            x = r["staged_1mb"]
            row(s, "staged 1 MB: state", x["state"])
            row(s, "staged 1 MB: seconds (goal <= 45)", x["seconds"])
            row(s, "staged 1 MB: stages / done at s", f"{x['stages']} / {x['stage_done_at_s']}")
            if "cpu_ms_per_device_mb" in x:
                row(s, "staged 1 MB: CPU ms per device MB", x["cpu_ms_per_device_mb"])
                row(s, "staged 1 MB: wire bytes per device", x["bytes_rx_mean"])
                row(s, "staged 1 MB: load average start/end", f"{x['loadavg_at_start'][0]:.1f} / {x['loadavg_at_end'][0]:.1f}")
        if "telemetry_abort" in r:
            x = r["telemetry_abort"]
            row(s, "3x slower: state", x["state"])
            row(s, "3x slower: share of fleet (<= 5%)", f"{x['devices_assigned']}/{r['devices']} = {x['share_of_fleet']:.1%}")
            row(s, "3x slower: s to abort / rolled back", f"{x['seconds_to_abort']} / {x['seconds_to_rolled_back']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--light", type=int, default=10_000, help="lightweight connected devices (a)")
    ap.add_argument("--light-procs", type=int, default=4)
    ap.add_argument("--light-workers", type=int, default=2, help="cloud workers (shared subscriptions) for (a)")
    ap.add_argument("--hold", type=float, default=300.0, help="seconds the light devices stay connected")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between telemetry records per device")
    ap.add_argument("--full", type=int, default=1000, help="full devices for the staged rollout and abort (b)")
    ap.add_argument("--full-procs", type=int, default=8)
    ap.add_argument("--full-traffic-hz", type=float, default=1.0,
                    help="requests/s each full device serves (0: rollout-only devices, no serving, no telemetry)")
    ap.add_argument("--full-telemetry-s", type=float, default=2.0, help="telemetry interval of each full device")
    ap.add_argument("--full-service-ms", type=float, default=5.0,
                    help="service time per request of the good releases (the slow one takes 3x)")
    ap.add_argument("--full-baseline-s", type=float, default=8.0,
                    help="seconds of telemetry before the first release (every device's p95 baseline)")
    ap.add_argument("--full-key", default="full",
                    help="the key of the result file that (b) is written under (with --update, others are kept)")
    ap.add_argument("--skip", action="append", default=[], choices=["light", "rollout", "abort"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fleet_scale.json"))
    ap.add_argument("--update", action="store_true",
                    help="keep the scenarios of an existing --out file that this run skips")
    ap.add_argument("--workdir", help="keep the working files here (default: a temp dir, removed)")
    ap.add_argument("--light-runner", help=argparse.SUPPRESS)
    ap.add_argument("--full-runner", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.light_runner:
        light_runner(args.light_runner)
        return 0
    if args.full_runner:
        full_runner(args.full_runner)
        return 0
    from export.signing import generate_keys

    nofile = raise_nofile()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pf-scale-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    keys = work / "keys"
    if not (keys / "pocketfleet.key").exists():
        generate_keys(keys)
    key, trust = keys / "pocketfleet.key", keys / "pocketfleet.pub"
    version = subprocess.run(["/usr/sbin/mosquitto", "-h"], capture_output=True, text=True).stdout.split("\n")[0]
    res: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "nofile": nofile,
                                       "loadavg_at_start": os.getloadavg()},
                           "broker": version.split()[-1] if version else "?", "args": vars(args)}
    started = time.monotonic()
    try:
        if "light" not in args.skip:
            print(f"(a) {args.light} light devices in {args.light_procs} processes for {args.hold:g} s", flush=True)
            res["light"] = scenario_light(work / "light", trust, args.light, args.light_procs, args.hold, args.interval,
                                          args.light_workers)
        if not {"rollout", "abort"} <= set(args.skip) and args.full:
            print(f"(b) {args.full} full devices in {args.full_procs} processes", flush=True)
            res[args.full_key] = scenario_full(work / "full", key, trust, args.full, args.full_procs, args.skip,
                                       args.full_traffic_hz, args.full_telemetry_s, args.full_service_ms,
                                       args.full_baseline_s)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    res["total_seconds"] = round(time.monotonic() - started, 1)
    if args.update and Path(args.out).exists():
        old = json.loads(Path(args.out).read_text())
        res = {**old, **{k: v for k, v in res.items() if k in ("light", args.full_key) or k not in old},
               "runs": [*old.get("runs", [{k: old.get(k) for k in ("args", "machine", "total_seconds")}]),
                        {k: res.get(k) for k in ("args", "machine", "total_seconds")}]}
    res["machine"]["loadavg_at_end"] = os.getloadavg()
    print()
    print(render(res))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, sort_keys=True, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
