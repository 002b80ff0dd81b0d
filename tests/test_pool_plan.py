"""Tests for serving/kv/pool_plan.py and slab_geometry.choose_slab_bytes: slab size, per-model geometry, and
the static / single-page-size baselines."""

from __future__ import annotations

from math import lcm

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.kv_pages import KVPageLayout, write_kv_tokens
from serving.kv.slab_geometry import EXACT_SLAB_SPAN, MAX_SLAB_WASTE, choose_slab_bytes, slab_bytes_for, slab_waste
from serving.kv.pool_plan import ModelPages, plan_pool


def candidates(pages: list[int], lo: int) -> list[int]:
    """Every slab size choose_slab_bytes may pick: multiples of a page size in [lo, span x lo]."""
    return sorted({k * p for p in pages for k in range(-(-lo // p), EXACT_SLAB_SPAN * lo // p + 1)})


@settings(max_examples=200, deadline=None)
@given(pages=st.lists(st.integers(1, 3000).map(lambda w: 4 * w), min_size=1, max_size=4),
       target=st.integers(4, 1 << 16))
def test_choose_slab_bytes(pages, target):
    s = choose_slab_bytes(pages, target)
    lo = -(-max(target, max(pages)) // 4) * 4
    assert s >= lo and s % 4 == 0
    exact = slab_bytes_for(pages, lo)
    if exact <= EXACT_SLAB_SPAN * lo:  # an exact tiling close enough to the target wins
        assert s == exact and slab_waste(s, pages) == 0
        return
    cands = candidates(pages, lo)
    assert s in cands
    meeting = [c for c in cands if slab_waste(c, pages) <= MAX_SLAB_WASTE]
    if meeting:  # the smallest slab within the waste bound
        assert s == meeting[0]
    else:        # otherwise the least waste
        assert slab_waste(s, pages) == min(slab_waste(c, pages) for c in cands)
    # The documented bound: a model's tail is less than one of its pages.
    for p in pages:
        assert s % p < p


def test_choose_slab_bytes_llama8b_bf16_with_int4_kv():
    bf16 = KVPageLayout(32, 8, 128, 16, "bf16").page_bytes
    int4 = KVPageLayout(32, 8, 128, 16, "int4").page_bytes
    assert (bf16, int4) == (2 << 20, 557056)   # int4 pages carry a scale and a zero per head per token
    fineserve = 2 * lcm(bf16, int4)              # FineServe's rule: 68 MiB slabs
    s = choose_slab_bytes([bf16, int4])
    assert s == 8 << 20 and s < fineserve / 8
    assert slab_waste(s, [bf16, int4]) < 0.005


def test_choose_slab_bytes_rejects_bad_pages():
    for bad in ([], [0], [6], [4096, -4]):
        with pytest.raises(ValueError):
            choose_slab_bytes(bad)


def layouts():
    return {"bf16": KVPageLayout(4, 2, 64, 16, "bf16"),
            "int8": KVPageLayout(6, 2, 64, 16, "int8"),
            "int4": KVPageLayout(3, 1, 32, 16, "int4")}


def test_plan_slab_mode():
    ls = layouts()
    plan = plan_pool({n: ModelPages(l) for n, l in ls.items()}, pool_bytes=64 << 20)
    assert plan.slab_bytes == choose_slab_bytes([l.page_bytes for l in ls.values()])
    assert plan.num_slabs == (64 << 20) // plan.slab_bytes
    for name, layout in plan.layouts.items():
        assert layout.page_slot_bytes == ls[name].page_bytes
        assert layout.pages_per_slab == plan.slab_bytes // ls[name].page_bytes
        assert plan.limits[name] == (0, None)
    pool = plan.build()
    assert pool.words.shape == (plan.num_slabs, plan.slab_bytes // 4)
    for name, layout in plan.layouts.items():
        assert pool.allocator.pages_per_slab(name) == layout.pages_per_slab


def test_plan_reservations_and_caps_round_to_slabs():
    ls = layouts()
    probe = plan_pool({n: ModelPages(l) for n, l in ls.items()}, pool_bytes=64 << 20)
    s = probe.slab_bytes
    plan = plan_pool({"bf16": ModelPages(ls["bf16"], reserve_bytes=s + 1),
                      "int8": ModelPages(ls["int8"], max_bytes=3 * s - 1),
                      "int4": ModelPages(ls["int4"])}, pool_bytes=64 << 20)
    assert plan.limits == {"bf16": (2, None), "int8": (0, 2), "int4": (0, None)}
    alloc = plan.build().allocator
    assert alloc.capacity_pages("int8") == 2 * plan.layouts["int8"].pages_per_slab
    assert alloc.capacity_pages("int4") == (plan.num_slabs - 2) * plan.layouts["int4"].pages_per_slab


def test_plan_static_partition():
    ls = layouts()
    plan = plan_pool({n: ModelPages(l) for n, l in ls.items()}, pool_bytes=64 << 20, mode="static")
    slabs = [lo for lo, hi in plan.limits.values()]
    assert all(lo == hi for lo, hi in plan.limits.values())
    assert sum(slabs) == plan.num_slabs and max(slabs) - min(slabs) <= 1
    weighted = plan_pool({"bf16": ModelPages(ls["bf16"], share=3), "int8": ModelPages(ls["int8"], share=1),
                          "int4": ModelPages(ls["int4"], share=1)}, pool_bytes=64 << 20, mode="static")
    n = weighted.num_slabs
    assert sum(lo for lo, _ in weighted.limits.values()) == n
    assert abs(weighted.limits["bf16"][0] - 0.6 * n) <= 1
    alloc = weighted.build().allocator
    alloc.allocate("int8", alloc.num_free_pages("int8"))  # fills its partition only
    assert alloc.num_free_pages("int8") == 0
    assert alloc.num_free_pages("bf16") == weighted.limits["bf16"][0] * weighted.layouts["bf16"].pages_per_slab


def test_plan_single_page_pads_every_page_to_the_largest():
    ls = layouts()
    plan = plan_pool({n: ModelPages(l) for n, l in ls.items()}, pool_bytes=64 << 20, mode="single_page")
    largest = max(l.page_bytes for l in ls.values())
    assert plan.slab_bytes % largest == 0
    for name, layout in plan.layouts.items():
        assert layout.page_slot_bytes == largest >= layout.page_bytes == ls[name].page_bytes
        assert layout.pages_per_slab == plan.slab_bytes // largest


def test_plan_errors():
    ls = layouts()
    models = {n: ModelPages(l) for n, l in ls.items()}
    with pytest.raises(ValueError, match="pool mode"):
        plan_pool(models, 64 << 20, mode="dynamic")
    with pytest.raises(ValueError, match="fewer than"):
        plan_pool(models, 1 << 20)
    with pytest.raises(ValueError, match="positive"):
        plan_pool(models, 0)
    with pytest.raises(ValueError, match="at least one"):
        plan_pool({}, 64 << 20)
    with pytest.raises(ValueError, match="exceed"):
        plan_pool({n: ModelPages(l, reserve_bytes=40 << 20) for n, l in ls.items()}, 64 << 20)
    with pytest.raises(ValueError, match="below one slab"):
        plan_pool({"bf16": ModelPages(ls["bf16"], max_bytes=1)}, 64 << 20)
    with pytest.raises(ValueError, match="shares must be positive"):
        plan_pool({"bf16": ModelPages(ls["bf16"], share=0)}, 64 << 20, mode="static")


@pytest.mark.parametrize("kv_dtype", ["float32", "int8", "int4"])
def test_padded_pages_write_only_inside_their_slot(kv_dtype):
    """With a page stride larger than the page, writes land in [slot start, slot start + page) only."""
    layout = KVPageLayout(2, 2, 32, 4, kv_dtype, pages_per_slab=3, page_stride_words=0)
    stride = layout.page_words + 37
    layout = KVPageLayout(2, 2, 32, 4, kv_dtype, pages_per_slab=3, page_stride_words=stride)
    sentinel = np.uint32(0xDEADBEEF)
    pool = np.full((2, 3 * stride), sentinel, np.uint32)
    rng = np.random.default_rng()
    pages = np.array([4, 4, 1, 1], np.int32)       # slab 1 slot 1, then slab 0 slot 1
    slots = np.array([0, 3, 2, 1], np.int32)
    k = rng.standard_normal((4, 2, 32)).astype(np.float32)
    out = np.asarray(write_kv_tokens(pool, layout, pages, slots, np.ones(4, bool), 1, k, -k))
    changed = out != sentinel
    for slab in range(2):
        for slot in range(3):
            region = changed[slab, slot * stride:(slot + 1) * stride]
            if (slab, slot) in {(1, 1), (0, 1)}:
                assert region[:layout.page_words].any()
            else:
                assert not region.any()
            assert not region[layout.page_words:].any()  # the padding is never written
    with pytest.raises(ValueError, match="shorter than a page"):
        KVPageLayout(2, 2, 32, 4, kv_dtype, page_stride_words=layout.page_words - 1)


@pytest.mark.parametrize("stride_pad", [0, 5])
def test_copy_pages_moves_whole_pages_and_nothing_else(stride_pad):
    """copy_pages (used by compaction) copies page slots exactly; padding entries copy nothing."""
    import jax.numpy as jnp

    from pallas_kernels.kv_pages import copy_pages

    base = KVPageLayout(2, 1, 32, 4, "int4", pages_per_slab=4)
    layout = KVPageLayout(2, 1, 32, 4, "int4", pages_per_slab=4,
                          page_stride_words=base.page_words + stride_pad if stride_pad else 0)
    n = layout.page_slot_words
    rng = np.random.default_rng()
    pool = rng.integers(0, 2**32, (3, 4 * n), dtype=np.uint32)
    src = np.array([9, 2, 0, 0], np.int32)
    dst = np.array([4, 11, -1, -1], np.int32)   # two moves, two padding entries
    out = np.asarray(copy_pages(jnp.asarray(pool), layout, jnp.asarray(src), jnp.asarray(dst)))

    def page(a, p):
        return a[p // 4, (p % 4) * n:(p % 4 + 1) * n]

    expected = pool.copy()
    for s_, d in ((9, 4), (2, 11)):
        page(expected, d)[:] = page(pool, s_)
    assert np.array_equal(out, expected)


def test_plan_picks_page_lengths_that_tile_a_slab_for_an_8b_class_mix():
    """Scale rows give int8/fp8 pages an odd factor (2^14 x 65 bytes for Llama-8B int8): at 16 tokens
    per page no slab up to 16x the target leaves < 1%; 8-token pages for those models do."""
    mix = {"llama8b-bf16": KVPageLayout(32, 8, 128, 16, "bf16"),
           "llama8b-int8": KVPageLayout(32, 8, 128, 16, "int8"),
           "3b-fp8": KVPageLayout(28, 8, 128, 16, "fp8"),
           "1b-int4": KVPageLayout(16, 8, 64, 16, "int4")}
    fixed = choose_slab_bytes([l.page_bytes for l in mix.values()])
    assert slab_waste(fixed, [l.page_bytes for l in mix.values()]) > MAX_SLAB_WASTE
    plan = plan_pool({n: ModelPages(l) for n, l in mix.items()}, pool_bytes=60 << 30)
    chosen = plan.layouts
    assert slab_waste(plan.slab_bytes, [l.page_bytes for l in chosen.values()]) <= MAX_SLAB_WASTE
    assert chosen["llama8b-bf16"].tokens_per_page == 16                      # preferred where it fits
    assert {l.tokens_per_page for l in chosen.values()} <= {8, 16, 32}
    assert {l.tokens_per_page for l in chosen.values()} != {16}
    for name, l in chosen.items():
        assert (l.num_layers, l.kv_dtype) == (mix[name].num_layers, mix[name].kv_dtype)
        assert l.pages_per_slab == plan.slab_bytes // l.page_bytes
