"""Pallas KV write: one layer's K/V rows of N tokens quantized in registers and stored into their pages.

The in-kernel equivalent of `kv_pages.write_kv_tokens` (one program per token, as vLLM's
reshape_and_cache, arXiv:2309.06180), writing the pool in place: it is passed with
`input_output_aliases`, so jit the caller with the pool donated. For the same input the stored words
are bit-identical to the reference (per token per kv head, bfloat16 scales, the formulas of
`quant_formats.quantize_kv`, round half to even); tokens with `valid` false write nothing. Stores are
contiguous dynamic slices, so the tests can also run the kernel under the strict TPU interpreter as a
bounds checker.

Written for the Triton-style `pl.pallas_call` lowering, with only ops Triton lowers (round-half-even
built from `floor` in `_round_half_even`, the e4m3 encoding in integer/float arithmetic in
`_e4m3_bits`); `write_shape_error` says which layouts the compiled path takes. Design and the compiled
path's float32-division caveat: docs/kernels.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels.kv_pages import (BF16_ONE_BITS, BOUNDS_SCALE_WORDS, SCALE_BITS, WORD_BITS, KVPageLayout,
                                     bound_codes, bounds_scale_bits)
from pallas_kernels.paged_attention_pallas import _elems_per_word, decode_element, token_scales
from pallas_kernels.pow2 import is_pow2
from pallas_kernels.quant_formats import E4M3_MAX, INT4_SYM_MAX, INT8_MAX, UINT4_MAX


def write_shape_error(layout: KVPageLayout) -> str | None:
    """Why the compiled (Triton) kernels cannot take this layout, or None: the token write's tiles are
    [D / n, n] values (n per word) and the key-bounds kernel's [T, D / 4], which Triton needs to be
    powers of two. Interpret mode has no such limit."""
    if not is_pow2(layout.head_dim):
        return f"head_dim {layout.head_dim} is not a power of two"
    if layout.key_bounds and not is_pow2(layout.tokens_per_page):
        return f"tokens_per_page {layout.tokens_per_page} is not a power of two"
    return None


# ---------------------------------------------------------------------------------------------------
# Quantization in registers (jnp values; usable inside the kernel, and tested on their own)


def _round_half_even(y):
    """Round float32 to the nearest integer, ties to even (`jnp.round`), from `floor` (Triton has no
    round). Computed on |y| (RNE is odd-symmetric) so `y - floor(y)` is exact."""
    a = jnp.abs(y)
    f = jnp.floor(a)
    frac = a - f                                     # exact for a >= 0
    odd = (f - 2.0 * jnp.floor(f * 0.5)) != 0.0
    r = f + jnp.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)
    return jnp.where(y < 0, -r, r)


def _bf16_bits(x):
    """float32 -> bfloat16 bit pattern (round to nearest even, as XLA's convert) in uint32."""
    return lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)


def _bf16_bits_to_f32(bits):
    return lax.bitcast_convert_type(bits << np.uint32(16), jnp.float32)


def _e4m3_bits(y):
    """float32 -> float8_e4m3fn bit pattern (uint32, 0..255), equal to `saturating_cast_e4m3`: clip to
    +-448, round to nearest even (subnormals included); NaN -> 0x7F with its sign.

    e4m3 codes are monotone in the value: code `(e << 3) | m` is `(8 + m) * 2^(e - 10)` for e >= 1 and
    `m * 2^-9` for e = 0. With E = max(floor(log2 |y|), -6), `|y| * 2^(3 - E)` (an exact power-of-two
    scaling) lies in [0, 16] and its rounding is `8 + m` (normal) or `m` (subnormal), a carry to 16
    being the next binade's `8 + 0`; so code = round(|y| * 2^(3 - E)) + (E + 6) * 8."""
    bits = lax.bitcast_convert_type(y, jnp.uint32)
    sign = (bits >> np.uint32(24)) & np.uint32(0x80)
    a = jnp.minimum(jnp.abs(y), E4M3_MAX)
    a_exp = lax.bitcast_convert_type(a, jnp.int32) >> 23                  # biased; a >= 0
    e = jnp.maximum(a_exp - 127, -6)                                      # -6 .. 8
    pow2 = lax.bitcast_convert_type((130 - e) << 23, jnp.float32)         # 2^(3 - E), normal
    code = _round_half_even(a * pow2).astype(jnp.int32) + (e + 6) * 8
    code = lax.bitcast_convert_type(code, jnp.uint32)
    return jnp.where(jnp.isnan(y), np.uint32(0x7F), code) | sign


def _scale_bits(scale):
    """float32 scale -> its bfloat16 bits, a zero scale replaced by 1 (`quant_formats._safe_scale`)."""
    bits = _bf16_bits(scale)
    return jnp.where(_bf16_bits_to_f32(bits) == 0.0, np.uint32(BF16_ONE_BITS), bits)


def quantize_head_row(x, kv_dtype: str):
    """One token's row of one kv head, as float32 [Dw, n] (value `n * w + i` at [w, i]) -> (uint32
    codes [Dw, n], each in the low `bits` bits, and the bfloat16 bits of its scale and zero; None
    where the format has none)."""
    if kv_dtype == "float32":
        return lax.bitcast_convert_type(x, jnp.uint32), None, None
    if kv_dtype == "bf16":
        return _bf16_bits(x), None, None
    if kv_dtype == "int4":
        x_min, x_max = jnp.min(x), jnp.max(x)
        scale_bits = _scale_bits((x_max - x_min) / UINT4_MAX)
        zero_bits = _bf16_bits(x_min)
        q = _round_half_even((x - _bf16_bits_to_f32(zero_bits)) / _bf16_bits_to_f32(scale_bits))
        return jnp.clip(q, 0.0, UINT4_MAX).astype(jnp.int32).astype(jnp.uint32), scale_bits, zero_bits
    absmax = jnp.max(jnp.abs(x))
    if kv_dtype == "int8":
        scale_bits = _scale_bits(absmax / INT8_MAX)
        q = jnp.clip(_round_half_even(x / _bf16_bits_to_f32(scale_bits)), -INT8_MAX, INT8_MAX)
        return lax.bitcast_convert_type(q.astype(jnp.int32), jnp.uint32) & np.uint32(0xFF), scale_bits, None
    if kv_dtype == "fp8":
        scale_bits = _scale_bits(absmax / E4M3_MAX)
        return _e4m3_bits(x / _bf16_bits_to_f32(scale_bits)), scale_bits, None
    if kv_dtype == "int4_fp8":   # symmetric int4, two's complement nibbles
        scale_bits = _scale_bits(absmax / INT4_SYM_MAX)
        q = jnp.clip(_round_half_even(x / _bf16_bits_to_f32(scale_bits)), -INT4_SYM_MAX, INT4_SYM_MAX)
        return lax.bitcast_convert_type(q.astype(jnp.int32), jnp.uint32) & np.uint32(0xF), scale_bits, None
    raise ValueError(f"unsupported kv_dtype {kv_dtype!r}")


def pack_codes(codes, bits: int):
    """uint32 codes [Dw, n] -> words [Dw]: code i of a word in bits [i * bits, (i + 1) * bits)."""
    n = codes.shape[-1]
    if n == 1:
        return codes[:, 0]
    shifts = lax.broadcasted_iota(jnp.int32, (1, n), 1).astype(jnp.uint32) * np.uint32(bits)
    # The codes occupy disjoint bits, so an integer sum is the bitwise OR.
    return jnp.sum(codes << shifts, axis=1, dtype=jnp.uint32)


# ---------------------------------------------------------------------------------------------------
# Kernel


def _write_kernel(layer_ref, pages_ref, slots_ref, valid_ref, k_ref, v_ref, pool_in_ref, pool_ref, *,
                  layout: KVPageLayout):
    del pool_in_ref  # aliased with pool_ref: the same buffer
    i = pl.program_id(0)
    hkv = layout.num_kv_heads
    n = _elems_per_word(layout)
    dw = layout.head_dim // n
    bits = layout.value_bits
    page, slot, layer = pages_ref[i], slots_ref[i], layer_ref[0]
    slab = page // layout.pages_per_slab
    page_origin = (page % layout.pages_per_slab) * layout.page_slot_words

    @pl.when(valid_ref[i] != 0)
    def _store():
        for kind, x_ref in ((0, k_ref), (1, v_ref)):
            origin = page_origin + layout.chunk_origin(layer, kind)
            scales, zeros = [], []
            for h in range(hkv):
                codes, scale, zero = quantize_head_row(x_ref[h].astype(jnp.float32), layout.kv_dtype)
                pool_ref[slab, pl.ds(origin + layout.value_word(h, slot), dw)] = pack_codes(codes, bits)
                scales.append(scale)
                zeros.append(zero)
            if not layout.quantized:
                continue
            # Scale row: scales then (int4) zeros, bf16 pairs per word, zero-padded to whole words.
            entries = scales + (zeros if layout.kv_dtype == "int4" else [])
            per_word = WORD_BITS // SCALE_BITS
            entries += [np.uint32(0)] * (layout.scale_row_words * per_word - len(entries))
            scale_row = origin + layout.scales_offset + slot * layout.scale_row_words
            for j in range(layout.scale_row_words):
                word = entries[2 * j] | (entries[2 * j + 1] << np.uint32(SCALE_BITS))
                pool_ref[slab, pl.ds(scale_row + j, 1)] = jnp.broadcast_to(word, (1,))


def _whole(shape) -> pl.BlockSpec:
    """The whole array as the one block of every program (grid of one axis)."""
    return pl.BlockSpec(shape, lambda i: (0,) * len(shape))


def write_kv_tokens_pallas(pool: jax.Array, layout: KVPageLayout, page_ids: jax.Array, slots: jax.Array,
                           valid: jax.Array, layer, k: jax.Array, v: jax.Array, *, interpret=False,
                           num_warps: int = 1) -> jax.Array:
    """`kv_pages.write_kv_tokens` as a Pallas kernel: page_ids, slots, valid: [N]; k, v: [N, Hkv, D]
    (any float dtype). Returns the pool with the valid tokens' K/V rows (and scales) written; the
    pool buffer is reused (aliased), so donate it under jit. `interpret`: False (compiled, GPU Triton
    lowering) or anything `pl.pallas_call` accepts."""
    num_tokens = k.shape[0]
    hkv, head_dim = layout.num_kv_heads, layout.head_dim
    if k.shape != (num_tokens, hkv, head_dim) or v.shape != k.shape:
        raise ValueError(f"k {k.shape} / v {v.shape} do not fit the layout ({hkv} kv heads x {head_dim})")
    if not (page_ids.shape == slots.shape == valid.shape == (num_tokens,)):
        raise ValueError(f"page_ids {page_ids.shape}, slots {slots.shape}, valid {valid.shape} must be "
                         f"[{num_tokens}]")
    if not interpret and (why := write_shape_error(layout)):
        raise ValueError(f"compiled Pallas KV write: {why}")
    if num_tokens == 0:
        return pool
    n = _elems_per_word(layout)
    dw = head_dim // n
    # [N, Hkv, Dw, n]: a head's row as the tile the kernel packs (a free reshape).
    k_tiles = k.reshape(num_tokens, hkv, dw, n)
    v_tiles = v.reshape(num_tokens, hkv, dw, n)
    compiler_params = None
    if not interpret:
        compiler_params = plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=1)
    token_spec = pl.BlockSpec((None, hkv, dw, n), lambda i: (i, 0, 0, 0))
    return pl.pallas_call(
        functools.partial(_write_kernel, layout=layout),
        grid=(num_tokens,),
        in_specs=[_whole((1,)), _whole((num_tokens,)), _whole((num_tokens,)), _whole((num_tokens,)),
                  token_spec, token_spec, _whole(pool.shape)],
        out_specs=_whole(pool.shape),
        out_shape=jax.ShapeDtypeStruct(pool.shape, pool.dtype),
        input_output_aliases={6: 0},
        interpret=interpret,
        compiler_params=compiler_params,
        name=f"write_kv_tokens_{layout.kv_dtype}",
    )(jnp.asarray(layer, jnp.int32).reshape(1), page_ids.astype(jnp.int32), slots.astype(jnp.int32),
      valid.astype(jnp.int32), k_tiles, v_tiles, pool)


# ---------------------------------------------------------------------------------------------------
# Key bounds (query-aware page selection)


def _bounds_kernel(layer_ref, pages_ref, fill_ref, pool_in_ref, pool_ref, *, layout: KVPageLayout):
    """One page: its key bounds for one layer recomputed from the keys in slots [0, fill)."""
    del pool_in_ref  # aliased with pool_ref: the same buffer
    i = pl.program_id(0)
    t, quarter = layout.tokens_per_page, layout.head_dim // 4
    n = _elems_per_word(layout)
    page, fill, layer = pages_ref[i], fill_ref[i], layer_ref[0]
    slab = page // layout.pages_per_slab
    page_origin = (page % layout.pages_per_slab) * layout.page_slot_words
    origin = page_origin + layout.chunk_origin(layer, 0)
    slot = lax.broadcasted_iota(jnp.int32, (t,), 0)
    slab_vec = jnp.broadcast_to(slab, (t,))
    u = lax.broadcasted_iota(jnp.int32, (1, quarter), 1)
    live = (slot < fill)[:, None]                                                  # [T, 1]

    @pl.when(fill > 0)
    def _store():
        for h in range(layout.num_kv_heads):
            scale = token_scales(pool_ref, layout, slab_vec, origin, slot, h) if layout.quantized else None
            zero = (token_scales(pool_ref, layout, slab_vec, origin, slot, layout.num_kv_heads + h)
                    if layout.kv_dtype == "int4" else None)
            lows, highs = [], []
            for j in range(4):               # channels 4u + j: byte j of bound word u
                channel = 4 * u + j                                                # [1, D/4]
                index = (origin + layout.value_word(h, slot))[:, None] + channel // n
                k = decode_element(pool_ref[jnp.broadcast_to(slab, (t, quarter)), index],
                                   (channel % n).astype(jnp.uint32), layout.kv_dtype)  # [T, D/4]
                if scale is not None:
                    k = k * scale + (zero if zero is not None else 0.0)
                lows.append(jnp.min(jnp.where(live, k, jnp.inf), axis=0))
                highs.append(jnp.max(jnp.where(live, k, -jnp.inf), axis=0))
            absmax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x)) for x in lows + highs])
            scale_bits = bounds_scale_bits(absmax)
            step = lax.bitcast_convert_type(scale_bits << np.uint32(16), jnp.float32)
            bounds = layout.bounds_origin(layer, h) + page_origin
            for part, (planes, up) in enumerate(((lows, False), (highs, True))):   # min codes, max codes
                word = sum((lax.bitcast_convert_type(bound_codes(x, step, up), jnp.uint32) & np.uint32(0xFF))
                           << np.uint32(8 * j) for j, x in enumerate(planes))
                pool_ref[slab, pl.ds(bounds + part * quarter, quarter)] = word
            scale_words = jnp.where(lax.broadcasted_iota(jnp.int32, (BOUNDS_SCALE_WORDS,), 0) == 0, scale_bits,
                                    np.uint32(0))
            pool_ref[slab, pl.ds(bounds + 2 * quarter, BOUNDS_SCALE_WORDS)] = scale_words


def write_key_bounds_pallas(pool: jax.Array, layout: KVPageLayout, page_ids: jax.Array, fill: jax.Array,
                            layer, *, interpret=False, num_warps: int = 2) -> jax.Array:
    """`kv_pages.write_key_bounds` as a Pallas kernel (one program per page): page_ids, fill int32[M].
    Returns the pool with those pages' key bounds of `layer` rewritten, bit-identical to the
    reference; the pool buffer is reused (aliased), so donate it under jit. Two warps by default:
    one needs 128 registers in fp8 ([T, D/4] x 4 planes), four spill a word in bf16 and int8
    (sm_90a, ptxas's choice at 40 registers)."""
    if not layout.key_bounds:
        raise ValueError("write_key_bounds_pallas: this layout stores no key bounds (key_bounds=False)")
    if page_ids.shape != fill.shape or page_ids.ndim != 1:
        raise ValueError(f"page_ids {page_ids.shape} and fill {fill.shape} must be one [M] shape")
    if not interpret and (why := write_shape_error(layout)):
        raise ValueError(f"compiled Pallas key bounds: {why}")
    num_pages = page_ids.shape[0]
    if num_pages == 0:
        return pool
    compiler_params = None
    if not interpret:
        compiler_params = plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=1)
    return pl.pallas_call(
        functools.partial(_bounds_kernel, layout=layout),
        grid=(num_pages,),
        in_specs=[_whole((1,)), _whole((num_pages,)), _whole((num_pages,)), _whole(pool.shape)],
        out_specs=_whole(pool.shape),
        out_shape=jax.ShapeDtypeStruct(pool.shape, pool.dtype),
        input_output_aliases={3: 0},
        interpret=interpret,
        compiler_params=compiler_params,
        name=f"write_key_bounds_{layout.kv_dtype}",
    )(jnp.asarray(layer, jnp.int32).reshape(1), page_ids.astype(jnp.int32), fill.astype(jnp.int32), pool)
