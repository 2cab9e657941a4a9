"""Errors raised by the agent (torch-free). Each is a PocketfleetError with one actionable message."""

from __future__ import annotations

from export.errors import DowngradeError
from pocketfleet import PocketfleetError
from pocketfleet.config import ConfigError as BaseConfigError


class AgentError(PocketfleetError):
    """Base class of the agent's errors."""


class ConfigError(AgentError, BaseConfigError):
    """The agent configuration (TOML file or flag) has an unknown key or a value of the wrong type."""


class StoreError(AgentError):
    """The model store cannot do what was asked (nothing installed, unknown version, locked, ...)."""


class TrustConfigError(StoreError):
    """The trust setting cannot verify the installed versions (none given, unreadable, not a key, or no
    installed version is signed by any of its keys): the agent refuses to start instead of quarantining."""


class VersionConflictError(StoreError):
    """A package has the version of an installed one, with other contents (a version is never reused)."""

    exit_code = 4


class HealthCheckError(StoreError):
    """A version failed to load or its outputs on the packaged samples differ from the expected ones."""

    exit_code = 4


class OutboxFullError(AgentError):
    """The outbox has no room for a record that must not be dropped (it is full of such records)."""


class RequestError(AgentError):
    """A local API request that is answered with a 4xx status; `code` is a short machine-readable tag."""

    def __init__(self, status: int, code: str, message: str, **fields: object) -> None:
        super().__init__(message)
        self.status, self.code, self.fields = status, code, fields


__all__ = ["AgentError", "ConfigError", "DowngradeError", "HealthCheckError", "OutboxFullError", "RequestError", "StoreError"]
