"""Tests for the Pallas prefill / chunked-prefill attention kernel over the shared KV pool
(pallas_kernels/paged_prefill_pallas.py) and its route through the dispatcher
(pallas_kernels/paged_attention.py), in interpret mode, against the pure-XLA reference
`paged_attention_reference` run on the same pool.

Inputs are fresh random numbers every run (the `rng` fixture prints its seed for replay). Every pool
starts out filled with a NaN bit pattern, so any word the kernel should not depend on (free pages, the
unwritten tail of a sequence's last page, the pages that padding table entries point at, the slab
remainder) poisons the result if it leaks in. Page tables are random permutations of the pool's pages
(a sequence's pages straddle slabs); entries past a sequence's pages point at random pages, free (NaN)
ones included. Each batch mixes: a fresh prefill (no context), chunked prefills (context already in
the pages, then this chunk's tokens, all written before the kernel runs), a single-token chunk that
ends exactly on a page boundary, a sequence of length 1, one filling the whole page table, and an
empty sequence. Query slots past a sequence's chunk are padding: random queries at random positions
(-1, which sees no key and must give exactly 0, up to past the sequence's end); none may give NaN.
Plain `interpret=True` fills outputs with NaN before the grid runs, so an output tile the kernel
forgets to write shows up as NaN.

Strict interpreter: not available for this kernel. jax 0.11.2's TPU simulator
(`pltpu.InterpretParams`, out-of-bounds reads raise) rejects gathers from refs ("Advanced indexers
are not supported on TPU"), which is how a Triton-style kernel addresses pages (pointer tensors),
and the Mosaic GPU interpreter runs only `plgpu.kernel` programs. Plain interpret mode clamps
out-of-range reads, so addressing is checked by the NaN poison and the comparison with the reference.

Tolerances. Kernel and reference dequantize identically (same bfloat16 scales/zeros, same float32
`x * s (+ z)`; fp8/int8/int4 codes and bf16 values convert exactly to float32; int4_fp8's e4m3
queries and P through the same `fp8_attention` functions, over the same KV blocks), so for every KV
format they differ only in float32 summation order: q.k sums D <= 128 products (relative error
<= D * 2^-24 ~ 8e-6 of the sum of |products|, far less in practice), p.v sums a block of tokens, and
the online softmax rescales at different block boundaries (a few ulps each). Outputs are convex
combinations of V values of magnitude ~1-4, so rtol = atol = 2e-5 holds for float32 outputs of every
format alike (observed differences ~1e-6). For bfloat16 outputs both sides round their float32
results to bfloat16, which can differ by one bfloat16 ulp at a rounding boundary: rtol = 2^-7,
atol = 2^-7 * max|out|.

Matrix: every KV format x page size 8/16 x head_dim 64/128 (every addressing variant), with GQA
ratio 4 where (T, D) is (8, 64) or (16, 128) and 1 elsewhere, so each format meets both ratios with
both page sizes and both head dims. The ratio only changes how the wrapper lays out query rows (a
code path shared by every format), so the full cross would double the compiles for little; further
tests add GQA 2 and 3 (a group padded to a power of two). Compile budget: the kernel, the reference
and the pool write are jitted with the layout static and the layer traced; XLA compiling the
interpreted kernel dominates, and the module compiles with most XLA optimizations off
(`fast_cpu_compiles`): ~45 s of CPU time for this file.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kv_pages import KVPageLayout, write_kv_tokens
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.paged_attention_ref import paged_attention_reference
from pallas_kernels.paged_prefill_pallas import paged_prefill_attention, plan_prefill, prefill_shape_error
from tests.helpers import check_fp8_p, mixed_page_group

POISON = np.uint32(0x7FC07FC0)  # NaN as one float32 and as two bfloat16 halves
NUM_LAYERS = 2
LAYER = 1                       # read the second layer: the layer offset matters
PAGES_PER_SLAB = 3
P = 6                           # page-table width
S = 8                           # query slots per sequence in the matrix
NUM_KV_HEADS = 2
KV_DTYPES = ("bf16", "float32", "fp8", "int8", "int4", "int4_fp8")
RTOL = ATOL = 2e-5              # float32 outputs, every KV format (see the module docstring)

_write = jax.jit(write_kv_tokens, static_argnums=1)
_ref = jax.jit(paged_attention_reference, static_argnums=2, static_argnames="pages_per_block")
_kernel = jax.jit(paged_prefill_attention, static_argnums=2,
                  static_argnames=("block_q", "pages_per_block", "interpret"))

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")  # tests/conftest.py


def build_pool(rng, layout: KVPageLayout, kv_lens, num_pages_table: int, spare_pages: int = 3,
               slab_remainder: int = 5):
    """A NaN-poisoned pool holding kv_lens[b] random tokens per sequence in every layer (earlier context
    and this chunk alike: the chunk is written before attention runs) and a page table of random
    distinct pages, its padding entries random valid pages. Returns (pool, table) as device arrays."""
    t = layout.tokens_per_page
    kv_lens = np.asarray(kv_lens)
    used = [layout.pages_for(int(n)) for n in kv_lens]
    num_slabs = -(-(sum(used) + spare_pages) // layout.pages_per_slab)
    num_pages = num_slabs * layout.pages_per_slab
    slab_words = layout.pages_per_slab * layout.page_slot_words + slab_remainder  # fits no page
    pool = jnp.full((num_slabs, slab_words), POISON, jnp.uint32)
    order = rng.permutation(num_pages)
    table = rng.integers(0, num_pages, size=(len(kv_lens), num_pages_table)).astype(np.int32)
    start = 0
    for b, u in enumerate(used):
        table[b, :u] = order[start:start + u]
        start += u
    rows = np.repeat(np.arange(len(kv_lens)), kv_lens)
    pos = np.concatenate([np.arange(n) for n in kv_lens])
    n, h, d = len(pos), layout.num_kv_heads, layout.head_dim
    for layer in range(NUM_LAYERS):
        # Scaled normals, so quantization scales vary per token and head.
        k = rng.standard_normal((n, h, d)).astype(np.float32) * rng.uniform(0.5, 2.0, (n, h, 1))
        v = rng.standard_normal((n, h, d)).astype(np.float32) * rng.uniform(0.5, 2.0, (n, h, 1))
        pool = _write(pool, layout, jnp.asarray(table[rows, pos // t]), jnp.asarray(pos % t),
                      jnp.ones(n, bool), jnp.int32(layer), jnp.asarray(k), jnp.asarray(v))
    return pool, jnp.asarray(table)


def chunk_positions(rng, contexts, chunks, seq: int):
    """q_positions [B, seq]: context + i for the chunk's i-th token; padding slots get random
    positions from -1 (sees no key) to past the sequence's end. Also returns the padding mask."""
    contexts, chunks = np.asarray(contexts), np.asarray(chunks)
    slot = np.arange(seq)[None, :]
    real = slot < chunks[:, None]
    pad_pos = rng.integers(-1, contexts[:, None] + chunks[:, None] + 3, size=(len(contexts), seq))
    pad_pos[:, -1] = -1                                  # at least one slot that sees nothing
    return np.where(real, contexts[:, None] + slot, pad_pos).astype(np.int32), ~real


def check(out, ref, rtol=RTOL, atol=ATOL, err_msg=""):
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), f"NaN/inf in the kernel output {err_msg}"
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol, err_msg=err_msg)


def random_q(rng, batch, seq, num_q_heads, head_dim, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal((batch, seq, num_q_heads, head_dim)).astype(np.float32), dtype)


# ---------------------------------------------------------------------------------------------------
# The matrix: every KV format x page size x head_dim, GQA ratios 1 and 4


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tokens_per_page", [8, 16])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_prefill_matches_reference(rng, kv_dtype, tokens_per_page, head_dim):
    t = tokens_per_page
    # GQA 4 where (T, D) is (8, 64) or (16, 128), else 1: every format meets both ratios with both
    # page sizes and both head dims, at half the compiles of the full cross (see the module docstring).
    group = 4 if (t == 8) == (head_dim == 64) else 1
    layout = KVPageLayout(NUM_LAYERS, NUM_KV_HEADS, head_dim, t, kv_dtype, pages_per_slab=PAGES_PER_SLAB)
    ctx = int(rng.integers(1, 3 * t))
    # (context, chunk): fresh prefill of a full chunk; a chunked prefill with a ragged context and
    # chunk; a 1-token chunk ending exactly on a page boundary; a sequence of length 1; one filling
    # the whole table; an empty sequence (every slot padding).
    contexts = [0, ctx, 2 * t - 1, 0, P * t - 5, 0]
    chunks = [S, int(rng.integers(1, S + 1)), 1, 1, 5, 0]
    kv_lens = np.add(contexts, chunks).astype(np.int32)
    pool, table = build_pool(rng, layout, kv_lens, P)
    q_pos, padding = chunk_positions(rng, contexts, chunks, S)
    q = random_q(rng, len(kv_lens), S, NUM_KV_HEADS * group, head_dim)
    args = (q, pool, layout, jnp.int32(LAYER), table, jnp.asarray(q_pos), jnp.asarray(kv_lens))
    # Several query blocks and KV blocks: 2 blocks of 4 tokens (G = 1: 4 rows) or 4 blocks of 2
    # tokens (G = 4: 8 rows); T = 8: KV blocks of 2 pages (3 blocks), T = 16: of 4 pages (the 6-page
    # table padded to 8).
    # int4_fp8 rounds P to e4m3 relative to the running max: it walks the reference's blocks.
    out = _kernel(*args, block_q=4 if group == 1 else 2,
                  pages_per_block=2 if t == 8 or kv_dtype == "int4_fp8" else 4, interpret=True)
    (check_fp8_p if kv_dtype == "int4_fp8" else check)(out, _ref(*args, pages_per_block=2))
    sees_nothing = (q_pos < 0) | (kv_lens[:, None] == 0)
    assert sees_nothing[padding].any()
    assert not np.asarray(out)[sees_nothing].any(), "a row with no keys must give 0"


# ---------------------------------------------------------------------------------------------------
# Further cases (one format each; the format-specific code is covered by the matrix)


def test_default_plan_long_chunks(rng):
    """Default block_q / pages_per_block: 40 query slots in 2 blocks of 32 tokens x 2 heads (64 rows),
    KV blocks of 4 pages over a 12-page table, chunks longer than a KV block."""
    layout = KVPageLayout(NUM_LAYERS, NUM_KV_HEADS, 64, 16, "int8", pages_per_slab=PAGES_PER_SLAB)
    width, seq, group = 12, 40, 2
    assert plan_prefill(layout, seq, group, width) == (32, 4)
    contexts = [0, int(rng.integers(1, 100)), width * 16 - 40]
    chunks = [40, int(rng.integers(20, 41)), 40]
    kv_lens = np.add(contexts, chunks).astype(np.int32)
    pool, table = build_pool(rng, layout, kv_lens, width)
    q_pos, _ = chunk_positions(rng, contexts, chunks, seq)
    q = random_q(rng, 3, seq, NUM_KV_HEADS * group, 64)
    args = (q, pool, layout, jnp.int32(LAYER), table, jnp.asarray(q_pos), jnp.asarray(kv_lens))
    check(_kernel(*args, interpret=True), _ref(*args, pages_per_block=4))


def test_layers_of_a_mixed_format_page(rng):
    """The int4_fp8 layers of a page whose first layer is bf16 (KVPageLayout.layer_groups)."""
    layout = mixed_page_group(NUM_LAYERS, NUM_KV_HEADS, 64, 8, "int4_fp8", pages_per_slab=PAGES_PER_SLAB)
    contexts, chunks = [0, 21, 40], [6, 5, 3]
    kv_lens = np.add(contexts, chunks).astype(np.int32)
    pool, table = build_pool(rng, layout, kv_lens, P)
    q_pos, _ = chunk_positions(rng, contexts, chunks, 6)
    args = (random_q(rng, 3, 6, NUM_KV_HEADS * 2, 64), pool, layout, jnp.int32(LAYER), table,
            jnp.asarray(q_pos), jnp.asarray(kv_lens))
    check_fp8_p(_kernel(*args, block_q=2, pages_per_block=2, interpret=True), _ref(*args, pages_per_block=2))


def test_bfloat16_queries_padded_page_stride(rng):
    """bfloat16 q (as the model passes it; the output is bfloat16, computed in float32 inside), with
    pages padded to a common slot size (page_stride_words > page_words)."""
    base = KVPageLayout(NUM_LAYERS, NUM_KV_HEADS, 128, 8, "fp8", pages_per_slab=PAGES_PER_SLAB)
    layout = KVPageLayout(NUM_LAYERS, NUM_KV_HEADS, 128, 8, "fp8", pages_per_slab=PAGES_PER_SLAB,
                          page_stride_words=base.page_words + 7)
    contexts, chunks = [0, 13, 30], [6, 6, 2]
    kv_lens = np.add(contexts, chunks).astype(np.int32)
    pool, table = build_pool(rng, layout, kv_lens, P)
    q_pos, _ = chunk_positions(rng, contexts, chunks, 6)
    q = random_q(rng, 3, 6, NUM_KV_HEADS * 3, 128, jnp.bfloat16)        # GQA 3: group padded to 4
    args = (q, pool, layout, jnp.int32(LAYER), table, jnp.asarray(q_pos), jnp.asarray(kv_lens))
    out = _kernel(*args, block_q=2, pages_per_block=2, interpret=True)
    ref = _ref(*args, pages_per_block=2)
    assert out.dtype == jnp.bfloat16
    scale = float(np.abs(np.asarray(ref, np.float32)).max())
    check(out, ref, rtol=2.0 ** -7, atol=2.0 ** -7 * scale)


# ---------------------------------------------------------------------------------------------------
# Dispatcher and the compiled path's shape rules


@functools.lru_cache(maxsize=None)
def _dispatch(implementation):
    return jax.jit(functools.partial(paged_attention, kernels=implementation), static_argnums=2)


def test_dispatcher_routes_prefill_to_the_kernel(rng):
    layout = KVPageLayout(NUM_LAYERS, NUM_KV_HEADS, 64, 8, "bf16", pages_per_slab=PAGES_PER_SLAB)
    contexts, chunks = [0, 11], [4, 3]
    kv_lens = np.add(contexts, chunks).astype(np.int32)
    pool, table = build_pool(rng, layout, kv_lens, P)
    q_pos, _ = chunk_positions(rng, contexts, chunks, 4)
    q = random_q(rng, 2, 4, NUM_KV_HEADS * 2, 64)
    args = (q, pool, layout, jnp.int32(LAYER), table, jnp.asarray(q_pos), jnp.asarray(kv_lens))
    got = np.asarray(_dispatch("interpret")(*args))
    np.testing.assert_array_equal(got, np.asarray(_kernel(*args, interpret=True)))
    check(got, _ref(*args, pages_per_block=6))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="interpret"):
            paged_attention(*args, kernels="pallas")


def test_prefill_shape_error():
    for t in (8, 16):
        for d in (64, 128):
            layout = KVPageLayout(NUM_LAYERS, 2, d, t, "int4")
            for group in (1, 2, 3, 4, 8):
                for seq in (1, 7, 300):
                    block_q, ppb = plan_prefill(layout, seq, group, 64)
                    rows = block_q * (1 << (group - 1).bit_length())
                    assert prefill_shape_error(layout, rows, ppb) is None, (t, d, group, seq)
    layout = KVPageLayout(NUM_LAYERS, 2, 64, 8, "fp8")
    assert "rows" in prefill_shape_error(layout, 8, 2)              # tl.dot needs M >= 16
    assert "KV block" in prefill_shape_error(layout, 16, 1)         # 8 tokens
    assert "KV block" in prefill_shape_error(layout, 16, 3)         # 24 tokens
    assert "head_dim" in prefill_shape_error(KVPageLayout(NUM_LAYERS, 2, 96, 8, "fp8"), 16, 2)
    # The compiled path refuses before lowering (so this holds on any backend).
    q = jnp.zeros((1, 4, 2, 64), jnp.float32)
    pool = jnp.zeros((1, layout.page_words), jnp.uint32)
    with pytest.raises(ValueError, match="compiled Pallas prefill attention: .*rows"):
        paged_prefill_attention(q, pool, layout, 0, jnp.zeros((1, 2), jnp.int32),
                                jnp.zeros((1, 4), jnp.int32), jnp.ones((1,), jnp.int32), block_q=4)
