"""Errors of the pruning package: one clear message naming the layer, node or field."""

from __future__ import annotations

from pocketfleet import PocketfleetError


class PruneError(PocketfleetError):
    """A pruning configuration or plan that cannot be applied (bad ratio, empty layer, unknown layer)."""


class PruneTraceError(PruneError):
    """The model could not be traced into a graph; the message names the module/node to ignore."""
