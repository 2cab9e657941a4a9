"""The cloud worker's /metrics (prometheus-client) and the console's HTTP rules (read-only, loopback by
default, a token anywhere else), against a live worker on a real mosquitto with simulated devices."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cloud_sync.cloud import CloudConfig, wait_for
from cloud_sync.console.settings import ConsoleSettings
from cloud_sync.errors import ConfigError


def test_a_console_off_loopback_needs_a_token_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="token_file"):
        CloudConfig.from_dict({"console": {"listen": "0.0.0.0:8470"}})
    with pytest.raises(ConfigError, match="HOST:PORT"):
        CloudConfig.from_dict({"console": {"listen": "8470"}})
    cfg = CloudConfig.from_dict({"console": {"listen": "127.0.0.1:0"}})
    assert cfg.console.listen == "127.0.0.1:0"
    short = tmp_path / "t"
    short.write_text("abc")
    with pytest.raises(ConfigError, match="at least 16"):
        ConsoleSettings(listen="0.0.0.0:0", token_file=str(short)).token()


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


@pytest.mark.mosquitto
def test_metrics_count_devices_messages_per_kind_rollouts_and_chunks(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from cloud_sync.client import MqttClient
    from cloud_sync.protocol import dev_topic
    from pocketfleet.sim.fleet import Fleet, make_digits_package
    from pocketfleet.sim.traffic import TrafficSettings
    from tests.mosquitto import Mosquitto

    ids = ["dev-000", "dev-001"]
    accounts = {d: ("device", "lab") for d in ids} | {"cloud-1": ("cloud", None)}
    with Mosquitto(tmp_path, accounts=accounts, persistence=False) as broker:
        fleet = Fleet(tmp_path / "fleet", devices=2, mqtt_for=broker.mqtt_config,
                      traffic=TrafficSettings(rate_hz=20, telemetry_interval_s=0.5),
                      console=ConsoleSettings(listen="127.0.0.1:0"))
        try:
            fleet.start(start_devices=False)
            v1 = make_digits_package(tmp_path / "v1.pfpkg", 1, fleet.key, hidden=32)
            v2 = make_digits_package(tmp_path / "v2.pfpkg", 2, fleet.key, hidden=32, head_seed=1)
            for d in ids:
                fleet.store(d).install(v1)
            fleet.start_devices()
            out = fleet.release(v2, canary="50%")
            assert fleet.wait(out["rollout_id"], 60)["state"] == "complete"
            # a device sends one malformed status (it passes the ACL: its own topic)
            bad = MqttClient(broker.mqtt_config("dev-001"), client_id="dev-001-x").start().wait_connected()
            bad.publish(dev_topic("dev-001", "ota"), b"{not json", qos=1)
            url = fleet.workers[0].console.url
            wait_for(lambda: fleet.workers[0].counters.get("malformed:ota") == 1, 10)
            wait_for(lambda: fleet.workers[0].counters.get("telemetry_stored") > 0, 20)
            bad.stop()

            code, body, headers = _get(url + "metrics")
            assert code == 200 and headers["Content-Type"].startswith("text/plain")
            fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
            samples = {(f.name, s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
            build = fams["pocketfleet_build_info"].samples[0]
            assert build.value == 1 and build.labels["version"] and build.labels["python"]
            assert fams["pocketfleet_mqtt_messages"].type == "counter"
            assert fams["pocketfleet_chunk_bytes_served"].type == "counter"
            online = {s.labels["state"]: s.value for s in fams["pocketfleet_devices"].samples}
            assert online.get("online") == 2
            msgs = {(s.labels["direction"], s.labels["kind"], s.labels["result"]): s.value
                    for s in fams["pocketfleet_mqtt_messages"].samples}
            assert msgs[("in", "ota", "malformed")] == 1
            assert msgs[("in", "telemetry", "ok")] > 0 and msgs[("in", "status", "ok")] >= 2
            assert msgs[("out", "cmd", "ok")] >= 2 and msgs[("out", "chunk", "ok")] > 0
            rollouts = {s.labels["state"]: s.value for s in fams["pocketfleet_rollouts"].samples}
            assert rollouts == {"complete": 1}
            served = [s.value for s in fams["pocketfleet_chunk_bytes_served"].samples]
            assert served[0] == fleet.workers[0].counters.get("chunk_bytes_sent") > 0
            assert samples  # parsed

            # the console: read-only, the API answers with the registry's devices, Host checked on loopback
            code, body, _ = _get(url + "api/state")
            state = json.loads(body)
            assert code == 200 and sorted(d["device"] for d in state["devices"]) == ids
            assert {(d["model"], d["version"]) for d in state["devices"]} == {("digits-mlp", 2)}
            assert _get(url + "api/state", method="POST")[0] == 405
            code, page, headers = _get(url)
            assert code == 200 and b"app.js" in page and "default-src 'self'" in headers["Content-Security-Policy"]
            host, port = url.split("//")[1].strip("/").split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", "/api/state", headers={"Host": "evil.example:80"})
            assert conn.getresponse().status == 403
            conn.close()
        finally:
            fleet.stop()


@pytest.mark.mosquitto
def test_a_console_with_a_token_refuses_requests_without_it(tmp_path: Path) -> None:
    from cloud_sync.cloud import Cloud, CloudSettings
    from tests.mosquitto import Mosquitto

    token = tmp_path / "console.token"
    token.write_text("s3cret-token-0123456789\n")
    with Mosquitto(tmp_path, accounts={"cloud-1": ("cloud", None)}, persistence=False) as broker:
        cfg = CloudConfig(cloud=CloudSettings(state_dir=str(tmp_path / "state")), mqtt=broker.mqtt_config("cloud-1"),
                          console=ConsoleSettings(listen="127.0.0.1:0", token_file=str(token)))
        cloud = Cloud(cfg).start()
        try:
            url = cloud.console.url
            assert _get(url + "metrics")[0] == 401
            assert _get(url + "api/state", {"Authorization": "Bearer wrong"})[0] == 401
            assert _get(url + "api/state", {"Authorization": "Bearer s3cret-token-0123456789"})[0] == 200
            assert _get(url + "metrics", {"Authorization": "Bearer s3cret-token-0123456789"})[0] == 200
            assert _get(url)[0] == 200  # the page itself holds no data
        finally:
            cloud.stop()
