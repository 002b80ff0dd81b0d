"""Pallas decode attention over KV pages of the shared pool, for every KV format (bf16, f32, fp8, int8,
int4, int4_fp8).

One query token per sequence, with the semantics of `paged_attention_ref.paged_attention_reference`
for S == 1. The kernel reads the uint32 pool in place through the page table (PagedAttention, Kwon et
al., arXiv:2309.06180) and decodes K/V words in registers with integer ops, so a quantized cache is
never dequantized into a copy and decode reads only the bytes the cache stores. Each program owns one
KV group (GQA: K/V read once for all its query heads) and one split of the page table, combined with
a log-sum-exp merge (split-K as in Flash-Decoding; online softmax as in FlashAttention,
arXiv:2205.14135). `decode_element` is the per-format in-register decoder the prefill kernel shares.
FireQ's int4_fp8 KV is attended with FP8 queries and FP8 P, the scales applied outside the products
(`fp8_attention`).

Written for the Triton-style `pl.pallas_call` lowering, which also runs under `interpret=True` on CPU;
`decode_shape_error` says which layouts the compiled path takes. Grid, addressing, decoding and
masking: docs/kernels.md. The dispatcher (`paged_attention.paged_attention`) routes decode here for
"pallas" (compiled) and "interpret".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels.fp8_attention import fp8_block_probabilities, fp8_queries, signed_nibbles
from pallas_kernels.kv_pages import KV_DTYPES, WORD_BITS, KVPageLayout
from pallas_kernels.pow2 import is_pow2, next_pow2

# Default tokens per inner-loop block (pages_per_block = this // tokens_per_page) and split count.
DEFAULT_BLOCK_TOKENS = 64
DEFAULT_MAX_SPLITS = 8
KV_VALUE_BITS = {name: bits for name, (_, bits) in KV_DTYPES.items()}


def _elems_per_word(layout: KVPageLayout) -> int:
    return WORD_BITS // layout.value_bits


def decode_shape_error(layout: KVPageLayout, pages_per_block: int) -> str | None:
    """Why the compiled (Triton) kernel cannot take this layout, or None. Triton tiles must have a
    power-of-two number of elements; interpret mode has no such limit."""
    n = _elems_per_word(layout)
    words = layout.head_dim // n
    block_tokens = pages_per_block * layout.tokens_per_page
    if not is_pow2(layout.head_dim) or not is_pow2(words):
        return f"head_dim {layout.head_dim} ({words} words per head row) is not a power of two"
    if not is_pow2(block_tokens):
        return f"block of {block_tokens} tokens ({pages_per_block} pages x {layout.tokens_per_page}) " \
               f"is not a power of two"
    return None


# ---------------------------------------------------------------------------------------------------
# In-register decoding (every function takes and returns jnp values; usable inside the kernel)


def _bf16_half_to_f32(words, half):
    """bfloat16 element `half` (0: low 16 bits, 1: high) of uint32 words -> float32 (exact)."""
    shift = (half * 16).astype(jnp.uint32) if hasattr(half, "astype") else np.uint32(16 * half)
    return lax.bitcast_convert_type(((words >> shift) & np.uint32(0xFFFF)) << np.uint32(16), jnp.float32)


def _fp8_e4m3_to_f32(byte):
    """float8_e4m3fn bit patterns held in uint32 (0..255) -> float32, exactly (NaN codes read as 480)."""
    e = (byte >> np.uint32(3)) & np.uint32(15)
    m = byte & np.uint32(7)
    sig = m + jnp.where(e > 0, np.uint32(8), np.uint32(0))                       # (8 + m) or m
    # 2^(max(e, 1) - 10) from its float32 exponent field: 117..122, always a normal number.
    pow2 = lax.bitcast_convert_type((jnp.maximum(e, np.uint32(1)) + np.uint32(117)) << np.uint32(23),
                                    jnp.float32)
    mag = lax.bitcast_convert_type(sig, jnp.int32).astype(jnp.float32) * pow2
    return jnp.where((byte & np.uint32(0x80)) != 0, -mag, mag)


def decode_element(words, index, kv_dtype: str):
    """Element `index` of uint32 words -> float32, the raw stored value (quantized codes are not scaled
    here). A word holds `n = 32 / bits` elements, element `n * w + i` of a row in bits
    `[i * bits, (i + 1) * bits)` of word w; `index` is a Python int (one plane) or a uint32 array that
    broadcasts against `words` (the prefill kernel splits `[block, Dw, 1]` words by a `[1, 1, n]`
    index into `[block, Dw, n]`, which is head_dim order once reshaped)."""
    if kv_dtype == "float32":
        return lax.bitcast_convert_type(words, jnp.float32)
    if kv_dtype == "bf16":
        return _bf16_half_to_f32(words, index)
    if kv_dtype not in ("int8", "fp8", "int4", "int4_fp8"):
        raise ValueError(f"unsupported kv_dtype {kv_dtype!r}")
    bits = KV_VALUE_BITS[kv_dtype]
    if isinstance(index, int):
        shift = np.uint32(bits * index)
    else:
        shift = index.astype(jnp.uint32) * np.uint32(bits)
    if kv_dtype == "int8":
        # Move the byte to the top, then an arithmetic right shift sign-extends it.
        signed = lax.bitcast_convert_type(words << (np.uint32(24) - shift), jnp.int32)
        return (signed >> 24).astype(jnp.float32)
    if kv_dtype == "fp8":
        return _fp8_e4m3_to_f32((words >> shift) & np.uint32(0xFF))
    if kv_dtype == "int4_fp8":   # two's complement nibbles, in the order of `pack_int4`
        return signed_nibbles(words, shift)
    # int4: nibble i of the word; element 2j sits in the low nibble of byte j (as `pack_int4`).
    return lax.bitcast_convert_type((words >> shift) & np.uint32(15), jnp.int32).astype(jnp.float32)


def decode_words(words, kv_dtype: str):
    """uint32 words -> list of `32 / bits` float32 planes; plane i holds element `n * w + i` of word w
    (the raw stored value: quantized codes are not scaled here)."""
    if kv_dtype not in KV_VALUE_BITS:
        raise ValueError(f"unsupported kv_dtype {kv_dtype!r}")
    return [decode_element(words, i, kv_dtype) for i in range(WORD_BITS // KV_VALUE_BITS[kv_dtype])]


def token_scales(pool_ref, layout: KVPageLayout, slab, origin, slot, entry):
    """bfloat16 scale-row entry `entry` (a kv head's scale h, or the int4 zero at Hkv + h; a traced int)
    of the tokens at `slot` of the chunks starting at word `origin` of `slab` ([K] each) -> float32
    [K, 1]. Entry e is the half `e % 2` of word `e // 2` of the token's scale row."""
    w = pool_ref[slab, origin + layout.scales_offset + slot * layout.scale_row_words + entry // 2]
    return _bf16_half_to_f32(w, entry % 2)[:, None]


# ---------------------------------------------------------------------------------------------------
# Kernel


def _decode_kernel(layer_ref, lens_ref, table_ref, q_ref, pool_ref, acc_ref, m_ref, l_ref, *,
                   layout: KVPageLayout, pages_per_block: int, blocks_per_split: int):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t_page = layout.tokens_per_page
    n = _elems_per_word(layout)
    dw = layout.head_dim // n                      # words of one kv head's row of one token
    block = pages_per_block * t_page               # tokens per loop step
    hkv = layout.num_kv_heads
    fp8 = layout.kv_dtype == "int4_fp8"           # codes and scales apart: FP8 q . k and p . v

    length = lens_ref[b, h]
    layer = layer_ref[0]
    split_start = split * (blocks_per_split * block)
    num_blocks = jnp.clip((length - split_start + block - 1) // block, 0, blocks_per_split)

    tok = lax.broadcasted_iota(jnp.int32, (block,), 0)
    page_in_block, slot = tok // t_page, tok % t_page
    word_iota = lax.broadcasted_iota(jnp.int32, (1, dw), 1)
    q_planes = [q_ref[:, pl.ds(i * dw, dw)].astype(jnp.float32) for i in range(n)]  # [G, Dw] each

    def load(slab, page_origin, kind, live):
        """K (kind 0) or V (kind 1) of kv head h for the block's tokens: n float32 planes [block, Dw]
        and, for int4_fp8, the codes' scales [block, 1] apart (else None); zero where not live."""
        origin = page_origin + layout.chunk_origin(layer, kind)                     # [block]
        # Two pointer tensors of one shape [block, Dw] (slab broadcast explicitly for Triton).
        slab_2d = jnp.broadcast_to(slab[:, None], (block, dw))
        words = pool_ref[slab_2d, (origin + layout.value_word(h, slot))[:, None] + word_iota]
        planes = decode_words(words, layout.kv_dtype)
        scale = token_scales(pool_ref, layout, slab, origin, slot, h) if layout.quantized else None
        if layout.kv_dtype == "int4":
            zero = token_scales(pool_ref, layout, slab, origin, slot, hkv + h)
            planes = [x * scale + zero for x in planes]
        elif layout.quantized and not fp8:
            planes = [x * scale for x in planes]
        planes = [jnp.where(live, x, 0.0) for x in planes]
        return planes, (jnp.where(live, scale, 0.0) if fp8 else None)

    def body(j, carry):
        m, l, accs = carry
        first = split * (blocks_per_split * pages_per_block) + j * pages_per_block
        pages = table_ref[first + page_in_block]                                           # [block]
        slab = pages // layout.pages_per_slab
        page_origin = (pages % layout.pages_per_slab) * layout.page_slot_words
        live = (split_start + j * block + tok < length)[:, None]                           # [block, 1]
        k, k_scale = load(slab, page_origin, 0, live)
        v, v_scale = load(slab, page_origin, 1, live)
        s = sum(jnp.sum(qp[:, None, :] * kp[None, :, :], axis=-1) for qp, kp in zip(q_planes, k))
        if fp8:
            s = s * k_scale[:, 0][None, :]
        s = jnp.where(live[:, 0][None, :], s, -jnp.inf)                                      # [G, block]
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
        l = l * alpha + p.sum(axis=-1)
        if fp8:
            pv, c = fp8_block_probabilities(p, v_scale[:, 0])
            accs = [a * alpha[:, None] + jnp.sum(pv[:, :, None] * vp[None, :, :], axis=1) / c
                    for a, vp in zip(accs, v)]
        else:
            accs = [a * alpha[:, None] + jnp.sum(p[:, :, None] * vp[None, :, :], axis=1)
                    for a, vp in zip(accs, v)]
        return m_new, l, accs

    g = q_ref.shape[0]
    m0 = jnp.full((g,), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((g,), jnp.float32)
    accs0 = [jnp.zeros((g, dw), jnp.float32) for _ in range(n)]
    m, l, accs = lax.fori_loop(0, num_blocks, body, (m0, l0, accs0))
    for i, a in enumerate(accs):
        acc_ref[:, pl.ds(i * dw, dw)] = a
    m_ref[...] = m
    l_ref[...] = l


def _merge_splits(acc, m, l):
    """Log-sum-exp merge over the split axis (2): acc [B, Hkv, S, G, D], m/l [B, Hkv, S, G] -> [B, Hkv, G, D].
    Splits without live tokens have m = -inf, l = 0 and weigh 0; rows with no keys at all give 0."""
    m_max = m.max(axis=2, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m_max), m_max, 0.0)
    w = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))                     # [B, Hkv, S, G]
    l_tot = (l * w).sum(axis=2)
    out = (acc * w[..., None]).sum(axis=2)
    return out / jnp.where(l_tot > 0, l_tot, 1.0)[..., None]


def decode_tiling(layout: KVPageLayout, group: int) -> tuple[int, int]:
    """(pages_per_block, num_warps) that fit the registers: a program holds [G, block, D] products,
    which spill past 255 registers per thread at G x D >= 512 with 4 warps (8 fix it) and at
    G x D >= 1024 even with 8 unless the block halves (sm_90a, `pallas_kernels.compile_check`)."""
    width = next_pow2(group) * layout.head_dim
    block_tokens = DEFAULT_BLOCK_TOKENS // 2 if width >= 1024 else DEFAULT_BLOCK_TOKENS
    return max(1, block_tokens // layout.tokens_per_page), 8 if width >= 512 else 4


def plan_splits(layout: KVPageLayout, num_pages: int, pages_per_block: int | None = None,
                num_splits: int | None = None) -> tuple[int, int, int]:
    """(pages_per_block, blocks_per_split, num_splits) for a page table of `num_pages` columns."""
    if pages_per_block is None:
        pages_per_block = max(1, DEFAULT_BLOCK_TOKENS // layout.tokens_per_page)
    pages_per_block = max(1, min(pages_per_block, num_pages))
    num_blocks = -(-num_pages // pages_per_block)
    num_splits = min(num_blocks, num_splits or DEFAULT_MAX_SPLITS)
    blocks_per_split = -(-num_blocks // num_splits)
    num_splits = -(-num_blocks // blocks_per_split)
    return pages_per_block, blocks_per_split, num_splits


def paged_decode_attention(
    q: jax.Array,            # [B, 1, Hq, D] queries (RoPE applied)
    pool: jax.Array,         # uint32[num_slabs, slab_words]
    layout: KVPageLayout,
    layer,                   # int or traced int32 scalar
    page_table: jax.Array,   # int32[B, P] or [B, Hkv, P]; entries past a sequence's pages: any valid page
    q_positions: jax.Array,  # int32[B, 1]
    kv_lens: jax.Array,      # int32[B], or [B, Hkv] with a per-head table
    *,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
    interpret=False,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> jax.Array:
    """Decode attention (one query per sequence) read in place from the pool. Returns [B, 1, Hq, D] in
    q's dtype. `interpret`: False (compiled, GPU Triton lowering) or anything `pl.pallas_call` accepts.
    `pages_per_block` and `num_warps` default to `decode_tiling`'s. A table per kv head (sparse decode
    over selected pages) gives kv head h of sequence b the pages `page_table[b, h]`, whose first
    `kv_lens[b, h]` tokens are live (all earlier than the query); every program reads its own row."""
    batch, seq, num_q_heads, head_dim = q.shape
    if seq != 1:
        raise ValueError(f"paged_decode_attention takes one query token per sequence, got S={seq}")
    hkv = layout.num_kv_heads
    if head_dim != layout.head_dim or num_q_heads % hkv:
        raise ValueError(f"q heads/dim {num_q_heads}x{head_dim} do not fit the layout "
                         f"({hkv} kv heads x {layout.head_dim})")
    group = num_q_heads // hkv
    gp = next_pow2(group)                 # Triton tiles: pad the query group to a power of two
    n = _elems_per_word(layout)
    dw = head_dim // n
    head_tables = page_table.ndim == 3
    if head_tables and (page_table.shape[:2] != (batch, hkv) or kv_lens.shape != (batch, hkv)):
        raise ValueError(f"a per-head page table is [B, Hkv, P] = [{batch}, {hkv}, P] with kv_lens [B, Hkv]; "
                         f"got {page_table.shape} and {kv_lens.shape}")
    num_pages = page_table.shape[-1]
    tiled_pages, tiled_warps = decode_tiling(layout, group)
    num_warps = num_warps or tiled_warps
    pages_per_block, blocks_per_split, num_splits = plan_splits(layout, num_pages, pages_per_block or tiled_pages,
                                                                num_splits)
    if not interpret and (why := decode_shape_error(layout, pages_per_block)):
        raise ValueError(f"compiled Pallas decode attention: {why}")

    # q: scale like the reference, group by kv head, head_dim permuted into plane order [i][w].
    qg = q.reshape(batch, hkv, group, head_dim).astype(jnp.float32) * head_dim ** -0.5
    qg = qg.reshape(batch, hkv, group, dw, n).swapaxes(-1, -2).reshape(batch, hkv, group, head_dim)
    if layout.kv_dtype == "int4_fp8":
        qg = fp8_queries(qg)
    if gp != group:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - group), (0, 0)))
    # Live tokens per (sequence, kv head): causal on the query position (a shared table), within
    # kv_len and within the page table.
    if head_tables:
        lens, table = kv_lens.astype(jnp.int32), page_table.astype(jnp.int32)
    else:
        lens = jnp.minimum(kv_lens.astype(jnp.int32), q_positions[:, 0].astype(jnp.int32) + 1)
        lens = jnp.broadcast_to(lens[:, None], (batch, hkv))
        table = jnp.broadcast_to(page_table.astype(jnp.int32)[:, None], (batch, hkv, num_pages))
    lens = jnp.clip(lens, 0, num_pages * layout.tokens_per_page)
    # Pad the table to whole splits with copies of its last column (valid page ids).
    padded = num_splits * blocks_per_split * pages_per_block
    if padded != num_pages:
        table = jnp.pad(table, ((0, 0), (0, 0), (0, padded - num_pages)), mode="edge")
    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)

    kernel = functools.partial(_decode_kernel, layout=layout, pages_per_block=pages_per_block,
                               blocks_per_split=blocks_per_split)
    grid = (batch, hkv, num_splits)
    compiler_params = None
    if not interpret:
        compiler_params = plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, s: (0,)),                                 # layer
            pl.BlockSpec((batch, hkv), lambda b, h, s: (0, 0)),                       # lens
            pl.BlockSpec((None, None, padded), lambda b, h, s: (b, h, 0)),            # page table row
            pl.BlockSpec((None, None, gp, head_dim), lambda b, h, s: (b, h, 0, 0)),   # q group
            pl.BlockSpec(pool.shape, lambda b, h, s: (0, 0)),                         # the whole pool
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, gp), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, hkv, num_splits, gp, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, hkv, num_splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((batch, hkv, num_splits, gp), jnp.float32),
        ],
        interpret=interpret,
        compiler_params=compiler_params,
        name=f"paged_decode_attention_{layout.kv_dtype}",
    )(layer_arr, lens, table, qg, pool)

    out = _merge_splits(acc, m, l)[:, :, :group]                                     # [B, Hkv, G, D]
    out = out.reshape(batch, hkv, group, n, dw).swapaxes(-1, -2)                      # back to [w][i]
    return out.reshape(batch, 1, num_q_heads, head_dim).astype(q.dtype)
