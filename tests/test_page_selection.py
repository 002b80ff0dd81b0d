"""Tests for query-aware page selection: key bounds in the slab (kv_pages.write_key_bounds and the
Pallas kernel), page scores (reference and Pallas), the selection policies, and sparse decode
attention (pallas_kernels/sparse_attention.py) against a dense oracle restricted to the chosen pages.

Inputs are fresh random numbers every run, in NaN-poisoned pools with scrambled page tables
(`build_case` of the decode-kernel tests). Kernels run in interpret mode.

Tolerances.
- Key bounds are the min/max of the dequantized keys as int8 codes of one scale per page and head,
  rounded outward: never inside the keys' range, and less than one scale step outside it (the
  head's largest |bound| / 126, rounded up to bfloat16: at most 2^-7 more).
- Scores: the kernel and the reference add the same D products in another order (2^-24 * D
  relative of the sum of |products|): rtol = atol = 1e-5 for D <= 128 and unit-size inputs.
- Sparse attention against the float64 oracle over the chosen pages: the same dequantized values,
  float32 sums, so 2e-5 as the decode kernel's tests; int4_fp8 rounds P to e4m3 (relative error
  <= 2^-4 per weight) where the oracle does not, so its outputs may move by up to 2^-4 of max|V|.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_attention import fp8_queries
from pallas_kernels.kernel_cases import page_fills
from pallas_kernels.kv_pages import (KVPageLayout, copy_pages, read_key_bounds, read_kv_pages, write_key_bounds,
                                     write_kv_tokens)
from pallas_kernels.kv_write import write_bounds
from pallas_kernels.page_scores_pallas import page_scores_pallas
from pallas_kernels.page_selection import (POLICIES, POLICY_IDS, SelectionInputs, SelectionPolicy, SparseSpec,
                                           page_scores_reference, select_pages)
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.sparse_attention import sparse_decode_attention
from tests.test_paged_attention_pallas import NUM_LAYERS, build_case

KV_DTYPES = ("bf16", "float32", "fp8", "int8", "int4", "int4_fp8")
LAYER = 1
PAGES_PER_SLAB = 3


def bound_step(k_min, k_max):
    """The largest distance a stored bound may lie outside the keys: one code step per kv head."""
    absmax = np.maximum(np.abs(k_min).max(axis=-1), np.abs(k_max).max(axis=-1))[..., None]
    return absmax / 126 * (1 + 2.0 ** -7)


def check_bounds(lo, hi, k_min, k_max):
    assert (lo <= k_min).all() and (hi >= k_max).all()
    step = bound_step(k_min, k_max)
    assert (k_min - lo <= step).all() and (hi - k_max <= step).all()

_write_bounds = jax.jit(write_bounds, static_argnums=1, static_argnames="kernels")
_scores_ref = jax.jit(page_scores_reference, static_argnums=2)
_scores_kernel = jax.jit(page_scores_pallas, static_argnums=2, static_argnames=("interpret", "block_pages"))
_sparse = jax.jit(sparse_decode_attention, static_argnums=2, static_argnames="kernels")
_select = jax.jit(select_pages, static_argnums=4)

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")  # tests/conftest.py


def bounds_case(rng, layout, lengths, num_pages_table, group=1, kernels="xla"):
    """`build_case` (both layers written) plus every live page's key bounds written in both layers."""
    q, pool, table, q_pos, kv_lens = build_case(rng, layout, lengths, num_pages_table=num_pages_table,
                                                group=group)
    pages, fill = page_fills(table, lengths, layout.tokens_per_page)
    for layer in range(NUM_LAYERS):
        pool = _write_bounds(pool, layout, jnp.asarray(pages, jnp.int32), jnp.asarray(fill, jnp.int32),
                             jnp.int32(layer), kernels=kernels)
    return q, pool, table, q_pos, kv_lens


def live_keys(pool, layout, table, lengths, layer=LAYER):
    """Dequantized keys [B, P*T, Hkv, D] float64 and their live mask [B, P*T]."""
    k, v = read_kv_pages(pool, layout, table, layer)                          # [B, P, T, Hkv, D]
    b, p, t = k.shape[:3]
    k = np.asarray(k, np.float64).reshape(b, p * t, *k.shape[3:])
    v = np.asarray(v, np.float64).reshape(b, p * t, *v.shape[3:])
    live = np.arange(p * t)[None, :] < np.asarray(lengths)[:, None]
    return k, v, live


# ---------------------------------------------------------------------------------------------------
# Key bounds


@pytest.mark.parametrize("tokens_per_page", [8, 16])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_key_bounds_bound_the_dequantized_keys(rng, kv_dtype, tokens_per_page):
    t = tokens_per_page
    layout = KVPageLayout(NUM_LAYERS, 2, 64, t, kv_dtype, pages_per_slab=PAGES_PER_SLAB, key_bounds=True)
    lengths = [1, t, 3 * t - 1, int(rng.integers(2, 4 * t + 1)), 0]
    _, pool, table, _, _ = build_case(rng, layout, lengths, num_pages_table=4)
    # Both implementations write the bounds into the same NaN-poisoned bounds regions: bit-identical.
    pages, fill = (jnp.asarray(x) for x in page_fills(table, lengths, t))
    pool_xla = _write_bounds(pool, layout, pages, fill, jnp.int32(LAYER), kernels="xla")
    pool_kernel = _write_bounds(pool, layout, pages, fill, jnp.int32(LAYER), kernels="interpret")
    np.testing.assert_array_equal(np.asarray(pool_kernel), np.asarray(pool_xla))

    k, _, live = live_keys(pool_xla, layout, table, lengths)
    lo, hi = (np.asarray(x, np.float64) for x in read_key_bounds(pool_xla, layout, table, LAYER))
    for b, n in enumerate(lengths):
        for i in range(layout.pages_for(n)):
            keys = k[b, i * t:(i + 1) * t][live[b, i * t:(i + 1) * t]]           # [n_i, Hkv, D]
            check_bounds(lo[b, i], hi[b, i], keys.min(axis=0), keys.max(axis=0))


@pytest.mark.parametrize("kv_dtype", ["bf16", "int4_fp8"])
def test_bounds_track_a_filling_page_and_follow_copies(rng, kv_dtype):
    """Bounds recomputed after every token equal a one-shot write of the same prefix, and a page
    copy (compaction) carries them with the page."""
    t = 8
    layout = KVPageLayout(1, 2, 64, t, kv_dtype, pages_per_slab=2, key_bounds=True)
    pool = jnp.full((3, 2 * layout.page_slot_words), np.uint32(0x7FC07FC0), jnp.uint32)
    keys = jnp.asarray(rng.standard_normal((t, 2, 64)), jnp.float32)
    page = jnp.asarray([3], jnp.int32)
    for i in range(t):
        pool = write_kv_tokens(pool, layout, page, jnp.asarray([i]), jnp.asarray([True]), 0, keys[i:i + 1], keys[i:i + 1])
        pool = write_key_bounds(pool, layout, page, jnp.asarray([i + 1]), 0)
        lo, hi = (np.asarray(x[0], np.float64) for x in read_key_bounds(pool, layout, page, 0))
        stored = np.asarray(read_kv_pages(pool, layout, page, 0)[0][0, :i + 1], np.float64)
        check_bounds(lo, hi, stored.min(axis=0), stored.max(axis=0))
    moved = copy_pages(pool, layout, jnp.asarray([3]), jnp.asarray([0]))
    for a, b in zip(read_key_bounds(moved, layout, jnp.asarray([0]), 0), read_key_bounds(pool, layout, page, 0)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bounds_cost_no_bytes_when_off_and_their_size_when_on():
    off = KVPageLayout(4, 2, 64, 16, "int4")
    on = dataclasses.replace(off, key_bounds=True)
    assert on.page_words - off.page_words == 4 * 2 * 36          # layers x heads x (2 x 64 int8 / 4 + 4)
    mixed = KVPageLayout(4, 2, 64, 16, "int4", layer_kv_dtypes=((0, "bf16"),), key_bounds=True)
    plain = KVPageLayout(4, 2, 64, 16, "int4", layer_kv_dtypes=((0, "bf16"),))
    assert mixed.page_words - plain.page_words == 4 * 2 * 36
    with pytest.raises(ValueError, match="no key bounds"):
        read_key_bounds(jnp.zeros((1, off.page_words), jnp.uint32), off, jnp.zeros((1,), jnp.int32), 0)


# ---------------------------------------------------------------------------------------------------
# Scores


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("tokens_per_page", [8, 16])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_scores_match_reference_and_bound_every_key(rng, kv_dtype, tokens_per_page, group):
    t = tokens_per_page
    layout = KVPageLayout(NUM_LAYERS, 2, 64, t, kv_dtype, pages_per_slab=PAGES_PER_SLAB, key_bounds=True)
    lengths = [1, 3 * t - 1, int(rng.integers(2, 6 * t + 1)), 0]
    q, pool, table, _, kv_lens = bounds_case(rng, layout, lengths, 6, group=group)
    ref = np.asarray(_scores_ref(q, pool, layout, jnp.int32(LAYER), table, kv_lens))
    out = np.asarray(_scores_kernel(q, pool, layout, jnp.int32(LAYER), table, kv_lens, interpret=True,
                                    block_pages=4))
    pages = np.arange(6)[None, :] < np.asarray([layout.pages_for(n) for n in lengths])[:, None]
    assert np.isneginf(ref[~np.broadcast_to(pages[:, None], ref.shape)]).all()
    assert np.isneginf(out[~np.broadcast_to(pages[:, None], out.shape)]).all()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # Each live page's score bounds q . k of every key in it, for every query head of the group.
    k, _, live = live_keys(pool, layout, table, lengths)
    qg = np.asarray(q, np.float64).reshape(len(lengths), 2, group, 64)
    dots = np.einsum("bhgd,blhd->bhgl", qg, k)
    dots = np.where(live[:, None, None, :], dots, -np.inf).max(axis=2).reshape(len(lengths), 2, 6, t).max(-1)
    ok = np.isneginf(dots) | (ref >= dots - 1e-5 * np.abs(dots))
    assert ok.all()


# ---------------------------------------------------------------------------------------------------
# Selection


def _select_case(scores, kv_lens, policy, budget, gate, t=4):
    b, _, width = scores.shape
    table = jnp.asarray(np.arange(b * width, dtype=np.int32).reshape(b, width) + 100)
    inputs = SelectionInputs(*(jnp.full((b,), x, jnp.int32) for x in (POLICY_IDS[policy], budget, gate)))
    return table, _select(jnp.asarray(scores, jnp.float32), table, jnp.asarray(kv_lens, jnp.int32), inputs, t)


def test_bbox_keeps_sink_and_last_then_the_best_scores(rng):
    scores = rng.standard_normal((2, 3, 12)).astype(np.float32)
    kv_lens = [4 * 10 - 1, 4 * 12]                       # 10 pages (last partial), 12 pages
    table, sel = _select_case(scores, kv_lens, "bbox", budget=4, gate=0)
    chosen = np.asarray(sel.chosen)
    for b, pages in enumerate((10, 12)):
        for h in range(3):
            picked = np.flatnonzero(chosen[b, h])
            assert len(picked) == 4 and picked[0] == 0 and picked[-1] == pages - 1
            middle = scores[b, h, 1:pages - 1]
            assert sorted(picked[1:-1] - 1) == sorted(np.argsort(-middle)[:2])
            # The head table lists the chosen pages first, in context order; only the last is partial.
            np.testing.assert_array_equal(np.asarray(sel.head_table[b, h, :4]), np.asarray(table[b, picked]))
    np.testing.assert_array_equal(np.asarray(sel.head_lens), [[3 * 4 + 3] * 3, [4 * 4] * 3])
    np.testing.assert_array_equal(np.asarray(sel.pages_read), 4)


def test_sink_window_full_gate_and_covering_budget(rng):
    scores = rng.standard_normal((1, 2, 12)).astype(np.float32)
    _, sel = _select_case(scores, [45], "sink_window", budget=4, gate=0)
    assert (np.flatnonzero(np.asarray(sel.chosen[0, 0])) == [0, 9, 10, 11]).all()
    dense_cols = np.arange(12)
    for policy, budget, gate, kv_len in (("full", 4, 0, 45), ("bbox", 4, 45, 45), ("bbox", 12, 0, 45),
                                         ("bbox", 4, 0, 8)):
        table, sel = _select_case(scores, [kv_len], policy, budget=budget, gate=gate)
        pages = -(-kv_len // 4)
        assert (np.asarray(sel.chosen[0]) == (dense_cols < pages)).all(), (policy, budget, gate, kv_len)
        np.testing.assert_array_equal(np.asarray(sel.head_table[0, :, :pages]),
                                      np.broadcast_to(np.asarray(table[0, :pages]), (2, pages)))
        np.testing.assert_array_equal(np.asarray(sel.head_lens), kv_len)


def test_bbox_span_reads_the_best_pages_with_their_neighbours(rng):
    """One page scores far above the rest: bbox_span reads it with both neighbours, where bbox
    reads it and the next best pages."""
    scores = rng.uniform(0.0, 1.0, (1, 2, 12)).astype(np.float32)
    scores[0, :, 6] = 10.0
    scores[0, 1, 3] = 5.0                                 # head 1: a second place, and its neighbours
    _, span = _select_case(scores, [48], "bbox_span", budget=8, gate=0)
    assert (np.flatnonzero(np.asarray(span.chosen[0, 0]))[[0, -1]] == [0, 11]).all()
    assert {5, 6, 7} <= set(np.flatnonzero(np.asarray(span.chosen[0, 0])))
    assert (np.flatnonzero(np.asarray(span.chosen[0, 1])) == [0, 2, 3, 4, 5, 6, 7, 11]).all()
    _, box = _select_case(scores, [48], "bbox", budget=5, gate=0)
    best = 1 + np.argsort(-scores[0, 0, 1:11])[:3]
    assert set(np.flatnonzero(np.asarray(box.chosen[0, 0]))) == {0, 11, *best}


def test_a_policy_is_a_plug_in(rng):
    """A policy is a name and a ranking: an extra one ("oldest": earliest pages first) runs beside the
    built-in ones, each row taking its own."""
    policies = (*POLICIES, SelectionPolicy("oldest", lambda scores, columns: -columns.astype(jnp.float32)))
    scores = jnp.asarray(rng.standard_normal((2, 2, 12)), jnp.float32)
    inputs = SelectionInputs(jnp.asarray([len(POLICIES), POLICY_IDS["sink_window"]], jnp.int32),
                             jnp.full((2,), 4, jnp.int32), jnp.zeros((2,), jnp.int32))
    table = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
    sel = select_pages(scores, table, jnp.asarray([48, 48], jnp.int32), inputs, 4, policies)
    assert (np.flatnonzero(np.asarray(sel.chosen[0, 0])) == [0, 1, 2, 11]).all()
    assert (np.flatnonzero(np.asarray(sel.chosen[1, 1])) == [0, 9, 10, 11]).all()


def test_sparse_spec_rows_and_bad_specs():
    assert SparseSpec("bbox", budget_tokens=512).row(8192, 16) == (POLICY_IDS["bbox"], 32, 1024)
    assert SparseSpec("bbox", budget_fraction=0.125).row(8192, 16) == (POLICY_IDS["bbox"], 64, 2048)
    assert SparseSpec("sink_window", budget_tokens=8, gate_tokens=0).row(100, 16) == (POLICY_IDS["sink_window"], 2, 0)
    for bad in ({"policy": "topk"}, {"budget_tokens": 0}, {"budget_tokens": 1.5}, {"budget_fraction": 0.0},
                {"budget_fraction": 2}, {"budget_tokens": 8, "budget_fraction": 0.5}, {"gate_tokens": -1}):
        with pytest.raises(ValueError):
            SparseSpec(**bad)


def test_layer_weights_share_the_budget_out_over_the_sparse_layers():
    spec = SparseSpec("bbox", budget_tokens=512, layer_weights=[9, 9, 1, 3])
    assert spec.layer_weights == (9.0, 9.0, 1.0, 3.0)       # a list (TOML's) becomes a tuple
    np.testing.assert_array_equal(spec.layer_budgets(32, 4, 2), [32, 32, 16, 48])   # dense layers unused
    np.testing.assert_array_equal(spec.layer_budgets(32, 4, 0), [52, 52, 6, 17])    # 32 * w / 5.5
    np.testing.assert_array_equal(SparseSpec("bbox", layer_weights=(1, 1, 1, 100)).layer_budgets(4, 4, 1),
                                  [4, 2, 2, 12])                      # 4 * 100 / 34, and >= 2 pages each
    np.testing.assert_array_equal(SparseSpec("bbox").layer_budgets(32, 4, 2), [32] * 4)
    np.testing.assert_array_equal(spec.layer_budgets(32, 4, 4), [32] * 4)          # every layer dense
    with pytest.raises(ValueError, match="layer_weights has 4 entries; the model has 6 layers"):
        spec.layer_budgets(32, 6, 2)
    for bad in ([], [1, 0], [1, -2], [1, "2"], [1, True], [1, float("nan")], [1, float("inf")], "12", 3):
        with pytest.raises(ValueError, match="layer_weights"):
            SparseSpec("bbox", layer_weights=bad)


# ---------------------------------------------------------------------------------------------------
# Sparse decode attention


def oracle(q, k, v, mask, fp8: bool):
    """Float64 attention of q [B, 1, Hq, D] over keys/values [B, L, Hkv, D] where mask [B, Hkv, L]."""
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    qg = np.asarray(q, np.float32).reshape(b, hkv, hq // hkv, d) * d ** -0.5
    if fp8:
        qg = np.asarray(fp8_queries(jnp.asarray(qg)))
    keep = mask.transpose(0, 2, 1)[..., None]                                     # [B, L, Hkv, 1]
    k, v = np.where(keep, k, 0.0), np.where(keep, v, 0.0)                          # dead slots: NaN poison
    s = np.einsum("bhgd,blhd->bhgl", qg.astype(np.float64), k)
    s = np.where(mask[:, :, None, :], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    p = np.where(np.isfinite(s), np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    out = np.einsum("bhgl,blhd->bhgd", p, v) / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return out.reshape(b, 1, hq, d)


@pytest.mark.parametrize("kernels", ["xla", "interpret"])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_sparse_attention_equals_dense_attention_over_the_chosen_pages(rng, kv_dtype, kernels):
    t, width = 8, 8
    layout = KVPageLayout(NUM_LAYERS, 2, 64, t, kv_dtype, pages_per_slab=PAGES_PER_SLAB, key_bounds=True)
    lengths = [width * t - 3, 5 * t, 2 * t + 1, 1]
    q, pool, table, q_pos, kv_lens = bounds_case(rng, layout, lengths, width, group=2)
    for policy in ("bbox", "sink_window", "bbox_span"):
        inputs = SelectionInputs(*(jnp.full((4,), x, jnp.int32) for x in (POLICY_IDS[policy], 3, 0)))
        out, sel = _sparse(q, pool, layout, jnp.int32(LAYER), table, q_pos, kv_lens, inputs, kernels=kernels)
        np.testing.assert_array_equal(np.asarray(sel.pages_read), [[3, 3], [3, 3], [3, 3], [1, 1]])
        k, v, live = live_keys(pool, layout, table, lengths)
        chosen = np.repeat(np.asarray(sel.chosen), t, axis=-1)                    # [B, Hkv, L]
        want = oracle(q, k, v, chosen & live[:, None, :], kv_dtype == "int4_fp8")
        out = np.asarray(out, np.float64)
        assert np.isfinite(out).all()
        v_max = np.abs(np.where(live[..., None, None], v, 0.0)).max()
        atol = 2.0 ** -4 * v_max if kv_dtype == "int4_fp8" else 2e-5
        np.testing.assert_allclose(out, want, rtol=2e-5, atol=atol, err_msg=policy)


@pytest.mark.parametrize("kernels", ["xla", "interpret"])
def test_sparse_equals_dense_when_the_budget_covers_the_context(rng, kernels):
    t, width = 8, 8
    layout = KVPageLayout(NUM_LAYERS, 2, 64, t, "int8", pages_per_slab=PAGES_PER_SLAB, key_bounds=True)
    lengths = [width * t - 3, 5 * t, 1]
    q, pool, table, q_pos, kv_lens = bounds_case(rng, layout, lengths, width, group=2)
    inputs = SelectionInputs(*(jnp.full((3,), x, jnp.int32) for x in (POLICY_IDS["bbox"], width, 0)))
    out, sel = _sparse(q, pool, layout, jnp.int32(LAYER), table, q_pos, kv_lens, inputs, kernels=kernels)
    dense = paged_attention(q, pool, layout, jnp.int32(LAYER), table, q_pos, kv_lens, kernels=kernels)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dense))
    np.testing.assert_array_equal(np.asarray(sel.pages_read), [[8, 8], [5, 5], [1, 1]])


def test_per_head_tables_are_for_decode_only():
    layout = KVPageLayout(1, 2, 64, 8, "bf16", key_bounds=True)
    pool = jnp.zeros((2, layout.page_words * 2), jnp.uint32)
    with pytest.raises(ValueError, match="decode"):
        paged_attention(jnp.zeros((1, 2, 2, 64)), pool, layout, 0, jnp.zeros((1, 2, 8), jnp.int32),
                        jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32))
    with pytest.raises(ValueError, match="key bounds"):
        page_scores_pallas(jnp.zeros((1, 1, 2, 64)), pool, dataclasses.replace(layout, key_bounds=False), 0,
                           jnp.zeros((1, 8), jnp.int32), jnp.ones((1,), jnp.int32), interpret=True)
