"""FP8 prefill attention over FireQ's int4_fp8 KV pages, for Hopper with Mosaic GPU: both products on
FP8 tensor cores (`wgmma` e4m3 x e4m3, float32 accumulation), K/V tiles fetched by TMA straight from
the shared pool.

Semantics are `paged_attention_ref.paged_attention_reference`'s for int4_fp8 (and the Triton prefill
kernel's): FP8 queries, int4 codes, per-token K scales on the score columns, P in e4m3 with V's scales
and the block's power-of-two factor folded in (`fp8_attention`), the same KV blocks of
`REFERENCE_PAGES_PER_BLOCK` pages in the same order, so results differ only by float32 summation
order. Each program owns 64 query rows (tokens x the KV group's query heads, one wgmma M) of one
sequence and KV head and walks the KV blocks up to its causal limit:
- TMA: a head's `[T, D]` page tile is one contiguous run of the pool (values are head-major,
  `kv_pages`), so a `[rows, D]` int4 view of the pool makes it one box; every page of the next block
  is in flight while the current one computes (two buffers, one barrier each);
- conversion: int4 codes -> e4m3 in registers (exact), into swizzled shared memory; V is transposed on
  the way (a register relayout), since FP8 wgmma reads both operands K-major;
- scores `q8 . k8^T` and `p8 . v8` on FP8 wgmma; online softmax in registers between them.
The per-token scales are gathered from the pool by XLA before the call (`[B, Hkv, tokens]` float32,
2 bytes a token and head against 32+ of codes): token-major scale rows hold every head's scale, and a
TMA box cannot pick one head's column out of them.

Runs compiled on sm_90a, or anywhere under `plgpu.InterpretGPUParams()` (the tests, on CPU).
`prefill_mgpu_shape_error` says which layouts it takes; the dispatcher (`paged_attention`) routes
int4_fp8 prefill here and everything else to the Triton kernel. Design: docs/kernels.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.fp8_attention import fp8_query_codes, p_factor
from pallas_kernels.kv_pages import KVPageLayout, read_kv_scales
from pallas_kernels.paged_attention_ref import REFERENCE_PAGES_PER_BLOCK
from pallas_kernels.paged_prefill_pallas import check_prefill_args, from_query_rows, query_rows
from pallas_kernels.pow2 import next_pow2

ROWS = 64                  # query rows per program: one warpgroup's wgmma M
HEAD_DIMS = (64, 128)     # e4m3 rows of D bytes: one shared-memory swizzle span (<= 128); D/2-byte TMA rows
TABLE_ROW = 64             # page-table (and per-block 1/c) entries per TMA box row: boxes are <= 256 a side


def _swizzled(row_bytes: int) -> tuple:
    """Tiling + swizzle of an e4m3 shared-memory tile whose rows are `row_bytes` long (wgmma operands)."""
    return plgpu.TilingTransform((8, row_bytes)), plgpu.SwizzleTransform(row_bytes)


def prefill_pages_per_block(num_pages: int) -> int:
    """Pages per KV block for a page table of `num_pages` columns: the reference's blocking."""
    return min(REFERENCE_PAGES_PER_BLOCK, num_pages)


def prefill_mgpu_shape_error(layout: KVPageLayout, pool_shape: tuple[int, ...], num_pages: int) -> str | None:
    """Why the Mosaic GPU prefill cannot take this layout, pool and page-table width, or None."""
    pages_per_block = prefill_pages_per_block(num_pages)
    if num_pages % pages_per_block:
        return f"page table width {num_pages} is not a multiple of {pages_per_block} (the reference's blocks)"
    if layout.kv_dtype != "int4_fp8" or layout.mixed:
        return f"it reads uniform int4_fp8 pages, not {layout.kv_dtype} (mixed: {layout.mixed})"
    if layout.head_dim not in HEAD_DIMS:
        return f"head_dim {layout.head_dim} is not one of {HEAD_DIMS}"
    t = layout.tokens_per_page
    if t % 8:
        return f"{t} tokens per page is not a multiple of 8 (a TMA box of whole 8-row groups)"
    block = pages_per_block * t
    if block % 32 or block > 256:
        return f"a KV block of {block} tokens is not a multiple of 32 (the FP8 wgmma K) up to 256"
    hw = layout.head_words
    for what, words in (("slab", pool_shape[-1]), ("page slot", layout.page_slot_words),
                        ("chunk", layout.chunk_words), ("first word", layout.first_word)):
        if words % hw:
            return f"the {what} ({words} words) is not a whole number of {hw}-word head rows (a TMA view)"
    return None


def _kernel(q_gmem, sq_gmem, lim_gmem, info_gmem, table_gmem, sk_gmem, sv_gmem, inv_c_gmem, pool_gmem,
            out_gmem, q_smem, sq_smem, lim_smem, info_smem, table_smem, inv_c_smem, k_raw, v_raw, sk_smem,
            sv_smem, k8, v8t, p8, out_smem, setup_barrier, kv_barrier, *, layout: KVPageLayout,
            pages_per_block: int):
    """info: int32 [layer, KV blocks of this program, 0, 0]."""
    b, h, i = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("i")
    t, hw, d = layout.tokens_per_page, layout.head_words, layout.head_dim
    block = pages_per_block * t
    rows = pl.ds(pl.multiple_of(i * ROWS, ROWS), ROWS)
    for src, dst in ((q_gmem.at[b, h, rows], q_smem), (sq_gmem.at[b, h, rows], sq_smem),
                     (lim_gmem.at[b, rows], lim_smem), (info_gmem.at[b, i], info_smem),
                     (table_gmem.at[b], table_smem), (inv_c_gmem.at[b, h], inv_c_smem)):
        plgpu.copy_gmem_to_smem(src, dst, setup_barrier)
    plgpu.barrier_wait(setup_barrier)
    layer, num_blocks = info_smem[0], info_smem[1]

    def fetch(j, slot):
        """TMA copies of block j's K and V page tiles and scales into buffer `slot`."""
        for p in range(pages_per_block):
            entry = j * pages_per_block + p
            page = table_smem[entry // TABLE_ROW, entry % TABLE_ROW]
            slab = page // layout.pages_per_slab
            origin = (page % layout.pages_per_slab) * layout.page_slot_words + layout.value_word(h, 0)
            for kind, raw in ((0, k_raw), (1, v_raw)):
                row = (origin + layout.chunk_origin(layer, kind)) // hw      # in [T, D] head rows
                plgpu.copy_gmem_to_smem(pool_gmem.at[slab, pl.ds(row, t)], raw.at[slot, pl.ds(p * t, t)],
                                        kv_barrier.at[slot])
        tokens = pl.ds(pl.multiple_of(j * block, block), block)
        plgpu.copy_gmem_to_smem(sk_gmem.at[b, h, tokens], sk_smem.at[slot], kv_barrier.at[slot])
        plgpu.copy_gmem_to_smem(sv_gmem.at[b, h, tokens], sv_smem.at[slot], kv_barrier.at[slot])

    @pl.when(num_blocks > 0)
    def _():
        fetch(jnp.int32(0), jnp.int32(0))

    row_vector = lambda ref: lax.broadcast_in_dim(  # noqa: E731
        plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(1)), (ROWS, block), (0,))
    col_vector = lambda ref: lax.broadcast_in_dim(  # noqa: E731
        plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(0)), (ROWS, block), (1,))
    sq, lim = row_vector(sq_smem), row_vector(lim_smem)
    token = plgpu.broadcasted_iota(jnp.int32, (ROWS, block), 1, layout=plgpu.Layout.WGMMA)

    def body(j, carry):
        m, l, acc = carry
        slot = j % 2

        @pl.when(j + 1 < num_blocks)
        def _():
            fetch(j + 1, 1 - slot)  # its buffers were last read by block j - 1, which has finished

        plgpu.barrier_wait(kv_barrier.at[slot])
        # int4 codes are exact in e4m3. FP8 wgmma reads V K-major, [D, tokens]: transposed on the way
        # (a 32-bit register relayout; 8-bit arrays have none).
        k8[...] = plgpu.load(k_raw.at[slot], layout=plgpu.Layout.WGMMA, optimized=False).astype(
            jnp.float32).astype(jnp.float8_e4m3fn)
        v = plgpu.load(v_raw.at[slot], layout=plgpu.Layout.WGMMA, optimized=False).astype(jnp.float32)
        v = plgpu.layout_cast(v, plgpu.Layout.WGMMA_TRANSPOSED).astype(jnp.float8_e4m3fn)
        v8t.transpose((1, 0))[...] = v
        plgpu.commit_smem()

        def scores(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k8.T)         # [ROWS, D] . [D, block]
            plgpu.wgmma_wait(0)
            return acc_ref[...]

        s = pl.run_scoped(scores, plgpu.ACC((ROWS, block), jnp.float32)) * sq * col_vector(sk_smem.at[slot])
        s = jnp.where(token + j * block <= lim, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - lax.broadcast_in_dim(m_safe, (ROWS, block), (0,)))
        alpha = jnp.exp(jnp.where(m == -jnp.inf, -jnp.inf, m - m_safe))
        l = l * alpha + p.sum(axis=1)
        p8[...] = (p * col_vector(sv_smem.at[slot])).astype(jnp.float8_e4m3fn)  # sv: V scale x c
        plgpu.commit_smem()

        def values(acc_ref):
            plgpu.wgmma(acc_ref, p8, v8t.T)            # [ROWS, block] . [block, D]
            plgpu.wgmma_wait(0)
            return acc_ref[...]

        pv = pl.run_scoped(values, plgpu.ACC((ROWS, d), jnp.float32)) * inv_c_smem[j // TABLE_ROW, j % TABLE_ROW]
        return m_new, l, acc * lax.broadcast_in_dim(alpha, (ROWS, d), (0,)) + pv

    m0 = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l0 = plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc0 = plgpu.layout_cast(jnp.full((ROWS, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
    _, l, acc = lax.fori_loop(0, num_blocks, body, (m0, l0, acc0))
    out_smem[...] = acc / lax.broadcast_in_dim(jnp.where(l > 0, l, 1.0), (ROWS, d), (0,))  # no key -> 0
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[b, h, rows])
    plgpu.wait_smem_to_gmem(0)


def _box_rows(x: jax.Array, mode: str) -> jax.Array:
    """x [B, n] padded (jnp.pad `mode`) to whole rows of TABLE_ROW entries, as [B, rows, TABLE_ROW]
    (TMA boxes are at most 256 a side)."""
    width = -(-x.shape[1] // TABLE_ROW) * TABLE_ROW
    return jnp.pad(x, ((0, 0), (0, width - x.shape[1])), mode=mode).reshape(x.shape[0], -1, TABLE_ROW)


def paged_prefill_attention_mgpu(
    q: jax.Array,            # [B, S, Hq, D] queries (RoPE applied)
    pool: jax.Array,         # uint32[num_slabs, slab_words]
    layout: KVPageLayout,    # int4_fp8 (prefill_mgpu_shape_error)
    layer,                   # int or traced int32 scalar
    page_table: jax.Array,   # int32[B, P]; entries past a sequence's pages may be any valid page
    q_positions: jax.Array,  # int32[B, S] absolute position of each query
    kv_lens: jax.Array,      # int32[B] cached tokens per sequence (this chunk's writes included)
    *,
    interpret=False,
) -> jax.Array:
    """Causal prefill / chunked-prefill attention over int4_fp8 pages on FP8 tensor cores. Returns
    [B, S, Hq, D] in q's dtype. `interpret`: False (compiled, sm_90a), True
    (`plgpu.InterpretGPUParams()`: any backend) or an `InterpretGPUParams`. Raises ValueError for
    layouts and shapes the kernel cannot take."""
    check_prefill_args(q, layout, q_positions, kv_lens)
    batch, seq, num_q_heads, head_dim = q.shape
    hkv, t = layout.num_kv_heads, layout.tokens_per_page
    num_pages = page_table.shape[1]
    if why := prefill_mgpu_shape_error(layout, pool.shape, num_pages):
        raise ValueError(f"Mosaic GPU prefill attention: {why}")
    pages_per_block = prefill_pages_per_block(num_pages)
    group = num_q_heads // hkv
    gp = next_pow2(group)
    if gp > ROWS:
        raise ValueError(f"a KV group of {group} query heads is more than a program's {ROWS} rows")
    block_q = ROWS // gp
    num_q_blocks = -(-seq // block_q)
    s_pad = num_q_blocks * block_q
    block = pages_per_block * t
    num_blocks = num_pages // pages_per_block

    qg, qpos = query_rows(q, q_positions, hkv, block_q)   # the Triton kernel's rows: [B, Hkv, S_pad * Gp, D]
    q8, sq = fp8_query_codes(qg)
    # Each row's last visible key (-1: none; padding rows and empty sequences).
    lim = jnp.minimum(qpos, kv_lens.astype(jnp.int32)[:, None] - 1)
    # KV blocks each program walks: up to its rows' causal limit.
    kv_hi = jnp.clip(lim.reshape(batch, num_q_blocks, ROWS).max(axis=-1) + 1, 0, num_pages * t)
    layer_col = jnp.broadcast_to(jnp.asarray(layer, jnp.int32), (batch, num_q_blocks))
    info = jnp.stack([layer_col, -(-kv_hi // block), jnp.zeros_like(kv_hi), jnp.zeros_like(kv_hi)], axis=-1)

    table = _box_rows(page_table.astype(jnp.int32), "edge")          # padding: valid page ids
    # Per-token scales [B, Hkv, P * T] of the table's pages, zero past each sequence's end (pages there
    # may hold NaN), V's times its block's power of two c, and 1 / c per block.
    live = jnp.arange(num_pages * t)[None, :] < kv_lens[:, None]
    sk, sv = (jnp.where(live[:, None, :], s.reshape(batch, num_pages * t, hkv).transpose(0, 2, 1), 0.0)
              for s in read_kv_scales(pool, layout, page_table.astype(jnp.int32), layer))
    c = p_factor(sv.reshape(batch, hkv, num_blocks, block).max(axis=-1))       # [B, Hkv, blocks]
    sv = (sv.reshape(batch, hkv, num_blocks, block) * c[..., None]).reshape(batch, hkv, num_pages * t)
    inv_c = _box_rows((1.0 / c).reshape(batch * hkv, num_blocks), "constant").reshape(batch, hkv, -1, TABLE_ROW)

    # The pool as [slab, head row, D] int4 codes: one kv head's [T, D] page tile is T consecutive rows.
    codes = lax.bitcast_convert_type(pool, jnp.int4).reshape(pool.shape[0], -1, head_dim)
    kernel = functools.partial(_kernel, layout=layout, pages_per_block=pages_per_block)
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((batch, hkv, s_pad * gp, head_dim), jnp.float32),
        grid=(batch, hkv, num_q_blocks),
        grid_names=("b", "h", "i"),
        scratch_types=[
            plgpu.SMEM((ROWS, head_dim), jnp.float8_e4m3fn, transforms=_swizzled(head_dim)),  # q8
            plgpu.SMEM((ROWS,), jnp.float32),                                                 # sq
            plgpu.SMEM((ROWS,), jnp.int32),                                                   # lim
            plgpu.SMEM((4,), jnp.int32),                                                      # info
            plgpu.SMEM(table.shape[1:], jnp.int32),
            plgpu.SMEM(inv_c.shape[2:], jnp.float32),
            plgpu.SMEM((2, block, head_dim), jnp.int4),                                       # K codes
            plgpu.SMEM((2, block, head_dim), jnp.int4),                                       # V codes
            plgpu.SMEM((2, block), jnp.float32),                                              # K scales
            plgpu.SMEM((2, block), jnp.float32),                                              # V scales x c
            plgpu.SMEM((block, head_dim), jnp.float8_e4m3fn, transforms=_swizzled(head_dim)),  # k8
            plgpu.SMEM((head_dim, block), jnp.float8_e4m3fn, transforms=_swizzled(block)),     # v8^T
            plgpu.SMEM((ROWS, block), jnp.float8_e4m3fn, transforms=_swizzled(block)),         # p8
            plgpu.SMEM((ROWS, head_dim), jnp.float32),                                         # out
            plgpu.Barrier(num_arrivals=6),
            plgpu.Barrier(num_arrivals=2 * pages_per_block + 2, num_barriers=2),
        ],
        interpret=plgpu.InterpretGPUParams() if interpret is True else interpret,
        kernel_name="paged_prefill_attention_int4_fp8_mgpu",
    )
    out = call(q8, sq.reshape(batch, hkv, s_pad * gp), lim, info, table, sk, sv, inv_c, codes)
    return from_query_rows(out, q)
