"""Shared pieces of the fuzz tests: example counts per profile, JSON value strategies, byte mutations,
and a memory bound (tracemalloc peak) for decoders of outside bytes."""

from __future__ import annotations

import json
import os
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import strategies as st

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
SCALE = 1 if PROFILE == "ci" else int(os.environ.get("FUZZ_SCALE", "30"))


def examples(n: int) -> int:
    """`n` examples in the CI profile, n * FUZZ_SCALE (default 30) in the deep profile."""
    return n * SCALE


# JSON scalars with the awkward cases: huge and negative integers, floats at the edges, odd unicode
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**53, max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
    st.sampled_from(["", "\n", "a\n", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59", "²", "-1"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=20,
)


def huge_int(digits: int = 5000, key: str = "x") -> bytes:
    """A JSON object holding an integer of `digits` digits: Python's json refuses > 4300 with ValueError."""
    return b'{"' + key.encode() + b'":' + b"7" * digits + b"}"


huge_ints = st.integers(4301, 6000).map(huge_int)


def nested(depth: int) -> bytes:
    """A JSON document nested `depth` levels deep (the RecursionError probe)."""
    return b"[" * depth + b"]" * depth


@st.composite
def mutated(draw: Callable[..., Any], base: bytes, regions: list[tuple[int, int]] | None = None) -> bytes:
    """`base` with a few edits: flipped bits, overwritten or inserted bytes, truncation. With `regions`
    ((start, end) byte ranges, e.g. a zip's central directory), some edits land there on purpose."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "flip", "set", "insert", "truncate", "region"]))
        if op == "region" and regions:
            lo, hi = draw(st.sampled_from(regions))
            pos = draw(st.integers(lo, max(lo, min(hi, len(data)) - 1)))
            if pos < len(data):
                data[pos] ^= draw(st.integers(1, 255))
            continue
        pos = draw(st.integers(0, len(data) - 1))
        if op in ("flip", "region"):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos : pos + len(chunk)] = chunk
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos:]
    return bytes(data)


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@contextmanager
def memory_bound(limit: int) -> Iterator[None]:
    """Fail when the Python-visible allocations (NumPy arrays included) peak above `limit` bytes."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= limit, f"peak allocation {peak} bytes, above the bound of {limit}"
