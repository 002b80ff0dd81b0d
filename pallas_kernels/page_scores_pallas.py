"""Pallas kernel scoring a sequence's KV pages for query-aware selection: per page and kv head, the
max over the query group of `sum_i max(q_i * min_i, q_i * max_i)` from the page's key bounds, as
`page_selection.page_scores_reference`.

One program per (sequence, kv head) walks the page table in blocks, reading only the bounds region
of each page (`KVPageLayout.bounds_origin`: 2 x head_dim int8 codes and a scale per page, a small
fraction of the page's K/V), so the score pass costs little next to attention over the pages it
selects. The scale is positive, so it leaves the max of each product pair and is applied once.
Selection (top-k) runs afterwards in XLA over the [B, Hkv, P] scores: a top-k across all pages needs
every score first, so scoring and attention are two passes (`sparse_attention`). Columns past a
sequence's pages score -inf.

Written for the Triton-style `pl.pallas_call` lowering, which also runs under `interpret=True` on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels.kv_pages import KVPageLayout
from pallas_kernels.paged_attention_pallas import _bf16_half_to_f32, decode_element
from pallas_kernels.pow2 import is_pow2, next_pow2

MAX_BLOCK_PAGES = 64
PRODUCT_ELEMENTS = 4096   # [G, pages, D/4] products per block that fit 4 warps' registers without spills


def block_pages_for(group: int, head_dim: int, num_pages: int) -> int:
    """Pages per loop step: the most that keep a block's [G, pages, D/4] products within
    PRODUCT_ELEMENTS (sm_90a, 4 warps: `pallas_kernels.compile_check`), a power of two."""
    fit = max(1, PRODUCT_ELEMENTS // (next_pow2(group) * head_dim // 4))
    return max(1, min(MAX_BLOCK_PAGES, 1 << (fit.bit_length() - 1), next_pow2(num_pages)))


def scores_shape_error(layout: KVPageLayout) -> str | None:
    """Why the compiled (Triton) kernel cannot take this layout, or None: tiles are [pages, D / 4]."""
    if not is_pow2(layout.head_dim):
        return f"head_dim {layout.head_dim} is not a power of two"
    return None


def _scores_kernel(layer_ref, lens_ref, table_ref, q_ref, pool_ref, out_ref, *, layout: KVPageLayout,
                   block_pages: int, group: int):
    b, h = pl.program_id(0), pl.program_id(1)
    quarter = layout.head_dim // 4
    layer = layer_ref[0]
    num_pages = (lens_ref[b] + layout.tokens_per_page - 1) // layout.tokens_per_page
    num_blocks = (num_pages + block_pages - 1) // block_pages
    total_blocks = table_ref.shape[0] // block_pages
    q_planes = [q_ref[:, j, :].astype(jnp.float32) for j in range(4)]          # [Gp, D/4]: channel 4u + j
    rows = lax.broadcasted_iota(jnp.int32, (q_planes[0].shape[0], 1), 0) < group  # padded rows: no vote
    word = lax.broadcasted_iota(jnp.int32, (1, quarter), 1)
    in_block = lax.broadcasted_iota(jnp.int32, (block_pages,), 0)

    def body(j, carry):
        pages = table_ref[pl.ds(j * block_pages, block_pages)]                    # [blk]
        slab = pages // layout.pages_per_slab
        origin = (pages % layout.pages_per_slab) * layout.page_slot_words + layout.bounds_origin(layer, h)
        slab_2d = jnp.broadcast_to(slab[:, None], (block_pages, quarter))
        lows = pool_ref[slab_2d, origin[:, None] + word]                           # [blk, D/4] min codes
        highs = pool_ref[slab_2d, origin[:, None] + quarter + word]                # max codes
        scale = _bf16_half_to_f32(pool_ref[slab, origin + 2 * quarter], 0)         # [blk]
        s = 0.0
        for plane, qp in enumerate(q_planes):   # byte `plane` of each word: channel 4u + plane
            lo = decode_element(lows, plane, "int8")[None]
            hi = decode_element(highs, plane, "int8")[None]
            s = s + jnp.sum(jnp.maximum(qp[:, None, :] * lo, qp[:, None, :] * hi), axis=-1)   # [Gp, blk]
        s = jnp.max(jnp.where(rows, s, -jnp.inf), axis=0) * scale
        live = j * block_pages + in_block < num_pages
        out_ref[pl.ds(j * block_pages, block_pages)] = jnp.where(live, s, -jnp.inf)
        return carry

    def dead(j, carry):
        out_ref[pl.ds(j * block_pages, block_pages)] = jnp.full((block_pages,), -jnp.inf, jnp.float32)
        return carry

    lax.fori_loop(0, num_blocks, body, 0)
    lax.fori_loop(num_blocks, total_blocks, dead, 0)


def page_scores_pallas(q: jax.Array, pool: jax.Array, layout: KVPageLayout, layer, page_table: jax.Array,
                       kv_lens: jax.Array, *, block_pages: int | None = None, interpret=False,
                       num_warps: int = 4) -> jax.Array:
    """q [B, 1, Hq, D], page_table int32[B, P], kv_lens int32[B] -> float32 [B, Hkv, P] (see module)."""
    batch, seq, num_q_heads, head_dim = q.shape
    hkv = layout.num_kv_heads
    if seq != 1 or head_dim != layout.head_dim or num_q_heads % hkv:
        raise ValueError(f"page scores take one query [B, 1, Hq, {layout.head_dim}] with Hq a multiple of "
                         f"{hkv}; got {q.shape}")
    layout.check_uniform("page_scores_pallas")
    if not layout.key_bounds:
        raise ValueError("page scores need a layout with key bounds (key_bounds=True)")
    if not interpret and (why := scores_shape_error(layout)):
        raise ValueError(f"compiled Pallas page scores: {why}")
    group = num_q_heads // hkv
    gp = next_pow2(group)
    num_pages = page_table.shape[1]
    block_pages = block_pages or block_pages_for(group, head_dim, num_pages)
    padded = -(-num_pages // block_pages) * block_pages
    table = page_table.astype(jnp.int32)
    if padded != num_pages:
        table = jnp.pad(table, ((0, 0), (0, padded - num_pages)), mode="edge")
    # q grouped by kv head, channels split four ways (the bytes of a bounds word).
    qg = q.reshape(batch, hkv, group, head_dim // 4, 4).swapaxes(-1, -2).astype(jnp.float32)
    if gp != group:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - group), (0, 0), (0, 0)))
    compiler_params = None
    if not interpret:
        compiler_params = plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=2)
    scores = pl.pallas_call(
        functools.partial(_scores_kernel, layout=layout, block_pages=block_pages, group=group),
        grid=(batch, hkv),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h: (0,)),                                       # layer
            pl.BlockSpec((batch,), lambda b, h: (0,)),                                   # kv lens
            pl.BlockSpec((None, padded), lambda b, h: (b, 0)),                           # page table row
            pl.BlockSpec((None, None, gp, 4, head_dim // 4), lambda b, h: (b, h, 0, 0, 0)),
            pl.BlockSpec(pool.shape, lambda b, h: (0, 0)),                               # the whole pool
        ],
        out_specs=pl.BlockSpec((None, None, padded), lambda b, h: (b, h, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, hkv, padded), jnp.float32),
        interpret=interpret,
        compiler_params=compiler_params,
        name=f"page_scores_{layout.kv_dtype}",
    )(jnp.asarray(layer, jnp.int32).reshape(1), kv_lens.astype(jnp.int32), table, qg, pool)
    return scores[:, :, :num_pages]
