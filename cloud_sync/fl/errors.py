"""Errors of the federated-learning engine. Payload errors are counted by the aggregator, never raised out."""

from __future__ import annotations

from pocketfleet import PocketfleetError


class FLError(PocketfleetError):
    """A federated-learning operation failed (bad config, bad state)."""


class UpdatePayloadError(FLError):
    """An update payload was rejected; `reason` is the counter key (e.g. 'malformed', 'oversize')."""

    reason = "rejected"


class MalformedUpdateError(UpdatePayloadError):
    """The payload is not a valid update: bad safetensors, header, names, shapes, dtypes, indices or values."""

    reason = "malformed"


class OversizeUpdateError(UpdatePayloadError):
    """The payload (or its header) is larger than the configured limit."""

    reason = "oversize"


class SecAggError(FLError):
    """Secure aggregation failed for the round (too many dropouts, bad shares, bad messages)."""


class SecAggAbort(SecAggError):
    """Fewer than the threshold of devices are left: the round's sum cannot (and must not) be unmasked."""
