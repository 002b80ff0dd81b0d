"""Tests for pallas_kernels/quant_formats.py: int4 packing layouts, saturating fp8 casts, quantize ->
dequantize error bounds for every weight/activation/KV format, exact byte accounting, and jit.

Random inputs are fresh each run (np.random.default_rng() without a seed) except inside hypothesis,
which draws its own seeds so failures shrink and replay.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import kv_bytes_per_token_per_layer
from pallas_kernels.quant_formats import (
    E4M3_MAX,
    QuantizedTensor,
    dequantize,
    dequantize_kv,
    pack_int4,
    pack_int4_u32,
    quantize_fp8_per_channel,
    quantize_fp8_per_token,
    quantize_int4_fp8,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    quantize_int8_per_token,
    quantize_kv,
    saturating_cast_e4m3,
    unpack_int4,
    unpack_int4_u32,
    stored_weight_arrays,
    weight_bytes,
    weight_kn,
)

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")   # compiling dominates these tests

# ---------------------------------------------------------------------------------------------------
# Helpers


def np_pack_u8(q: np.ndarray, axis: int) -> np.ndarray:
    """Numpy reference of the documented uint8 layout: element 2i low nibble, 2i+1 high nibble."""
    n = np.moveaxis(q.astype(np.int64) & 0xF, axis, -1).astype(np.uint8)
    out = n[..., 0::2] | (n[..., 1::2] << 4)
    return np.moveaxis(out, -1, axis)


def np_pack_u32(q: np.ndarray, axis: int) -> np.ndarray:
    """Numpy reference of the documented uint32 layout: element 8j+i in bits 4i..4i+3 of word j."""
    n = np.moveaxis(q.astype(np.int64) & 0xF, axis, -1).astype(np.uint32)
    out = np.zeros(n.shape[:-1] + (n.shape[-1] // 8,), np.uint32)
    for i in range(8):
        out |= n[..., i::8] << np.uint32(4 * i)
    return np.moveaxis(out, -1, axis)


def rand_weights(rng: np.random.Generator, shape) -> np.ndarray:
    """Normal values with per-row magnitudes spread over decades, a few outliers, and one zero row."""
    x = rng.standard_normal(shape).astype(np.float32)
    x *= np.exp(rng.uniform(-4, 4, size=shape[:-1] + (1,))).astype(np.float32)
    flat = x.reshape(-1)
    idx = rng.integers(0, flat.size, size=max(1, flat.size // 500))
    flat[idx] *= 30.0
    x[(0,) * (len(shape) - 1)] = 0.0  # an all-zero row (and so zero groups/tokens)
    return x


# ---------------------------------------------------------------------------------------------------
# int4 packing


def test_pack_int4_hand_written_bytes():
    assert pack_int4(jnp.array([1, 2], jnp.int32)).tolist() == [0x21]
    assert pack_int4(jnp.array([-1, 0], jnp.int8)).tolist() == [0x0F]
    assert pack_int4(jnp.array([0, -1], jnp.int8)).tolist() == [0xF0]
    assert pack_int4(jnp.array([-8, 7], jnp.int8)).tolist() == [0x78]
    assert pack_int4(jnp.array([15, 0, 3, 12], jnp.int32)).tolist() == [0x0F, 0xC3]
    # Along axis 0: column j pairs rows 0 and 1.
    assert pack_int4(jnp.array([[1, 5], [2, 6]]), axis=0).tolist() == [[0x21, 0x65]]
    assert pack_int4(jnp.array([1, 2])).dtype == jnp.uint8

    assert pack_int4_u32(jnp.arange(1, 9)).tolist() == [0x87654321]
    assert pack_int4_u32(jnp.full((8,), -1, jnp.int8)).tolist() == [0xFFFFFFFF]
    assert pack_int4_u32(jnp.array([0] * 7 + [-8], jnp.int8)).tolist() == [0x80000000]
    assert pack_int4_u32(jnp.arange(1, 9)).dtype == jnp.uint32

    assert unpack_int4(jnp.array([0x78], jnp.uint8), signed=True).tolist() == [-8, 7]
    assert unpack_int4(jnp.array([0x78], jnp.uint8), signed=False).tolist() == [8, 7]
    assert unpack_int4_u32(jnp.array([0x87654321], jnp.uint32), signed=True).tolist() == [1, 2, 3, 4, 5, 6, 7, -8]
    assert unpack_int4_u32(jnp.array([0x87654321], jnp.uint32), signed=False).tolist() == list(range(1, 9))


def test_pack_rejects_indivisible_axis():
    with pytest.raises(ValueError):
        pack_int4(jnp.zeros((3, 5), jnp.int8), axis=-1)
    with pytest.raises(ValueError):
        pack_int4(jnp.zeros((3, 4), jnp.int8), axis=0)
    with pytest.raises(ValueError):
        pack_int4_u32(jnp.zeros((2, 12), jnp.int8))
    with pytest.raises(ValueError):
        quantize_kv(jnp.zeros((2, 3, 5)), "int4")
    with pytest.raises(ValueError):
        quantize_int4_groupwise(jnp.zeros((100, 4)), group_size=64)


@st.composite
def pack_cases(draw, per: int):
    ndim = draw(st.integers(1, 3))
    shape = draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim))  # odd sizes elsewhere
    axis = draw(st.integers(-ndim, ndim - 1))
    shape[axis] = per * draw(st.integers(1, 3))
    signed = draw(st.booleans())
    dtype = draw(st.sampled_from([np.int8, np.int32])) if signed else draw(st.sampled_from([np.uint8, np.int32]))
    seed = draw(st.integers(0, 2**32 - 1))
    lo, hi = (-8, 8) if signed else (0, 16)
    q = np.random.default_rng(seed).integers(lo, hi, size=tuple(shape)).astype(dtype)
    return q, axis, signed


# Pack and unpack compiled together: one compile per shape instead of one per eager op keeps the
# hypothesis runs fast.
@jax.jit(static_argnames=("axis", "signed"))
def _u8_round_trip(q, axis, signed):
    packed = pack_int4(q, axis=axis)
    return packed, unpack_int4(packed, signed=signed, axis=axis)


@jax.jit(static_argnames=("axis", "signed"))
def _u32_round_trip(q, axis, signed):
    packed = pack_int4_u32(q, axis=axis)
    return packed, unpack_int4_u32(packed, signed=signed, axis=axis)


@settings(max_examples=40, deadline=None)
@given(pack_cases(per=2))
def test_pack_int4_u8_round_trip_and_layout(case):
    q, axis, signed = case
    packed, out = _u8_round_trip(jnp.asarray(q), axis=axis, signed=signed)
    assert packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(packed), np_pack_u8(q, axis))
    assert out.dtype == jnp.int8 and out.shape == q.shape
    np.testing.assert_array_equal(np.asarray(out), q.astype(np.int64))


@settings(max_examples=40, deadline=None)
@given(pack_cases(per=8))
def test_pack_int4_u32_round_trip_and_layout(case):
    q, axis, signed = case
    packed, out = _u32_round_trip(jnp.asarray(q), axis=axis, signed=signed)
    assert packed.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(packed), np_pack_u32(q, axis))
    assert out.dtype == jnp.int8 and out.shape == q.shape
    np.testing.assert_array_equal(np.asarray(out), q.astype(np.int64))


def test_u8_and_u32_forms_agree_bytewise():
    # Little-endian: a u32 word's bytes are the u8 packing of the same eight elements.
    q = np.random.default_rng().integers(-8, 8, size=(3, 64)).astype(np.int8)
    u8 = np.asarray(pack_int4(jnp.asarray(q)))
    u32 = np.asarray(pack_int4_u32(jnp.asarray(q)))
    np.testing.assert_array_equal(u32.astype("<u4").view(np.uint8), u8)


# ---------------------------------------------------------------------------------------------------
# FP8


def test_saturating_cast_e4m3():
    assert E4M3_MAX == 448.0
    x = jnp.array([500.0, -1e6, 448.0, -448.0, jnp.inf, -jnp.inf, jnp.nan, 0.0], jnp.float32)
    out = np.asarray(saturating_cast_e4m3(x).astype(jnp.float32))
    assert saturating_cast_e4m3(x).dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(out[:6], [448.0, -448.0, 448.0, -448.0, 448.0, -448.0])
    assert np.isnan(out[6]) and out[7] == 0.0
    # Why the clip is needed: the plain cast does not saturate on this stack.
    assert np.isnan(float(jnp.float32(500.0).astype(jnp.float8_e4m3fn)))


def test_saturating_cast_in_range_matches_plain_cast():
    rng = np.random.default_rng()
    x = (rng.standard_normal(4096) * np.exp(rng.uniform(-12, 6, 4096))).astype(np.float32)
    x = np.clip(x, -E4M3_MAX, E4M3_MAX)
    sat = np.asarray(saturating_cast_e4m3(jnp.asarray(x)).astype(jnp.float32))
    plain = np.asarray(jnp.asarray(x).astype(jnp.float8_e4m3fn).astype(jnp.float32))
    np.testing.assert_array_equal(sat, plain)
    # Within e4m3 rounding: half an ulp is <= 2^-4 relative (3 mantissa bits) for normals
    # (|x| >= 2^-6); the subnormal spacing is 2^-9, so absolute error <= 2^-10 below that.
    assert np.all(np.abs(sat - x) <= np.maximum(2.0**-4 * np.abs(x), 2.0**-10))
    # bf16 inputs go through the same path.
    xb = jnp.asarray(x, jnp.bfloat16)
    assert saturating_cast_e4m3(xb).dtype == jnp.float8_e4m3fn


# ---------------------------------------------------------------------------------------------------
# Quantize -> dequantize error bounds


def assert_int8_bound(x, qt, scale_per_elem):
    deq = np.asarray(dequantize(qt))
    # Round-to-nearest of x/scale into [-127, 127] (absmax maps to 127, never clipped) moves each
    # element by at most half a step: |err| <= scale/2. Slack covers float32 rounding of x/s and q*s.
    slack = 1e-6 * np.abs(x) + 1e-6 * scale_per_elem
    assert np.all(np.abs(deq - x) <= scale_per_elem / 2 + slack)
    assert np.all(np.isfinite(deq))


def test_int8_per_channel_error_bound():
    rng = np.random.default_rng()
    w = rand_weights(rng, (48, 256)).T.copy()  # [in=256, out=48]; column 0 is all zeros
    qt = quantize_int8_per_channel(jnp.asarray(w), axis=0)
    assert qt.values.dtype == jnp.int8 and qt.scales.shape == (1, 48) and qt.zeros is None
    assert np.abs(np.asarray(qt.values)).max() <= 127
    s = np.asarray(qt.scales)
    assert_int8_bound(w, qt, np.broadcast_to(s, w.shape))
    # A zero channel dequantizes to exact zeros.
    assert np.all(np.asarray(dequantize(qt))[:, 0] == 0.0)
    # Absmax maps to +-127 exactly.
    np.testing.assert_array_equal(np.abs(np.asarray(qt.values))[:, 1:].max(axis=0), 127)


def test_int8_per_token_error_bound_and_bf16_scales():
    rng = np.random.default_rng()
    x = rand_weights(rng, (3, 17, 96))
    for scale_dtype in (jnp.float32, jnp.bfloat16):
        qt = quantize_int8_per_token(jnp.asarray(x), scale_dtype=scale_dtype)
        assert qt.scales.shape == (3, 17, 1) and qt.scales.dtype == scale_dtype
        # With bf16 scales the values are quantized against the rounded scale, so the bound holds
        # for the stored scale (absmax/s_rounded <= 127.25 still rounds into range).
        s = np.asarray(qt.scales.astype(jnp.float32))
        assert_int8_bound(x, qt, np.broadcast_to(s, x.shape))
        assert np.all(np.asarray(dequantize(qt))[0, 0] == 0.0)


def assert_fp8_bound(x, qt, scale_per_elem):
    deq = np.asarray(dequantize(qt))
    # x/scale lies in [-448, 448]. e4m3 has 3 mantissa bits, so rounding a normal value
    # (|y| >= 2^-6) errs by <= 2^-4 relative; subnormals are spaced 2^-9, so <= 2^-10 absolute in
    # scaled units, i.e. 2^-10 * scale. Slack covers float32 rounding of x/s and q*s.
    bound = 2.0**-4 * np.abs(x) + 2.0**-10 * scale_per_elem
    assert np.all(np.abs(deq - x) <= bound * (1 + 1e-5) + 1e-30)
    assert np.all(np.isfinite(deq))


def test_fp8_per_channel_and_per_token_error_bounds():
    rng = np.random.default_rng()
    w = rand_weights(rng, (40, 128)).T.copy()  # [in=128, out=40]
    qt = quantize_fp8_per_channel(jnp.asarray(w), axis=0)
    assert qt.values.dtype == jnp.float8_e4m3fn and qt.scales.shape == (1, 40)
    assert_fp8_bound(w, qt, np.broadcast_to(np.asarray(qt.scales), w.shape))
    assert np.all(np.asarray(dequantize(qt))[:, 0] == 0.0)
    # The channel absmax lands on 448 (not NaN: the cast saturates).
    vals = np.asarray(qt.values.astype(jnp.float32))
    np.testing.assert_array_equal(np.abs(vals)[:, 1:].max(axis=0), 448.0)

    x = rand_weights(rng, (5, 7, 64))
    qt = quantize_fp8_per_token(jnp.asarray(x))
    assert qt.scales.shape == (5, 7, 1)
    assert_fp8_bound(x, qt, np.broadcast_to(np.asarray(qt.scales), x.shape))


@pytest.mark.parametrize("asymmetric", [True, False])
def test_int4_groupwise_error_bound(asymmetric):
    rng = np.random.default_rng()
    k, n, g = 512, 24, 128
    w = rand_weights(rng, (n, k)).T.copy()  # [in=512, out=24]; column 0 all zeros
    w[128:256, 1] = np.abs(w[128:256, 1]) + 5.0  # an all-positive group (min > 0)
    qt = quantize_int4_groupwise(jnp.asarray(w), group_size=g, axis=0, asymmetric=asymmetric)
    assert qt.values.dtype == jnp.uint8 and qt.values.shape == (k // 2, n)
    assert qt.scales.shape == (k // g, n) and qt.shape == (k, n)
    q = np.asarray(unpack_int4(qt.values, signed=not asymmetric, axis=0)).astype(np.int64)
    s = np.repeat(np.asarray(qt.scales), g, axis=0)
    if asymmetric:
        assert qt.fmt == "int4" and qt.zeros.shape == (k // g, n)
        z = np.asarray(qt.zeros)
        assert q.min() >= 0 and q.max() <= 15
        assert np.all((z >= 0) & (z <= 15) & (z == np.round(z)))
        # The packed values are exactly the documented ones: x ~= (q - z) * scale.
        deq_manual = (q - np.repeat(z, g, axis=0)) * s
    else:
        assert qt.fmt == "int4_sym" and qt.zeros is None
        assert q.min() >= -8 and q.max() <= 7
        deq_manual = q * s
    deq = np.asarray(dequantize(qt))
    np.testing.assert_allclose(deq, deq_manual, rtol=1e-6, atol=0)
    # Asymmetric: the group range [min(min,0), max(max,0)] spans exactly 15 steps and the zero point
    # is an integer in [0, 15], so every element is rounded to its nearest step: |err| <= scale/2.
    # Symmetric: [-absmax, absmax] maps into [-7, 7], same half-step bound. Slack: float32 rounding.
    assert np.all(np.abs(deq - w) <= s / 2 + 1e-5 * s + 1e-6 * np.abs(w))
    assert np.all(deq[:, 0] == 0.0) and np.all(np.isfinite(deq))


def test_int4_groupwise_other_axis():
    rng = np.random.default_rng()
    w = rng.standard_normal((6, 256)).astype(np.float32)  # K on the last axis
    qt = quantize_int4_groupwise(jnp.asarray(w), group_size=64, axis=-1)
    assert qt.axis == 1 and qt.values.shape == (6, 128) and qt.scales.shape == (6, 4)
    s = np.repeat(np.asarray(qt.scales), 64, axis=1)
    assert np.all(np.abs(np.asarray(dequantize(qt)) - w) <= s / 2 + 1e-5 * s + 1e-6 * np.abs(w))


@pytest.mark.parametrize("kv_format", ["int8", "fp8", "int4"])
def test_kv_error_bounds(kv_format):
    rng = np.random.default_rng()
    x = rand_weights(rng, (2, 9, 4, 64)) + rng.uniform(-3, 3, size=(2, 9, 4, 1)).astype(np.float32)
    x[0, 0] = 0.0  # a token whose K row is all zeros
    x[0, 1, 2] = 1.5  # a constant (token, head) row
    qt = quantize_kv(jnp.asarray(x), kv_format)
    assert qt.fmt == f"kv_{kv_format}" and qt.scales.shape == (2, 9, 4, 1)
    deq = np.asarray(dequantize_kv(qt))
    assert deq.shape == x.shape and np.all(np.isfinite(deq))
    s = np.broadcast_to(np.asarray(qt.scales), x.shape)
    if kv_format == "int8":
        assert qt.values.dtype == jnp.int8
        assert_int8_bound(x, qt, s)  # |err| <= scale/2 per token per head (see helper)
    elif kv_format == "fp8":
        assert qt.values.dtype == jnp.float8_e4m3fn
        assert_fp8_bound(x, qt, s)  # <= 2^-4 relative + 2^-10 * scale (see helper)
    else:
        assert qt.values.dtype == jnp.uint8 and qt.values.shape == (2, 9, 4, 32)
        mn = np.broadcast_to(np.asarray(qt.zeros), x.shape)
        np.testing.assert_array_equal(mn, np.broadcast_to(x.min(axis=-1, keepdims=True), x.shape))
        # (x - min)/scale lies in [0, 15], so rounding to the nearest integer errs by <= 1/2 step:
        # |err| <= scale/2. Slack: float32 rounding of (x - min)/s and q*s + min.
        assert np.all(np.abs(deq - x) <= s / 2 + 1e-5 * s + 1e-6 * (np.abs(x) + np.abs(mn)))
    assert np.all(deq[0, 0] == 0.0)
    if kv_format == "int4":
        # A constant row stores q = 0 and zero = min, so it comes back exactly.
        np.testing.assert_array_equal(deq[0, 1, 2], 1.5)


def test_quantize_kv_rejects_unknown_format():
    with pytest.raises(ValueError):
        quantize_kv(jnp.zeros((2, 4, 8)), "int2")


def test_quantized_tensor_is_a_pytree():
    qt = quantize_int8_per_token(jnp.ones((2, 8)))
    leaves, treedef = jax.tree_util.tree_flatten(qt)
    assert len(leaves) == 2  # values, scales; zeros=None is an empty subtree
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(back, QuantizedTensor) and back.fmt == "int8" and back.zeros is None
    qt4 = quantize_int4_groupwise(jnp.ones((128, 4)))
    assert len(jax.tree_util.tree_leaves(qt4)) == 3
    with pytest.raises(Exception):
        qt.fmt = "fp8"  # frozen


# ---------------------------------------------------------------------------------------------------
# Byte accounting (expected numbers computed by hand for Llama-3-8B geometry: 8 KV heads, head_dim 128)


def test_kv_bytes_llama3_8b():
    h, d = 8, 128
    # bf16: K and V, 8*128 elements * 2 bytes each.
    assert kv_bytes_per_token_per_layer("bf16", h, d) == 2 * 8 * 128 * 2 == 4096
    assert kv_bytes_per_token_per_layer("float32", h, d) == 8192
    # int8 / fp8: 1 byte per element + one bf16 scale per head, for K and V: 2048 + 2*8*2.
    assert kv_bytes_per_token_per_layer("int8", h, d) == 2 * 8 * 128 + 2 * 8 * 2 == 2080
    assert kv_bytes_per_token_per_layer("fp8", h, d) == 2080
    # int4: half a byte per element + bf16 scale and bf16 zero per head, for K and V: 1024 + 2*8*2*2.
    assert kv_bytes_per_token_per_layer("int4", h, d) == 2 * 8 * 128 // 2 + 2 * 8 * 2 * 2 == 1088
    # float32 scales: 2048 + 2*8*4.
    assert kv_bytes_per_token_per_layer("int8", h, d, scale_dtype=jnp.float32) == 2112
    with pytest.raises(ValueError):
        kv_bytes_per_token_per_layer("int2", h, d)
    with pytest.raises(ValueError):
        kv_bytes_per_token_per_layer("int4", 1, 1)  # half a byte is not storable


def test_kv_bytes_pad_scale_rows_to_words():
    # The paged KV cache stores each token's scale row in whole 32-bit words (tokens never share a
    # word). SmolLM2-135M geometry, 3 KV heads of 64, per K (or V):
    # int8/fp8: 192 bytes + 3 bf16 scales (6 bytes) padded to 8.
    assert kv_bytes_per_token_per_layer("int8", 3, 64) == 2 * (192 + 8) == 400
    assert kv_bytes_per_token_per_layer("fp8", 3, 64) == 400
    # int4: 96 bytes + 3 scales + 3 zeros (12 bytes, whole words already).
    assert kv_bytes_per_token_per_layer("int4", 3, 64) == 2 * (96 + 12) == 216
    # One head: int8 64 + 2 -> 4; int4 32 + 4; float32 scales fill their words.
    assert kv_bytes_per_token_per_layer("int8", 1, 64) == 2 * (64 + 4)
    assert kv_bytes_per_token_per_layer("int4", 1, 64) == 2 * (32 + 4)
    assert kv_bytes_per_token_per_layer("int8", 3, 64, scale_dtype=jnp.float32) == 2 * (192 + 12)
    # Unquantized: values only; "bfloat16" is an alias of "bf16".
    assert kv_bytes_per_token_per_layer("bfloat16", 3, 64) == kv_bytes_per_token_per_layer("bf16", 3, 64) == 768
    # A values row that is not whole words cannot be stored.
    with pytest.raises(ValueError):
        kv_bytes_per_token_per_layer("int8", 1, 2)


def _fireq_exponent(scales: np.ndarray) -> int:
    """The smallest i in [0, 14] with every scale * 2^i an e4m3 value in [2^-9, 448]. With a clamped
    (all-zero) group in the tensor, whose scale is exactly 2^-9 / 2^I, that is the quantizer's I."""
    for i in range(15):
        t = scales.astype(np.float64) * 2.0 ** i
        e4 = np.asarray(jnp.asarray(t, jnp.float32).astype(jnp.float8_e4m3fn).astype(jnp.float32), np.float64)
        if np.all(e4 == t) and t.max() <= E4M3_MAX and t.min() >= 2.0 ** -9:
            return i
    raise AssertionError("no per-tensor multiplier makes the scales e4m3")


@pytest.mark.parametrize("magnitude", [0.05, 40.0, 1e-4])
def test_int4_fp8_format(magnitude):
    """FireQ's INT4-FP8: symmetric int4 in [-7, 7] per group of 128 along K, stored K-major; group
    scales are e4m3 values under one per-tensor 2^i (i the largest keeping them <= 448, so the
    smallest scales underflow least), clamped at 2^-9; within half a step of the float weight except
    where the clamp or the e4m3 rounding of the scale bites."""
    rng = np.random.default_rng()
    k, n, g = 512, 48, 128
    w = (rng.standard_normal((k, n)) * magnitude).astype(np.float32)
    w[:, 0] = 0.0                                                  # an all-zero column
    w[:128, 1] *= 1e-3                                             # a tiny group
    qt = quantize_int4_fp8(jnp.asarray(w), g)
    assert qt.fmt == "int4_fp8" and qt.axis == 1 and qt.values.dtype == jnp.uint8
    assert qt.values.shape == (n, k // 2) and qt.scales.shape == (k // g, n) and qt.shape == (n, k)
    q = np.asarray(unpack_int4(qt.values, signed=True, axis=1)).astype(np.int64)      # [N, K]
    assert q.min() >= -7 and q.max() <= 7 and not q[0].any()
    s = np.asarray(qt.scales, np.float64)                                              # [G, N]
    i = _fireq_exponent(s)
    top = np.abs(w).reshape(k // g, g, n).max(axis=1).max() / 7
    assert top * 2.0 ** i <= E4M3_MAX and (i == 14 or top * 2.0 ** (i + 1) > E4M3_MAX)
    deq = np.asarray(dequantize(qt), np.float64)                                       # [N, K]
    np.testing.assert_array_equal(deq, q * np.repeat(s.T, g, axis=1))
    # Half a step of the stored scale, plus what saturating at +-7 costs when e4m3 rounded the scale
    # down (at most 2^-4 relative: e4m3 has 3 mantissa bits, so 7 * s_stored >= absmax / (1 + 2^-4)).
    step = np.repeat(s.T, g, axis=1)
    assert np.all(np.abs(deq - w.T) <= step / 2 + np.abs(w.T) * 2.0 ** -4 + 1e-12)
    # The same nibbles and scales are the [K, N] int4_sym weight.
    kn = weight_kn(qt)
    assert kn.fmt == "int4_sym" and kn.axis == 0 and np.array_equal(np.asarray(dequantize(kn)), deq.T)


def test_int4_fp8_stored_arrays_and_bytes():
    k, n = 4096, 14336
    assert stored_weight_arrays("int4_fp8", k, n, 128, 1) == {
        "values": ((n, k // 2), "uint8"), "scales": (k // 128, n), "zeros": None}
    assert stored_weight_arrays("fp8", k, n, None, 1)["scales"] == (n, 1)
    assert stored_weight_arrays("int4", k, n, 128, 0)["zeros"] == (k // 128, n)
    with pytest.raises(ValueError, match="K-major"):
        stored_weight_arrays("int4_fp8", k, n, 128, 0)
    with pytest.raises(ValueError, match="K-major"):
        stored_weight_arrays("int8", k, n, None, 1)
    with pytest.raises(ValueError, match="does not tile"):
        stored_weight_arrays("int4_fp8", 100, n, 128, 1)
    assert weight_bytes("int4_fp8", (k, n), 128) == weight_bytes("fireq", (k, n), 128) == (
        k * n // 2 + (k // 128) * n * 2)
    qt = quantize_int4_fp8(jnp.ones((256, 16)), 128)
    assert qt.values.size + qt.scales.size * 2 == weight_bytes("int4_fp8", (256, 16), 128)


def test_weight_bytes_llama3_8b_mlp():
    k, n = 4096, 14336
    # int4 group 128: half a byte per element + (4096/128)*14336 groups * (bf16 scale + bf16 zero).
    expected = 4096 * 14336 // 2 + 2 * (4096 // 128) * 14336 * 2
    assert expected == 31_195_136
    assert weight_bytes("int4", (k, n), 128) == expected
    assert weight_bytes("w4a16", (k, n), 128) == expected
    assert weight_bytes("w4a8kv4", (k, n), 128) == expected
    # Symmetric int4: scales only.
    assert weight_bytes("int4_sym", (k, n), 128) == 4096 * 14336 // 2 + (4096 // 128) * 14336 * 2
    # int8 / fp8 per output channel: 1 byte per element + one bf16 scale per output column.
    assert weight_bytes("w8a8", (k, n)) == 4096 * 14336 + 14336 * 2 == 58_748_928
    assert weight_bytes("fp8", (k, n)) == 58_748_928
    assert weight_bytes("bf16", (k, n)) == 4096 * 14336 * 2
    # float32 scales and zeros.
    assert weight_bytes("int4", (k, n), 128, scale_dtype=jnp.float32, zero_dtype=jnp.float32) == (
        4096 * 14336 // 2 + 2 * 32 * 14336 * 4
    )
    with pytest.raises(ValueError):
        weight_bytes("int4", (100, 8), 128)
    with pytest.raises(ValueError):
        weight_bytes("nf4", (k, n))


def test_byte_accounting_matches_stored_arrays():
    # Sizes from what the quantizers actually store (with bf16 scales); packed int4 is uint8 here.
    for kv_format in ("int8", "fp8", "int4"):
        qt = quantize_kv(jnp.ones((1, 8, 128)), kv_format, scale_dtype=jnp.bfloat16)
        total = qt.values.size * jnp.dtype(qt.values.dtype).itemsize + sum(
            a.size * jnp.dtype(a.dtype).itemsize for a in (qt.scales, qt.zeros) if a is not None
        )
        assert 2 * total == kv_bytes_per_token_per_layer(kv_format, 8, 128)
    qt = quantize_int4_groupwise(jnp.ones((256, 16)), 128, scale_dtype=jnp.bfloat16)
    total = qt.values.size + (qt.scales.size + qt.zeros.size) * 2  # uint8 bytes each hold 2 values
    assert total == weight_bytes("int4", (256, 16), 128)


# ---------------------------------------------------------------------------------------------------
# jit


def test_everything_works_under_jit():
    rng = np.random.default_rng()
    w = jnp.asarray(rng.standard_normal((256, 32)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((4, 6, 64)).astype(np.float32))
    q4 = jnp.asarray(rng.integers(-8, 8, size=(4, 16)).astype(np.int8))

    def same(a, b):
        # Integer codes must match exactly; float results may differ by an ulp or two because XLA
        # fuses the jitted arithmetic (e.g. an FMA for q * scale + min).
        for la, lb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
            assert la.dtype == lb.dtype and la.shape == lb.shape
            if jnp.issubdtype(la.dtype, jnp.integer):
                np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
            else:
                np.testing.assert_allclose(np.asarray(la.astype(jnp.float32)), np.asarray(lb.astype(jnp.float32)),
                                           rtol=1e-5, atol=1e-6)

    cases = [
        (lambda a: pack_int4(a, axis=0), q4),
        (lambda a: unpack_int4(pack_int4(a), signed=True), q4),
        (lambda a: pack_int4_u32(a, axis=-1), q4),
        (lambda a: unpack_int4_u32(pack_int4_u32(a), signed=True), q4),
        (lambda a: saturating_cast_e4m3(a * 1000.0), x),
        (lambda a: quantize_int8_per_channel(a, axis=0), w),
        (lambda a: quantize_int8_per_token(a), x),
        (lambda a: quantize_fp8_per_channel(a, axis=0), w),
        (lambda a: quantize_fp8_per_token(a), x),
        (lambda a: quantize_int4_groupwise(a, 128, 0, True), w),
        (lambda a: quantize_int4_groupwise(a, 64, 0, False), w),
        (lambda a: dequantize(quantize_int4_groupwise(a, 128)), w),
        (lambda a: dequantize(quantize_fp8_per_token(a), jnp.bfloat16), x),
    ]
    cases += [(lambda a, f=f: quantize_kv(a, f), x) for f in ("int8", "fp8", "int4")]
    cases += [(lambda a, f=f: dequantize_kv(quantize_kv(a, f)), x) for f in ("int8", "fp8", "int4")]
    for fn, arg in cases:
        same(jax.jit(fn)(arg), fn(arg))
    # A QuantizedTensor can be passed into a jitted function as an argument.
    qt = quantize_int4_groupwise(w, 128)
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(qt)), np.asarray(dequantize(qt)))
