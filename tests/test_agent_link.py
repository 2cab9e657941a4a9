"""The agent daemon with an [mqtt] table: its own connection to the cloud (presence, OTA into the store
it serves, outbox drain) on a real mosquitto, and labelled samples posted to its local API."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from cloud_sync.cloud import wait_for
from edge_agent import Agent, AgentConfig, Client
from edge_agent.errors import AgentError, ConfigError
from pocketfleet.sim.fleet import Fleet, make_digits_package
from tests.mosquitto import Mosquitto

pytestmark = pytest.mark.mosquitto


def agent_config(state: Path, trust: Path, mqtt: dict, **kw: object) -> AgentConfig:
    return AgentConfig(state_dir=str(state), trust=str(trust), listen="127.0.0.1:0", device_id="edge-1",
                       telemetry_interval_s=0.3, drain_interval_s=0.2, watch_interval_s=0.1, mqtt=mqtt, **kw)


def test_agent_rolls_out_over_mqtt_drains_its_outbox_and_keeps_posted_samples(tmp_path: Path) -> None:
    accounts = {"edge-1": ("device", "lab"), "cloud-1": ("cloud", None)}
    with Mosquitto(tmp_path, accounts=accounts, persistence=False) as broker:
        state = tmp_path / "agent"
        fleet = Fleet(tmp_path / "fleet", mqtt_for=broker.mqtt_config, device_dirs={"edge-1": state})
        fleet.start(start_devices=False)
        v1 = make_digits_package(tmp_path / "v1.pfpkg", 1, fleet.key)
        v2 = make_digits_package(tmp_path / "v2.pfpkg", 2, fleet.key, head_seed=1)
        mqtt = {**dataclasses.asdict(broker.mqtt_config("edge-1")), "group": "lab"}
        agent = Agent(agent_config(state, fleet.trust, mqtt))
        agent.store.install(v1)
        agent.start()
        try:
            fleet.wait_online()
            assert agent.served() == {"digits-mlp": 1}
            rollout = fleet.release(v2, canary="100%")
            assert fleet.wait(rollout["rollout_id"])["state"] == "complete"
            wait_for(lambda: agent.served() == {"digits-mlp": 2}, 20)  # OTA installed, the agent swapped
            x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
            with Client(agent.urls()[0]) as client:
                assert client.predict({"image": x}).model["version"] == 2
                stored = client.add_samples({"image": x}, [1, 2, 3])
                assert stored["stored"] == 3 and stored["total"] == 3
                with pytest.raises(AgentError, match="labels"):
                    client.add_samples({"image": x}, [1, 2])
                with pytest.raises(AgentError, match="image"):
                    client.add_samples({"image": x[:, :10]}, [1, 2, 3])
                with pytest.raises(AgentError, match="NaN"):
                    client.add_samples({"image": np.full((1, 64), np.nan, np.float32)}, [1])
                with pytest.raises(AgentError, match="label"):
                    client.add_samples({"image": x[:1]}, [-1])
                assert client.request("POST", "/v1/samples", b"1,2", "text/csv")[0] == 415
                assert client.add_samples({"image": x[:1]}, [4])["total"] == 4  # still taking samples
            data = agent.samples.dataset()
            assert data.labels.tolist() == [1, 2, 3, 4] and np.allclose(data.arrays["image"], np.vstack([x, x[:1]]))
            reg = fleet.registry()
            try:  # telemetry and the swap event went through the outbox, over MQTT, into the registry
                wait_for(lambda: any(r["kind"] == "event" for r in reg.telemetry("edge-1")), 20)
                wait_for(lambda: agent.outbox.stats()["records"] == 0, 20)
            finally:
                reg.close()
        finally:
            agent.stop()
            fleet.stop()
    assert fleet.versions() == {"edge-1": 2}


def test_agent_config_mqtt_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    from cloud_sync.device import DeviceConfig
    from edge_agent.config import load_config

    (tmp_path / "mqtt.password").write_text("s3cret\n")
    conf = tmp_path / "agent.toml"
    conf.write_text('state_dir = "state"\ndevice_id = "edge-9"\n[mqtt]\nhost = "broker"\n'
                    'username = "edge-9"\npassword_file = "mqtt.password"\ngroup = "lab"\n')
    cfg = load_config(conf)
    device = DeviceConfig.from_agent(cfg, base=Path(cfg.base_dir))
    assert cfg.state_dir == str(tmp_path / "state") and cfg.base_dir == str(tmp_path)
    assert device.mqtt.secret() == "s3cret" and device.group == "lab" and device.device_id == "edge-9"
    conf.write_text('state_dir = "state"\nbase_dir = "/elsewhere"\n')  # internal, not a config key
    with pytest.raises(ConfigError, match="base_dir: unknown key"):
        load_config(conf)
