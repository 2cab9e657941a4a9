"""Telemetry: exact running mean/variance per feature across batches, latency percentiles, error counts,
pooling of large inputs, and one outbox record per model version per window."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.outbox import Outbox, Priority
from edge_agent.telemetry import RunningStats, Telemetry, features

RNG = np.random.default_rng(3)


def test_running_stats_match_numpy_over_batches() -> None:
    batches = [RNG.normal(2.0, 3.0, (n, 5)) for n in (1, 7, 30, 2)]
    stats = RunningStats(5)
    for b in batches:
        stats.update(b)
    allx = np.concatenate(batches)
    assert stats.count == 40
    np.testing.assert_allclose(stats.mean, allx.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.var, allx.var(axis=0), rtol=1e-10)


def test_large_inputs_are_pooled_into_bins() -> None:
    x = np.arange(2 * 1000, dtype=np.float32).reshape(2, 1000)
    pooled, was = features(x, 100)
    assert was and pooled.shape == (2, 100)
    np.testing.assert_allclose(pooled[0, 0], x[0, :10].mean())
    small, was = features(x[:, :50], 100)
    assert not was and small.shape == (2, 50)


def test_window_counts_latencies_errors_and_input_stats(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    tel = Telemetry("dev-1", box, max_features=16)
    xs = [RNG.random((4, 1, 8, 8), dtype=np.float32) for _ in range(10)]
    for i, x in enumerate(xs):
        tel.observe("digits", 3, (i + 1) / 1000, {"image": x}, None)
    tel.observe("digits", 3, 0.5, None, "bad_input")
    tel.observe("digits", 4, 0.002, {"image": xs[0]}, None)
    (rec3, rec4) = tel.snapshot()
    assert rec3["model"] == {"name": "digits", "version": 3} and rec3["device"] == "dev-1"
    assert (rec3["requests"], rec3["errors"], rec3["error_count"]) == (11, {"bad_input": 1}, 1)
    assert rec3["latency_ms"]["p50"] == np.percentile(np.arange(1, 11), 50)
    assert rec3["latency_ms"]["p95"] == np.percentile(np.arange(1, 11), 95) and rec3["latency_ms"]["max"] == 10
    image = rec3["inputs"]["image"]
    want, _ = features(np.concatenate(xs), 16)
    assert image["count"] == 40 and image["pooled"] is True and len(image["mean"]) == 16
    np.testing.assert_allclose(image["mean"], want.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(image["var"], want.var(axis=0), atol=1e-6)
    assert rec4["requests"] == 1
    assert tel.flush() == 2 and tel.snapshot() == []  # flushed records start a new window
    recs = box.peek(10)
    assert [r.priority for r in recs] == [Priority.TELEMETRY] * 2 and recs[0].json()["requests"] == 11


def test_pending_input_bytes_are_bounded() -> None:
    tel = Telemetry("dev-1", None, max_pending_bytes=3 * 256)  # room for 3 inputs of 256 bytes
    x = np.ones((1, 64), np.float32)
    for _ in range(5):
        tel.observe("m", 1, 0.001, {"x": x}, None)
    assert tel.unsampled == 2
    (rec,) = tel.snapshot()
    assert rec["requests"] == 5 and rec["inputs"]["x"]["count"] == 3 and rec["unsampled"] == 2
    tel.observe("m", 1, 0.001, {"x": x}, None)  # folding freed the room again
    assert tel.unsampled == 2
