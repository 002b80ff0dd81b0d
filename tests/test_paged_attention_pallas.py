"""Tests for the Pallas decode attention kernel over the shared KV pool (pallas_kernels/
paged_attention_pallas.py) and its dispatcher (pallas_kernels/paged_attention.py), in interpret mode,
against the pure-XLA reference `paged_attention_reference`.

Inputs are fresh random numbers every run (no fixed seed; a failure prints the generator's seed so it
can be replayed). Every pool starts out filled with a NaN bit pattern, so any word the kernel should
not depend on (free pages, the tail of a partly filled page, the pages that padding table entries
point at, the slab remainder) poisons the result if it leaks in. Page tables are random permutations
of the pool's pages (pages of one sequence straddle slabs), and table entries past a sequence's pages
point at random valid pages, free (NaN) ones included. Plain `interpret=True` fills the kernel's
outputs with NaN before the grid runs, so an output tile the kernel forgets to write shows up as NaN.

Strict interpreter: jax 0.11.2's stricter interpreters do not fit this kernel. The TPU simulator
(`pltpu.InterpretParams`: out-of-bounds reads raise, uninitialised memory is NaN) rejects gathers from
refs ("Advanced indexers are not supported on TPU"), which is how a Triton-style kernel addresses pages
(pointer tensors); the Mosaic GPU interpreter (`InterpretGPUParams`) runs only `plgpu.kernel`
programs. Plain interpret mode clamps out-of-range reads, so addressing is checked by the NaN poison
(a read of any wrong word of a live page, or of any unwritten word, gives NaN or a wrong value).

Tolerances. The kernel and the reference dequantize identically (the same bfloat16 scales/zeros, the
same float32 `x * s (+ z)`; fp8/int8/int4 codes and bf16 values convert exactly to float32; int4_fp8's
e4m3 queries and P through the same `fp8_attention` functions, over the same KV blocks), so the
two differ only in float32 summation order: scores are sums of D <= 128 products (relative error
<= D * 2^-24 ~ 8e-6 of the sum of |products|, far less in practice), and exp/normalisation add a few
ulps. Outputs are convex combinations of V values of magnitude ~1-4, so rtol = atol = 2e-5 for float32
outputs holds for every KV format alike (observed differences are ~3e-7). For bfloat16 outputs both
sides round the same float32 result to bfloat16, which can differ by one bfloat16 ulp when the float32
values straddle a rounding boundary: rtol = 2^-7, atol = 2^-7 * max|out|.

Compile budget: the kernel, the reference and the pool write are jitted with the layout static and the
layer traced; shapes are fixed per parametrization (B = 5 rows, P = 6 pages); the matrix's two GQA
ratios share one pool. XLA compiling the
interpreted kernel dominates (~1 s a case); the module compiles with most XLA optimizations off, which
brings the file to ~70 s on a busy 2-core CPU machine.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels.kv_pages import KVPageLayout, write_kv_tokens
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.paged_attention_pallas import decode_words, paged_decode_attention, plan_splits
from pallas_kernels.paged_attention_ref import paged_attention_reference
from tests.helpers import check_fp8_p, mixed_page_group

POISON = np.uint32(0x7FC07FC0)  # NaN as one float32 and as two bfloat16 halves
NUM_LAYERS = 2
LAYER = 1                       # read the second layer: the layer offset matters
PAGES_PER_SLAB = 3
P = 6                           # page-table width
KV_DTYPES = ("bf16", "float32", "fp8", "int8", "int4", "int4_fp8")
RTOL = ATOL = 2e-5              # float32 outputs, every KV format (see the module docstring)

_write = jax.jit(write_kv_tokens, static_argnums=1)
_ref = jax.jit(paged_attention_reference, static_argnums=2, static_argnames="pages_per_block")
_kernel = jax.jit(paged_decode_attention, static_argnums=2,
                  static_argnames=("pages_per_block", "num_splits", "interpret"))


pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")  # tests/conftest.py


def build_case(rng, layout: KVPageLayout, lengths, *, num_pages_table: int = P, q_dtype=jnp.float32,
               group: int = 1, spare_pages: int = 4):
    """A NaN-poisoned pool holding `lengths[b]` random tokens per sequence in both layers, a page table
    of random distinct pages (padding entries: random valid pages), and random queries at position
    kv_len - 1. Returns (q, pool, page_table, q_positions, kv_lens) as device arrays."""
    t = layout.tokens_per_page
    lengths = np.asarray(lengths, np.int32)
    b = len(lengths)
    used = [layout.pages_for(int(n)) for n in lengths]
    total_pages = sum(used) + spare_pages
    num_slabs = -(-total_pages // layout.pages_per_slab)
    num_pages = num_slabs * layout.pages_per_slab
    slab_words = layout.pages_per_slab * layout.page_slot_words + 5  # a remainder that fits no page
    pool = jnp.full((num_slabs, slab_words), POISON, jnp.uint32)

    order = rng.permutation(num_pages)
    table = rng.integers(0, num_pages, size=(b, num_pages_table)).astype(np.int32)  # padding entries
    start = 0
    for i, u in enumerate(used):
        table[i, :u] = order[start:start + u]
        start += u

    n = int(lengths.sum()) or 1
    rows = np.repeat(np.arange(b), lengths)
    pos = np.concatenate([np.arange(m) for m in lengths]) if lengths.sum() else np.zeros(0, np.int64)
    pages = np.zeros(n, np.int32)
    slots = np.zeros(n, np.int32)
    valid = np.zeros(n, bool)
    pages[:len(pos)] = table[rows, pos // t]
    slots[:len(pos)] = pos % t
    valid[:len(pos)] = True
    h, d = layout.num_kv_heads, layout.head_dim
    for layer in range(NUM_LAYERS):
        # Scaled normals with an occasional large value, so quantization scales vary per token.
        k = rng.standard_normal((n, h, d)).astype(np.float32) * rng.uniform(0.5, 2.0, (n, h, 1))
        v = rng.standard_normal((n, h, d)).astype(np.float32) * rng.uniform(0.5, 2.0, (n, h, 1))
        pool = _write(pool, layout, jnp.asarray(pages), jnp.asarray(slots), jnp.asarray(valid),
                      jnp.int32(layer), jnp.asarray(k), jnp.asarray(v))
    q = jnp.asarray(rng.standard_normal((b, 1, h * group, d)).astype(np.float32), q_dtype)
    q_positions = jnp.asarray(np.maximum(lengths - 1, 0)[:, None], jnp.int32)
    return q, pool, jnp.asarray(table), q_positions, jnp.asarray(lengths)


def check(out, ref, rtol=RTOL, atol=ATOL, err_msg=""):
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), f"NaN/inf in the kernel output {err_msg}"
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol, err_msg=err_msg)


# ---------------------------------------------------------------------------------------------------
# The matrix: every KV format x page size x GQA ratio x head_dim


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tokens_per_page", [8, 16])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_decode_matches_reference(rng, kv_dtype, tokens_per_page, head_dim):
    """GQA ratios 1 and 4 run on the same pool (the pool does not depend on them; saves compiles)."""
    t = tokens_per_page
    layout = KVPageLayout(NUM_LAYERS, 2, head_dim, t, kv_dtype, pages_per_slab=PAGES_PER_SLAB)
    # 1 token, exactly one page, exactly three pages, a random ragged length, and an empty (padding)
    # row, whose output must be 0.
    lengths = [1, t, 3 * t, int(rng.integers(2, P * t + 1)), 0]
    _, pool, table, q_pos, kv_lens = build_case(rng, layout, lengths)
    # Several splits either way: 3 blocks of 2 pages in 2 splits, or 6 blocks of 1 page in 3 splits.
    # int4_fp8 rounds P to e4m3 relative to the running max, so it matches the reference only when
    # it walks the same blocks in the same order: 3 blocks of 2 pages, one split (the split/merge
    # path does not depend on the format and is checked with the others).
    ppb, splits = (2, 1) if kv_dtype == "int4_fp8" else (2, 2) if t == 8 else (1, 4)
    assert plan_splits(layout, P, ppb, splits)[2] > 1 or kv_dtype == "int4_fp8"
    for group in (1, 4):
        q = jnp.asarray(rng.standard_normal((len(lengths), 1, 2 * group, head_dim)).astype(np.float32))
        out = _kernel(q, pool, layout, jnp.int32(LAYER), table, q_pos, kv_lens, pages_per_block=ppb,
                      num_splits=splits, interpret=True)
        ref = _ref(q, pool, layout, jnp.int32(LAYER), table, q_pos, kv_lens, pages_per_block=2)
        if kv_dtype == "int4_fp8":
            check_fp8_p(out, ref)
        else:
            check(out, ref, err_msg=f"GQA ratio {group}")
        assert not np.asarray(out[-1]).any(), f"GQA ratio {group}: a row with no keys must give 0"


# ---------------------------------------------------------------------------------------------------
# Further cases (one format each; the format-specific code is covered by the matrix)


def test_default_plan_long_table(rng):
    """Default pages_per_block / num_splits on a wider table: 8 pages per block, several splits,
    and a sequence filling the whole table."""
    layout = KVPageLayout(NUM_LAYERS, 2, 64, 8, "int4", pages_per_slab=PAGES_PER_SLAB)
    width = 24
    assert plan_splits(layout, width) == (8, 1, 3)
    lengths = [width * 8, int(rng.integers(1, width * 8)), 65]
    q, pool, table, q_pos, kv_lens = build_case(rng, layout, lengths, num_pages_table=width, group=2)
    out = _kernel(q, pool, layout, jnp.int32(LAYER), table, q_pos, kv_lens, interpret=True)
    ref = _ref(q, pool, layout, jnp.int32(LAYER), table, q_pos, kv_lens, pages_per_block=8)
    check(out, ref)


def test_query_position_masks_later_tokens(rng):
    """A query at a position before the end of the cache sees only keys at positions <= its own."""
    layout = KVPageLayout(NUM_LAYERS, 2, 64, 8, "int8", pages_per_slab=PAGES_PER_SLAB)
    q, pool, table, _, kv_lens = build_case(rng, layout, [40, 17, 9], group=4)
    q_pos = jnp.asarray([[20], [16], [0]], jnp.int32)
    out = _kernel(q, pool, layout, jnp.int32(LAYER), table, q_pos, kv_lens, pages_per_block=1,
                  num_splits=3, interpret=True)
    ref = _ref(q, pool, layout, jnp.int32(LAYER), table, q_pos, kv_lens, pages_per_block=2)
    check(out, ref)


def test_padded_page_stride(rng):
    """Pages padded to a common slot size (page_stride_words > page_words)."""
    base = KVPageLayout(NUM_LAYERS, 2, 64, 16, "fp8", pages_per_slab=PAGES_PER_SLAB)
    layout = KVPageLayout(NUM_LAYERS, 2, 64, 16, "fp8", pages_per_slab=PAGES_PER_SLAB,
                          page_stride_words=base.page_words + 7)
    q, pool, table, q_pos, kv_lens = build_case(rng, layout, [33, 96, 1], group=1)
    out = _kernel(q, pool, layout, jnp.int32(LAYER), table, q_pos, kv_lens, pages_per_block=2,
                  num_splits=2, interpret=True)
    ref = _ref(q, pool, layout, jnp.int32(LAYER), table, q_pos, kv_lens, pages_per_block=2)
    check(out, ref)


def test_layers_of_a_mixed_format_page(rng):
    """The int4 layers of a page whose first layer is bf16 (KVPageLayout.layer_groups)."""
    layout = mixed_page_group(NUM_LAYERS, 2, 64, 16, "int4", pages_per_slab=PAGES_PER_SLAB)
    q, pool, table, q_pos, kv_lens = build_case(rng, layout, [33, 70, 5], group=2)
    out = _kernel(q, pool, layout, jnp.int32(LAYER), table, q_pos, kv_lens, pages_per_block=2,
                  num_splits=2, interpret=True)
    check(out, _ref(q, pool, layout, jnp.int32(LAYER), table, q_pos, kv_lens, pages_per_block=2))


def test_bfloat16_queries(rng):
    """bfloat16 q (as the model passes it): the output is bfloat16, computed in float32 inside."""
    layout = KVPageLayout(NUM_LAYERS, 4, 128, 16, "bf16", pages_per_slab=PAGES_PER_SLAB)
    q, pool, table, q_pos, kv_lens = build_case(rng, layout, [50, 16, 3], q_dtype=jnp.bfloat16, group=2)
    out = _kernel(q, pool, layout, jnp.int32(LAYER), table, q_pos, kv_lens, pages_per_block=1,
                  num_splits=4, interpret=True)
    ref = _ref(q, pool, layout, jnp.int32(LAYER), table, q_pos, kv_lens, pages_per_block=2)
    assert out.dtype == jnp.bfloat16
    scale = float(np.abs(np.asarray(ref, np.float32)).max())
    check(out, ref, rtol=2.0 ** -7, atol=2.0 ** -7 * scale)


# ---------------------------------------------------------------------------------------------------
# In-register decoding, exhaustively over the codes (plain jnp, no kernel)


def _words(byte_values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(byte_values.astype(np.uint8)).view("<u4")


def test_decode_words_fp8_int8_all_codes():
    codes = np.arange(256, dtype=np.uint8)
    words = jnp.asarray(_words(codes))
    fp8 = np.stack([np.asarray(p) for p in decode_words(words, "fp8")], axis=-1).reshape(-1)
    want = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    finite = np.isfinite(want)  # 0x7F / 0xFF are NaN codes (never written: the quantizer saturates)
    assert finite.sum() == 254
    np.testing.assert_array_equal(fp8[finite], want[finite])
    i8 = np.stack([np.asarray(p) for p in decode_words(words, "int8")], axis=-1).reshape(-1)
    np.testing.assert_array_equal(i8, codes.view(np.int8).astype(np.float32))


def test_decode_words_int4_bf16_f32():
    rng = np.random.default_rng()
    nibbles = rng.integers(0, 16, size=64)
    packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)  # pack_int4's convention
    planes = decode_words(jnp.asarray(_words(packed)), "int4")
    np.testing.assert_array_equal(np.stack([np.asarray(p) for p in planes], -1).reshape(-1), nibbles)
    bf = rng.standard_normal(64).astype(ml_dtypes.bfloat16)
    planes = decode_words(jnp.asarray(np.ascontiguousarray(bf).view("<u4")), "bf16")
    np.testing.assert_array_equal(np.stack([np.asarray(p) for p in planes], -1).reshape(-1),
                                  bf.astype(np.float32))
    f = rng.standard_normal(16).astype(np.float32)
    [plane] = decode_words(jnp.asarray(f.view("<u4")), "float32")
    np.testing.assert_array_equal(np.asarray(plane), f)


# ---------------------------------------------------------------------------------------------------
# Dispatcher


@functools.lru_cache(maxsize=None)
def _dispatch(implementation):
    return jax.jit(functools.partial(paged_attention, kernels=implementation), static_argnums=2)


def test_dispatcher_decode_and_prefill(rng):
    layout = KVPageLayout(NUM_LAYERS, 2, 64, 8, "int4", pages_per_slab=PAGES_PER_SLAB)
    q, pool, table, q_pos, kv_lens = build_case(rng, layout, [12, 30, 1], group=2)
    ref = _ref(q, pool, layout, jnp.int32(LAYER), table, q_pos, kv_lens, pages_per_block=2)
    out = _dispatch("interpret")(q, pool, layout, jnp.int32(LAYER), table, q_pos, kv_lens)
    check(out, ref)
    check(_dispatch("xla")(q, pool, layout, jnp.int32(LAYER), table, q_pos, kv_lens), ref)
    # Prefill (S > 1): "xla" is the reference itself, "interpret" the prefill kernel (tested in
    # tests/test_paged_prefill_pallas.py); "pallas" off the GPU is rejected (next test).
    s = 3
    qs = jnp.asarray(rng.standard_normal((3, s, 4, 64)).astype(np.float32))
    q_pos_s = jnp.maximum(kv_lens[:, None] - s + jnp.arange(s)[None, :], 0).astype(jnp.int32)
    want = np.asarray(_ref(qs, pool, layout, jnp.int32(LAYER), table, q_pos_s, kv_lens, pages_per_block=6))
    got = _dispatch("xla")(qs, pool, layout, jnp.int32(LAYER), table, q_pos_s, kv_lens)
    np.testing.assert_array_equal(np.asarray(got), want)
    check(_dispatch("interpret")(qs, pool, layout, jnp.int32(LAYER), table, q_pos_s, kv_lens), want)


def test_dispatcher_rejects_unknown_and_compiled_on_cpu(rng):
    layout = KVPageLayout(NUM_LAYERS, 2, 64, 8, "bf16", pages_per_slab=PAGES_PER_SLAB)
    q, pool, table, q_pos, kv_lens = build_case(rng, layout, [3], group=1)
    with pytest.raises(ValueError, match="xla.*pallas.*interpret"):
        paged_attention(q, pool, layout, LAYER, table, q_pos, kv_lens, kernels="triton")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="interpret"):
            paged_attention(q, pool, layout, LAYER, table, q_pos, kv_lens, kernels="pallas")
