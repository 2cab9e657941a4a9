"""Cloud-worker hardening (issue 12, cases 1, 7 and 10): poison telemetry is set aside and acknowledged,
chunk requests are rate-limited per device, protocol fields are full-match and bounded."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_sync.client import MqttClient
from cloud_sync.cloud import Cloud, CloudConfig, CloudSettings, wait_for
from cloud_sync.errors import ProtocolError
from cloud_sync.protocol import check_id, decode, dev_topic, encode, valid_id
from tests.mosquitto import Mosquitto

ACCOUNTS = {"dev-c": ("device", "lab"), "dev-d": ("device", "lab"), "cloud-1": ("cloud", None)}


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(keys folder, a signed digits package), made once for the module."""
    from export.signing import generate_keys
    from pocketfleet.sim.fleet import make_digits_package

    keys = tmp_path_factory.mktemp("keys")
    generate_keys(keys)
    return keys, make_digits_package(keys / "v1.pfpkg", 1, keys / "pocketfleet.key")


def _cloud(tmp_path: Path, broker: Mosquitto, **settings: object) -> Cloud:
    cfg = CloudConfig(cloud=CloudSettings(state_dir=str(tmp_path / "cloud"), worker_id="cloud-1", **settings),
                      mqtt=broker.mqtt_config("cloud-1"))
    return Cloud(cfg).start()


def _record(i: int, **over: object) -> dict:
    return {"schema": "pf.outbox/1", "device": "dev-c", "id": i, "kind": "telemetry", "created": 1.7e9,
            "body": {"n": i}, **over}


@pytest.mark.mosquitto
def test_poison_telemetry_is_dead_lettered_acknowledged_and_never_stops_other_messages(tmp_path: Path) -> None:
    """Before: `created` = 10**30 raised OverflowError in the registry; the worker retried that batch forever,
    never acknowledged it, and no later telemetry was stored (nor after a restart)."""
    with Mosquitto(tmp_path, accounts=dict(ACCOUNTS)) as broker:
        cloud = _cloud(tmp_path, broker)
        dev = MqttClient(broker.mqtt_config("dev-c")).start().wait_connected()
        acks: list[bool] = []
        poison = [
            json.dumps(_record(1, created=10**30)).encode(),  # the attack of the report: refused as malformed
            json.dumps(_record(2, id=2**70)).encode(),
            # valid JSON and schema, but SQLite cannot store it (lone surrogate): dead-lettered
            b'{"schema":"pf.outbox/1","device":"dev-c","id":3,"kind":"\\ud800","created":1.0,"body":{}}',
        ]
        for raw in poison:
            dev.publish(dev_topic("dev-c", "telemetry"), raw, on_ack=lambda ok, _: acks.append(ok))
        for i in range(10, 30):
            dev.publish(dev_topic("dev-c", "telemetry"), json.dumps(_record(i)).encode(),
                        on_ack=lambda ok, _: acks.append(ok))
        wait_for(lambda: len(acks) == 23, 10)
        wait_for(lambda: cloud.counters.get("telemetry_stored") == 20, 15)
        wait_for(lambda: cloud.counters.get("telemetry_dead_letter") == 1, 5)
        counters = cloud.counters()
        assert counters["malformed"] == 2, counters
        letters = cloud.registry.dead_letters()
        assert len(letters) == 1 and "surrogate" in letters[0]["error"] and letters[0]["device"] == "dev-c"
        time.sleep(0.3)  # the last PUBACKs on the wire
        cloud.stop()
        # everything was acknowledged: a restarted worker is given nothing again and keeps working
        cloud = _cloud(tmp_path, broker)
        time.sleep(1.0)
        assert cloud.counters.get("received") == 0, cloud.counters()
        dev.publish(dev_topic("dev-c", "telemetry"), json.dumps(_record(99)).encode())
        wait_for(lambda: cloud.counters.get("telemetry_stored") == 1, 10)
        assert len(cloud.registry.telemetry("dev-c")) == 21
        dev.stop()
        cloud.stop()
    # what the worker counted is visible from the command line
    toml = tmp_path / "cloud.toml"
    toml.write_text(f'[cloud]\nstate_dir = "{tmp_path / "cloud"}"\nworker_id = "cloud-1"\n')
    out = subprocess.run([str(Path(sys.executable).parent / "pocketfleet"), "cloud", "counters", "--config", str(toml),
                          "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["dead_letters"] == 1 and shown["workers"][0]["counters"]["telemetry_stored"] == 1


def test_protocol_ids_are_full_match_and_integers_are_bounded() -> None:
    """Before: `^...$` accepted a trailing newline, and integers of any size passed validation."""
    assert valid_id("dev-a") and not valid_id("dev-a\n") and not valid_id("dev-a\n\n")
    with pytest.raises(ProtocolError):
        check_id("grp\n", "group")
    with pytest.raises(ProtocolError, match="release_id"):
        encode("pf.chunk.request/1", release_id="ab" * 8 + "\n", idx=[0])
    for field, value in (("created", 10**30), ("id", 2**70), ("created", -(2**64))):
        with pytest.raises(ProtocolError, match=field):
            decode(json.dumps(_record(1, **{field: value})).encode(), ("pf.outbox/1",))
    status = {"schema": "pf.status/1", "device": "dev-c", "online": True, "ts": 1.0, "seq": 2**63}
    with pytest.raises(ProtocolError, match="seq"):
        decode(json.dumps(status).encode(), ("pf.status/1",))
    assert decode(json.dumps(_record(1, created=1.7e9)).encode(), ("pf.outbox/1",))["created"] == 1.7e9


@pytest.mark.mosquitto
def test_repeated_again_chunk_requests_do_not_amplify(tmp_path: Path, signed: tuple[Path, Path]) -> None:
    """Before: 20 requests with `again: true` and 64 indexes (6.7 KB) brought back 5.6 MB (838x)."""
    from cloud_sync.releases import create_release
    from export.signing import load_trust

    keys, pkg = signed
    with Mosquitto(tmp_path, accounts=dict(ACCOUNTS)) as broker:
        cloud = _cloud(tmp_path, broker)
        cloud.registry.ensure_device("dev-c", "lab")
        rel = create_release(cloud.registry, cloud.config.artifacts_dir, pkg, "lab",
                             load_trust(keys / "pocketfleet.pub"), canary=0)
        size, chunks = rel["size"], rel["chunks"]
        got: list[int] = []
        dev = MqttClient(broker.mqtt_config("dev-c"))
        dev.subscribe(dev_topic("dev-c", "chunk"), lambda m: got.append(len(m.payload)), qos=1)
        dev.start().wait_connected()
        idx = [i % chunks for i in range(64)]  # every chunk, several times over, in each request
        request = encode("pf.chunk.request/1", release_id=rel["release_id"], idx=idx, again=True)
        sent = 0
        for _ in range(20):
            dev.publish(dev_topic("dev-c", "req"), request)
            sent += len(request)
        wait_for(lambda: cloud.counters.get("duplicate_requests") >= 20 * 64 - chunks, 10)
        time.sleep(1.0)
        received = sum(got)
        assert received <= 1.2 * size + 32 * chunks, (received, size, sent)  # each chunk once, not 20x
        assert cloud.counters.get("chunks_sent") == chunks
        # a genuine retry (again, a little later) is still answered
        time.sleep(cloud.config.cloud.again_min_s)
        dev.publish(dev_topic("dev-c", "req"), encode("pf.chunk.request/1", release_id=rel["release_id"], idx=[0],
                                                      again=True))
        wait_for(lambda: cloud.counters.get("chunks_sent") == chunks + 1, 10)
        dev.stop()
        cloud.stop()


@pytest.mark.mosquitto
def test_a_device_over_its_chunk_rate_is_throttled(tmp_path: Path, signed: tuple[Path, Path]) -> None:
    from cloud_sync.releases import create_release
    from export.signing import load_trust

    keys, pkg = signed
    with Mosquitto(tmp_path, accounts=dict(ACCOUNTS)) as broker:
        cloud = _cloud(tmp_path, broker, device_rate_bps=8192, again_min_s=0.0)
        cloud.registry.ensure_device("dev-c", "lab")
        rel = create_release(cloud.registry, cloud.config.artifacts_dir, pkg, "lab",
                             load_trust(keys / "pocketfleet.pub"), canary=0)
        dev = MqttClient(broker.mqtt_config("dev-c")).start().wait_connected()
        request = encode("pf.chunk.request/1", release_id=rel["release_id"], idx=list(range(rel["chunks"])),
                         again=True)
        t0 = time.monotonic()
        for _ in range(10):
            dev.publish(dev_topic("dev-c", "req"), request)
            time.sleep(0.05)
        wait_for(lambda: cloud.counters.get("chunks_rate_limited") > 0, 10)
        time.sleep(0.5)
        elapsed = time.monotonic() - t0
        assert cloud.counters.get("chunk_bytes_sent") <= 4 * 8192 + elapsed * 8192 + 70_000  # burst + rate + 1 chunk
        dev.stop()
        cloud.stop()
