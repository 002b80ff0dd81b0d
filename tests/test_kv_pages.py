"""Tests for the quantized KV page formats of pallas_kernels/kv_pages.py (fp8 / int8 / int4 with
bfloat16 scales): the layout's sizes against the documented formula and against
quant_formats.kv_bytes_per_token_per_layer, bit-exact write -> read round trips over a poisoned pool
(values and scale rows land exactly where the layout says, nothing else changes), and fp8
saturation. Attention over quantized pages is tested in test_paged_attention.py.

Random inputs are fresh each run (np.random.default_rng() without a seed).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pallas_kernels.kv_pages import KVPageLayout, read_kv_pages, read_kv_pages_quantized, write_kv_tokens
from tests.helpers import kv_bytes_per_token_per_layer
from tests.test_paged_attention import (_dequantize_kv, _quantize_kv, _read, _write, bits, model_write,
                                        quantized_words)

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")   # compiling dominates these tests

QUANTIZED = ("fp8", "int8", "int4", "int4_fp8")
ALL_FORMATS = ("bf16", "float32") + QUANTIZED
VALUE_BITS = {"bf16": 16, "float32": 32, "fp8": 8, "int8": 8, "int4": 4, "int4_fp8": 4}
SCALES_PER_HEAD = {"bf16": 0, "float32": 0, "fp8": 1, "int8": 1, "int4": 2, "int4_fp8": 1}  # int4: scale + zero
POISON = np.uint32(0xFFFFFFFF)  # NaN as float32, bfloat16 (scales) and e4m3 (0xFF); int8 -1, int4 15

_read_quantized = jax.jit(read_kv_pages_quantized, static_argnums=1)


# ---------------------------------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize("kv_dtype", ALL_FORMATS)
def test_layout_sizes_follow_the_documented_formula(kv_dtype):
    for h in range(1, 9):
        for d in (64, 128):
            for t in (8, 16):
                for num_layers in (1, 3):
                    layout = KVPageLayout(num_layers, h, d, t, kv_dtype)
                    rw = h * d * VALUE_BITS[kv_dtype] // 32
                    srw = -(-h * SCALES_PER_HEAD[kv_dtype] * 2 // 4)  # bf16 entries, padded to words
                    assert (layout.row_words, layout.scale_row_words) == (rw, srw)
                    assert layout.chunk_words == t * (rw + srw)
                    assert layout.page_words == num_layers * 2 * t * (rw + srw)
                    assert layout.page_bytes == 4 * layout.page_words == t * layout.bytes_per_token
                    # The byte accounting used for capacity planning is exactly what a page stores.
                    assert layout.bytes_per_token == num_layers * kv_bytes_per_token_per_layer(kv_dtype, h, d)
                    assert layout.quantized == (kv_dtype in QUANTIZED)


def test_layout_sizes_by_hand():
    # SmolLM2-135M geometry: 3 KV heads of 64. int8: 192 value bytes + 3 bf16 scales (6 bytes,
    # padded to 8) per token, for K and V.
    assert KVPageLayout(1, 3, 64, 16, "int8").bytes_per_token == 2 * (192 + 8) == 400
    assert kv_bytes_per_token_per_layer("int8", 3, 64) == 400
    # int4: 96 value bytes + 3 scales and 3 zeros (12 bytes, already whole words).
    assert KVPageLayout(1, 3, 64, 16, "int4").bytes_per_token == 2 * (96 + 12) == 216
    # One KV head: fp8 64 bytes + one scale (2 bytes -> 4); int4 32 bytes + scale and zero (4 bytes).
    assert KVPageLayout(2, 1, 64, 8, "fp8").bytes_per_token == 2 * 2 * (64 + 4) == 272
    assert kv_bytes_per_token_per_layer("int4", 1, 64) == 2 * (32 + 4) == 72
    # Llama-3-8B geometry (32 layers): bf16 128 KiB per token, int8 65 KiB, int4 34 KiB.
    assert KVPageLayout(32, 8, 128, 16, "bf16").bytes_per_token == 32 * 4096
    assert KVPageLayout(32, 8, 128, 16, "int8").bytes_per_token == 32 * 2080
    assert KVPageLayout(32, 8, 128, 16, "int4").bytes_per_token == 32 * 1088
    # FireQ's int4_fp8: int4 values and one bf16 scale per head (no zero): 2 * (512 + 16) bytes a layer.
    assert KVPageLayout(32, 8, 128, 16, "int4_fp8").bytes_per_token == 32 * 1056


def test_layout_validation():
    layout = KVPageLayout(1, 2, 64, 8, "bf16")
    assert layout.kv_dtype == "bf16" and layout == KVPageLayout(1, 2, 64, 8, "bfloat16")
    assert dataclasses.replace(layout, pages_per_slab=3).kv_dtype == "bf16"
    assert kv_bytes_per_token_per_layer("bfloat16", 2, 64) == kv_bytes_per_token_per_layer("bf16", 2, 64)
    assert layout.dtype == jnp.bfloat16 and KVPageLayout(1, 2, 64, 8, "int4").dtype == jnp.float32
    with pytest.raises(ValueError, match="unsupported kv_dtype"):
        KVPageLayout(1, 2, 64, 8, "int2")
    with pytest.raises(ValueError, match="32-bit words"):
        KVPageLayout(1, 1, 2, 8, "int8")    # 16 bits of values per token
    with pytest.raises(ValueError, match="32-bit words"):
        KVPageLayout(1, 1, 4, 8, "int4")
    with pytest.raises(ValueError):
        KVPageLayout(1, 8, 1, 8, "int4")    # 32 bits, but head_dim 1 cannot pack two per byte
    with pytest.raises(ValueError):
        kv_bytes_per_token_per_layer("int8", 1, 2)
    with pytest.raises(ValueError, match="quantized"):
        read_kv_pages_quantized(jnp.zeros((1, layout.page_words), jnp.uint32), layout, jnp.zeros(1, jnp.int32), 0)


@pytest.mark.parametrize("kv_dtype", ALL_FORMATS + ("bf16",))
def test_bytes_per_token_for_matches_the_layout(kv_dtype):
    # The page-size-free figure capacity planning uses is what any page of that model stores.
    for num_layers, h, d in ((1, 3, 64), (32, 8, 128), (2, 1, 64)):
        want = num_layers * kv_bytes_per_token_per_layer(kv_dtype, h, d)
        assert KVPageLayout.bytes_per_token_for(num_layers, h, d, kv_dtype) == want
        for t in (8, 16):
            assert KVPageLayout(num_layers, h, d, t, kv_dtype).bytes_per_token == want
    with pytest.raises(ValueError, match="unsupported kv_dtype"):
        KVPageLayout.bytes_per_token_for(1, 2, 64, "int2")


# ---------------------------------------------------------------------------------------------------
# Write -> read round trips


@jax.jit(static_argnums=1)
def _write_read(pool, layout, pages, slots, valid, k, v, read_ids):
    """Write every layer (k, v: [layers, N, H, D]), then read every layer back, both forms."""
    pool = lax.fori_loop(0, layout.num_layers,
                         lambda layer, p: write_kv_tokens(p, layout, pages, slots, valid, layer, k[layer], v[layer]),
                         pool)
    reads = lax.map(lambda layer: (read_kv_pages(pool, layout, read_ids, layer),
                                   read_kv_pages_quantized(pool, layout, read_ids, layer)),
                    jnp.arange(layout.num_layers))
    return pool, reads


def rand_kv(rng, shape) -> np.ndarray:
    """Normal values, per-(token, head) magnitudes over decades, offsets (int4 min != -max), outliers."""
    x = rng.standard_normal(shape).astype(np.float32)
    x *= np.exp(rng.uniform(-3, 3, size=shape[:-1] + (1,))).astype(np.float32)
    x += rng.uniform(-2, 2, size=shape[:-1] + (1,)).astype(np.float32)
    flat = x.reshape(-1)
    flat[rng.integers(0, flat.size, max(1, flat.size // 300))] *= 20.0
    return x


# Geometries: every format with every head count (1, 3 (odd: padded scale rows), 8), and (head_dim,
# tokens_per_page) rotating through all four of {64, 128} x {8, 16} so that every format and every
# head count meets both head dims and both page sizes (all pairs covered in 9 cases instead of 36:
# each case costs a compile of write + read, ~0.5 s). The full format x head_dim x page size grid,
# with float32 K/V inputs, runs in test_paged_attention.py::test_write_read_attend.
_DT = [(64, 8), (128, 16), (64, 16), (128, 8)]
ROUND_TRIP_CASES = [(fmt, h, *_DT[(f + i) % 4]) for f, fmt in enumerate(QUANTIZED) for i, h in enumerate((1, 3, 8))]


@pytest.mark.parametrize(("kv_dtype", "heads", "head_dim", "tokens_per_page"), ROUND_TRIP_CASES)
def test_round_trip(kv_dtype, heads, head_dim, tokens_per_page):
    rng = np.random.default_rng()
    t, pages_per_slab, num_slabs, num_layers = tokens_per_page, 3, 3, 2
    layout = KVPageLayout(num_layers, heads, head_dim, t, kv_dtype, pages_per_slab=pages_per_slab)
    num_pages = pages_per_slab * num_slabs
    pool0 = np.full((num_slabs, pages_per_slab * layout.page_words + 5), POISON, np.uint32)

    # Valid tokens at distinct random (page, slot)s, about half of all slots, so every page has
    # written and unwritten neighbours; padding rows aim at the same slots and carry garbage.
    n = num_pages * t
    targets = rng.permutation(n)
    valid = rng.random(n) < 0.5
    pages, slots = (targets // t).astype(np.int32), (targets % t).astype(np.int32)
    pages[~valid] = rng.choice(pages[valid], (~valid).sum())
    slots[~valid] = rng.choice(slots[valid], (~valid).sum())
    # K/V arrive in bfloat16, as the model passes them (after RoPE).
    kv = rand_kv(rng, (num_layers, 2, n, heads, head_dim)).astype(jnp.bfloat16).astype(np.float32)
    kv[:, 0, ~valid] = np.nan
    kv[:, 1, ~valid] = np.inf
    read_ids = rng.permutation(num_pages).astype(np.int32)
    pool, ((k_all, v_all), (kq_all, vq_all)) = _write_read(
        jnp.asarray(pool0), layout, jnp.asarray(pages), jnp.asarray(slots), jnp.asarray(valid),
        jnp.asarray(kv[:, 0], jnp.bfloat16), jnp.asarray(kv[:, 1], jnp.bfloat16), jnp.asarray(read_ids))
    pool = np.asarray(pool)
    k_all, v_all, kq_all, vq_all = jax.tree.map(np.asarray, (k_all, v_all, kq_all, vq_all))

    # 1. The pool is exactly the layout model; spelled out: the words that changed are exactly the
    #    valid tokens' value rows and scale rows (every layer, K and V), everything else is poison.
    expected = pool0
    for layer in range(num_layers):
        expected = model_write(expected, layout, pages, slots, valid, layer, kv[layer, 0], kv[layer, 1])
    assert np.array_equal(pool, expected)
    written = np.zeros(pool.shape, bool)
    for i in np.flatnonzero(valid):
        slab, local = divmod(int(pages[i]), pages_per_slab)
        for c in range(2 * num_layers):  # (layer, K|V) chunks
            w = local * layout.page_words + c * layout.chunk_words
            for h in range(heads):
                v0 = w + (h * t + slots[i]) * layout.head_words
                written[slab, v0:v0 + layout.head_words] = True
            s0 = w + t * layout.row_words + slots[i] * layout.scale_row_words
            written[slab, s0:s0 + layout.scale_row_words] = True
    assert written.sum() == valid.sum() * 2 * num_layers * (layout.row_words + layout.scale_row_words)
    assert (pool[~written] == POISON).all()

    # 2. Reads: the quantized form is exactly quantize_kv's (values, bf16 scales and zeros); the
    #    dequantized form is exactly dequantize_kv of it; never-written slots read as NaN.
    slot_of = {(int(p), int(s)): i for i, (p, s) in enumerate(zip(pages, slots)) if valid[i]}
    live = np.zeros((num_pages, t), bool)
    src = np.zeros((num_pages, t), np.int64)
    for r, p in enumerate(read_ids):
        for s in range(t):
            if (int(p), s) in slot_of:
                live[r, s], src[r, s] = True, slot_of[(int(p), s)]
    assert live.sum() == valid.sum()
    for layer in range(num_layers):
        kq, vq = (jax.tree.map(lambda a: a[layer], qt) for qt in (kq_all, vq_all))
        for kind, x, xq in ((0, k_all[layer], kq), (1, v_all[layer], vq)):
            ref = _quantize_kv(jnp.asarray(kv[layer, kind]), kv_dtype)  # all N rows: one compile
            ref_deq = np.asarray(_dequantize_kv(ref))[src[live]]
            assert xq.fmt == ref.fmt == f"kv_{kv_dtype}" and xq.axis == 3
            assert xq.values.shape == (num_pages, t) + ref.values.shape[1:]
            assert xq.scales.shape == (num_pages, t, heads, 1) and xq.scales.dtype == jnp.bfloat16
            for got, want in ((xq.values, ref.values), (xq.scales, ref.scales), (xq.zeros, ref.zeros)):
                if want is None:
                    assert got is None
                    continue
                got, want = np.asarray(got)[live], np.asarray(want)[src[live]]
                assert got.dtype == want.dtype
                assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
            x = np.asarray(x)
            assert x.dtype == np.float32 and x.shape == (num_pages, t, heads, head_dim)
            assert np.array_equal(bits(x[live]), bits(ref_deq))
            assert np.isnan(x[~live]).all()


def test_scale_row_padding_is_zero_and_order_is_scales_then_zeros():
    """int4 with 3 heads: a scale row is [s0 s1 s2 z0 z1 z2] = 3 words; int8: [s0 s1 s2 0] = 2 words."""
    rng = np.random.default_rng()
    x = rand_kv(rng, (1, 3, 64))
    for fmt, srw in (("int8", 2), ("int4", 3)):
        _, scale_rows = quantized_words(x, fmt)
        assert scale_rows.shape == (1, srw)
        halves = scale_rows.view(np.uint16)[0]
        qt = _quantize_kv(jnp.asarray(x), fmt)
        want = [np.asarray(qt.scales).reshape(-1)] + ([np.asarray(qt.zeros).reshape(-1)] if fmt == "int4" else [])
        want = np.concatenate(want).view(np.uint16)
        assert np.array_equal(halves[:len(want)], want) and not halves[len(want):].any()
        layout = KVPageLayout(1, 3, 64, 2, fmt)
        pool = _write(jnp.full((1, layout.page_words), POISON), layout, jnp.zeros(1, jnp.int32),
                      jnp.ones(1, jnp.int32), jnp.ones(1, bool), jnp.int32(0), jnp.asarray(x), jnp.asarray(x))
        w = 2 * layout.row_words + layout.scale_row_words  # token 1's K scale row
        assert np.array_equal(np.asarray(pool)[0, w:w + srw], scale_rows[0])


def test_fp8_saturates_instead_of_nan():
    """Values of 1e6 next to tiny ones: bfloat16 rounding of the scale (absmax/448) down pushes
    absmax/scale above 448, where XLA's plain fp8 cast gives NaN; the write must clip instead."""
    rng = np.random.default_rng()
    n, h, d = 64, 2, 64
    layout = KVPageLayout(1, h, d, 8, "fp8")
    x = (rng.standard_normal((n, h, d)) * 1e-3).astype(np.float32)
    x[:, :, 0] = rng.uniform(0.5e6, 2e6, (n, h)) * rng.choice([-1, 1], (n, h))
    x[:, :, 1] = -x[:, :, 0] * 0.999
    absmax = np.abs(x).max(axis=-1)
    scale = (absmax / 448).astype(jnp.bfloat16).astype(np.float32)
    rounded_down = scale < absmax / 448
    assert rounded_down.sum() > n * h // 8  # the case that needs saturation does occur
    pool = jnp.full((layout.pages_for(n), layout.page_words), POISON)
    ids = np.arange(n) // 8
    pool = _write(pool, layout, jnp.asarray(ids, jnp.int32), jnp.asarray(np.arange(n) % 8, jnp.int32),
                  jnp.ones(n, bool), jnp.int32(0), jnp.asarray(x), jnp.asarray(-x))
    read_ids = jnp.arange(layout.pages_for(n), dtype=jnp.int32)
    k, v = _read(pool, layout, read_ids, jnp.int32(0))
    kq, _ = _read_quantized(pool, layout, read_ids, jnp.int32(0))
    k, v = np.asarray(k).reshape(n, h, d), np.asarray(v).reshape(n, h, d)
    assert np.isfinite(k).all() and np.isfinite(v).all()
    codes = np.asarray(kq.values.astype(jnp.float32)).reshape(n, h, d)
    assert (np.abs(codes[:, :, 0][rounded_down]) == 448.0).all()  # clipped to the largest e4m3
    # The big values come back within e4m3's 2^-4 relative rounding plus the clip (<= 2^-8 of the
    # bf16 scale rounding); the tiny ones (|x| / scale < 2^-10, half the smallest e4m3 subnormal)
    # flush to zero.
    np.testing.assert_allclose(k[:, :, :2], x[:, :, :2], rtol=2.0 ** -4 + 2.0 ** -8)
    np.testing.assert_allclose(v[:, :, :2], -x[:, :, :2], rtol=2.0 ** -4 + 2.0 ** -8)
    assert (np.abs(x[:, :, 2:]) < 2.0 ** -10 * scale[:, :, None]).all()
    assert not k[:, :, 2:].any() and not v[:, :, 2:].any()


# ---------------------------------------------------------------------------------------------------
# Pages mixing formats over layers (layer_kv_dtypes)


def test_mixed_page_sizes_sum_their_layers():
    # Layers 0 and 3 bf16, 1-2 and 4 int4: groups [0] [1, 2] [3] [4], one after another in the page.
    layout = KVPageLayout(5, 3, 64, 16, "int4", layer_kv_dtypes=((3, "bfloat16"), (0, "bf16"), (2, "int4")))
    assert layout.layer_kv_dtypes == ((0, "bf16"), (3, "bf16"))   # sorted, aliases named, no-ops dropped
    assert layout.mixed and [layout.kv_dtype_of(i) for i in range(5)] == ["bf16", "int4", "int4", "bf16", "int4"]
    per_layer = {fmt: kv_bytes_per_token_per_layer(fmt, 3, 64) for fmt in ("bf16", "int4")}
    assert layout.bytes_per_token == 2 * per_layer["bf16"] + 3 * per_layer["int4"]
    assert KVPageLayout.bytes_per_token_for(5, 3, 64, "int4", ((0, "bf16"), (3, "bf16"))) == layout.bytes_per_token
    groups = layout.layer_groups()
    assert [(g.first_layer, g.layout.num_layers, g.layout.kv_dtype) for g in groups] == [
        (0, 1, "bf16"), (1, 2, "int4"), (3, 1, "bf16"), (4, 1, "int4")]
    word = 0
    for g in groups:   # contiguous, in layer order, each a uniform page of its own layers
        assert not g.layout.mixed and g.layout.first_word == word
        assert g.layout.page_slot_words == layout.page_words
        assert g.layout.page_words == KVPageLayout(g.layout.num_layers, 3, 64, 16, g.layout.kv_dtype).page_words
        word += g.layout.page_words
    assert word == layout.page_words == 16 * layout.bytes_per_token // 4
    # Every layer overridden to one format: one group, the size of that format's uniform page.
    every = KVPageLayout(2, 3, 64, 16, "int4", layer_kv_dtypes=((0, "bf16"), (1, "bf16")))
    assert len(every.layer_groups()) == 1 and every.page_words == KVPageLayout(2, 3, 64, 16, "bf16").page_words
    # A padded slot keeps its stride for every group; a uniform page is its own single group.
    padded = dataclasses.replace(layout, page_stride_words=layout.page_words + 5)
    assert all(g.layout.page_slot_words == layout.page_words + 5 for g in padded.layer_groups())
    plain = KVPageLayout(2, 3, 64, 16, "int8")
    assert plain.layer_groups()[0].layout is plain and not plain.mixed


def test_mixed_page_validation():
    with pytest.raises(ValueError, match="not one of the model's 2 layers"):
        KVPageLayout(2, 2, 64, 8, "int4", layer_kv_dtypes=((2, "bf16"),))
    with pytest.raises(ValueError, match="not one of the model's"):
        KVPageLayout(2, 2, 64, 8, "int4", layer_kv_dtypes=((-1, "bf16"),))
    with pytest.raises(ValueError, match="twice"):
        KVPageLayout(2, 2, 64, 8, "int4", layer_kv_dtypes=((0, "bf16"), (0, "fp8")))
    with pytest.raises(ValueError, match="unsupported kv_dtype"):
        KVPageLayout(2, 2, 64, 8, "int4", layer_kv_dtypes=((0, "int2"),))
    with pytest.raises(ValueError, match="32-bit words"):   # the override's own geometry is checked
        KVPageLayout(2, 1, 2, 8, "float32", layer_kv_dtypes=((0, "fp8"),))
    with pytest.raises(ValueError, match="shorter than a page"):
        KVPageLayout(2, 2, 64, 8, "int4", first_word=8, page_stride_words=KVPageLayout(2, 2, 64, 8, "int4").page_words)
    mixed = KVPageLayout(2, 2, 64, 8, "int4", layer_kv_dtypes=((0, "bf16"),))
    pool, ids = jnp.zeros((1, mixed.page_words), jnp.uint32), jnp.zeros(1, jnp.int32)
    with pytest.raises(ValueError, match="layer_groups"):
        read_kv_pages(pool, mixed, ids, 0)
    with pytest.raises(ValueError, match="layer_groups"):
        write_kv_tokens(pool, mixed, ids, ids, jnp.ones(1, bool), 0, jnp.zeros((1, 2, 64)), jnp.zeros((1, 2, 64)))


@jax.jit(static_argnums=1)
def _write_layers(pool, layout, pages, slots, k, v):
    """Write every layer of `layout` (k, v: [layers, N, H, D])."""
    valid = jnp.ones(pages.shape, bool)
    return lax.fori_loop(0, layout.num_layers, lambda layer, p: write_kv_tokens(
        p, layout, pages, slots, valid, layer, k[layer], v[layer]), pool)


def test_mixed_page_groups_write_where_a_uniform_page_of_theirs_would(rng):
    """Each group's layers land in their own span of the page slot: the span holds, word for word,
    what a plain uniform layout of that group writes into a pool of the span alone; reads through the
    group layout give what reads of that pool give; nothing outside the span changes."""
    t, h, d, num_pages = 8, 3, 64, 4
    layout = KVPageLayout(4, h, d, t, "int4_fp8", pages_per_slab=2, layer_kv_dtypes=((0, "bf16"), (2, "fp8")))
    assert [g.layout.kv_dtype for g in layout.layer_groups()] == ["bf16", "int4_fp8", "fp8", "int4_fp8"]
    pos = rng.permutation(num_pages * t)[:19]            # distinct (page, slot) pairs, both slabs
    pages, slots = jnp.asarray(pos // t, jnp.int32), jnp.asarray(pos % t, jnp.int32)
    pool = jnp.full((num_pages // 2, 2 * layout.page_words), POISON, jnp.uint32)
    for g in layout.layer_groups():
        sub = g.layout
        lo, hi = sub.first_word, sub.first_word + sub.page_words
        k, v = (jnp.asarray(rand_kv(rng, (sub.num_layers, len(pos), h, d))) for _ in range(2))
        before = np.asarray(pool).reshape(num_pages, layout.page_words)
        pool = _write_layers(pool, sub, pages, slots, k, v)
        after = np.asarray(pool).reshape(num_pages, layout.page_words)
        alone = dataclasses.replace(sub, first_word=0, page_stride_words=0, pages_per_slab=1)
        span = _write_layers(jnp.full((num_pages, sub.page_words), POISON, jnp.uint32), alone, pages, slots, k, v)
        np.testing.assert_array_equal(after[:, lo:hi], np.asarray(span))
        assert (after[:, lo:hi] != POISON).any(), "nothing written"
        outside = np.ones(layout.page_words, bool)
        outside[lo:hi] = False
        np.testing.assert_array_equal(after[:, outside], before[:, outside])
        for layer in range(sub.num_layers):
            for got, want in zip(read_kv_pages(pool, sub, pages, layer), read_kv_pages(span, alone, pages, layer)):
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
