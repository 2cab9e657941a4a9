"""Content-defined chunking (cloud_sync/cdc.py): the vectorized hash equals its definition, chunk sizes
respect min/max and cluster near the average, and an insertion changes only the chunks around it."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from cloud_sync.cdc import GEAR, WINDOW, cut, gear_hashes


def test_doubled_gear_hash_equals_the_windowed_sum() -> None:
    data = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)
    direct = [
        sum(int(GEAR[data[i - j]]) << j for j in range(WINDOW) if i >= j) % (1 << 32) for i in range(300)
    ]
    assert gear_hashes(data).tolist() == direct


@pytest.mark.parametrize("avg", [2048, 16384])
def test_chunk_sizes_and_shift_resistance(avg: int) -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    chunks = list(cut(data, avg // 4, avg, avg * 4))
    sizes = np.array([n for _, n in chunks])
    assert sum(sizes) == len(data) and chunks[0][0] == 0
    assert all(o2 == o1 + n1 for (o1, n1), (o2, _) in zip(chunks, chunks[1:], strict=False))
    assert sizes[:-1].min() >= avg // 4 and sizes.max() <= avg * 4
    assert 0.75 * avg < sizes.mean() < 1.5 * avg

    edited = data[: 1 << 20] + b"inserted bytes" + data[(1 << 20) + 5 :]
    before = {hashlib.sha256(data[o : o + n]).digest() for o, n in chunks}
    after = [hashlib.sha256(edited[o : o + n]).digest() for o, n in cut(edited, avg // 4, avg, avg * 4)]
    changed = sum(h not in before for h in after)
    assert 1 <= changed <= 3, changed  # the chunk(s) around the edit, nothing else


def test_small_and_empty_inputs() -> None:
    assert list(cut(b"", 4, 8, 16)) == []
    assert list(cut(b"abc", 4, 8, 16)) == [(0, 3)]
    sizes = [n for _, n in cut(bytes(100), 4, 8, 16)]  # constant bytes: a constant hash
    assert sum(sizes) == 100 and all(4 <= n <= 16 for n in sizes[:-1])
