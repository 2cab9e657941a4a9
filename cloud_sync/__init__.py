"""cloud_sync: the MQTT protocol, client, brokers, fleet registry, OTA releases and rollouts.

`import cloud_sync` is light (no torch, no paho until a name is used): names resolve lazily.

Device side (torch-free): DeviceLink, DeviceConfig, OtaClient, OtaSettings, MqttSink, MqttClient.
Cloud side: Cloud, CloudConfig, run_cloud, Registry, create_release, describe_rollout, RolloutController.
Development: EmbeddedBroker (amqtt). Fleet simulators (broker + cloud + N devices in one process) are
in `pocketfleet.sim`, on top of every package.
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
    # staged rollouts, telemetry, the operator's view, console and metrics
    "StagePlan": "cloud_sync.staged",
    "AbortCriterion": "cloud_sync.staged",
    "parse_criterion": "cloud_sync.staged",
    "parse_rate": "cloud_sync.staged",
    "parse_stages": "cloud_sync.staged",
    "operator_action": "cloud_sync.staged",
    "Rollups": "cloud_sync.telemetry_rollup",
    "RollupSettings": "cloud_sync.telemetry_rollup",
    "fleet_status": "cloud_sync.fleet_view",
    "device_rows": "cloud_sync.fleet_view",
    "telemetry_series": "cloud_sync.fleet_view",
    "ConsoleSettings": "cloud_sync.console.settings",
    "ConsoleServer": "cloud_sync.console.server",
    # brokers
    "EmbeddedBroker": "cloud_sync.broker",
    "mosquitto_conf": "cloud_sync.broker_files",
}
_ERRORS = ["SyncError", "ConfigError", "ProtocolError", "ConnectError", "ReleaseError", "RolloutError", "OtaError"]
_EXPORTS.update({name: "cloud_sync.errors" for name in _ERRORS})

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, modules=["protocol"])

