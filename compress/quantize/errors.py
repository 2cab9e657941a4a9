"""Errors of the quantization package: one clear message naming the input, layer, op or field."""

from __future__ import annotations

from pocketfleet import PocketfleetError


class QuantizeError(PocketfleetError):
    """A quantization config or request that cannot be carried out (bad field, unknown layer, no budget)."""


class CalibrationDataError(QuantizeError):
    """Calibration data that cannot be used: wrong input names or shape, empty, NaN/inf values."""


class UnsupportedOpError(QuantizeError):
    """An op that cannot be quantized for the requested target while float fallback is disabled."""
