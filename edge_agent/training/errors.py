"""Errors raised by on-device training (torch-free)."""

from __future__ import annotations

from pocketfleet import PocketfleetError


class TrainingError(PocketfleetError):
    """Local training could not run: bad config, no data, mismatched shapes or head weights."""


class DatasetError(TrainingError):
    """A local dataset file or labelled sample is unreadable or inconsistent (names the file or field)."""
