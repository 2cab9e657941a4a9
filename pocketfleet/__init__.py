"""pocketfleet's base layer (torch-free, imports nothing else of ours): the error type, durable file
writes (`pocketfleet.fs`), typed TOML config loading (`pocketfleet.config`), latency measurement
(`pocketfleet.timing`), command output (`emit`, `table`, `--json`) and lazy re-exports.

The composition root lives beside it and is imported by nothing: `pocketfleet.cli` (the `pocketfleet`
command), `pocketfleet.demo` and `pocketfleet.sim` (fleet simulators for the demo, tests and benchmarks).
"""

from __future__ import annotations

from pocketfleet.errors import PocketfleetError
from pocketfleet.lazy import callable_package, lazy_exports
from pocketfleet.output import add_json_flag, emit, table

__version__ = "0.1.0"

__all__ = ["PocketfleetError", "__version__", "add_json_flag", "callable_package", "emit", "lazy_exports", "table"]
