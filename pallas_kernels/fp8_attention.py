"""FireQ's FP8 attention numerics over int4_fp8 KV pages (arXiv:2505.20839), shared by the reference
and the Pallas kernels so that every implementation rounds the same values.

K and V are stored as symmetric int4 codes in [-7, 7] with one bfloat16 scale per token per KV head
(`quant_formats.quantize_kv(..., "int4_fp8")`); every code is exact in e4m3, so both attention
products can run on FP8 tensor cores with the scales applied outside them:
- queries: each row (one query head of one token, already multiplied by D^-0.5) is scaled by a power
  of two that brings its absmax into (128, 256], rounded to e4m3 and scaled back (`fp8_queries`):
  q8 * sq with q8 in e4m3, carried as one float (exact), since sq can leave the product exactly;
- scores: s = ((q8 * sq) . k_codes) * sk[t], one FP8 product, the token's K scale applied per column;
- P: the online softmax's p in [0, 1] with V's per-token scale folded in, times a power of two that
  brings the block's largest V scale into (128, 256], rounded to e4m3 (`fp8_probabilities`); then
  p . v = (p8 . v_codes) / c, one FP8 product. The softmax denominator sums the unrounded p.
Every rescaling is by a power of two, so it is exact and commutes with e4m3 rounding (away from the
subnormal range): the block size does not change what c does. P itself is relative to the running
max when its block is processed, so implementations that walk the same blocks in the same order
differ only where float32 summation order moves a value across an e4m3 rounding boundary, and others
by e4m3 roundings of P. The functions use only ops the Triton lowering takes.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

FP8_HEADROOM = 256.0       # largest power of two below e4m3's 448: rows are scaled into (128, 256]
TINY = 2.0 ** -100         # stands in for an all-zero row's absmax (any normal power of two works)


def pow2_ceil(x):
    """The smallest power of two >= x, for positive normal float32 x, from its bits (exact)."""
    bits = lax.bitcast_convert_type(x, jnp.int32)
    mantissa = bits & np.int32(0x7FFFFF)
    exponent = (bits >> np.int32(23)) + jnp.minimum(mantissa, np.int32(1))
    return lax.bitcast_convert_type(exponent << np.int32(23), jnp.float32)


def round_e4m3(x):
    """float32 -> the nearest float8_e4m3fn value, as float32 (|x| <= 448 here, so no saturation)."""
    return x.astype(jnp.float8_e4m3fn).astype(jnp.float32)


def fp8_query_codes(q):
    """q float32 [..., D] -> (q8 float8_e4m3fn [..., D], sq float32 [..., 1]): each row scaled by the
    power of two that brings its absmax into (128, 256] and rounded to e4m3; q ~ q8 * sq."""
    factor = pow2_ceil(jnp.maximum(jnp.max(jnp.abs(q), axis=-1, keepdims=True), TINY))
    return (q * (FP8_HEADROOM / factor)).astype(jnp.float8_e4m3fn), factor / FP8_HEADROOM


def fp8_queries(q):
    """q float32 [..., D] -> q8 * sq (`fp8_query_codes`) as one float32 array (exact; bf16 holds it too)."""
    q8, sq = fp8_query_codes(q)
    return q8.astype(jnp.float32) * sq


def p_factor(v_scale_max):
    """The power of two c that P is multiplied by before its e4m3 rounding, from the largest V scale
    of the tokens it weighs (a tensor of any shape; >= 0)."""
    return FP8_HEADROOM / pow2_ceil(jnp.maximum(v_scale_max, TINY))


def fp8_probabilities(p, v_scale, c):
    """p [..., K] in [0, 1] and V's per-token scales broadcast to it -> p8 = e4m3(p * sv * c); the
    caller accumulates (p8 . v_codes) / c."""
    return round_e4m3(p * v_scale * c)


def fp8_block_probabilities(p, v_scale):
    """A kernel's KV block: p [rows, K] and the block's V scales [K] -> (p8, c) with c the block's
    `p_factor` (a one-axis max: Triton lowers no other reduction)."""
    c = p_factor(jnp.max(v_scale))
    return fp8_probabilities(p, v_scale[None, :], c), c


def signed_nibbles(words, shift):
    """int4 codes (two's complement nibbles) at bit `shift` of uint32 words -> float32 in [-8, 7]:
    the nibble moved to the top, then an arithmetic right shift sign-extends it."""
    top = lax.bitcast_convert_type(words << (np.uint32(28) - shift), jnp.int32)
    return (top >> 28).astype(jnp.float32)

