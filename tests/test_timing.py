"""pocketfleet.timing.time_interleaved: rounds take each callable in turn, `block` calls in a row."""

from __future__ import annotations

import pytest

from pocketfleet.timing import time_interleaved


def test_blocks_of_consecutive_calls_interleave_and_count_calls() -> None:
    order: list[str] = []
    fns = {name: (lambda n=name: order.append(n)) for name in ("a", "b")}
    stats = time_interleaved(fns, min_runs=6, min_seconds=0.0, warmup_seconds=0.0, warmup_runs=1, block=3)
    timed = order[2:]  # after one warm-up call each
    assert timed == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert stats["a"].runs == stats["b"].runs == 6


def test_block_one_is_strict_round_robin_and_a_bad_block_is_refused() -> None:
    order: list[str] = []
    fns = {name: (lambda n=name: order.append(n)) for name in ("a", "b")}
    time_interleaved(fns, min_runs=2, min_seconds=0.0, warmup_seconds=0.0, warmup_runs=1)
    assert order[2:] == ["a", "b", "a", "b"]
    with pytest.raises(ValueError, match="block must be >= 1"):
        time_interleaved(fns, block=0)
