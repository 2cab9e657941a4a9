"""Federated learning: update codecs, strategies, central DP, secure aggregation, the round engine
(synchronous and FedBuff-asynchronous), task files, a device-behaviour simulator and light fleets.

Device-side parts (codecs, secagg client, the FL client) import with numpy, safetensors and
cryptography only; nothing here imports torch.
"""

from __future__ import annotations

from pocketfleet import lazy_exports

_EXPORTS = {
    "CodecConfig": "cloud_sync.fl.codecs",
    "DecodeLimits": "cloud_sync.fl.codecs",
    "DecodedUpdate": "cloud_sync.fl.codecs",
    "ErrorFeedback": "cloud_sync.fl.codecs",
    "encode_update": "cloud_sync.fl.codecs",
    "decode_update": "cloud_sync.fl.codecs",
    "quantize_int8": "cloud_sync.fl.codecs",
    "stochastic_round": "cloud_sync.fl.codecs",
    "ClientResult": "cloud_sync.fl.strategy",
    "RoundPlan": "cloud_sync.fl.strategy",
    "Strategy": "cloud_sync.fl.strategy",
    "FedAvg": "cloud_sync.fl.strategy",
    "FedProx": "cloud_sync.fl.strategy",
    "FedAdam": "cloud_sync.fl.strategy",
    "FedYogi": "cloud_sync.fl.strategy",
    "FedAdagrad": "cloud_sync.fl.strategy",
    "Median": "cloud_sync.fl.strategy",
    "TrimmedMean": "cloud_sync.fl.strategy",
    "MultiKrum": "cloud_sync.fl.strategy",
    "FedBuff": "cloud_sync.fl.strategy",
    "AsyncRounds": "cloud_sync.fl.fedbuff",
    "BehaviourModel": "cloud_sync.fl.behaviour",
    "DeviceBehaviour": "cloud_sync.fl.behaviour",
    "BehaviourHub": "cloud_sync.fl.behaviour",
    "VirtualClock": "cloud_sync.fl.behaviour",
    "time_to_accuracy": "cloud_sync.fl.behaviour",
    "LightFleet": "cloud_sync.fl.lightfleet",
    "TaskFile": "cloud_sync.fl.tasks",
    "STRATEGIES": "cloud_sync.fl.strategy",
    "make_strategy": "cloud_sync.fl.strategy",
    "DPConfig": "cloud_sync.fl.dp",
    "DPStrategy": "cloud_sync.fl.dp",
    "PrivacyAccountant": "cloud_sync.fl.dp",
    "SecAggClient": "cloud_sync.fl.secagg",
    "SecAggServer": "cloud_sync.fl.secagg",
    "quantize_fixed": "cloud_sync.fl.secagg",
    "dequantize_sum": "cloud_sync.fl.secagg",
    "Aggregator": "cloud_sync.fl.rounds",
    "TaskConfig": "cloud_sync.fl.rounds",
    "RoundStore": "cloud_sync.fl.store",
    "FLClient": "cloud_sync.fl.client",
    "InProcessHub": "cloud_sync.fl.transport",
    "MqttCloudTransport": "cloud_sync.fl.mqtt",
    "MqttDeviceTransport": "cloud_sync.fl.mqtt",
    "SecAggCoordinator": "cloud_sync.fl.secagg_round",
    "SecAggParticipant": "cloud_sync.fl.secagg_round",
    "head_release": "cloud_sync.fl.release",
    "release_hook": "cloud_sync.fl.release",
    "dirichlet_split": "cloud_sync.fl.partition",
    "shard_split": "cloud_sync.fl.partition",
    "FLError": "cloud_sync.fl.errors",
    "UpdatePayloadError": "cloud_sync.fl.errors",
    "MalformedUpdateError": "cloud_sync.fl.errors",
    "OversizeUpdateError": "cloud_sync.fl.errors",
    "SecAggError": "cloud_sync.fl.errors",
    "SecAggAbort": "cloud_sync.fl.errors",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

