"""A simulated fleet in one process, for the demo, the tests and benchmarks/ota.py.

    fleet = Fleet(workdir, devices=4, group="lab").start()          # embedded amqtt broker by default
    fleet.install_everywhere(v1_package)                             # seed each device's store
    out = fleet.release(v2_package, canary="25%", gates=["golden>=0.9"])
    final = fleet.wait(out["rollout_id"])                            # {'state': 'complete', ...}
    fleet.versions()                                                 # {'dev-000': 2, ...}
    fleet.stop()

Each simulated device is a real `DeviceLink` (its own MQTT connection, session and last will) bound to
its own agent state directory with a real `edge_agent.store.ModelStore`; the devices share this process
(one paho network thread and one OTA thread each). The cloud is a real `Cloud` worker in-process, or
any number of them; its state is SQLite under `workdir/cloud`.

`make_digits_package` builds small real models for tests and benchmarks: an ONNX MLP over scikit-learn's
8x8 digits (random ReLU features + a ridge-regression head), exported, packaged with samples and the
signed golden labels, at any size (the hidden width sets it).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_sync.broker_files import Account, hash_password
from cloud_sync.cloud import Cloud, CloudConfig, CloudSettings, wait_for
from cloud_sync.config import MqttConfig
from cloud_sync.device import DeviceConfig, DeviceLink
from cloud_sync.ota_client import OtaSettings
from cloud_sync.rollout import RolloutConfig

log = logging.getLogger("pocketfleet.fleet")

FINAL_STATES = ("complete", "failed", "superseded", "aborted")
MqttFor = Callable[[str], MqttConfig]


# ------------------------------------------------------------------------------------------- packages


def make_digits_package(
    out: str | Path,
    version: int,
    key: Any,
    hidden: int = 256,
    name: str = "digits-mlp",
    seed: int = 0,
    head_seed: int | None = None,
    broken: bool = False,
    samples: int = 16,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a signed package of a 64 -> hidden (ReLU) -> 10 ONNX classifier of the digits.

    The hidden layer depends only on `seed`; the head is a ridge fit, perturbed by `head_seed` (a
    "head-only" update), or scrambled when `broken` (a model that runs but answers wrongly: its samples
    still match its own outputs, so only the golden-set gate catches it). Size ~ 296 * hidden bytes.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from compress.zoo.digits_data import digits_all
    from export.package import build_package
    from export.samples import Samples

    images, y = digits_all()
    x = images.reshape(len(images), -1)
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((64, hidden)) / 4).astype(np.float32)
    b1 = (rng.standard_normal(hidden) / 4).astype(np.float32)
    train, test = slice(0, 1400), slice(1400, None)
    h = np.maximum(x[train] @ w1 + b1, 0)
    t = np.eye(10, dtype=np.float32)[y[train]]
    if hidden <= h.shape[0]:  # ridge regression, primal or dual form (whichever system is smaller)
        w2 = np.linalg.solve(h.T @ h + np.eye(hidden, dtype=np.float32), h.T @ t).astype(np.float32)
    else:
        w2 = (h.T @ np.linalg.solve(h @ h.T + np.eye(h.shape[0], dtype=np.float32), t)).astype(np.float32)
    b2 = np.zeros(10, np.float32)
    if head_seed is not None:
        w2 = (w2 * (1 + 0.01 * np.random.default_rng(head_seed).standard_normal(w2.shape))).astype(np.float32)
    if broken:
        w2 = w2[:, np.random.default_rng(seed + 1).permutation(10)]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["image", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
         helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
         helper.make_node("Add", ["l0", "b2"], ["logits"])],
        "digits_mlp",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pocketfleet")
    model.ir_version = 8
    raw = model.SerializeToString()
    sess = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
    xs = x[test][:samples]
    logits = sess.run(None, {"image": xs})[0]
    acc = float((sess.run(None, {"image": x[test]})[0].argmax(1) == y[test]).mean())
    fields = {
        "name": name, "version": version, "format": "onnx", "dtype": "fp32",
        "inputs": [{"name": "image", "shape": ["batch", 64], "dtype": "float32"}],
        "outputs": [{"name": "logits", "shape": ["batch", 10], "dtype": "float32"}],
        "report": {"accuracy": acc}, "workload": "digits",
        "extra": {"golden": {"labels": [int(v) for v in y[test][:samples]], "output": "logits"}, **(extra or {})},
    }
    out = Path(out)
    build_package({"model.onnx": raw}, fields, Samples({"image": xs}, {"logits": logits}), out, key=key)
    del onnx
    return out


# ---------------------------------------------------------------------------------------------- fleet


class Fleet:
    """Broker + cloud worker(s) + N simulated devices in this process."""

    def __init__(
        self,
        workdir: str | Path,
        devices: int = 3,
        group: str = "lab",
        mqtt_for: MqttFor | None = None,
        keys_dir: str | Path | None = None,
        workers: int = 1,
        shared_group: str = "pfcloud",
        rollout: RolloutConfig | None = None,
        ota: OtaSettings | None = None,
        device_prefix: str = "dev",
        device_dirs: dict[str, str | Path] | None = None,
        traffic: Any = None,
        console: Any = None,
        cloud: dict[str, Any] | None = None,
    ) -> None:
        """`device_dirs` binds devices to existing agent state directories (device id -> dir); by default
        `devices` ids named `<device_prefix>-NNN` get fresh directories under `workdir/devices/`.
        `traffic` (pocketfleet.sim.traffic.TrafficSettings): every device also serves requests with its
        active version and sends the agent's telemetry through a durable outbox. `cloud`: CloudSettings
        fields for every worker (e.g. {"multicast_min": 0})."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.group = group
        self.device_dirs = {d: Path(p) for d, p in (device_dirs or {}).items()}
        self.device_ids = sorted(self.device_dirs) or [f"{device_prefix}-{i:03d}" for i in range(devices)]
        self._mqtt_for = mqtt_for
        self.broker: Any = None
        self.keys_dir = Path(keys_dir) if keys_dir else self.workdir / "keys"
        self.n_workers = workers
        self.shared_group = shared_group
        self.rollout_config = rollout or RolloutConfig(tick_s=0.2, resend_s=10.0, canary_timeout_s=120.0,
                                                       rollback_timeout_s=60.0, probe_runs=5)
        self.ota_settings = ota or OtaSettings(window=16, chunk_timeout_s=10.0)
        self.workers: list[Cloud] = []
        self.devices: dict[str, DeviceLink] = {}
        self.traffic_settings = traffic
        self.console_settings = console  # cloud_sync.console.ConsoleSettings for the first worker
        self.cloud_overrides = dict(cloud or {})
        self.traffic: dict[str, Any] = {}
        self._inputs: Any = None
        self.cloud_config: CloudConfig | None = None
        # every simulated device shares this process: at most two installs or probes hold a model at once
        self.install_slots = threading.BoundedSemaphore(2)

    # ------------------------------------------------------------------------------------------ setup

    @property
    def key(self) -> Path:
        return self.keys_dir / "pocketfleet.key"

    @property
    def trust(self) -> Path:
        return self.keys_dir / "pocketfleet.pub"

    def mqtt_for(self, username: str) -> MqttConfig:
        if self._mqtt_for is not None:
            return self._mqtt_for(username)
        assert self.broker is not None
        return MqttConfig(host=self.broker.host, port=self.broker.port, client_id=username, protocol="3.1.1",
                          reconnect_min_s=0.1, reconnect_max_s=2.0)

    def start(self, start_devices: bool = True) -> Fleet:
        if self._mqtt_for is None and self.broker is None:
            from cloud_sync.broker import EmbeddedBroker

            self.broker = EmbeddedBroker(port=0).start()
        if not self.trust.exists():
            from export.signing import generate_keys

            generate_keys(self.keys_dir)
        mqtt = self.mqtt_for("cloud-1")
        v311 = mqtt.protocol == "3.1.1" or self.broker is not None
        self.cloud_config = CloudConfig(
            cloud=CloudSettings(state_dir=str(self.workdir / "cloud"), worker_id="cloud-1", trust=str(self.trust),
                                shared_group="" if v311 else self.shared_group, **self.cloud_overrides),
            mqtt=mqtt, rollout=self.rollout_config,
        )
        registry = self.cloud_config.open_registry()
        for d in self.device_ids:
            registry.put_account(Account(d, "device", hash_password(d), self.group))
        registry.close()
        for i in range(self.n_workers):
            self.start_worker(i)
        if start_devices:
            self.start_devices()
        return self

    def start_devices(self) -> None:
        for d in self.device_ids:
            if d not in self.devices:
                self.start_device(d)
        if self.n_workers:
            self.wait_online()

    def worker_config(self, i: int) -> CloudConfig:
        assert self.cloud_config is not None
        wid = f"cloud-{i + 1}"
        base = self.cloud_config
        cfg = CloudConfig(cloud=CloudSettings(**{**base.cloud.__dict__, "worker_id": wid}),
                          mqtt=self.mqtt_for(wid), rollout=base.rollout)
        if i == 0 and self.console_settings is not None:
            cfg.console = self.console_settings
        return cfg

    def start_worker(self, i: int = 0) -> Cloud:
        cloud = Cloud(self.worker_config(i)).start()
        self.workers.append(cloud)
        return cloud

    def store(self, device: str) -> Any:
        from edge_agent.store import ModelStore

        return ModelStore(self.state_dir(device), self.trust)

    def state_dir(self, device: str) -> Path:
        return self.device_dirs.get(device) or self.workdir / "devices" / device

    def start_device(self, device: str) -> DeviceLink:
        cfg = DeviceConfig(device_id=device, state_dir=str(self.state_dir(device)), trust=str(self.trust),
                           group=self.group, mqtt=self.mqtt_for(device), ota=self.ota_settings)
        store = self.store(device)
        link = DeviceLink(cfg, store=store, install_slots=self.install_slots)
        if self.traffic_settings is not None:
            from pocketfleet.sim.traffic import DeviceTraffic, digits_inputs

            if self._inputs is None:
                self._inputs = digits_inputs()
            self.state_dir(device).mkdir(parents=True, exist_ok=True)
            self.traffic[device] = DeviceTraffic(device, store, self.state_dir(device), self.traffic_settings,
                                                 self._inputs, seed=len(self.traffic)).start(link.sink)
        link.start()
        self.devices[device] = link
        return link

    def stop_device(self, device: str, clean: bool = True) -> None:
        tr = self.traffic.pop(device, None)
        if tr is not None:
            tr.stop()
        link = self.devices.pop(device, None)
        if link is not None:
            link.stop(clean=clean)

    def install_everywhere(self, package: str | Path) -> None:
        """Seed every device's store directly (as `pocketfleet agent install` would), then announce it."""
        for d in self.device_ids:
            self.store(d).install(package)
            if d in self.devices:
                self.devices[d].publish_status()

    def wait_online(self, timeout: float = 30.0) -> None:
        reg = self.registry()
        try:
            wait_for(lambda: all(r["online"] for r in reg.devices(self.group)) and
                     len(reg.devices(self.group)) == len(self.device_ids), timeout)
        finally:
            reg.close()

    def registry(self) -> Any:
        assert self.cloud_config is not None
        return self.cloud_config.open_registry()

    # --------------------------------------------------------------------------------------- rollouts

    def release(self, package: str | Path, canary: str | float = "10%", gates: list[str] | None = None,
                rollback: bool = False, plan: Any = None, abort: list[str] | None = None) -> dict[str, Any]:
        from cloud_sync.releases import create_release, parse_canary

        assert self.cloud_config is not None
        reg = self.registry()
        try:
            return create_release(reg, self.cloud_config.artifacts_dir, package, self.group, str(self.trust),
                                  parse_canary(canary), gates or [], rollback=rollback,
                                  rollback_key=self.key if rollback else None, plan=plan, abort=abort)
        finally:
            reg.close()

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        from cloud_sync.rollout import describe_rollout

        reg = self.registry()
        try:
            return describe_rollout(reg, rollout_id)
        finally:
            reg.close()

    def wait(self, rollout_id: str, timeout: float = 120.0, states: tuple[str, ...] = FINAL_STATES) -> dict[str, Any]:
        """Wait until the rollout reaches one of `states`; returns describe_rollout()."""
        return wait_for(lambda: (r := self.rollout(rollout_id))["state"] in states and r, timeout, interval=0.1)

    def versions(self, name: str | None = None) -> dict[str, int | None]:
        """The active version of each device, read from its store."""
        out: dict[str, int | None] = {}
        for d in self.device_ids:
            models = self.store(d).read_state()
            m = models.get(name) if name else (next(iter(models.values())) if models else None)
            out[d] = m.active if m else None
        return out

    def stop(self) -> None:
        for d in list(self.devices):
            self.stop_device(d)
        for w in self.workers:
            w.stop()
        self.workers.clear()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(), time.perf_counter() - start
