"""A hostile fleet against a real mosquitto (issue 12): while a rollout and a federated round run, one
provisioned device attacks -- poison and oversized telemetry, malformed messages, subscriptions to the
cloud's shared groups, repeated `again` chunk requests, publishing on and reading other devices' topics.
Every legitimate message is accounted for; the rollout and the round complete."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cloud_sync.broker_files import Account, hash_password
from cloud_sync.client import Message, MqttClient
from cloud_sync.cloud import wait_for
from cloud_sync.fl.client import FLClient
from cloud_sync.fl.mqtt import MqttCloudTransport, MqttDeviceTransport
from cloud_sync.fl.rounds import Aggregator, TaskConfig
from cloud_sync.protocol import dev_filter, dev_topic, encode
from edge_agent.fl import head_trainer_fn
from edge_agent.training import DenseLayer, Head, HeadTrainer, LocalDataset
from pocketfleet.sim.fleet import Fleet, make_digits_package
from tests.fl_helpers import digits_flat
from tests.mosquitto import Mosquitto

pytestmark = pytest.mark.mosquitto

DEVICES = [f"dev-{i:03d}" for i in range(4)]
EVIL = "evil-1"
TELEMETRY_EACH = 20
HEAD = Head([DenseLayer("w", "b")])


def _attack(evil: MqttClient, release_id: str, chunks: int, stop: threading.Event, sent: dict[str, int]) -> None:
    """One round of every attack, repeated until `stop`."""
    def pub(topic: str, payload: bytes, what: str) -> None:
        evil.publish(topic, payload, qos=1)
        sent[what] = sent.get(what, 0) + 1

    own = lambda leaf: dev_topic(EVIL, leaf)  # noqa: E731
    n = 0
    while not stop.is_set():
        n += 1
        rec = {"schema": "pf.outbox/1", "device": EVIL, "id": n, "kind": "telemetry", "created": 1.0, "body": {}}
        pub(own("telemetry"), json.dumps({**rec, "created": 10**30}).encode(), "poison_int")  # case 1
        pub(own("telemetry"), json.dumps({**rec, "id": f"s{n}"}).replace('"telemetry"', '"\\ud800"').encode(),
            "poison_unstorable")
        pub(own("telemetry"), b'{"schema":"pf.outbox/1","body":' + b"[" * 50_000 + b"]" * 50_000 + b"}", "deep")
        if n % 10 == 1:
            pub(own("telemetry"), b"x" * (300 << 10), "oversized")
        pub(own("ota"), b"\xff\xfe not json", "malformed")
        pub(own("req"), encode("pf.chunk.request/1", release_id=release_id,
                               idx=[i % chunks for i in range(64)], again=True), "again_request")  # case 7
        pub(own("fl/up/garbage"), b"\x00" * 1024, "fl_garbage")
        for victim in DEVICES[:2]:  # other devices' topics: refused by the ACL
            pub(dev_topic(victim, "telemetry"), json.dumps({**rec, "device": victim}).encode(), "foreign")
            pub(dev_topic(victim, "ota"), b"{}", "foreign")
        stop.wait(0.25)


def test_a_hostile_device_loses_no_legitimate_message_and_stops_no_rollout_or_round(tmp_path: Path) -> None:
    from export.signing import generate_keys

    keys = tmp_path / "keys"
    generate_keys(keys)
    v1 = make_digits_package(tmp_path / "v1.pfpkg", 1, keys / "pocketfleet.key")
    v2 = make_digits_package(tmp_path / "v2.pfpkg", 2, keys / "pocketfleet.key", head_seed=1)
    accounts = {d: ("device", "lab") for d in DEVICES} | {EVIL: ("device", "evil"), "cloud-1": ("cloud", None),
                                                          "flagg": ("cloud", None)}
    with Mosquitto(tmp_path, accounts=accounts, persistence=False) as broker:
        fleet = Fleet(tmp_path / "fleet", devices=len(DEVICES), mqtt_for=broker.mqtt_config, keys_dir=keys)
        fleet.start(start_devices=False)
        reg = fleet.registry()
        reg.put_account(Account(EVIL, "device", hash_password(EVIL), "evil"))  # provisioned, in its own group
        reg.close()
        fleet.start_devices()
        fleet.install_everywhere(v1)
        from cloud_sync.releases import create_release

        reg = fleet.registry()  # a release assigned to the attacker, so that its chunk requests are served
        evil_rel = create_release(reg, fleet.cloud_config.artifacts_dir, v2, "evil", str(fleet.trust), canary=0)
        reg.close()

        # the attacker: its own credentials, subscribed to the cloud's groups and to other devices' commands
        evil = MqttClient(broker.mqtt_config(EVIL))
        stolen: list[Message] = []
        for flt in (dev_filter("telemetry", "pfcloud"), dev_filter("ota", "pfcloud"), dev_filter("req", "pfcloud"),
                    dev_filter("fl/up/#", "pffl"), dev_topic(DEVICES[0], "cmd"), dev_topic(DEVICES[0], "chunk"),
                    "pf/v1/dev/+/telemetry"):
            evil.subscribe(flt, stolen.append, qos=1)
        chunk_bytes: list[int] = []
        evil.subscribe(dev_topic(EVIL, "chunk"), lambda m: chunk_bytes.append(len(m.payload)), qos=1)
        evil.start().wait_connected()
        wait_for(lambda: evil.counters.get("subscribe_refused") >= 4, 10)

        # a federated round over the devices' own connections
        x, y = digits_flat("train")
        parts = np.array_split(np.random.default_rng(1).permutation(len(y)), len(DEVICES))
        fl_links = []
        for dev, p in zip(DEVICES, parts, strict=True):
            mc = fleet.devices[dev].client
            link = MqttDeviceTransport(mc, dev, group="lab")
            fl = FLClient(dev, head_trainer_fn(HeadTrainer(HEAD), LocalDataset({"features": x[p]}, y[p])), len(p),
                          tmp_path / "fl" / dev, link.send_checkin, link.send_update, send_secagg=link.send_secagg)
            link.bind(fl)
            fl_links.append(link)
        aggc = MqttClient(broker.mqtt_config("flagg"), name="flagg")
        transport = MqttCloudTransport(aggc)
        agg = Aggregator(tmp_path / "fl.sqlite", transport)
        transport.bind(agg)
        aggc.start().wait_connected()

        stop = threading.Event()
        sent: dict[str, int] = {}
        attacker = threading.Thread(target=_attack, args=(evil, evil_rel["release_id"], evil_rel["chunks"], stop, sent),
                                    daemon=True)
        t0 = time.monotonic()
        attacker.start()
        try:
            rollout = fleet.release(v2, canary="25%")
            agg.create_task(TaskConfig(task="hostile", rounds=1, clients_per_round=4, over_selection=1.0,
                                       checkin_target=4, checkin_s=3, round_s=40, group="lab",
                                       train={"epochs": 1, "lr": 0.1}), HEAD.init([64, 10], seed=0))
            fl_result: dict = {}
            runner = threading.Thread(target=lambda: fl_result.update(agg.run("hostile", timeout=60)), daemon=True)
            runner.start()
            # legitimate telemetry from every device, on its own connection, during all of it
            acks: list[bool] = []
            for i in range(TELEMETRY_EACH):
                for dev in DEVICES:
                    payload = encode("pf.outbox/1", device=dev, id=i, kind="telemetry", created=time.time(),
                                     body={"i": i})
                    fleet.devices[dev].client.publish(dev_topic(dev, "telemetry"), payload, qos=1,
                                                      on_ack=lambda ok, _: acks.append(ok))
                time.sleep(0.02)
            done = fleet.wait(rollout["rollout_id"], timeout=90)
            runner.join(70)
            stop.wait(max(0.0, 3.0 - (time.monotonic() - t0)))  # the attack goes on for 3 s at least
        finally:
            stop.set()
            attacker.join(5)
        elapsed = time.monotonic() - t0
        worker = fleet.workers[0]
        assert done["state"] == "complete", done
        assert set(fleet.versions().values()) == {2}
        assert fl_result.get("state") == "finished", fl_result
        assert [r["state"] for r in fl_result["rounds"]] == ["done"]
        assert fl_result["rounds"][0]["result"]["participants"] == 4
        # every legitimate telemetry record was stored, exactly once
        wait_for(lambda: len(acks) == TELEMETRY_EACH * len(DEVICES), 20)
        assert all(acks)
        reg = fleet.registry()
        try:
            wait_for(lambda: sum(len(reg.telemetry(d)) for d in DEVICES) == TELEMETRY_EACH * len(DEVICES), 20)
            stored = {(r["device"], r["record_id"]) for d in DEVICES for r in reg.telemetry(d)}
            forged = [r for r in reg.telemetry() if r["device"] in DEVICES and json.loads(r["body"]) == {}]
            letters = reg.dead_letters()
        finally:
            reg.close()
        assert stored == {(d, str(i)) for d in DEVICES for i in range(TELEMETRY_EACH)}
        assert forged == []  # nothing published on another device's topic got in
        # ... and every attack was refused, counted, and went nowhere
        assert stolen == [], [m.topic for m in stolen][:5]
        wait_for(lambda: worker.counters().get("telemetry_dead_letter", 0) == sent["poison_unstorable"], 20)
        wait_for(lambda: evil.counters.get("publish_refused") >= sent["foreign"], 10)
        counters = worker.counters()
        assert counters.get("malformed", 0) >= sent["poison_int"] + sent["malformed"] + sent["deep"]
        assert len(letters) <= sent["poison_unstorable"]
        assert counters.get("duplicate_requests", 0) > 0
        asked = sent["again_request"] * 64 * evil_rel["size"] / evil_rel["chunks"]  # what 838x would have sent
        again_s = worker.config.cloud.again_min_s
        assert sum(chunk_bytes) <= evil_rel["size"] * (elapsed / again_s + 2), (sum(chunk_bytes), asked)
        print(f"hostile fleet: {elapsed:.1f} s, attacker sent {sum(sent.values())} messages {sent}, "
              f"cloud counters {counters}, chunk bytes to attacker {sum(chunk_bytes)} of {asked:.0f} asked "
              f"(release {evil_rel['size']} B)")
        evil.stop()
        for link in fl_links:
            link.stop()
        aggc.stop()
        fleet.stop()
