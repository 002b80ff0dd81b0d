"""Pure-XLA reference for attention over KV pages of the shared pool (prefill, chunked prefill, decode).

Queries attend to every cached token of their sequence at a position <= their own (causal). Pages are
visited a block at a time with an online softmax (flash-decoding style), so no sequence's whole
context is ever gathered into one contiguous buffer, and the loop stops at the longest live context
in the batch rather than at the page table's width.

Every KV format of `KVPageLayout` works: quantized pages (fp8 / int8 / int4 with bfloat16 scales) are
dequantized to float32 inside the block loop, one block of pages at a time (`read_kv_pages`), so the
cache is never expanded as a whole. Positions past a sequence's end are zeroed before use, so garbage
there (NaN values, or garbage scale words that dequantize to NaN/inf) never reaches a live result.
FireQ's int4_fp8 pages are read as codes and scales instead, and attended with FP8 queries and FP8 P
(`fp8_attention`), as the kernels do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.fp8_attention import fp8_probabilities, fp8_queries, p_factor
from pallas_kernels.kv_pages import (KVPageLayout, read_kv_head_pages, read_kv_head_pages_quantized, read_kv_pages,
                                     read_kv_pages_quantized)
from pallas_kernels.quant_formats import unpack_int4

REFERENCE_PAGES_PER_BLOCK = 8  # pages per step of the block loop (the engine's table widths are multiples of 8)


def paged_attention_reference(
    q: jax.Array,            # [B, S, Hq, D] queries (RoPE applied)
    pool: jax.Array,         # uint32[num_slabs, slab_words]
    layout: KVPageLayout,
    layer,                   # int or traced int32 scalar
    page_table: jax.Array,   # int32[B, P], or [B, Hkv, P] per kv head (decode only, see below)
    q_positions: jax.Array,  # int32[B, S] absolute position of each query
    kv_lens: jax.Array,      # int32[B] cached tokens per sequence (after this step's writes), or [B, Hkv]
    *,
    pages_per_block: int = REFERENCE_PAGES_PER_BLOCK,
) -> jax.Array:
    """Attention over each sequence's pages; entries of the table past a sequence's pages may be any
    valid page. With a table per kv head (sparse decode over selected pages: S == 1), kv head h of
    sequence b reads its own pages `page_table[b, h]`, whose first `kv_lens[b, h]` tokens are live;
    they are all earlier than the query, so no causal mask applies."""
    batch, seq, num_q_heads, head_dim = q.shape
    num_kv_heads = layout.num_kv_heads
    group = num_q_heads // num_kv_heads
    head_tables = page_table.ndim == 3
    if head_tables and (seq != 1 or page_table.shape[:2] != (batch, num_kv_heads)
                        or kv_lens.shape != (batch, num_kv_heads)):
        raise ValueError(f"per-head page tables are for decode: q [B, 1, Hq, D], table [B, Hkv, P] and "
                         f"kv_lens [B, Hkv]; got q {q.shape}, table {page_table.shape}, kv_lens {kv_lens.shape}")
    lens = kv_lens if head_tables else jnp.broadcast_to(kv_lens[:, None], (batch, num_kv_heads))
    num_pages = page_table.shape[-1]
    pages_per_block = min(pages_per_block, num_pages)
    if num_pages % pages_per_block:
        raise ValueError(f"page table width {num_pages} must be a multiple of {pages_per_block}")
    block_tokens = pages_per_block * layout.tokens_per_page
    scale = head_dim ** -0.5

    # [B, Hkv, G, S, D]: with the queries' rows next to head_dim, XLA's CPU dot computes each row
    # the same way whatever S is (from [B, S, Hkv, G, D] it does not), so a prompt token's attention
    # does not depend on how many others share its prefill step (a prefix cache's reused KV equals
    # recomputed KV).
    qg = jnp.moveaxis(q.reshape(batch, seq, num_kv_heads, group, head_dim), 1, 3).astype(jnp.float32) * scale
    fp8 = layout.kv_dtype == "int4_fp8"
    if fp8:
        qg = fp8_queries(qg)

    def tokens_major(x):
        """A block read per kv head [B, Hkv, pb, T, ...] -> [B, K, Hkv, ...], as the shared-table reads."""
        x = x.reshape(batch, num_kv_heads, block_tokens, *x.shape[4:])
        return jnp.moveaxis(x, 1, 2)

    def read_block(ids, k_live):
        """K and V of the block's tokens [B, K, Hkv, D] float32, zero where not live ([B, K, Hkv]),
        and (int4_fp8) their per-token scales [B, K, Hkv] (codes otherwise dequantized: scales None)."""
        live = k_live[..., None]
        if not fp8:
            if head_tables:
                k, v = (tokens_major(x) for x in read_kv_head_pages(pool, layout, ids, layer))
            else:
                k, v = (x.reshape(batch, block_tokens, num_kv_heads, head_dim)
                        for x in read_kv_pages(pool, layout, ids, layer))       # [B, pb, T, Hkv, D]
            return [jnp.where(live, x.astype(jnp.float32), 0.0) for x in (k, v)] + [None, None]
        if head_tables:
            stored = read_kv_head_pages_quantized(pool, layout, ids, layer)
            codes = [tokens_major(unpack_int4(x.values, signed=True, axis=x.axis)) for x in stored]
            scales = [tokens_major(x.scales)[..., 0] for x in stored]
        else:
            stored = read_kv_pages_quantized(pool, layout, ids, layer)
            codes = [unpack_int4(x.values, signed=True, axis=x.axis).reshape(batch, block_tokens, num_kv_heads,
                                                                              head_dim) for x in stored]
            scales = [x.scales.reshape(batch, block_tokens, num_kv_heads) for x in stored]
        return ([jnp.where(live, c.astype(jnp.float32), 0.0) for c in codes]
                + [jnp.where(k_live, x.astype(jnp.float32), 0.0) for x in scales])
    m0 = jnp.full((batch, num_kv_heads, group, seq), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((batch, num_kv_heads, group, seq), jnp.float32)
    acc0 = jnp.zeros((batch, num_kv_heads, group, seq, head_dim), jnp.float32)

    def block(i, carry):
        m, l, acc = carry
        ids = lax.dynamic_slice_in_dim(page_table, i * pages_per_block, pages_per_block, axis=-1)
        k_pos = i * block_tokens + jnp.arange(block_tokens)
        k_live = k_pos[None, :, None] < lens[:, None, :]                            # [B, K, Hkv]
        # Pages past a sequence's end may hold anything (NaN values or scales included): read_block
        # zeroes them before use.
        k, v, k_scale, v_scale = read_block(ids, k_live)
        mask = jnp.swapaxes(k_live, 1, 2)[:, :, None, :]                            # [B, Hkv, 1, K]
        if not head_tables:
            mask = mask & (k_pos[None, None, :] <= q_positions[:, :, None])[:, None]   # [B, Hkv, S, K]
        s = jnp.einsum("bhgsd,bkhd->bhgsk", qg, k, preferred_element_type=jnp.float32)
        if fp8:
            s = s * k_scale.transpose(0, 2, 1)[:, :, None, None, :]
        s = jnp.where(mask[:, :, None], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
        l = l * alpha + p.sum(axis=-1)
        if fp8:
            sv = v_scale.transpose(0, 2, 1)[:, :, None, None, :]                    # [B, Hkv, 1, 1, K]
            c = p_factor(sv.max(axis=-1, keepdims=True))
            pv = jnp.einsum("bhgsk,bkhd->bhgsd", fp8_probabilities(p, sv, c), v,
                            preferred_element_type=jnp.float32) / c
        else:
            pv = jnp.einsum("bhgsk,bkhd->bhgsd", p, v, preferred_element_type=jnp.float32)
        acc = acc * alpha[..., None] + pv
        return m_new, l, acc

    num_blocks = (jnp.max(lens) + block_tokens - 1) // block_tokens
    _, l, acc = lax.fori_loop(0, num_blocks, block, (m0, l0, acc0))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]                 # queries with no keys -> 0
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, num_q_heads, head_dim)
    return out.astype(q.dtype)
