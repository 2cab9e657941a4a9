"""Importing this module registers the built-in step types."""

from . import prune, quantize, train  # noqa: F401
