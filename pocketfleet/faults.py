"""Named fault-injection points for crash tests: `POCKETFLEET_FAULT=install.after_unpack` makes the
process SIGKILL itself when it reaches that point (several names may be given, comma-separated).

The points, in the order an install and a swap reach them, are listed in POINTS and docs/agent.md.
"""

from __future__ import annotations

import os
import signal

ENV = "POCKETFLEET_FAULT"

POINTS = (
    "install.after_verify",  # package verified, nothing written yet
    "install.during_unpack",  # half the files extracted into the staging directory
    "install.after_unpack",  # staging directory complete, not yet fsynced
    "install.after_fsync",  # staging directory fsynced, not yet renamed
    "install.after_rename",  # version directory in place, not yet health-checked
    "install.after_health",  # health check passed, active pointer not switched
    "state.after_tmp",  # new state.json.tmp written and fsynced, not yet renamed over state.json
    "state.after_replace",  # state.json replaced, directory not yet fsynced
    "swap.after_load",  # running agent: new version loaded and warmed beside the old one
    "swap.after_switch",  # running agent: requests now go to the new version
)


def fault_point(name: str) -> None:
    """SIGKILL this process if `name` is armed in the environment (no-op otherwise)."""
    armed = os.environ.get(ENV)
    if armed and name in armed.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
