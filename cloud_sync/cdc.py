"""Gear content-defined chunking with normalized chunk sizes (FastCDC's scheme), vectorized in numpy.

The rolling hash at byte i is h_i = sum_{j<32} G[b_{i-j}] << j (mod 2^32), with G a fixed table of 256
pseudo-random words (Gear's hash, as in FastCDC): it depends on the last 32 bytes only, so all of it is
computed at once, in blocks, with five shifted adds. A chunk ends after byte i when the top bits of h_i are zero: a stricter mask (more
bits: log2(avg) + 1) until the chunk reaches the average size and a looser one (log2(avg) - 2) after it, so sizes cluster around the
average (FastCDC's normalized chunking); never before `min`, always at `max`. Boundaries depend only on
content, so bytes that did not change between two files fall into identical chunks.

The table and masks are part of the chunk format ("gear32"): a device cuts its local files with the same
ones as the cloud did.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import numpy as np

ALGO = "gear32"
WINDOW = 32  # bytes that determine the hash at a position
_BLOCK = 1 << 22  # bytes hashed at a time (about 40 MB of temporaries)
# G[k] = the first 4 bytes of SHA-256("pocketfleet-gear32" || k), big-endian
GEAR = np.array(
    [
        int.from_bytes(hashlib.sha256(b"pocketfleet-gear32" + bytes([k])).digest()[:4], "big")
        for k in range(256)
    ],
    dtype=np.uint32,
)


def _mask(bits: int) -> np.uint32:
    bits = max(1, min(bits, 31))
    return np.uint32(((1 << bits) - 1) << (32 - bits))


def gear_hashes(data: np.ndarray) -> np.ndarray:
    """h_i for every byte of `data` (uint8); the first WINDOW-1 values see fewer bytes.

    By doubling: with H_k(i) = sum_{j<k} G[b_{i-j}] << j, H_2k(i) = H_k(i) + H_k(i-k) << k, so five
    shifted adds give the 32-byte window."""
    h = GEAR[data]
    step = 1
    while step < WINDOW:
        h[step:] += h[:-step] << np.uint32(step)
        step *= 2
    return h


def _candidates(view: memoryview, strict: np.uint32, loose: np.uint32) -> tuple[np.ndarray, np.ndarray]:
    """Positions whose hash passes the strict and the loose mask, over the whole buffer, block by block."""
    n = len(view)
    strict_at, loose_at = [], []
    for start in range(0, n, _BLOCK):
        lo = max(0, start - (WINDOW - 1))  # the window of the block's first bytes reaches back
        block = np.frombuffer(view[lo : min(n, start + _BLOCK)], dtype=np.uint8)
        h = gear_hashes(block)[start - lo :]
        strict_at.append(np.flatnonzero((h & strict) == 0) + start)
        loose_at.append(np.flatnonzero((h & loose) == 0) + start)
    empty = np.zeros(0, dtype=np.int64)
    return (
        np.concatenate(strict_at) if strict_at else empty,
        np.concatenate(loose_at) if loose_at else empty,
    )


def cut(view: memoryview | bytes, min_size: int, avg_size: int, max_size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each chunk of `view`, in order."""
    view = memoryview(view).cast("B")
    n = len(view)
    if n == 0:
        return
    bits = round(math.log2(avg_size))
    strict, loose = _candidates(view, _mask(bits + 1), _mask(bits - 2))
    start = 0
    while start < n:
        if n - start <= min_size:
            yield start, n - start
            return
        end = _first(strict, start + min_size - 1, min(start + avg_size - 1, n))
        if end is None:
            end = _first(loose, start + avg_size - 1, min(start + max_size - 1, n))
        stop = end + 1 if end is not None else min(start + max_size, n)
        yield start, stop - start
        start = stop


def _first(positions: np.ndarray, lo: int, hi: int) -> int | None:
    """The first position p with lo <= p < hi."""
    i = int(np.searchsorted(positions, lo))
    return int(positions[i]) if i < len(positions) and positions[i] < hi else None
