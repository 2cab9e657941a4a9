"""Errors raised by cloud_sync/ (torch-free). Each is a PocketfleetError with a message naming the field."""

from __future__ import annotations

from pocketfleet import PocketfleetError
from pocketfleet.config import ConfigError as BaseConfigError


class SyncError(PocketfleetError):
    """Base class for cloud_sync errors."""


class ConfigError(SyncError, BaseConfigError):
    """A cloud.toml / agent [mqtt] setting is missing or invalid (the message names the key)."""


class ProtocolError(SyncError):
    """An MQTT message does not follow docs/protocol.md (bad topic, schema, field, size or frame)."""


class ConnectError(SyncError):
    """The MQTT client could not connect (refused, bad credentials, TLS failure, timeout)."""


class ReleaseError(SyncError):
    """A release was refused (unsigned package, not newer than the group's release, bad gate, ...)."""


class RolloutError(SyncError):
    """A rollout could not be found or does not allow the requested action."""


class OtaError(SyncError):
    """A device-side OTA job failed (chunk verification, package verification, install, probe)."""
