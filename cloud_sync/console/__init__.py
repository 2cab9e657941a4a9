"""The read-only fleet console and /metrics, served by a cloud worker (plain HTML/JS from this package)."""

from __future__ import annotations

from pocketfleet import lazy_exports

_EXPORTS = {
    "ConsoleSettings": "cloud_sync.console.settings",
    "ConsoleServer": "cloud_sync.console.server",
    "console_state": "cloud_sync.console.state",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
