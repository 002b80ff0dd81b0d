"""Pallas prefill / chunked-prefill attention over KV pages of the shared pool, for every KV format.

Queries `q [B, S, Hq, D]` at absolute positions attend causally to their sequence's cached tokens (the
earlier context and this chunk's own, already written by `kv_write.write_kv`), with exactly the
semantics of `paged_attention_ref.paged_attention_reference`; a query that sees no key gives 0. As in
the decode kernel, K/V words are read in place from the pool and decoded in registers
(`paged_attention_pallas.decode_element`), never dequantized into a copy. Each program owns a block of
query tokens times one KV group's query heads and runs FlashAttention's online softmax
(arXiv:2205.14135, arXiv:2307.08691) over KV blocks up to its causal limit, with two float32-
accumulating dots per block; no split-K, since prefill has parallelism enough in its query blocks.
FireQ's int4_fp8 KV is attended with FP8 queries and FP8 P (`fp8_attention`): the dots multiply
e4m3 values and int4 codes, which bfloat16 holds exactly, so they run as bf16 dots with float32
accumulation and give what FP8 tensor cores would.

Written for the Triton-style `pl.pallas_call` lowering, which also runs under `interpret=True` on CPU;
`prefill_shape_error` says which layouts / tilings the compiled path takes. Design: docs/kernels.md.
The dispatcher (`paged_attention.paged_attention`) routes S > 1 here for "pallas" and "interpret".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels.fp8_attention import fp8_block_probabilities, fp8_queries
from pallas_kernels.kv_pages import KVPageLayout
from pallas_kernels.paged_attention_pallas import DEFAULT_BLOCK_TOKENS, _elems_per_word, decode_element, token_scales
from pallas_kernels.pow2 import is_pow2, next_pow2

# Default rows (query tokens x padded group) per program.
DEFAULT_BLOCK_ROWS = 64
# Triton's `tl.dot` needs every dimension >= 16.
MIN_DOT_DIM = 16
# Dot algorithms that split each float32 operand into two and run three dots: near-float32 accuracy
# on tensor cores (what a correctness check wants, where "highest" would compile to FMA loops). The
# split operands take registers, so their KV blocks are MIN_DOT_DIM tokens: 0 spills on sm_90a for
# BF16_BF16_F32_X3, the GPU check's; TF32x3 still spills 48-56 B there.
MULTIPASS_DOTS = (lax.DotAlgorithmPreset.BF16_BF16_F32_X3, lax.DotAlgorithmPreset.TF32_TF32_F32_X3)


def prefill_shape_error(layout: KVPageLayout, block_rows: int, pages_per_block: int) -> str | None:
    """Why the compiled (Triton) kernel cannot take this layout and tiling, or None. Triton tiles
    must have a power-of-two number of elements and `tl.dot` dimensions must be >= 16: the rows of a
    program (M of both dots), the tokens of a KV block (N of q.k, K of p.v) and head_dim (K of q.k,
    N of p.v). Interpret mode has no such limit."""
    block_tokens = pages_per_block * layout.tokens_per_page
    for what, size in ((f"head_dim {layout.head_dim}", layout.head_dim),
                       (f"KV block of {block_tokens} tokens ({pages_per_block} pages x "
                        f"{layout.tokens_per_page})", block_tokens),
                       (f"query block of {block_rows} rows", block_rows)):
        if not is_pow2(size) or size < MIN_DOT_DIM:
            return f"{what} is not a power of two >= {MIN_DOT_DIM}"
    return None


def plan_prefill(layout: KVPageLayout, seq: int, group: int, num_pages: int,
                 block_q: int | None = None, pages_per_block: int | None = None,
                 precision=None) -> tuple[int, int]:
    """(block_q, pages_per_block) for S = `seq` query tokens of GQA ratio `group` and a page table of
    `num_pages` columns. Defaults: about DEFAULT_BLOCK_ROWS rows (at least 16, the smallest Triton
    dot) and KV blocks of DEFAULT_BLOCK_TOKENS tokens (half for int4, MIN_DOT_DIM for MULTIPASS_DOTS)."""
    gp = next_pow2(group)
    if block_q is None:
        block_q = max(1, min(DEFAULT_BLOCK_ROWS // gp, next_pow2(seq)), -(-MIN_DOT_DIM // gp))
    if pages_per_block is None:
        # int4 words split into eight elements in registers: 64-token blocks spill (sm_90a).
        block_tokens = (MIN_DOT_DIM if precision in MULTIPASS_DOTS else
                        DEFAULT_BLOCK_TOKENS // 2 if layout.value_bits == 4 else DEFAULT_BLOCK_TOKENS)
        pages_per_block = max(1, block_tokens // layout.tokens_per_page)
    pages_per_block = max(1, min(pages_per_block, num_pages))
    return max(1, block_q), pages_per_block


def check_prefill_args(q, layout: KVPageLayout, q_positions, kv_lens) -> None:
    """ValueError unless q [B, S, Hq, D], q_positions [B, S] and kv_lens [B] fit each other and the layout."""
    batch, seq, num_q_heads, head_dim = q.shape
    hkv = layout.num_kv_heads
    if head_dim != layout.head_dim or num_q_heads % hkv:
        raise ValueError(f"q heads/dim {num_q_heads}x{head_dim} do not fit the layout "
                         f"({hkv} kv heads x {layout.head_dim})")
    if q_positions.shape != (batch, seq) or kv_lens.shape != (batch,):
        raise ValueError(f"q_positions {q_positions.shape} / kv_lens {kv_lens.shape} do not fit q "
                         f"[{batch}, {seq}, ...]")


def query_rows(q, q_positions, num_kv_heads: int, block_q: int):
    """The prefill kernels' query rows: q [B, S, Hq, D] scaled by D^-0.5 like the reference, grouped by
    kv head, S padded to whole blocks of `block_q` tokens and the group G to a power of two Gp, rows
    ordered (token, head) in a kv head -> (float32 [B, Hkv, S_pad * Gp, D], each row's query position
    int32 [B, S_pad * Gp], -1 for padding rows (S or G): they see no key)."""
    batch, seq, num_q_heads, head_dim = q.shape
    group = num_q_heads // num_kv_heads
    gp = next_pow2(group)
    s_pad = -(-seq // block_q) * block_q
    qg = q.reshape(batch, seq, num_kv_heads, group, head_dim).astype(jnp.float32) * head_dim ** -0.5
    qg = jnp.pad(qg, ((0, 0), (0, s_pad - seq), (0, 0), (0, gp - group), (0, 0)))
    qg = qg.transpose(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, s_pad * gp, head_dim)
    qpos = jnp.pad(q_positions.astype(jnp.int32), ((0, 0), (0, s_pad - seq)), constant_values=-1)
    qpos = jnp.broadcast_to(qpos[:, :, None], (batch, s_pad, gp))
    qpos = jnp.where(jnp.arange(gp)[None, None, :] < group, qpos, -1).reshape(batch, s_pad * gp)
    return qg, qpos


def from_query_rows(out, q):
    """Kernel output rows [B, Hkv, S_pad * Gp, D] (`query_rows`' order) -> [B, S, Hq, D] in q's dtype."""
    batch, seq, num_q_heads, head_dim = q.shape
    hkv = out.shape[1]
    group = num_q_heads // hkv
    gp = next_pow2(group)
    out = out.reshape(batch, hkv, -1, gp, head_dim)[:, :, :seq, :group]
    return out.transpose(0, 2, 1, 3, 4).reshape(batch, seq, num_q_heads, head_dim).astype(q.dtype)


def _prefill_kernel(layer_ref, lens_ref, table_ref, qpos_ref, q_ref, pool_ref, out_ref, *,
                    layout: KVPageLayout, pages_per_block: int, max_tokens: int, precision):
    b, h = pl.program_id(0), pl.program_id(1)
    t_page = layout.tokens_per_page
    n = _elems_per_word(layout)
    d = layout.head_dim
    dw = d // n
    block = pages_per_block * t_page               # KV tokens per loop step
    hkv = layout.num_kv_heads
    fp8 = layout.kv_dtype == "int4_fp8"            # codes and scales apart: FP8 q . k and p . v

    layer = layer_ref[0]
    q = q_ref[...]                                  # [R, D] float32, scaled by D^-0.5 (int4_fp8: rounded to e4m3)
    if fp8:
        q = q.astype(jnp.bfloat16)                  # exact: e4m3 values times a power of two
    qpos = qpos_ref[...]                            # [R] int32; -1 for padding rows
    # Causal limit of this program's rows: no row sees a key at or past it.
    kv_hi = jnp.clip(jnp.minimum(lens_ref[b], jnp.max(qpos) + 1), 0, max_tokens)
    num_blocks = (kv_hi + block - 1) // block

    tok = lax.broadcasted_iota(jnp.int32, (block,), 0)
    page_in_block, slot = tok // t_page, tok % t_page
    word_col = lax.broadcasted_iota(jnp.int32, (1, dw), 1)
    elem_in_word = lax.broadcasted_iota(jnp.uint32, (1, 1, n), 2)

    def load(slab, page_origin, kind, live):
        """K (kind 0) or V (kind 1) of kv head h for the block's tokens -> float32 [block, D] and, for
        int4_fp8, the codes' scales [block, 1] apart (else None); zero where not live. Each word is
        loaded once (a contiguous row of Dw words: wide loads) and split in registers."""
        origin = page_origin + layout.chunk_origin(layer, kind)                     # [block]
        slab_2d = jnp.broadcast_to(slab[:, None], (block, dw))  # both pointer tensors [block, Dw]
        words = pool_ref[slab_2d, (origin + layout.value_word(h, slot))[:, None] + word_col]
        if n == 1:
            x = decode_element(words, 0, layout.kv_dtype)
        else:   # element w * n + i of the row is element i of word w: [block, Dw, n] -> [block, D]
            x = decode_element(words[:, :, None], elem_in_word, layout.kv_dtype).reshape(block, d)
        live = live[:, None]
        if fp8:
            scale = token_scales(pool_ref, layout, slab, origin, slot, h)
            return jnp.where(live, x, 0.0), jnp.where(live, scale, 0.0)
        if layout.quantized:
            x = x * token_scales(pool_ref, layout, slab, origin, slot, h)
            if layout.kv_dtype == "int4":
                x = x + token_scales(pool_ref, layout, slab, origin, slot, hkv + h)
        return jnp.where(live, x, 0.0), None

    def body(j, carry):
        m, l, acc = carry
        pages = table_ref[j * pages_per_block + page_in_block]                             # [block]
        slab = pages // layout.pages_per_slab
        page_origin = (pages % layout.pages_per_slab) * layout.page_slot_words
        pos = j * block + tok                                                              # [block]
        live = pos < kv_hi
        k, k_scale = load(slab, page_origin, 0, live)
        v, v_scale = load(slab, page_origin, 1, live)
        if fp8:
            s = lax.dot_general(q, k.astype(jnp.bfloat16), (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * k_scale[:, 0][None, :]
        else:
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32)                       # [R, block]
        seen = live[None, :] & (pos[None, :] <= qpos[:, None])
        s = jnp.where(seen, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
        l = l * alpha + p.sum(axis=-1)
        if fp8:
            p8, c = fp8_block_probabilities(p, v_scale[:, 0])                 # e4m3: exact in bf16
            pv = lax.dot_general(p8.astype(jnp.bfloat16), v.astype(jnp.bfloat16), (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32) / c
        else:
            pv = lax.dot_general(p, v, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)                      # [R, D]
        return m_new, l, acc * alpha[:, None] + pv

    rows = q.shape[0]
    m0 = jnp.full((rows,), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((rows,), jnp.float32)
    acc0 = jnp.zeros((rows, d), jnp.float32)
    _, l, acc = lax.fori_loop(0, num_blocks, body, (m0, l0, acc0))
    out_ref[...] = acc / jnp.where(l > 0, l, 1.0)[:, None]          # rows with no keys -> 0


def paged_prefill_attention(
    q: jax.Array,            # [B, S, Hq, D] queries (RoPE applied)
    pool: jax.Array,         # uint32[num_slabs, slab_words]
    layout: KVPageLayout,
    layer,                   # int or traced int32 scalar
    page_table: jax.Array,   # int32[B, P]; entries past a sequence's pages may be any valid page
    q_positions: jax.Array,  # int32[B, S] absolute position of each query
    kv_lens: jax.Array,      # int32[B] cached tokens per sequence (this chunk's writes included)
    *,
    block_q: int | None = None,
    pages_per_block: int | None = None,
    precision=None,
    interpret=False,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> jax.Array:
    """Causal prefill / chunked-prefill attention read in place from the pool. Returns [B, S, Hq, D]
    in q's dtype. `block_q`: query tokens per program; `pages_per_block`: pages per KV loop step;
    `precision`: of the two dots (None: the backend default, TF32 on float32 operands on the GPU;
    a `MULTIPASS_DOTS` algorithm for near-float32 accuracy on tensor cores); `interpret`: False
    (compiled, GPU Triton lowering) or anything `pl.pallas_call` accepts."""
    check_prefill_args(q, layout, q_positions, kv_lens)
    batch, seq, num_q_heads, head_dim = q.shape
    hkv = layout.num_kv_heads
    group = num_q_heads // hkv
    gp = next_pow2(group)
    num_pages = page_table.shape[1]
    block_q, pages_per_block = plan_prefill(layout, seq, group, num_pages, block_q, pages_per_block, precision)
    rows = block_q * gp
    if not interpret and (why := prefill_shape_error(layout, rows, pages_per_block)):
        raise ValueError(f"compiled Pallas prefill attention: {why}")
    num_q_blocks = -(-seq // block_q)
    s_pad = num_q_blocks * block_q

    qg, qpos = query_rows(q, q_positions, hkv, block_q)
    if layout.kv_dtype == "int4_fp8":
        qg = fp8_queries(qg)
    # Pad the table to whole KV blocks with copies of its last column (valid page ids).
    padded = -(-num_pages // pages_per_block) * pages_per_block
    table = page_table.astype(jnp.int32)
    if padded != num_pages:
        table = jnp.pad(table, ((0, 0), (0, padded - num_pages)), mode="edge")
    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)

    kernel = functools.partial(_prefill_kernel, layout=layout, pages_per_block=pages_per_block,
                               max_tokens=num_pages * layout.tokens_per_page, precision=precision)
    compiler_params = None
    if not interpret:
        # 4 warps spill the [BQ x G, D] accumulators at head_dim 128 (sm_90a, pallas_kernels.compile_check)
        warps = num_warps or (8 if layout.head_dim >= 128 else 4)
        compiler_params = plgpu_triton.CompilerParams(num_warps=warps, num_stages=num_stages)
    out = pl.pallas_call(
        kernel,
        grid=(batch, hkv, num_q_blocks),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, i: (0,)),                                  # layer
            pl.BlockSpec((batch,), lambda b, h, i: (0,)),                              # kv_lens
            pl.BlockSpec((None, padded), lambda b, h, i: (b, 0)),                      # page table row
            pl.BlockSpec((None, rows), lambda b, h, i: (b, i)),                        # row positions
            pl.BlockSpec((None, None, rows, head_dim), lambda b, h, i: (b, h, i, 0)),  # q rows
            pl.BlockSpec(pool.shape, lambda b, h, i: (0, 0)),                          # the whole pool
        ],
        out_specs=pl.BlockSpec((None, None, rows, head_dim), lambda b, h, i: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct((batch, hkv, s_pad * gp, head_dim), jnp.float32),
        interpret=interpret,
        compiler_params=compiler_params,
        name=f"paged_prefill_attention_{layout.kv_dtype}",
    )(layer_arr, kv_lens.astype(jnp.int32), table, qpos, qg, pool)

    return from_query_rows(out, q)
