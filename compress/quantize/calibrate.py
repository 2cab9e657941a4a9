"""Activation range calibration from histograms (numpy only).

Statistics are gathered in two passes over the same calibration batches: pass 1 finds each tensor's
min/max, pass 2 fills a 2048-bin histogram of the values over [min, max] and one of |x| over
[0, max|x|]. A range method then turns the histograms into a (lo, hi) range that always contains 0:

- minmax: the observed extremes.
- percentile: cut `100 - p` percent of the mass off each tail (e.g. p = 99.99).
- entropy: TensorRT's KL-divergence threshold on |x| (128 levels for signed, 256 for non-negative data),
  ignoring the first bin (the spike of exact zeros after ReLU).
- mse: the scaling of [min, max] that minimises the expected squared error of uint8 affine quantization
  (clipping error of the tails + step^2 / 12 inside the range).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

BINS = 2048
LEVELS = 256  # uint8 / int8 activation levels


@dataclass
class TensorStats:
    """Running statistics of one tensor across calibration batches."""

    lo: float = np.inf
    hi: float = -np.inf
    count: int = 0
    hist: np.ndarray | None = None  # BINS counts over [lo, hi]
    abs_hist: np.ndarray | None = None  # BINS counts over [0, max(|lo|, |hi|)]
    channel_absmax: np.ndarray | None = field(default=None, repr=False)  # per last-axis channel (SmoothQuant)

    @property
    def absmax(self) -> float:
        return max(abs(self.lo), abs(self.hi))

    def update_minmax(self, x: np.ndarray, channels: bool = False) -> None:
        x = np.asarray(x, dtype=np.float32)
        if x.size == 0:
            return
        finite = x if np.isfinite(x).all() else x[np.isfinite(x)]
        if finite.size == 0:
            return
        self.lo = min(self.lo, float(finite.min()))
        self.hi = max(self.hi, float(finite.max()))
        self.count += int(finite.size)
        if channels and x.ndim >= 1:
            cmax = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
            self.channel_absmax = (
                cmax if self.channel_absmax is None else np.maximum(self.channel_absmax, cmax)
            )

    def update_hist(self, x: np.ndarray) -> None:
        if not np.isfinite(self.lo):
            return
        x = np.asarray(x, dtype=np.float32).ravel()
        x = x[np.isfinite(x)]
        if self.hist is None:
            self.hist = np.zeros(BINS, np.int64)
            self.abs_hist = np.zeros(BINS, np.int64)
        self.hist += _bincount(x, self.lo, self.hi)
        self.abs_hist += _bincount(np.abs(x), 0.0, self.absmax)


def _bincount(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        out = np.zeros(BINS, np.int64)
        out[0] = x.size
        return out
    idx = np.clip(((x - lo) * (BINS / (hi - lo))).astype(np.int64), 0, BINS - 1)
    return np.bincount(idx, minlength=BINS)


def collect(
    batches: Iterable[dict[str, np.ndarray]] | None,
    rerun: Iterable[dict[str, np.ndarray]] | None,
    channels: Iterable[str] = (),
) -> dict[str, TensorStats]:
    """Two-pass statistics: `batches` yields {tensor: value} for pass 1, `rerun` the same for pass 2."""
    stats: dict[str, TensorStats] = {}
    want_channels = set(channels)
    for values in batches or ():
        for name, value in values.items():
            stats.setdefault(name, TensorStats()).update_minmax(value, channels=name in want_channels)
    for values in rerun or ():
        for name, value in values.items():
            if name in stats:
                stats[name].update_hist(value)
    return stats


def compute_range(stats: TensorStats, method: str, percentile: float = 99.99) -> tuple[float, float]:
    """The (lo, hi) activation range of one tensor by `method`; always lo <= 0 <= hi and hi > lo."""
    if not np.isfinite(stats.lo):
        return 0.0, 1e-6
    lo, hi = stats.lo, stats.hi
    if method != "minmax" and stats.hist is not None and hi > lo:
        if method == "percentile":
            lo, hi = _percentile(stats, percentile)
        elif method == "entropy":
            t = _kl_threshold(stats.abs_hist, stats.absmax, LEVELS if stats.lo >= 0 else LEVELS // 2)
            lo, hi = max(stats.lo, -t), min(stats.hi, t)
        elif method == "mse":
            lo, hi = _mse_range(stats)
        else:
            raise ValueError(f"unknown calibration method {method!r}")
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-6
    return float(lo), float(hi)


def _centers(stats: TensorStats) -> np.ndarray:
    width = (stats.hi - stats.lo) / BINS
    return stats.lo + (np.arange(BINS) + 0.5) * width


def _percentile(stats: TensorStats, p: float) -> tuple[float, float]:
    assert stats.hist is not None
    cdf = np.cumsum(stats.hist) / max(stats.hist.sum(), 1)
    tail = (100.0 - p) / 100.0
    edges = np.linspace(stats.lo, stats.hi, BINS + 1)
    lo_i = int(np.searchsorted(cdf, tail, side="left"))
    hi_i = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
    lo = stats.lo if tail <= 0 else float(edges[lo_i])
    hi = stats.hi if tail <= 0 else float(edges[min(hi_i + 1, BINS)])
    return lo, hi


def quant_mse(centers: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Expected squared error of uint8 affine quantization over [lo, hi] for each candidate range."""
    scale = (hi - lo) / (LEVELS - 1)
    c = centers[None, :]
    clipped = np.clip(c, lo[:, None], hi[:, None])
    clip_err = (c - clipped) ** 2
    inside = (c >= lo[:, None]) & (c <= hi[:, None])
    round_err = np.where(inside, (scale[:, None] ** 2) / 12.0, 0.0)
    return ((clip_err + round_err) * counts[None, :]).sum(axis=1)


def _mse_range(stats: TensorStats) -> tuple[float, float]:
    assert stats.hist is not None
    keep = stats.hist > 0
    centers, counts = _centers(stats)[keep], stats.hist[keep].astype(np.float64)
    t = np.linspace(0.02, 1.0, 64)
    # shrink both ends (around 0) and the upper end alone (the usual shape for post-activation data)
    lo_c = np.concatenate([min(stats.lo, 0.0) * t, np.full_like(t, min(stats.lo, 0.0))])
    hi_c = np.concatenate([max(stats.hi, 0.0) * t, max(stats.hi, 0.0) * t])
    ok = hi_c - lo_c > 0
    err = np.where(ok, quant_mse(centers, counts, lo_c, np.where(ok, hi_c, lo_c + 1.0)), np.inf)
    best = int(np.argmin(err))
    return float(lo_c[best]), float(hi_c[best])


def _kl_threshold(hist: np.ndarray | None, absmax: float, levels: int) -> float:
    """TensorRT entropy calibration on a histogram of |x| over [0, absmax]: the clipping threshold whose
    quantized distribution (into `levels` bins) is closest in KL divergence to the clipped reference."""
    if hist is None or hist.sum() == 0 or absmax <= 0:
        return absmax
    hist = hist.astype(np.float64)
    hist[0] = 0.0  # the spike of exact zeros (ReLU) would otherwise dominate the divergence
    total = hist.sum()
    if total == 0:
        return absmax
    width = absmax / BINS
    best_i, best_kl = BINS, np.inf
    for i in range(levels, BINS + 1, 16):
        src = hist[:i]
        ref = src.copy()
        ref[-1] += hist[i:].sum()  # outliers clipped into the last bin
        starts = np.linspace(0, i, levels + 1).astype(np.int64)[:-1]
        group = np.repeat(np.arange(levels), np.diff(np.append(starts, i)))
        mass = np.add.reduceat(src, starts)
        nonzero = np.add.reduceat((src > 0).astype(np.float64), starts)
        per_bin = np.where(nonzero > 0, mass / np.maximum(nonzero, 1), 0.0)
        cand = np.where(src > 0, per_bin[group], 0.0)
        if cand.sum() == 0:
            continue
        p, q = ref / total, cand / cand.sum()
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return (best_i + 0.5) * width


def symmetric_weight_scales(w: np.ndarray, axis: int | None, bits: int = 8) -> np.ndarray:
    """Per-channel (along `axis`) or per-tensor (axis None) symmetric scales: max|w| / 127."""
    qmax = 2 ** (bits - 1) - 1
    if axis is None:
        amax = np.array(np.abs(w).max(), dtype=np.float32)
    else:
        other = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        amax = np.abs(w).max(axis=other)
    scale = (amax / qmax).astype(np.float32)
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
