"""The Mosaic GPU FP8 prefill attention over int4_fp8 pages (pallas_kernels/paged_prefill_mgpu.py),
under `plgpu.InterpretGPUParams()` on CPU, against the pure-XLA reference on the same pool, and its
route through the dispatcher.

Pools, page tables and query batches are tests/test_paged_prefill_pallas.py's: fresh random inputs
every run, NaN-poisoned pools (free pages, unwritten slots, padding table entries, the slab
remainder), sequences mixing a fresh prefill, chunked prefills with earlier context, a 1-token chunk
ending on a page boundary, a sequence of length 1, one filling the whole table and an empty one;
padding query slots at random positions, some seeing no key (exactly 0). The slab remainder is a
whole number of head rows here, as real slabs are (the kernel's TMA view needs it; other pools go
to the Triton kernel).

Tolerance: the kernel rounds the reference's values (e4m3 queries, int4 codes, e4m3 P with V's
scales and the block's power of two, the reference's KV blocks of 8 pages in its order), so the two
differ only in float32 summation order, as the Triton kernel does: rtol = atol = 2e-5 (see that
file's docstring for the bound), except where that order moves an unrounded P value across an e4m3
rounding boundary (`check_fp8_p`: 99% tight, none past one flip's bound).

Matrix: page size 8/16 x head_dim 64/128 (4 KV heads), GQA 4 where (T, D) is (8, 64) or (16, 128)
and 1 elsewhere;
further tests add GQA 3 (a group padded to 4), bfloat16 queries, a later layer group of a
mixed-format page (a word offset inside the slot), the dispatcher's routing and the shape rules.
Compiled for H100, tests/test_compile_check.py checks its FP8 wgmma and TMA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.kv_pages import KVPageLayout
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.paged_prefill_mgpu import paged_prefill_attention_mgpu, prefill_mgpu_shape_error
from tests.helpers import check_fp8_p, mixed_page_group
from tests.test_paged_prefill_pallas import LAYER, NUM_KV_HEADS, NUM_LAYERS, _ref, build_pool
from tests.test_paged_prefill_pallas import chunk_positions
from tests.test_paged_prefill_pallas import _kernel as _triton
from tests.test_paged_prefill_pallas import random_q

P = 16          # page-table width: two KV blocks of 8 pages
S = 40          # query slots per sequence
PAGES_PER_SLAB = 3

_kernel = jax.jit(paged_prefill_attention_mgpu, static_argnums=2, static_argnames="interpret")

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")  # tests/conftest.py


def _pool(rng, layout, kv_lens, width=P):
    """build_pool with a slab remainder of two head rows (a TMA view of the slab needs whole rows)."""
    return build_pool(rng, layout, kv_lens, width, slab_remainder=2 * layout.head_words)


def _batch(rng, t: int):
    """(contexts, chunks) of the six kinds of sequence in the module docstring."""
    contexts = [0, int(rng.integers(1, 3 * t)), 2 * t - 1, 0, P * t - 5, 0]
    chunks = [S, int(rng.integers(1, S + 1)), 1, 1, 5, 0]
    return contexts, chunks


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tokens_per_page", [8, 16])
def test_prefill_matches_reference(rng, tokens_per_page, head_dim):
    t = tokens_per_page
    group = 4 if (t == 8) == (head_dim == 64) else 1
    # 4 KV heads: two words of scales a token, so a chunk is whole head rows at (8, 128) too.
    layout = KVPageLayout(NUM_LAYERS, 4, head_dim, t, "int4_fp8", pages_per_slab=PAGES_PER_SLAB)
    contexts, chunks = _batch(rng, t)
    kv_lens = np.add(contexts, chunks).astype(np.int32)
    pool, table = _pool(rng, layout, kv_lens)
    q_pos, padding = chunk_positions(rng, contexts, chunks, S)
    q = random_q(rng, len(kv_lens), S, 4 * group, head_dim)
    args = (q, pool, layout, jnp.int32(LAYER), table, jnp.asarray(q_pos), jnp.asarray(kv_lens))
    # G = 1: one program of 64 rows per sequence and head; G = 4: three (16 tokens x 4 heads each).
    out = _kernel(*args, interpret=True)
    check_fp8_p(out, _ref(*args))
    sees_nothing = (q_pos < 0) | (kv_lens[:, None] == 0)
    assert sees_nothing[padding].any()
    assert not np.asarray(out)[sees_nothing].any(), "a row with no keys must give 0"


def test_group_of_three_bfloat16_queries(rng):
    """GQA 3 (padded to 4 rows a token) with bfloat16 queries, as the model passes them."""
    layout = KVPageLayout(NUM_LAYERS, NUM_KV_HEADS, 64, 16, "int4_fp8", pages_per_slab=PAGES_PER_SLAB)
    contexts, chunks = [0, 70, 3], [S, 9, 30]
    kv_lens = np.add(contexts, chunks).astype(np.int32)
    pool, table = _pool(rng, layout, kv_lens)
    q_pos, _ = chunk_positions(rng, contexts, chunks, S)
    q = random_q(rng, 3, S, NUM_KV_HEADS * 3, 64, jnp.bfloat16)
    args = (q, pool, layout, jnp.int32(LAYER), table, jnp.asarray(q_pos), jnp.asarray(kv_lens))
    out = _kernel(*args, interpret=True)
    assert out.dtype == jnp.bfloat16
    ref = np.asarray(_ref(*args), np.float32)
    check_fp8_p(out, ref, rtol=2.0 ** -7, atol=2.0 ** -7 * np.abs(ref).max())


def test_layers_of_a_mixed_format_page(rng):
    """The int4_fp8 layers of a page whose first layer is bf16: a word offset inside each page slot."""
    layout = mixed_page_group(NUM_LAYERS, NUM_KV_HEADS, 64, 8, "int4_fp8", pages_per_slab=PAGES_PER_SLAB)
    assert layout.first_word > 0
    contexts, chunks = [0, 21, 90], [6, 5, 3]
    kv_lens = np.add(contexts, chunks).astype(np.int32)
    pool, table = _pool(rng, layout, kv_lens)
    q_pos, _ = chunk_positions(rng, contexts, chunks, 6)
    args = (random_q(rng, 3, 6, NUM_KV_HEADS * 2, 64), pool, layout, jnp.int32(LAYER), table,
            jnp.asarray(q_pos), jnp.asarray(kv_lens))
    check_fp8_p(_kernel(*args, interpret=True), _ref(*args))


def test_the_kv_pipeline_has_no_race(rng):
    """Three KV blocks through the two buffers (each refilled while the other computes), with the
    interpreter's race detector on."""
    layout = KVPageLayout(NUM_LAYERS, NUM_KV_HEADS, 64, 8, "int4_fp8", pages_per_slab=PAGES_PER_SLAB)
    kv_lens = np.array([150, 70], np.int32)
    pool, table = _pool(rng, layout, kv_lens, width=24)
    q_pos = np.stack([np.arange(n - 16, n) for n in kv_lens]).astype(np.int32)
    args = (random_q(rng, 2, 16, NUM_KV_HEADS * 4, 64), pool, layout, LAYER, table, jnp.asarray(q_pos),
            jnp.asarray(kv_lens))
    out = paged_prefill_attention_mgpu(*args, interpret=plgpu.InterpretGPUParams(detect_races=True))
    assert not get_races().races_found
    check_fp8_p(out, _ref(*args))


@functools.lru_cache(maxsize=None)
def _dispatch():
    return jax.jit(functools.partial(paged_attention, kernels="interpret"), static_argnums=2)


def _lowered_kernels(args) -> str:
    """The text of the dispatcher's program for these arguments (which kernels it calls)."""
    return str(jax.make_jaxpr(functools.partial(paged_attention, kernels="interpret"), static_argnums=2)(*args))


def test_dispatcher_routes_int4_fp8_prefill_here(rng):
    """int4_fp8 prefill goes to this kernel; a pool whose slabs are not whole head rows goes to the
    Triton kernel, with the same result."""
    layout = KVPageLayout(NUM_LAYERS, NUM_KV_HEADS, 64, 16, "int4_fp8", pages_per_slab=PAGES_PER_SLAB)
    contexts, chunks = [0, 40], [8, 3]
    kv_lens = np.add(contexts, chunks).astype(np.int32)
    pool, table = _pool(rng, layout, kv_lens, width=8)
    q_pos, _ = chunk_positions(rng, contexts, chunks, 8)
    args = (random_q(rng, 2, 8, NUM_KV_HEADS * 2, 64), pool, layout, jnp.int32(LAYER), table,
            jnp.asarray(q_pos), jnp.asarray(kv_lens))
    assert "paged_prefill_attention_int4_fp8_mgpu" in _lowered_kernels(args)
    got = _dispatch()(*args)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_kernel(*args, interpret=True)))
    check_fp8_p(got, _ref(*args))
    odd = (args[0], jnp.pad(pool, ((0, 0), (0, 3))), *args[2:])   # slabs 3 words past whole rows
    text = _lowered_kernels(odd)
    assert "mgpu" not in text and "paged_prefill_attention_int4_fp8" in text
    np.testing.assert_array_equal(np.asarray(_dispatch()(*odd)), np.asarray(_triton(*odd, interpret=True)))


def test_shape_error():
    layout = KVPageLayout(NUM_LAYERS, 2, 64, 16, "int4_fp8")
    slab = (4, 8 * layout.page_words)
    assert prefill_mgpu_shape_error(layout, slab, 16) is None
    assert prefill_mgpu_shape_error(KVPageLayout(NUM_LAYERS, 4, 128, 8, "int4_fp8"), slab, 8) is None
    assert "int4_fp8" in prefill_mgpu_shape_error(KVPageLayout(NUM_LAYERS, 2, 64, 16, "int4"), slab, 16)
    assert "head_dim" in prefill_mgpu_shape_error(KVPageLayout(NUM_LAYERS, 2, 32, 16, "int4_fp8"), slab, 16)
    assert "multiple of 8" in prefill_mgpu_shape_error(KVPageLayout(NUM_LAYERS, 2, 64, 4, "int4_fp8"), slab, 16)
    assert "wgmma K" in prefill_mgpu_shape_error(layout, slab, 1)          # a 16-token block
    assert "page table width" in prefill_mgpu_shape_error(layout, slab, 12)
    assert "slab" in prefill_mgpu_shape_error(layout, (4, slab[1] + 3), 16)
    # 8 tokens x 1 word of scales next to 16-word head rows (D = 128, 2 heads): not whole rows.
    assert "chunk" in prefill_mgpu_shape_error(KVPageLayout(NUM_LAYERS, 2, 128, 8, "int4_fp8"), slab, 8)
    q = jnp.zeros((1, 4, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="Mosaic GPU prefill attention: .*slab"):
        paged_prefill_attention_mgpu(q, jnp.zeros((1, slab[1] + 3), jnp.uint32), layout, 0,
                                     jnp.zeros((1, 16), jnp.int32), jnp.zeros((1, 4), jnp.int32),
                                     jnp.ones((1,), jnp.int32))
