"""Signed OTA rollouts end to end on a real mosquitto: canary + gates, promotion, automatic rollback,
offline devices, delta transfer, and every refusal (replay, unsigned, oversized, tampered, forged)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloud_sync.client import MqttClient
from cloud_sync.cloud import wait_for
from cloud_sync.errors import ReleaseError
from cloud_sync.ota_client import OtaSettings
from cloud_sync.protocol import dev_topic, encode
from cloud_sync.registry import Registry
from pocketfleet.sim.fleet import Fleet, make_digits_package
from tests.mosquitto import Mosquitto

pytestmark = pytest.mark.mosquitto


@pytest.fixture(scope="module")
def pkgs(keys_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pkgs")
    key = keys_dir / "pocketfleet.key"
    return {
        "v1": make_digits_package(d / "v1.pfpkg", 1, key),
        "v2": make_digits_package(d / "v2.pfpkg", 2, key, head_seed=1),  # only the classifier head changes
        "v2_broken": make_digits_package(d / "v2b.pfpkg", 2, key, broken=True),
        "v3": make_digits_package(d / "v3.pfpkg", 3, key, head_seed=2),
        "v3_unsigned": make_digits_package(d / "v3u.pfpkg", 3, None),
    }


@pytest.fixture
def make_fleet(tmp_path: Path, keys_dir: Path) -> Iterator[Callable[..., Fleet]]:
    made: list[tuple[Fleet, Mosquitto]] = []

    def make(devices: int = 4, ota: OtaSettings | None = None, start_devices: bool = True) -> Fleet:
        ids = [f"dev-{i:03d}" for i in range(devices)]
        accounts = {d: ("device", "lab") for d in ids} | {"cloud-1": ("cloud", None), "cloud-2": ("cloud", None),
                                                          "operator": ("cloud", None)}
        broker = Mosquitto(tmp_path, accounts=accounts, persistence=False).start()
        fleet = Fleet(tmp_path / "fleet", devices=devices, mqtt_for=broker.mqtt_config, keys_dir=keys_dir, ota=ota)
        fleet.broker_process = broker  # type: ignore[attr-defined]
        made.append((fleet, broker))
        return fleet.start(start_devices=start_devices)

    yield make
    for fleet, broker in made:
        fleet.stop()
        broker.stop()


def _operator(fleet: Fleet) -> MqttClient:
    """A client with cloud rights: stands in for a compromised or replaying cloud."""
    return MqttClient(fleet.broker_process.mqtt_config("operator")).start().wait_connected()  # type: ignore[attr-defined]


def _update_cmd(fleet: Fleet, release_id: str, expires_in: float = 600) -> bytes:
    reg = fleet.registry()
    try:
        rel = reg.release(release_id)
    finally:
        reg.close()
    assert rel is not None
    return encode("pf.cmd.update/1", cmd_id="ab" * 8, rollout_id="cd" * 8, phase="main", issued=time.time(),
                  expires=time.time() + expires_in, release=rel.descriptor(), probe=None)


def _reports(fleet: Fleet, device: str, state: str, n: int = 1, timeout: float = 20) -> list[dict]:
    ota = fleet.devices[device].ota
    return wait_for(lambda: len(r := [x for x in ota.reports if x["state"] == state]) >= n and r, timeout, 0.05)


def test_canary_passes_then_the_whole_group_gets_only_the_changed_chunks(make_fleet, pkgs) -> None:
    fleet = make_fleet(4)
    fleet.install_everywhere(pkgs["v1"])
    out = fleet.release(pkgs["v2"], canary="25%", gates=["golden>=0.8", "error_rate<=0.01", "p95_ms<=1000"])
    assert len(out["canary"]) == 1
    final = fleet.wait(out["rollout_id"], 120)
    assert final["state"] == "complete", final
    assert fleet.versions() == {d: 2 for d in fleet.device_ids}
    canary = [d for d in final["devices"] if d["phase"] == "canary"]
    assert len(canary) == 1 and canary[0]["probe"]["golden"] >= 0.8 and canary[0]["probe"]["requests"] > 0
    assert final["gate_result"]["pass"] is True
    size = pkgs["v2"].stat().st_size
    for d in final["devices"]:
        assert d["state"] == "installed"
        assert d["progress"]["bytes_reused"] > 0.4 * size, d
        assert d["progress"]["bytes_rx"] + d["progress"]["bytes_reused"] >= size
        assert d["progress"]["bytes_rx"] < 0.5 * size, d
    reg = fleet.registry()
    try:
        assert {r["active_version"] for r in reg.devices("lab")} == {2}
    finally:
        reg.close()


def test_a_bad_canary_is_rolled_back_on_every_canary_device(make_fleet, pkgs) -> None:
    fleet = make_fleet(4)
    fleet.install_everywhere(pkgs["v1"])
    out = fleet.release(pkgs["v2_broken"], canary="50%", gates=["golden>=0.8"])
    final = fleet.wait(out["rollout_id"], 120)
    assert final["state"] == "failed" and "golden" in final["reason"], final
    canary = {d["device"] for d in final["devices"] if d["phase"] == "canary"}
    assert len(canary) == 2 and all(d["state"] == "rolled_back" for d in final["devices"])
    assert {d["phase"] for d in final["devices"]} == {"canary"}, "never promoted"
    assert fleet.versions() == {d: 1 for d in fleet.device_ids}
    for d in set(fleet.device_ids) - canary:
        assert not fleet.devices[d].ota.reports, "non-canary devices never saw the release"
    # the group moves on with a good, newer release (the rolled-back one stays revoked on the canaries)
    out = fleet.release(pkgs["v3"], canary="25%", gates=["golden>=0.8"])
    assert fleet.wait(out["rollout_id"], 120)["state"] == "complete"
    assert fleet.versions() == {d: 3 for d in fleet.device_ids}


def test_an_offline_device_gets_the_current_release_when_it_returns(make_fleet, pkgs) -> None:
    fleet = make_fleet(3)
    fleet.install_everywhere(pkgs["v1"])
    fleet.stop_device("dev-002")
    out = fleet.release(pkgs["v2"], canary=0)
    wait_for(lambda: fleet.rollout(out["rollout_id"])["counts"].get("installed") == 2, 30)
    assert fleet.rollout(out["rollout_id"])["state"] == "promoted"
    assert fleet.store("dev-002").read_state()["digits-mlp"].active == 1
    fleet.start_device("dev-002")
    final = fleet.wait(out["rollout_id"], 30)
    assert final["state"] == "complete" and fleet.versions() == {d: 2 for d in fleet.device_ids}


def test_a_replayed_old_release_is_refused_by_cloud_and_device(make_fleet, pkgs) -> None:
    fleet = make_fleet(2)
    first = fleet.release(pkgs["v1"], canary=0)  # devices start empty: a full download
    assert fleet.wait(first["rollout_id"], 120)["state"] == "complete"
    second = fleet.release(pkgs["v2"], canary=0)
    assert fleet.wait(second["rollout_id"], 120)["state"] == "complete"
    with pytest.raises(ReleaseError, match="not newer"):
        fleet.release(pkgs["v1"], canary=0)
    op = _operator(fleet)
    op.publish(dev_topic("dev-000", "cmd"), _update_cmd(fleet, first["release_id"]))
    refused = _reports(fleet, "dev-000", "refused")
    assert "not newer" in refused[-1]["error"] and refused[-1].get("progress") is None
    expired = _update_cmd(fleet, second["release_id"], expires_in=-5)
    op.publish(dev_topic("dev-001", "cmd"), expired)
    assert "expired" in _reports(fleet, "dev-001", "refused")[-1]["error"]
    assert fleet.versions() == {"dev-000": 2, "dev-001": 2}
    op.stop()


def test_unsigned_releases_are_refused_by_cloud_and_device(make_fleet, pkgs) -> None:
    from cloud_sync.chunks import choose_chunking, file_sha256, index_file
    from cloud_sync.registry import Release
    from cloud_sync.releases import new_id
    from export.errors import UnsignedPackageError

    fleet = make_fleet(2)
    fleet.install_everywhere(pkgs["v1"])
    with pytest.raises(UnsignedPackageError):
        fleet.release(pkgs["v3_unsigned"], canary=0)
    # a cloud that skips its own check (compromised): the devices still refuse to install
    reg = fleet.registry()
    try:
        rid, path = new_id(), pkgs["v3_unsigned"]
        chunking = choose_chunking(path.stat().st_size)
        index = index_file(path, chunking)
        index_path = fleet.cloud_config.artifacts_dir / f"{rid}.index"  # type: ignore[union-attr]
        index_path.write_bytes(index.to_bytes())
        import hashlib

        reg.add_release(Release(rid, "digits-mlp", 3, path.stat().st_size, file_sha256(path), str(path),
                                str(index_path), hashlib.sha256(index.to_bytes()).hexdigest(),
                                len(index.to_bytes()), len(index), chunking.to_dict(), None, time.time(), {}))
        roll = new_id()
        reg.add_rollout(roll, rid, "lab", 0.0, [], None, main_devices=fleet.device_ids)
    finally:
        reg.close()
    final = fleet.wait(roll, 60)
    assert final["state"] == "complete"
    assert all(d["state"] == "refused" and "not signed" in d["error"] for d in final["devices"]), final
    assert fleet.versions() == {d: 1 for d in fleet.device_ids}


def test_an_oversized_release_is_refused_before_download(make_fleet, pkgs) -> None:
    fleet = make_fleet(2, ota=OtaSettings(max_package_bytes=10_000))
    fleet.install_everywhere(pkgs["v1"])
    out = fleet.release(pkgs["v2"], canary="50%")
    final = fleet.wait(out["rollout_id"], 120)
    assert final["state"] == "failed" and "failed the install" in final["reason"]
    refused = [r for r in fleet.devices[final["devices"][0]["device"]].ota.reports if r["state"] == "refused"]
    assert refused and "max_package_bytes" in refused[0]["error"]
    assert all(w.counters.get("chunks_sent") == 0 for w in fleet.workers)


def test_a_tampered_chunk_is_rejected_and_fetched_again(make_fleet, pkgs) -> None:
    fleet = make_fleet(1)
    tampered: list[int] = []

    def corrupt_once(release_id: str, idx: int, data: bytes) -> bytes:
        if idx == 1 and not tampered:
            tampered.append(idx)
            return bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    fleet.workers[0].chunk_filter = corrupt_once
    out = fleet.release(pkgs["v1"], canary=0)
    final = fleet.wait(out["rollout_id"], 120)
    assert tampered == [1] and final["state"] == "complete"
    ota = fleet.devices["dev-000"].ota
    assert ota.counters.get("bad_chunks") == 1 and final["devices"][0]["progress"]["refetched"] >= 1
    assert fleet.versions() == {"dev-000": 1}


def test_signed_rollback_release_goes_back_and_a_forged_one_does_not(make_fleet, pkgs, tmp_path) -> None:
    from cloud_sync.releases import sign_rollback
    from export.signing import generate_keys

    fleet = make_fleet(2)
    fleet.install_everywhere(pkgs["v1"])
    up = fleet.release(pkgs["v2"], canary=0)
    assert fleet.wait(up["rollout_id"], 60)["state"] == "complete"
    with pytest.raises(ReleaseError, match="needs --key|signed rollback"):
        fleet.release(pkgs["v1"], canary=0)
    back = fleet.release(pkgs["v1"], canary=0, rollback=True)
    assert back["rollback"] is True
    assert fleet.wait(back["rollout_id"], 60)["state"] == "complete"
    assert fleet.versions() == {"dev-000": 1, "dev-001": 1}
    # a rollback authorization signed by a key the devices do not trust is refused
    rogue = generate_keys(tmp_path / "rogue")["private_key"]
    reg: Registry = fleet.registry()
    try:
        rel = reg.release(up["release_id"])
        v1 = reg.release(back["release_id"])
    finally:
        reg.close()
    assert rel is not None and v1 is not None
    fleet.release(pkgs["v3"], canary=0)
    wait_for(lambda: fleet.versions() == {"dev-000": 3, "dev-001": 3}, 60)
    forged = v1.descriptor() | {"rollback_auth": sign_rollback(rogue, v1.id, v1.name, v1.version, v1.sha256, 3)}
    cmd = encode("pf.cmd.update/1", cmd_id="ef" * 8, rollout_id="cd" * 8, phase="main", issued=time.time(),
                 expires=time.time() + 60, release=forged, probe=None)
    op = _operator(fleet)
    op.publish(dev_topic("dev-000", "cmd"), cmd)
    assert "does not verify" in _reports(fleet, "dev-000", "refused")[-1]["error"]
    assert fleet.versions()["dev-000"] == 3
    op.stop()


def test_bandwidth_cap_bounds_the_download_rate(make_fleet, keys_dir, tmp_path) -> None:
    big = make_digits_package(tmp_path / "big.pfpkg", 1, keys_dir / "pocketfleet.key", hidden=1024)
    rate = 200_000
    fleet = make_fleet(1, ota=OtaSettings(bandwidth_bps=rate))
    start = time.monotonic()
    out = fleet.release(big, canary=0)
    final = fleet.wait(out["rollout_id"], 120)
    elapsed = time.monotonic() - start
    received = final["devices"][0]["progress"]["bytes_rx"]
    assert final["state"] == "complete" and received >= big.stat().st_size
    burst = 4 * 64 * 1024  # at most one max-size chunk ahead of the cap (chunk max is <= 4 x avg)
    assert elapsed >= (received - burst) / rate, (elapsed, received)


def test_release_and_rollout_status_from_the_command_line(make_fleet, pkgs, tmp_path) -> None:
    import json
    import subprocess
    import sys

    fleet = make_fleet(2)
    fleet.install_everywhere(pkgs["v1"])
    cfg = tmp_path / "cloud.toml"
    cfg.write_text(f'[cloud]\nstate_dir = "{fleet.workdir / "cloud"}"\ntrust = "{fleet.trust}"\n')

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).parent / "pocketfleet"), *argv, "--config", str(cfg)],
                              capture_output=True, text=True, timeout=120)

    out = cli("release", str(pkgs["v2"]), "--group", "lab", "--canary", "50%", "--gate", "golden>=0.8", "--json")
    assert out.returncode == 0, out.stderr
    started = json.loads(out.stdout)
    assert started["version"] == 2 and len(started["canary"]) == 1 and started["gates"] == ["golden>=0.8"]
    done = cli("rollout", "status", started["rollout_id"], "--wait", "60", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads(done.stdout)
    assert status["state"] == "complete" and status["counts"] == {"installed": 2}
    listing = json.loads(cli("rollout", "status", "--json").stdout)
    assert [r["rollout_id"] for r in listing] == [started["rollout_id"]]
    human = cli("rollout", "status", started["rollout_id"])
    assert "complete" in human.stdout and "dev-000" in human.stdout
    unsigned = cli("release", str(pkgs["v3_unsigned"]), "--group", "lab")
    assert unsigned.returncode == 4 and unsigned.stderr.startswith("error:") and "not signed" in unsigned.stderr
    bad_gate = cli("release", str(pkgs["v3"]), "--group", "lab", "--gate", "latency<5")
    assert bad_gate.returncode == 2 and "gate 'latency<5'" in bad_gate.stderr
