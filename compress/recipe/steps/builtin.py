"""Importing this module registers the built-in step types."""

from . import plan, prune, quantize, train  # noqa: F401
