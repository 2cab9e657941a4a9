"""The one error type every package builds on: an error the user can act on."""

from __future__ import annotations


class PocketfleetError(Exception):
    """An error the user can act on: printed as one line, never as a traceback."""

    exit_code = 2
