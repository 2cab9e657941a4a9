"""edge_agent: the on-device daemon (torch-free).

Runtimes (onnxruntime, LiteRT), a crash-safe versioned model store with health checks, hot swap and
rollback, a local HTTP API, a durable SQLite outbox, and telemetry. Names are resolved lazily so that
`import export.runtimes` stays light.

    from edge_agent import Agent, AgentConfig, Client, ModelStore, Outbox
"""

from __future__ import annotations

from pocketfleet import lazy_exports

_EXPORTS = {
    "Agent": "edge_agent.daemon",
    "running_agent": "edge_agent.daemon",
    "AgentConfig": "edge_agent.config",
    "load_config": "edge_agent.config",
    "ModelStore": "edge_agent.store",
    "InstallResult": "edge_agent.store",
    "ServedModel": "edge_agent.health",
    "health_check": "edge_agent.health",
    "verify_installed": "export.installed",
    "Client": "edge_agent.client",
    "Prediction": "edge_agent.client",
    "Outbox": "edge_agent.outbox",
    "Priority": "edge_agent.outbox",
    "Record": "edge_agent.outbox",
    "Sink": "edge_agent.outbox",
    "JsonlSink": "edge_agent.outbox",
    "Drainer": "edge_agent.outbox",
    "Telemetry": "edge_agent.telemetry",
    "RunningStats": "edge_agent.telemetry",
    "load_runtime": "export.runtimes",
    "Runtime": "export.runtimes",
    "InputError": "export.runtimes",
    "RuntimeLoadError": "export.runtimes",
    "FAULT_POINTS": "pocketfleet.faults:POINTS",
}
_ERRORS = ["AgentError", "ConfigError", "StoreError", "DowngradeError", "HealthCheckError", "OutboxFullError", "RequestError",
           "TrustConfigError", "VersionConflictError"]
_EXPORTS.update({name: "edge_agent.errors" for name in _ERRORS})

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

