"""cloud_sync: the MQTT protocol, client, brokers, fleet registry, OTA releases and rollouts.

`import cloud_sync` is light (no torch, no paho until a name is used): names resolve lazily.

Device side (torch-free): DeviceLink, DeviceConfig, OtaClient, OtaSettings, MqttSink, MqttClient.
Cloud side: Cloud, CloudConfig, run_cloud, Registry, create_release, describe_rollout, RolloutController.
Development: EmbeddedBroker (amqtt), Fleet (broker + cloud + N simulated devices in one process),
make_digits_package (small real signed packages).

Demo in a few lines:

    from cloud_sync import Fleet, make_digits_package
    with Fleet("work/fleet", devices=4, group="lab") as fleet:   # embedded broker, cloud, 4 agents
        v1 = make_digits_package("work/v1.pfpkg", 1, fleet.key)
        v2 = make_digits_package("work/v2.pfpkg", 2, fleet.key, head_seed=1)
        fleet.install_everywhere(v1)
        out = fleet.release(v2, canary="25%", gates=["golden>=0.9", "error_rate<=0.01"])
        print(fleet.wait(out["rollout_id"])["state"], fleet.versions())
"""

from __future__ import annotations

from pocketfleet import lazy_exports

_EXPORTS = {
    # wire
    "MqttConfig": "cloud_sync.config",
    "MqttClient": "cloud_sync.client",
    "Message": "cloud_sync.client",
    "Will": "cloud_sync.client",
    "protocol": "cloud_sync",
    # device side
    "DeviceConfig": "cloud_sync.device",
    "DeviceLink": "cloud_sync.device",
    "MqttSink": "cloud_sync.device",
    "OtaClient": "cloud_sync.ota_client",
    "OtaSettings": "cloud_sync.ota_client",
    "run_probe": "cloud_sync.probe",
    # chunks
    "Chunking": "cloud_sync.chunks",
    "ChunkIndex": "cloud_sync.chunks",
    "choose_chunking": "cloud_sync.chunks",
    "index_file": "cloud_sync.chunks",
    # cloud side
    "Cloud": "cloud_sync.cloud",
    "CloudConfig": "cloud_sync.cloud",
    "run_cloud": "cloud_sync.cloud",
    "wait_for": "cloud_sync.cloud",
    "Registry": "cloud_sync.registry",
    "Release": "cloud_sync.registry",
    "create_release": "cloud_sync.releases",
    "parse_gate": "cloud_sync.releases",
    "parse_canary": "cloud_sync.releases",
    "Gate": "cloud_sync.releases",
    "RolloutConfig": "cloud_sync.rollout",
    "RolloutController": "cloud_sync.rollout",
    "describe_rollout": "cloud_sync.rollout",
    "evaluate_gates": "cloud_sync.rollout",
    # brokers and simulation
    "EmbeddedBroker": "cloud_sync.broker",
    "mosquitto_conf": "cloud_sync.broker_files",
    "Fleet": "cloud_sync.fleet",
    "make_digits_package": "cloud_sync.fleet",
}
_ERRORS = ["SyncError", "ConfigError", "ProtocolError", "ConnectError", "ReleaseError", "RolloutError", "OtaError"]
_EXPORTS.update({name: "cloud_sync.errors" for name in _ERRORS})

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, modules=["protocol"])

