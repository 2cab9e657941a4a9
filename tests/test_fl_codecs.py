"""cloud_sync.fl.codecs: top-k / int8 / error feedback round trips, byte savings, and strict decoding."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from cloud_sync.fl import tensors as T
from cloud_sync.fl.codecs import (
    CodecConfig,
    DecodeLimits,
    ErrorFeedback,
    decode_update,
    encode_update,
    quantize_int8,
)
from cloud_sync.fl.errors import MalformedUpdateError, OversizeUpdateError

RNG = np.random.default_rng(0)
DELTA = {"conv.weight": RNG.normal(size=(16, 8, 3, 3)).astype(np.float32), "fc.bias": RNG.normal(size=10).astype(np.float32)}
SHAPES = T.shapes(DELTA)
HDR = {"task": "t", "round": 3, "device": "d1", "num_samples": 7, "metrics": {"loss": 0.5}}


@pytest.mark.parametrize(
    "cfg", [CodecConfig(), CodecConfig(int8=True), CodecConfig(topk=0.05, min_sparse=1), CodecConfig(topk=0.05, int8=True, min_sparse=1)]
)
def test_round_trip_with_error_feedback_is_lossless_in_sum(cfg):
    ef = ErrorFeedback()
    upd = decode_update(encode_update(DELTA, cfg, HDR, ef, seed=1), SHAPES)
    assert upd.num_samples == 7 and upd.header["round"] == 3 and upd.metrics == {"loss": 0.5}
    for k, v in DELTA.items():
        assert upd.delta[k].shape == v.shape and upd.delta[k].dtype == np.float32
        # what was sent + what was kept back == the true update (error feedback loses nothing)
        assert np.allclose(upd.delta[k] + ef.residuals.get(k, 0.0), v, atol=1e-6)
    if not cfg.lossy:
        assert not ef.residuals and all(np.array_equal(upd.delta[k], DELTA[k]) for k in DELTA)
    if cfg.topk:
        nz = sum(int((u != 0).sum()) for u in upd.delta.values())
        assert nz <= sum(max(1, round(0.05 * v.size)) for v in DELTA.values())


def test_compressed_payload_is_over_10x_smaller_than_dense():
    big = {"w": RNG.normal(size=(64, 288)).astype(np.float32), "b": RNG.normal(size=64).astype(np.float32)}
    dense = len(encode_update(big, CodecConfig(), HDR))
    small = len(encode_update(big, CodecConfig(topk=0.1, int8=True), HDR, ErrorFeedback(), seed=0))
    assert dense / small >= 10


def test_int8_stochastic_rounding_is_unbiased():
    x = np.full(200_000, 0.3, np.float32)
    q, scale = quantize_int8(np.concatenate([x, [1.27]]).astype(np.float32), np.random.default_rng(0))
    assert scale == pytest.approx(0.01)
    assert float((q[:-1].astype(np.float64) * scale).mean()) == pytest.approx(0.3, abs=1e-3)
    assert set(np.unique(q[:-1]).tolist()) == {30}  # 0.3 / 0.01 is exactly representable
    q2, _ = quantize_int8(np.full(100_000, 0.305, np.float32), np.random.default_rng(1), scale=0.01)
    assert set(np.unique(q2).tolist()) == {30, 31} and abs(q2.mean() - 30.5) < 0.02


def test_error_feedback_accumulates_over_rounds_and_persists(tmp_path):
    ef = ErrorFeedback()
    cfg = CodecConfig(topk=0.1, int8=True)
    sent = T.zeros_like(DELTA)
    for r in range(30):
        upd = decode_update(encode_update(DELTA, cfg, {**HDR, "round": r}, ef, seed=r), SHAPES)
        sent = T.add(sent, upd.delta)
        ef.save(tmp_path / "ef.safetensors")
        ef = ErrorFeedback.load(tmp_path / "ef.safetensors")
        if r == 4:
            err5 = T.l2_norm(T.sub(sent, {k: 5 * v for k, v in DELTA.items()})) / (5 * T.l2_norm(DELTA))
    # nothing is lost: sent + kept-back residual == 30 x the true update, and the relative gap shrinks
    total = {k: 30 * v for k, v in DELTA.items()}
    assert all(np.allclose(sent[k] + ef.residuals[k], total[k], atol=1e-3) for k in DELTA)
    err30 = T.l2_norm(T.sub(sent, total)) / T.l2_norm(total)
    assert err30 < 0.5 * err5
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    assert ErrorFeedback.load(tmp_path / "bad.safetensors").residuals == {}
    assert ErrorFeedback.load(tmp_path / "missing").residuals == {}


def _rebuild(payload: bytes, mutate) -> bytes:
    header, tensors = T.from_bytes(payload, 1 << 30)
    mutate(header, tensors)
    return T.to_bytes(tensors, header)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda h, t: h.update(schema="pf.fl.update/0"), "schema"),
        (lambda h, t: h.update(num_samples=0), "num_samples"),
        (lambda h, t: h.update(num_samples=True), "num_samples"),
        (lambda h, t: h.update(codec={"int8": 1}), "codec"),
        (lambda h, t: h["tensors"].pop("fc.bias"), "missing"),
        (lambda h, t: h["tensors"].update(extra={"enc": "dense"}), "unknown"),
        (lambda h, t: h["tensors"]["fc.bias"].update(enc="rle"), "encoding"),
        (lambda h, t: h["tensors"]["conv.weight"].update(k=0), "k=0"),
        (lambda h, t: h["tensors"]["conv.weight"].update(k=5000), "k=5000"),
        (lambda h, t: h["tensors"]["conv.weight"].update(k=50), "shape"),  # counts no longer add up
        (lambda h, t: t.update(values=t["values"].astype(np.float16)), "dtype"),
        (lambda h, t: t.update(values=t["values"][:-1].copy()), "shape"),
        (lambda h, t: t.update(idx16=t["idx16"] + 10_000), "out of"),
        (lambda h, t: t.update(idx16=t["idx16"][::-1].copy()), "strictly increasing"),
        (lambda h, t: t.update(idx16=t["idx16"].astype(np.int32)), "dtype"),
        (lambda h, t: t.update(scales=np.array([np.inf, 1.0], np.float32)), "scales"),
        (lambda h, t: t.update(scales=np.array([-1.0, 1.0], np.float32)), "scales"),
        (lambda h, t: t.pop("scales"), "missing"),
        (lambda h, t: t.update(smuggled=np.zeros(3, np.float32)), "unexpected"),
    ],
)
def test_malformed_payloads_are_rejected_with_a_reason(mutate, match):
    good = encode_update(DELTA, CodecConfig(topk=0.03, int8=True), HDR, ErrorFeedback(), seed=0)  # index list
    with pytest.raises(MalformedUpdateError, match=match):
        decode_update(_rebuild(good, mutate), SHAPES)


def _set_bit(t, i: int) -> None:
    bits = np.unpackbits(t["bitmap"])
    bits[i] ^= 1
    t["bitmap"] = np.packbits(bits)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda h, t: _set_bit(t, 1101), "padding"),  # a pad bit past the tensor's 1100 entries
        (lambda h, t: _set_bit(t, int(np.flatnonzero(np.unpackbits(t["bitmap"]))[0])), "k="),
        (lambda h, t: t.update(bitmap=t["bitmap"][:-1].copy()), "shape"),
        (lambda h, t: t.update(bitmap=t["bitmap"].astype(np.int8)), "dtype"),
    ],
)
def test_malformed_bitmaps_are_rejected(mutate, match):
    odd = {"w": RNG.normal(size=1100).astype(np.float32)}
    good = encode_update(odd, CodecConfig(topk=0.1, int8=True), HDR, ErrorFeedback(), seed=0)
    assert "bitmap" in T.from_bytes(good, 1 << 30)[1]  # 138 bytes < 110 uint16 indices (220 bytes)
    assert np.count_nonzero(decode_update(good, T.shapes(odd)).delta["w"]) == 110
    with pytest.raises(MalformedUpdateError, match=match):
        decode_update(_rebuild(good, mutate), T.shapes(odd))


def test_non_finite_and_garbage_payloads():
    bad = {k: v.copy() for k, v in DELTA.items()}
    bad["fc.bias"][3] = np.nan
    with pytest.raises(MalformedUpdateError, match="NaN"):
        decode_update(encode_update(bad, CodecConfig(), HDR), SHAPES)
    for junk in (b"", b"1234567", struct.pack("<Q", 16) + b"\xff" * 100, struct.pack("<Q", 50) + b"{}", "text"):
        with pytest.raises(MalformedUpdateError):
            decode_update(junk, SHAPES)
    hdr = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1_000_000]}}).encode()
    with pytest.raises(MalformedUpdateError):
        decode_update(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 16, SHAPES)


def test_oversized_payload_and_header_are_rejected_before_parsing():
    good = encode_update(DELTA, CodecConfig(), HDR)
    with pytest.raises(OversizeUpdateError, match="limit"):
        decode_update(good, SHAPES, DecodeLimits(max_bytes=len(good) - 1))
    with pytest.raises(OversizeUpdateError, match="header"):
        decode_update(struct.pack("<Q", 1 << 40) + b"{}", SHAPES)
    with pytest.raises(OversizeUpdateError, match="header"):
        decode_update(b"\xff" * 100, SHAPES)


def test_small_tensors_stay_dense_under_topk():
    cfg = CodecConfig(topk=0.05, int8=True)  # min_sparse 1024: fc.bias (10) dense, conv.weight (1152) sparse
    header, tensors = T.from_bytes(encode_update(DELTA, cfg, HDR, ErrorFeedback(), seed=0), 1 << 30)
    assert header["tensors"]["fc.bias"] == {"enc": "dense"} and header["tensors"]["conv.weight"]["enc"] == "topk"
    k = round(0.05 * 1152)  # 58 uint16 indices (116 bytes) beat a 144-byte bitmap
    assert tensors["idx16"].shape == (k,) and "idx32" not in tensors and "bitmap" not in tensors
    assert tensors["values"].shape == (k + 10,)
    assert tensors["values"].dtype == np.int8 and tensors["scales"].shape == (2,)


def test_large_tensors_use_int32_indices():
    big = {"emb": RNG.normal(size=(70_000,)).astype(np.float32), "b": np.ones(3, np.float32)}
    payload = encode_update(big, CodecConfig(topk=0.01, int8=True), HDR, ErrorFeedback(), seed=0)
    _, tensors = T.from_bytes(payload, 1 << 30)
    assert tensors["idx32"].dtype == np.int32 and tensors["idx32"].shape == (700,) and "idx16" not in tensors
    upd = decode_update(payload, T.shapes(big))
    top = np.sort(np.argsort(-np.abs(big["emb"]))[:700])
    assert np.array_equal(np.flatnonzero(upd.delta["emb"]), top)
