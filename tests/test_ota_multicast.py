"""Multicast chunk serving on a real mosquitto: chunks that several devices of a group ask for in one batch
go out once on pf/v1/grp/<group>/ota/<release>, each device still verifies every chunk against its own
command's chunk index, and a device that cannot take the multicast falls back to unicast."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloud_sync.ota_client import OtaSettings
from cloud_sync.protocol import is_multicast_topic, multicast_topic
from cloud_sync.staged import parse_stages
from pocketfleet.sim.fleet import Fleet, make_digits_package
from tests.mosquitto import Mosquitto

pytestmark = pytest.mark.mosquitto


@pytest.fixture(scope="module")
def pkgs(keys_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pkgs")
    key = keys_dir / "pocketfleet.key"
    # v2 has other hidden weights: nothing of it is found locally, every device fetches all of it
    return {
        "v1": make_digits_package(d / "v1.pfpkg", 1, key, hidden=64),
        "v2": make_digits_package(d / "v2.pfpkg", 2, key, hidden=512, seed=7),
    }


@pytest.fixture
def make_fleet(tmp_path: Path, keys_dir: Path) -> Iterator[Callable[..., Fleet]]:
    made: list[tuple[Fleet, Mosquitto]] = []

    def make(devices: int, broker_group: str = "lab", ota: OtaSettings | None = None) -> Fleet:
        ids = [f"dev-{i:03d}" for i in range(devices)]
        accounts = {d: ("device", broker_group) for d in ids} | {"cloud-1": ("cloud", None)}
        broker = Mosquitto(tmp_path, accounts=accounts, persistence=False).start()
        fleet = Fleet(
            tmp_path / "fleet",
            devices=devices,
            mqtt_for=broker.mqtt_config,
            keys_dir=keys_dir,
            ota=ota,
            cloud={"batch_wait_s": 0.3},
        )
        made.append((fleet, broker))
        return fleet.start()

    yield make
    for fleet, broker in made:
        fleet.stop()
        broker.stop()


def _rollout(fleet: Fleet, pkgs: dict[str, Path]) -> dict:
    fleet.install_everywhere(pkgs["v1"])
    out = fleet.release(pkgs["v2"], plan=parse_stages("100%", 0.2))
    final = fleet.wait(out["rollout_id"], 120)
    assert final["state"] == "complete", final
    assert fleet.versions() == {d: 2 for d in fleet.device_ids}
    return final


def test_chunks_several_devices_ask_for_go_out_once_on_the_group_multicast_topic(make_fleet, pkgs) -> None:
    n = 5
    fleet = make_fleet(n)
    final = _rollout(fleet, pkgs)
    size = pkgs["v2"].stat().st_size
    c = fleet.workers[0].counters
    assert c.get("chunks_multicast") > 0
    assert c.get("multicast_deliveries") >= 2 * c.get("chunks_multicast")  # each one served several devices
    assert c.get("chunk_bytes_sent") < 0.6 * n * size, c()  # unicast would publish n copies
    for d in final["devices"]:
        assert d["state"] == "installed"
        assert size <= d["progress"]["bytes_rx"] + d["progress"]["bytes_reused"]
        assert d["progress"]["bytes_rx"] <= 2 * size, d  # duplicates of a shared chunk stay bounded
    for link in fleet.devices.values():
        assert link.ota.counters.get("bad_chunks") == 0
        # the subscription lasted as long as the download
        assert not [s for s in link.client._subs if s[0].startswith("pf/v1/grp/")]


def test_a_device_refused_the_multicast_topic_falls_back_to_unicast(make_fleet, pkgs) -> None:
    """The broker lets these devices read only group 'other' while their rollout names group 'lab': the
    multicast never reaches them, their chunks time out and are fetched again by unicast."""
    fleet = make_fleet(3, broker_group="other", ota=OtaSettings(window=16, chunk_timeout_s=1.5))
    final = _rollout(fleet, pkgs)
    c = fleet.workers[0].counters
    assert c.get("chunks_multicast") > 0  # the cloud tried ...
    for link in fleet.devices.values():  # ... and every device got everything by unicast after a timeout
        assert link.ota.counters.get("timeouts") >= 1
        assert link.ota.counters.get("bad_chunks") == 0
    assert {d["state"] for d in final["devices"]} == {"installed"}


def test_a_device_subscribes_only_to_its_releases_group_multicast_topic() -> None:
    rid = "ab" * 8
    assert multicast_topic("lab", rid) == f"pf/v1/grp/lab/ota/{rid}"
    assert is_multicast_topic(multicast_topic("lab", rid), rid)
    for bad in (
        f"pf/v1/grp/+/ota/{rid}",
        "pf/v1/grp/#",
        f"pf/v1/dev/lab/ota/{rid}",
        multicast_topic("lab", "cd" * 8),
        f"pf/v1/grp/lab/ota/{rid}/x",
        None,
    ):
        assert not is_multicast_topic(bad, rid)
