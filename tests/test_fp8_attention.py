"""FireQ's FP8 attention numerics over int4_fp8 KV (pallas_kernels/fp8_attention.py): the helpers on
their own, and the reference attention against an independent float64 model of the same numerics.

Fresh random inputs every run (the `rng` fixture prints its seed on failure)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels.fp8_attention import FP8_HEADROOM, fp8_queries, p_factor, pow2_ceil, round_e4m3
from pallas_kernels.kv_pages import KVPageLayout, read_kv_pages_quantized, write_kv_tokens
from pallas_kernels.paged_attention_ref import paged_attention_reference
from pallas_kernels.quant_formats import unpack_int4


def e4m3(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


def test_pow2_ceil_is_the_next_power_of_two(rng):
    x = np.exp(rng.uniform(-80, 80, 4096)).astype(np.float32)
    x[:4] = [1.0, 2.0 ** -100, 0.75, 3.0]
    got = np.asarray(jax.jit(pow2_ceil)(jnp.asarray(x)), np.float64)
    want = 2.0 ** np.ceil(np.log2(x.astype(np.float64)))
    np.testing.assert_array_equal(got, want)
    assert list(got[:4]) == [1.0, 2.0 ** -100, 1.0, 4.0]


def test_fp8_queries_round_each_row_to_e4m3_under_a_power_of_two(rng):
    q = (rng.standard_normal((64, 128)) * np.exp(rng.uniform(-20, 20, (64, 1)))).astype(np.float32)
    q[0] = 0.0                                                            # an all-zero row
    got = np.asarray(jax.jit(fp8_queries)(jnp.asarray(q)), np.float64)
    scale = 2.0 ** np.ceil(np.log2(np.maximum(np.abs(q).max(axis=-1, keepdims=True), 2.0 ** -100))) / FP8_HEADROOM
    q8 = got / scale
    np.testing.assert_array_equal(q8, e4m3(q8))                          # e4m3 values under the scale
    np.testing.assert_array_equal(q8, e4m3(q / scale))                   # round to nearest of q / scale
    absmax = np.abs(q8).max(axis=-1)
    # (128, 256] before rounding; a row max just above 128 rounds to 128
    assert np.all((absmax[1:] >= FP8_HEADROOM / 2) & (absmax[1:] <= FP8_HEADROOM)) and not got[0].any()
    # Within half an e4m3 step (2^-4 relative) of q, except where q / scale falls under e4m3's
    # normal range (2^-6) and the absolute step 2^-9 rules.
    err = np.abs(got - q)
    assert np.all(err <= np.maximum(2.0 ** -4 * np.abs(q), 2.0 ** -10 * scale) * (1 + 1e-6))
    np.testing.assert_array_equal(got, got.astype(ml_dtypes.bfloat16).astype(np.float64))   # bf16 holds it


def test_round_e4m3_matches_ml_dtypes(rng):
    x = (rng.standard_normal(8192) * np.exp(rng.uniform(-12, 6, 8192))).astype(np.float32)
    x = np.clip(x, -448, 448)
    np.testing.assert_array_equal(np.asarray(jax.jit(round_e4m3)(jnp.asarray(x)), np.float64), e4m3(x))


def fp8_model(q, k_codes, k_scale, v_codes, v_scale, n):
    """float64 FireQ attention of one query row set over one block of n live tokens: q [G, D] (scaled
    by D^-0.5), codes [n, D], scales [n]. P is rounded relative to the block's max, as the
    reference does when the whole context is one block."""
    q8 = np.asarray(fp8_queries(jnp.asarray(q, jnp.float32)), np.float64)
    s = (q8 @ k_codes[:n].T) * k_scale[None, :n]
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    c = float(p_factor(jnp.float32(v_scale[:n].max())))
    p8 = e4m3(p * v_scale[None, :n] * c)
    return (p8 @ v_codes[:n]) / c / p.sum(axis=-1, keepdims=True), p / p.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("group", [1, 4])
def test_reference_is_the_fp8_model(rng, group):
    """One block covers the context, so the reference's running max is the block's: it computes
    the model's numbers up to float32 arithmetic. An e4m3 rounding of P can flip where float32 and
    float64 land on either side of a rounding boundary (rare: the values differ by ~1e-7 relative,
    the boundaries are 2^-4 apart); a flip moves one P entry by one e4m3 step (2^-3 relative), so
    each output stays within 2^-3 max_i(p_i) max|v| of the model, and nearly all match to 1e-5."""
    hkv, d, t, pages = 2, 64, 16, 4
    layout = KVPageLayout(1, hkv, d, t, "int4_fp8", pages_per_slab=pages)
    n = int(rng.integers(2, pages * t + 1))
    k = (rng.standard_normal((n, hkv, d)) * rng.uniform(0.3, 3.0, (n, hkv, 1))).astype(np.float32)
    v = (rng.standard_normal((n, hkv, d)) * rng.uniform(0.3, 3.0, (n, hkv, 1))).astype(np.float32)
    pool = jnp.full((1, pages * layout.page_words), 0x7FC07FC0, jnp.uint32)     # NaN poison
    pool = write_kv_tokens(pool, layout, jnp.arange(n) // t, jnp.arange(n) % t, jnp.ones(n, bool), 0,
                           jnp.asarray(k), jnp.asarray(v))
    table = jnp.arange(pages, dtype=jnp.int32)[None]
    q = rng.standard_normal((1, 1, hkv * group, d)).astype(np.float32)
    out = np.asarray(paged_attention_reference(jnp.asarray(q), pool, layout, 0, table, jnp.asarray([[n - 1]]),
                                               jnp.asarray([n]), pages_per_block=pages))[0, 0]
    kq, vq = read_kv_pages_quantized(pool, layout, table[0], 0)
    codes = [np.asarray(unpack_int4(x.values, signed=True, axis=x.axis), np.float64).reshape(-1, hkv, d)
             for x in (kq, vq)]
    scales = [np.asarray(x.scales, np.float64).reshape(-1, hkv) for x in (kq, vq)]
    for h in range(hkv):
        rows = slice(h * group, (h + 1) * group)
        want, p = fp8_model(q[0, 0, rows] * d ** -0.5, codes[0][:, h], scales[0][:, h], codes[1][:, h],
                            scales[1][:, h], n)
        err = np.abs(out[rows] - want)
        vmax = np.abs(codes[1][:n, h] * scales[1][:n, h, None]).max()
        assert np.all(err <= 2.0 ** -3 * p.max(axis=-1, keepdims=True) * vmax + 1e-5), err.max()
        assert np.mean(err <= 1e-5 + 1e-5 * np.abs(want)) >= 0.99
