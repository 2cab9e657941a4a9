"""Fault injection during rollouts on a real mosquitto: a device's link drops mid-download, a device
process restarts mid-download, the broker restarts mid-rollout, the cloud is killed with -9 mid-rollout.
Each ends with every device on the right version and nothing acknowledged lost (outbox records included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cloud_sync.cloud import wait_for
from cloud_sync.ota_client import OtaSettings
from pocketfleet.sim.fleet import Fleet, make_digits_package
from tests.mosquitto import Mosquitto

pytestmark = pytest.mark.mosquitto

HIDDEN = 1024  # ~300 KB packages: big enough to interrupt, small enough to stay fast


@pytest.fixture(scope="module")
def pkgs(keys_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pkgs")
    key = keys_dir / "pocketfleet.key"
    return {"v1": make_digits_package(d / "v1.pfpkg", 1, key, hidden=HIDDEN, seed=1),
            "v2": make_digits_package(d / "v2.pfpkg", 2, key, hidden=HIDDEN, seed=2)}  # nothing in common


def _accounts(n: int) -> dict[str, tuple[str, str | None]]:
    return {f"dev-{i:03d}": ("device", "lab") for i in range(n)} | {"cloud-1": ("cloud", None),
                                                                    "cloud-2": ("cloud", None)}


def _fraction(fleet: Fleet, device: str) -> float:
    job = fleet.devices[device].ota._job if device in fleet.devices else None
    if job is None or job.index is None:
        return 0.0
    return 1 - len(job.missing) / len(job.index)


def _outboxes(fleet: Fleet, tmp_path: Path, records: int) -> dict[str, object]:
    """Give each running device an outbox holding `records` telemetry records, drained through MQTT."""
    from edge_agent.outbox import Drainer, Outbox

    out = {}
    for d, link in fleet.devices.items():
        ob = Outbox(tmp_path / "outbox" / f"{d}.sqlite")
        for i in range(records):
            ob.put("telemetry", {"i": i})
        link._drainer = Drainer(ob, link.sink, interval_s=0.2).start()
        out[d] = ob
    return out


def _assert_outboxes_delivered(fleet: Fleet, outboxes: dict, records: int) -> None:
    reg = fleet.registry()
    try:
        wait_for(lambda: len(reg.telemetry()) >= records * len(outboxes), 30)
        rows = reg.telemetry()
    finally:
        reg.close()
    assert len(rows) == records * len(outboxes)
    wait_for(lambda: all(ob.stats()["records"] == 0 for ob in outboxes.values()), 15)


def test_link_drop_mid_download_resumes_without_refetching(tmp_path: Path, keys_dir: Path, pkgs: dict) -> None:
    size = pkgs["v2"].stat().st_size
    with Mosquitto(tmp_path, accounts=_accounts(1), persistence=False) as broker:
        # chunk_timeout_s 30: on a loaded CI box a 10 s timeout re-requested chunks that were only slow,
        # which this test would count as refetched (it is about the link drop, not timeouts)
        fleet = Fleet(tmp_path / "fleet", devices=1, mqtt_for=broker.mqtt_config, keys_dir=keys_dir,
                      ota=OtaSettings(bandwidth_bps=size, chunk_timeout_s=30)).start()
        try:
            fleet.install_everywhere(pkgs["v1"])
            out = fleet.release(pkgs["v2"], canary=0)
            wait_for(lambda: _fraction(fleet, "dev-000") >= 0.5, 30, 0.01)
            link = fleet.devices["dev-000"]

            def dropped() -> bool:  # on a loaded box the socket may be between reads: drop until it is seen
                link.client.drop_connection()
                return link.client.counters.get("disconnects") >= 1

            wait_for(dropped, 10, 0.05)
            final = fleet.wait(out["rollout_id"], 60)
            assert final["state"] == "complete" and fleet.versions() == {"dev-000": 2}
            assert link.client.counters.get("disconnects") >= 1 and link.client.counters.get("connects") >= 2
            progress = final["devices"][0]["progress"]
            assert progress["bytes_rx"] + progress["bytes_reused"] <= 1.1 * size, progress
        finally:
            fleet.stop()


def test_device_restart_mid_download_resumes_from_disk(tmp_path: Path, keys_dir: Path, pkgs: dict) -> None:
    size = pkgs["v2"].stat().st_size
    with Mosquitto(tmp_path, accounts=_accounts(1), persistence=False) as broker:
        fleet = Fleet(tmp_path / "fleet", devices=1, mqtt_for=broker.mqtt_config, keys_dir=keys_dir,
                      ota=OtaSettings(bandwidth_bps=size, chunk_timeout_s=10)).start()
        try:
            fleet.install_everywhere(pkgs["v1"])
            out = fleet.release(pkgs["v2"], canary=0)
            wait_for(lambda: _fraction(fleet, "dev-000") >= 0.5, 30, 0.01)
            job = fleet.devices["dev-000"].ota._job
            fleet.stop_device("dev-000", clean=False)  # the process goes away mid-download
            before = job.bytes_rx
            assert before >= 0.5 * size * 0.9
            fleet.start_device("dev-000")  # a new process on the same state directory
            final = fleet.wait(out["rollout_id"], 60)
            assert final["state"] == "complete" and fleet.versions() == {"dev-000": 2}
            after = final["devices"][0]["progress"]["bytes_rx"]
            assert after < 0.6 * size, ("the second process fetched only what was missing", before, after, size)
            assert before + after <= 1.1 * size, (before, after, size)
        finally:
            fleet.stop()


def test_broker_restart_mid_rollout(tmp_path: Path, keys_dir: Path, pkgs: dict) -> None:
    size = pkgs["v2"].stat().st_size
    with Mosquitto(tmp_path, accounts=_accounts(3), persistence=True) as broker:
        fleet = Fleet(tmp_path / "fleet", devices=3, mqtt_for=broker.mqtt_config, keys_dir=keys_dir, workers=2,
                      ota=OtaSettings(bandwidth_bps=size // 2, chunk_timeout_s=5)).start()
        try:
            fleet.install_everywhere(pkgs["v1"])
            outboxes = _outboxes(fleet, tmp_path, 30)
            out = fleet.release(pkgs["v2"], canary="34%")
            wait_for(lambda: max(_fraction(fleet, d) for d in fleet.device_ids) >= 0.3, 30, 0.01)
            broker.restart(down_s=1.0)
            final = fleet.wait(out["rollout_id"], 90)
            assert final["state"] == "complete", final
            assert fleet.versions() == {d: 2 for d in fleet.device_ids}
            assert all(w.client.counters.get("connects") >= 2 for w in fleet.workers)
            assert all(w.counters.get("chunks_sent") > 0 for w in fleet.workers), "both workers served chunks"
            _assert_outboxes_delivered(fleet, outboxes, 30)
        finally:
            fleet.stop()


def test_cloud_killed_mid_rollout_resumes_from_sqlite(tmp_path: Path, keys_dir: Path, pkgs: dict) -> None:
    size = pkgs["v2"].stat().st_size
    with Mosquitto(tmp_path, accounts=_accounts(3), persistence=False) as broker:
        fleet = Fleet(tmp_path / "fleet", devices=3, mqtt_for=broker.mqtt_config, keys_dir=keys_dir, workers=0,
                      ota=OtaSettings(bandwidth_bps=size // 2, chunk_timeout_s=3)).start(start_devices=False)
        config = tmp_path / "cloud.toml"
        config.write_text(
            f'[cloud]\nstate_dir = "{fleet.workdir / "cloud"}"\nworker_id = "cloud-1"\ntrust = "{fleet.trust}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nusername = "cloud-1"\npassword = "pw-cloud-1"\n'
            f'reconnect_min_s = 0.1\nreconnect_max_s = 1.0\n[rollout]\ntick_s = 0.2\nresend_s = 5.0\nprobe_runs = 3\n'
        )
        cmd = [str(Path(sys.executable).parent / "pocketfleet"), "cloud", "run", "--config", str(config), "--log-level", "warning"]
        log = open(tmp_path / "cloud.log", "ab")  # noqa: SIM115 - closed in finally
        cloud = subprocess.Popen(cmd, stdout=log, stderr=log)
        try:
            fleet.start_devices()
            fleet.wait_online()
            fleet.install_everywhere(pkgs["v1"])
            outboxes = _outboxes(fleet, tmp_path, 30)
            out = fleet.release(pkgs["v2"], canary="34%")
            wait_for(lambda: max(_fraction(fleet, d) for d in fleet.device_ids) >= 0.3, 30, 0.01)
            os.kill(cloud.pid, signal.SIGKILL)
            cloud.wait(10)
            time.sleep(1.0)
            cloud = subprocess.Popen(cmd, stdout=log, stderr=log)
            final = fleet.wait(out["rollout_id"], 90)
            assert final["state"] == "complete", final
            assert fleet.versions() == {d: 2 for d in fleet.device_ids}
            _assert_outboxes_delivered(fleet, outboxes, 30)
        finally:
            cloud.terminate()
            cloud.wait(10)
            log.close()
            fleet.stop()


def test_a_restarted_job_keeps_chunks_written_after_the_last_saved_bitmap(tmp_path: Path) -> None:
    """The bitmap of received chunks is saved at most every 0.5 s; chunks written to the part file after it
    are found again on restart by their hashes, and a chunk whose bytes are wrong is not."""
    import hashlib

    from cloud_sync.chunks import ChunkIndex
    from cloud_sync.ota_job import OtaJob

    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1000, 2000, 1500, 800)]
    index = ChunkIndex(tuple(hashlib.sha256(c).hexdigest() for c in chunks), tuple(len(c) for c in chunks))
    cmd = {"release": {"release_id": "r1", "chunks": len(chunks)}}
    job = OtaJob(tmp_path, cmd)
    job.open(index, index.to_bytes())
    for i in (0, 1, 2):  # three chunks written, the bitmap saved after the first only
        os.pwrite(job.fd, chunks[i] if i != 2 else b"\0" * len(chunks[i]), index.offsets[i])
        job.mark(i)
        if i == 0:
            job.save()
    job.close()  # the process dies: chunk 1 is on disk but not in the saved bitmap; chunk 2 is torn
    again = OtaJob(tmp_path, cmd)
    again.open(index, index.to_bytes())
    assert again.missing == {1, 2, 3}
    assert again.recover_written() == 1 and again.missing == {2, 3}
    again.close()
