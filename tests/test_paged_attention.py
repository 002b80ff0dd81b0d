"""Tests for pallas_kernels/kv_pages.py (page reads/writes in the shared uint32 pool) and
pallas_kernels/paged_attention_ref.py (the pure-XLA paged attention reference), for every KV format:
bfloat16 and float32 stored as is, fp8 / int8 / int4 quantized on write (per token per kv head,
bfloat16 scales) and dequantized inside the attention.

Every pool starts out filled with NaN bit patterns, so any word a read or an attention step should
not depend on (unwritten pages, the unused tail of a partly filled page, the table entries past a
sequence's pages, the slab remainder) would poison the result. Page tables are random permutations
of the pool's pages, so nothing relies on pages being contiguous or in order.

Pool writes are checked bit for bit against a numpy model of the layout documented in kv_pages.py
(quantized rows: `quantize_kv`'s codes and bfloat16 scales, placed by numpy), which also proves that
no word outside the written rows changes. Attention is checked against a dense float64
softmax(q k^T / sqrt(D)) v with GQA grouping and a causal mask, computed on the K/V as stored
(rounded to bfloat16, or dequantized), and against the original float32 K/V with an error budget
derived from each format's precision.

Compile budget: the jitted functions take the layout as a static argument and the layer as a traced
int32, and all shapes within one parametrization are fixed (B, P, N, S), so each of the 40 parameter
combinations compiles write, read, decode attention (bfloat16/float32 only) and prefill attention once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels.kv_pages import KVPageLayout, read_kv_pages, write_kv_tokens
from pallas_kernels.paged_attention_ref import paged_attention_reference
from pallas_kernels.quant_formats import dequantize_kv, quantize_kv
from serving.kv.slab_allocator import SlabAllocator

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")   # compiling dominates these tests

# 0x7FC00000 is a float32 quiet NaN, but read as two bfloat16 elements its low half is +0.0. The
# pattern 0x7FC07FC0 is a NaN whether the word is read as one float32 or as two bfloat16s.
POISON = np.uint32(0x7FC07FC0)

NUM_LAYERS = 2
B = 6               # batch rows: lengths 1, a multiple of T, several blocks, random, random, 0
P = 24              # page-table width: 3 attention blocks of 8 pages
PAGES_PER_BLOCK = 8
PAGES_PER_SLAB = 3  # pages of one sequence straddle slabs
S_PREFILL = 6
U_BF16 = 2.0 ** -8  # unit roundoff of bfloat16 (8-bit significand, round to nearest even)
# Variance of e4m3's relative rounding error, for values whose significand m is spread as
# log-uniform over [1, 2) (Benford): the spacing is 2^-3 m relative, the error uniform within half
# of it, so E[(2^-3 / m)^2] / 12 = 2^-6 / 12 * E[1 / m^2] with E[1 / m^2] = (1/2 - 1/8) / ln 2.
E4M3_REL_VAR = 2.0 ** -6 / 12 * (0.5 - 0.125) / np.log(2)

NP_DTYPES = {"float32": np.float32, "bf16": ml_dtypes.bfloat16}
QUANTIZED = ("fp8", "int8", "int4", "int4_fp8")
KV_DTYPES = ("float32", "bf16") + QUANTIZED

_write = jax.jit(write_kv_tokens, static_argnums=1)
_read = jax.jit(read_kv_pages, static_argnums=1)
_attn = jax.jit(paged_attention_reference, static_argnums=2, static_argnames="pages_per_block")
# The reference quantization (bfloat16 scales, as the pool stores them), compiled as one function.
_quantize_kv = jax.jit(lambda x, kv_format: quantize_kv(x, kv_format, scale_dtype=jnp.bfloat16),
                       static_argnums=1)
_dequantize_kv = jax.jit(dequantize_kv)


# ---------------------------------------------------------------------------------------------------
# numpy model of the layout


def to_words(x: np.ndarray, kv_dtype: str) -> np.ndarray:
    """[..., n] values -> uint32[..., n * itemsize / 4], the bytes stored in the pool."""
    e = np.ascontiguousarray(np.asarray(x, np.float32).astype(NP_DTYPES[kv_dtype]))
    return e.view(np.uint32)  # little-endian: element 0 of a word is its low half, as XLA's bitcast


def quantized_words(x: np.ndarray, kv_format: str) -> tuple[np.ndarray, np.ndarray]:
    """[N, H, D] -> (uint32[N, row_words], uint32[N, scale_row_words]): a quantized token row as
    stored. Values: quantize_kv's codes (int4: its packed bytes), row-major [H][D], 4 bytes a word;
    scales: bfloat16 [s_0..s_H-1] (int4: then [z_0..z_H-1]), zero-padded to a whole word."""
    qt = _quantize_kv(jnp.asarray(x), kv_format)
    n = x.shape[0]
    values = np.ascontiguousarray(np.asarray(qt.values)).view(np.uint8).reshape(n, -1)
    scales = [np.asarray(qt.scales).reshape(n, -1)]
    if qt.zeros is not None:
        scales.append(np.asarray(qt.zeros).reshape(n, -1))
    scales = np.concatenate(scales, axis=1).view(np.uint16)
    scales = np.pad(scales, ((0, 0), (0, scales.shape[1] % 2)))  # pad half words with +0.0
    return values.view("<u4"), np.ascontiguousarray(scales).view("<u4")


def stored_kv(x: np.ndarray, kv_dtype: str) -> np.ndarray:
    """The K/V values a read returns for rows `x` [..., H, D]: rounded to the stored dtype, or
    quantized then dequantized (float32) for quantized formats."""
    if kv_dtype in QUANTIZED:
        return np.asarray(_dequantize_kv(_quantize_kv(jnp.asarray(x), kv_dtype)))
    return np.asarray(x, np.float32).astype(NP_DTYPES[kv_dtype])


def bits(x) -> np.ndarray:
    """Bit pattern of an array (NaN-safe exact comparison)."""
    x = np.ascontiguousarray(np.asarray(x))
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def model_write(pool: np.ndarray, layout: KVPageLayout, pages, slots, valid, layer, k, v) -> np.ndarray:
    """What write_kv_tokens must do, computed from the layout's documented formula: a chunk is
    [kv_head][token][head_words] values, then (quantized formats) [token][scale_row_words] scales."""
    pool = pool.copy()
    rw, srw, t = layout.row_words, layout.scale_row_words, layout.tokens_per_page
    hw = layout.head_words
    for kind, x in ((0, k), (1, v)):
        x = np.asarray(x)
        if layout.quantized:
            rows, scale_rows = quantized_words(x, layout.kv_dtype)
        else:
            rows, scale_rows = to_words(x.reshape(len(x), -1), layout.kv_dtype), None
        for i in np.flatnonzero(valid):
            slab, local = divmod(int(pages[i]), layout.pages_per_slab)
            chunk = local * layout.page_words + (layer * 2 + kind) * layout.chunk_words
            for h in range(layout.num_kv_heads):
                w = chunk + (h * t + int(slots[i])) * hw
                pool[slab, w:w + hw] = rows[i, h * hw:(h + 1) * hw]
            if scale_rows is not None:
                w = chunk + t * rw + int(slots[i]) * srw
                pool[slab, w:w + srw] = scale_rows[i]
    return pool


def page_words(layout: KVPageLayout, page: int) -> tuple[int, slice]:
    slab, local = divmod(page, layout.pages_per_slab)
    return slab, slice(local * layout.page_words, (local + 1) * layout.page_words)


def make_pool(layout: KVPageLayout, num_slabs: int, spare_words: int = 5) -> np.ndarray:
    """Poisoned pool whose slabs hold `pages_per_slab` pages plus a remainder that fits no page."""
    slab_words = layout.pages_per_slab * layout.page_words + spare_words
    return np.full((num_slabs, slab_words), POISON, np.uint32)


def dense_attention(q, k, v, q_pos, kv_len) -> np.ndarray:
    """float64 softmax(q k^T / sqrt(D)) v for one sequence. q: [S, Hq, D]; k, v: [>=kv_len, Hkv, D].
    q head h reads kv head h // (Hq / Hkv). A query that sees no key gives 0."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k[:kv_len], v[:kv_len]))
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    kh = np.repeat(k, hq // hkv, axis=1)  # [L, Hq, D]
    vh = np.repeat(v, hq // hkv, axis=1)
    s = np.einsum("shd,lhd->hsl", q, kh) / np.sqrt(d)
    mask = np.arange(kv_len)[None, :] <= np.asarray(q_pos)[:, None]  # [S, L]
    s = np.where(mask[None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)
    p = np.where(mask[None], np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    l = p.sum(axis=-1, keepdims=True)
    out = np.einsum("hsl,lhd->shd", p / np.where(l > 0, l, 1.0), vh)
    return out


def bf16_error_bound(q, k, v, q_pos, kv_len) -> np.ndarray:
    """Rigorous bound on |attention(K, V) - attention(bf16(K), bf16(V))| per [S, Hq] (float32 math
    aside). Rounding gives |dk| <= u|k| and |dv| <= u|v| elementwise (u = 2^-8), hence every score
    moves by at most eps = u * max_i sum_d |q_d k_id| / sqrt(D), every softmax weight by a factor in
    [e^-2eps, e^2eps], so sum_i |p_i - p'_i| <= e^(2 eps) - 1, and
        |out - out'| <= sum_i |p_i - p'_i| |v_i| + sum_i p'_i |dv_i| <= max|v| (e^(2 eps) - 1 + u)."""
    q, k, v = (np.abs(np.asarray(a, np.float64)) for a in (q, k[:kv_len], v[:kv_len]))
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    kh = np.repeat(k, hq // hkv, axis=1)
    vmax = np.repeat(v, hq // hkv, axis=1).max(axis=(0, 2), initial=0.0)  # [Hq]
    eps = U_BF16 * np.einsum("shd,lhd->shl", q, kh).max(axis=-1, initial=0.0) / np.sqrt(d)  # [S, Hq]
    return vmax[None, :] * (np.expm1(2 * eps) + U_BF16)


def quant_step(x: np.ndarray, kv_format: str) -> np.ndarray:
    """Quantization step (spacing of the representable values around each element) of K/V rows
    x [..., H, D], in x's units, from the stored bfloat16 scales: int8 and int4 one step of `scale`
    (absmax/127, (max - min)/15) per token and head; fp8 e4m3 has 3 mantissa bits, so the spacing
    at y = |x| / scale is 2^(floor(log2 y) - 3) (relative 2^-4..2^-3), and 2^-9 below 2^-6."""
    qt = _quantize_kv(jnp.asarray(x), kv_format)
    scale = np.asarray(qt.scales.astype(jnp.float32), np.float64)
    if kv_format != "fp8":
        return np.broadcast_to(scale, x.shape)
    y = np.abs(np.asarray(x, np.float64)) / scale
    return 2.0 ** (np.floor(np.log2(np.maximum(y, 2.0 ** -6))) - 3) * scale


def predicted_sq_error(q, k, v, var_k, var_v, q_pos, kv_len, fp8_rel_var: float = 0.0) -> float:
    """Expected sum of squared attention-output errors when K and V carry independent zero-mean
    errors of variance var_k, var_v (per element), to first order. With weights p_i and output o,
        d_out = sum_i p_i dv_i + sum_i p_i ds_i (v_i - o),  ds_i = q . dk_i / sqrt(D)
    (the softmax's normalisation turns sum_i p_i (ds_i - sum_j p_j ds_j) v_i into the second sum), so
        E|d_out|^2 = sum_i p_i^2 (sum_d var_v[i, d] + Var(ds_i) |v_i - o|^2),
        Var(ds_i) = sum_d q_d^2 var_k[i, d] / D.
    int4_fp8's e4m3 queries and P add relative errors of variance `fp8_rel_var` on every q_d (a
    further q_d^2 k_id^2 fp8_rel_var / D in Var(ds_i)) and on every p_i (d_out += sum_i p_i e_i v_i:
    sum_i p_i^2 fp8_rel_var |v_i|^2)."""
    q = np.asarray(q, np.float64)
    k, v, var_k, var_v = (np.asarray(a, np.float64)[:kv_len] for a in (k, v, var_k, var_v))
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    k, v, var_k, var_v = (np.repeat(a, hq // hkv, axis=1) for a in (k, v, var_k, var_v))  # [L, Hq, D]
    s = np.einsum("shd,lhd->hsl", q, k) / np.sqrt(d)
    mask = np.arange(kv_len)[None, :] <= np.asarray(q_pos)[:, None]
    s = np.where(mask[None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)
    p = np.where(mask[None], np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    p /= np.where(p.sum(axis=-1, keepdims=True) > 0, p.sum(axis=-1, keepdims=True), 1.0)
    o = np.einsum("hsl,lhd->hsd", p, v)
    var_s = np.einsum("shd,lhd->hsl", q ** 2, var_k + fp8_rel_var * k ** 2) / d
    dev2 = (np.einsum("lhd,lhd->hl", v, v)[:, None, :] - 2 * np.einsum("lhd,hsd->hsl", v, o)
            + np.einsum("hsd,hsd->hs", o, o)[:, :, None])                      # |v_i - o|^2
    v_err = var_v.sum(axis=-1) + fp8_rel_var * np.einsum("lhd,lhd->lh", v, v)
    return float(np.sum(p ** 2 * (v_err.T[:, None, :] + var_s * dev2)))


# ---------------------------------------------------------------------------------------------------
# The main round trip: write ragged sequences into scattered pages, read back, attend


def ragged_lengths(rng, t: int) -> np.ndarray:
    block = PAGES_PER_BLOCK * t
    return np.array([
        1,                                         # a single token
        t * int(rng.integers(1, 5)),               # exactly fills its last page
        int(rng.integers(2 * block + 1, P * t + 1)),  # spans all three attention blocks
        int(rng.integers(2, P * t + 1)),
        int(rng.integers(2, block + 1)),
        0,                                         # nothing cached
    ])


def scattered_batch(rng, layout: KVPageLayout, lens: np.ndarray, num_pages: int):
    """Page table: each sequence's pages drawn from a random permutation of the pool; entries past a
    sequence's pages point at random pages never written (poison)."""
    t = layout.tokens_per_page
    need = [layout.pages_for(int(n)) for n in lens]
    perm = rng.permutation(num_pages)
    used, spare = perm[:sum(need)], perm[sum(need):]
    assert len(spare) > 0
    table = rng.choice(spare, size=(len(lens), P)).astype(np.int32)
    offs = np.cumsum([0] + need)
    for b, n in enumerate(need):
        table[b, :n] = used[offs[b]:offs[b + 1]]
    # The tokens to write: every cached position of every sequence, in a random order, with padding
    # rows (valid=False) pointing at live pages and carrying NaN K/V scattered among them.
    tok_b = np.concatenate([np.full(n, b) for b, n in enumerate(lens)]).astype(np.int64)
    tok_pos = np.concatenate([np.arange(n) for n in lens]).astype(np.int64)
    n_tok = len(tok_b)
    n_rows = len(lens) * P * t  # fixed, so the write compiles once per layout
    order = rng.permutation(n_rows)
    valid = np.zeros(n_rows, bool)
    valid[order[:n_tok]] = True
    rows_b = np.zeros(n_rows, np.int64)
    rows_pos = np.zeros(n_rows, np.int64)
    rows_b[order[:n_tok]], rows_pos[order[:n_tok]] = tok_b, tok_pos
    rows_b[order[n_tok:]] = rng.integers(0, len(lens), n_rows - n_tok)
    rows_pos[order[n_tok:]] = rng.integers(0, P * t, n_rows - n_tok)
    pages = table[rows_b, rows_pos // t].astype(np.int32)
    slots = (rows_pos % t).astype(np.int32)
    return table, used, spare, valid, rows_b, rows_pos, pages, slots


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("tokens_per_page", [8, 16])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_write_read_attend(kv_dtype, tokens_per_page, heads, head_dim):
    rng = np.random.default_rng()
    hq, hkv = heads
    t = tokens_per_page
    layout = KVPageLayout(NUM_LAYERS, hkv, head_dim, t, kv_dtype, pages_per_slab=PAGES_PER_SLAB)
    num_slabs = -(-(B * P + 8) // PAGES_PER_SLAB)
    num_pages = num_slabs * PAGES_PER_SLAB
    pool0 = make_pool(layout, num_slabs)

    lens = ragged_lengths(rng, t)
    table, used, spare, valid, rows_b, rows_pos, pages, slots = scattered_batch(rng, layout, lens, num_pages)
    max_len = P * t
    # Per-layer K/V of each sequence, float32 (the same shapes every run).
    kv = rng.standard_normal((NUM_LAYERS, 2, B, max_len, hkv, head_dim)).astype(np.float32)

    pool = jnp.asarray(pool0)
    expected = pool0
    for layer in range(NUM_LAYERS):
        k_rows = kv[layer, 0, rows_b, rows_pos]
        v_rows = kv[layer, 1, rows_b, rows_pos]
        k_rows[~valid] = np.nan  # padding rows carry garbage that must never land
        v_rows[~valid] = np.inf
        pool = _write(pool, layout, jnp.asarray(pages), jnp.asarray(slots), jnp.asarray(valid),
                      jnp.int32(layer), jnp.asarray(k_rows), jnp.asarray(v_rows))
        expected = model_write(expected, layout, pages, slots, valid, layer, k_rows, v_rows)

    # 1. The pool is exactly the layout model: written rows hold the K/V bits, every other word
    #    (pages never written, page tails, slab remainders, padding targets) is still poison.
    pool_np = np.asarray(pool)
    assert pool_np.dtype == np.uint32 and pool_np.shape == pool0.shape
    assert np.array_equal(pool_np, expected)
    for p in spare:
        slab, sl = page_words(layout, int(p))
        assert (pool_np[slab, sl] == POISON).all()
    assert (pool_np[:, PAGES_PER_SLAB * layout.page_words:] == POISON).all()

    # 2. Read back through the page table, bit for bit: the stored dtype, or for quantized formats
    #    float32 equal to dequantize(quantize(x)) with bfloat16 scales.
    kv_cast = stored_kv(kv, kv_dtype)
    for layer in range(NUM_LAYERS):
        k, v = _read(pool, layout, jnp.asarray(table), jnp.int32(layer))
        assert k.dtype == layout.dtype and k.shape == (B, P, t, hkv, head_dim)
        k = np.asarray(k).reshape(B, max_len, hkv, head_dim)
        v = np.asarray(v).reshape(B, max_len, hkv, head_dim)
        for b, n in enumerate(lens):
            assert np.array_equal(bits(k[b, :n]), bits(kv_cast[layer, 0, b, :n]))
            assert np.array_equal(bits(v[b, :n]), bits(kv_cast[layer, 1, b, :n]))
            assert np.isnan(k[b, n:]).all() and np.isnan(v[b, n:]).all()  # never written: poison
            # (Quantized: poison scale words are NaN, so a read that ignored the scales fails here.)

    # 3. Attention, decode (one query at len - 1) and prefill (the last S positions, causal).
    # Tolerances. The kernel computes in float32 (bf16 K/V are upcast exactly), so against a float64
    # reference built from the K/V *as stored* (bf16-rounded for bfloat16) only float32 rounding in
    # the dot products, exp and the online-softmax rescaling remains: a few float32 ulps (6e-8) per
    # operation over <= 384 keys, i.e. ~1e-6 absolute on outputs of magnitude <= ~3 (measured max
    # 7e-7). rtol = 1e-5 with atol = 5e-6 (for outputs near 0, where a relative test is meaningless)
    # leaves ~7x margin. Against the *unrounded* float32 K/V, bf16 storage adds an error bounded by
    # bf16_error_bound (rigorous, from bf16's 2^-8 unit roundoff) and, in RMS, by 2^-8 |v|.
    # Quantized formats: against the *dequantized* K/V the same float32-only tolerance holds (the
    # values are dequantized to float32 before any arithmetic), which checks the kernel logic
    # exactly; against the original K/V see the error budget below.
    kv_stored = kv_cast.astype(np.float64)
    if layout.quantized:
        # Rounding to a grid of step h leaves an error uniform in [-h/2, h/2]: variance h^2 / 12.
        var = quant_step(kv, kv_dtype) ** 2 / 12
        sq_err_q = sq_pred = 0.0
    # Quantized formats run the prefill shape only: its last query is the decode query (position
    # len - 1), and the kernel's path through the dequantization does not depend on S, so a decode
    # compile per format would only add test time (the bfloat16/float32 runs cover S = 1).
    for s_len in (S_PREFILL,) if layout.quantized else (1, S_PREFILL):
        q = rng.standard_normal((B, s_len, hq, head_dim)).astype(np.float32)
        q_pos = (lens[:, None] - s_len + np.arange(s_len)[None, :]).astype(np.int32)  # may be < 0
        for layer in range(NUM_LAYERS):
            out = _attn(jnp.asarray(q), pool, layout, jnp.int32(layer), jnp.asarray(table),
                        jnp.asarray(q_pos), jnp.asarray(lens, dtype=jnp.int32),
                        pages_per_block=PAGES_PER_BLOCK)
            out = np.asarray(out)
            assert out.shape == (B, s_len, hq, head_dim) and out.dtype == np.float32
            assert np.isfinite(out).all()
            sq_err = sq_v = 0.0
            for b, n in enumerate(lens):
                if kv_dtype != "int4_fp8":   # whose e4m3 queries and P are in the error budget below
                    ref = dense_attention(q[b], kv_stored[layer, 0, b], kv_stored[layer, 1, b], q_pos[b], n)
                    np.testing.assert_allclose(out[b], ref, rtol=1e-5, atol=5e-6,
                                               err_msg=f"layer {layer} row {b} len {n} S {s_len}")
                if layout.quantized and n:
                    ref32 = dense_attention(q[b], kv[layer, 0, b], kv[layer, 1, b], q_pos[b], n)
                    sq_err_q += np.sum((out[b] - ref32) ** 2)
                    sq_pred += predicted_sq_error(q[b], kv[layer, 0, b], kv[layer, 1, b], var[layer, 0, b],
                                                  var[layer, 1, b], q_pos[b], n,
                                                  E4M3_REL_VAR if kv_dtype == "int4_fp8" else 0.0)
                if kv_dtype == "bf16" and n:
                    k32, v32 = kv[layer, 0, b], kv[layer, 1, b]
                    ref32 = dense_attention(q[b], k32, v32, q_pos[b], n)
                    bound = bf16_error_bound(q[b], k32, v32, q_pos[b], n)
                    err = np.abs(out[b] - ref32)
                    assert (err.max(axis=-1) <= bound + 5e-6).all(), (err.max(), bound.min())
                    sq_err += np.sum(err[q_pos[b] >= 0] ** 2)
                    sq_v += np.sum(v32[:n] ** 2) / n * (q_pos[b] >= 0).sum() * hq * head_dim
            if kv_dtype == "bf16":
                # The worst-case bound above is loose (it lets every rounding push the same way);
                # the roundings have random signs and average out, so over the batch the RMS error
                # stays within bf16's relative precision of the RMS value (measured: < 0.25 u).
                assert np.sqrt(sq_err) <= U_BF16 * np.sqrt(sq_v), (np.sqrt(sq_err / sq_v) / U_BF16)
            assert not out[lens == 0].any()  # no keys: exactly zero
    if layout.quantized:
        # Against the original float32 K/V the error comes from quantization alone. Its size follows
        # from each format's step (quant_step: int8 absmax/127, int4 (max - min)/15, int4_fp8
        # absmax/7, fp8 2^-4..2^-3 relative; int4_fp8 also rounds its queries and P to e4m3,
        # E4M3_REL_VAR): rounding errors are independent and uniform within half a step, and
        # predicted_sq_error propagates them through the softmax to first order. The measured RMS
        # error over the batch must match that prediction to within a factor 1.25 either way.
        # Measured over 48 runs: 0.94..1.04 (the absmax/min/max elements round exactly, the model
        # ignores second-order terms).
        # Quantization that did nothing (ratio 0), used a wrong scale (off by 2x) or the wrong
        # bits falls outside the window.
        ratio = np.sqrt(sq_err_q / sq_pred)
        assert 0.8 <= ratio <= 1.25, ratio


def test_error_grows_as_precision_drops():
    """The same K/V and queries through every KV format: the attention error against the float32
    K/V must order as the formats' precision. Per-element RMS storage error for N(0, 1) K/V with
    head_dim 64 (absmax ~2.5, range ~5): float32 0; bfloat16 2^-9/sqrt(3) ~ 1e-3 (relative);
    int8 (2.5/127)/sqrt(12) ~ 6e-3; fp8 e4m3 ~ 2.6e-2 (spacing 2^-4..2^-3 relative); int4
    (5/15)/sqrt(12) ~ 0.1. Measured output RMS errors: 3e-8, 5e-4, 1.8e-3, 7.6e-3, 2.8e-2 (neighbours
    3.4x..4.2x apart, float32 aside), so a factor 2 between neighbours is asserted; a format whose
    quantization silently did nothing (or too much) breaks the chain."""
    rng = np.random.default_rng()
    # The shapes of test_write_read_attend[*-8-gqa4-64], so the jitted write and attention are shared.
    t, hq, hkv, d = 8, 8, 2, 64
    num_slabs = -(-(B * P + 8) // PAGES_PER_SLAB)
    lens = ragged_lengths(rng, t)
    kv = rng.standard_normal((2, B, P * t, hkv, d)).astype(np.float32)
    q = rng.standard_normal((B, S_PREFILL, hq, d)).astype(np.float32)
    q_pos = (lens[:, None] - S_PREFILL + np.arange(S_PREFILL)[None, :]).astype(np.int32)
    refs = [dense_attention(q[b], kv[0, b], kv[1, b], q_pos[b], n) for b, n in enumerate(lens)]
    rms = {}
    for kv_dtype in ("float32", "bf16", "int8", "fp8", "int4"):
        layout = KVPageLayout(NUM_LAYERS, hkv, d, t, kv_dtype, pages_per_slab=PAGES_PER_SLAB)
        table, _, _, valid, rows_b, rows_pos, pages, slots = scattered_batch(
            rng, layout, lens, num_slabs * PAGES_PER_SLAB)
        pool = _write(jnp.asarray(make_pool(layout, num_slabs)), layout, jnp.asarray(pages), jnp.asarray(slots),
                      jnp.asarray(valid), jnp.int32(1), jnp.asarray(kv[0, rows_b, rows_pos]),
                      jnp.asarray(kv[1, rows_b, rows_pos]))
        out = np.asarray(_attn(jnp.asarray(q), pool, layout, jnp.int32(1), jnp.asarray(table), jnp.asarray(q_pos),
                               jnp.asarray(lens, dtype=jnp.int32), pages_per_block=PAGES_PER_BLOCK))
        rms[kv_dtype] = np.sqrt(np.mean([np.mean((out[b] - refs[b]) ** 2) for b in range(B)]))
    names = list(rms)
    for lo, hi in zip(names, names[1:]):
        assert rms[hi] > 2 * rms[lo], rms


# ---------------------------------------------------------------------------------------------------
# Writes touch exactly their rows

SMALL = KVPageLayout(num_layers=2, num_kv_heads=2, head_dim=64, tokens_per_page=4, kv_dtype="bfloat16",
                     pages_per_slab=4)


@pytest.mark.parametrize("layout", [SMALL, dataclasses.replace(SMALL, kv_dtype="float32", pages_per_slab=2),
                                    dataclasses.replace(SMALL, kv_dtype="int8", num_kv_heads=3),
                                    dataclasses.replace(SMALL, kv_dtype="fp8", num_kv_heads=1, pages_per_slab=3),
                                    dataclasses.replace(SMALL, kv_dtype="int4", num_kv_heads=3)],
                         ids=["bf16", "f32", "int8", "fp8", "int4"])
def test_padding_writes_touch_nothing(layout):
    rng = np.random.default_rng()
    num_slabs = 3
    num_pages = num_slabs * layout.pages_per_slab
    n = 16
    # Start from random words (not all poison), so "unchanged" is a strong statement.
    pool0 = rng.integers(0, 2 ** 32, (num_slabs, layout.pages_per_slab * layout.page_words + 3),
                         dtype=np.uint32)
    pool0[rng.random(pool0.shape) < 0.3] = POISON
    # Distinct (page, slot) targets so the valid rows' outcome is order independent; padding rows
    # aim at the same pages, including the very rows the valid ones write.
    targets = rng.choice(num_pages * layout.tokens_per_page, n, replace=False)
    pages, slots = (targets // layout.tokens_per_page).astype(np.int32), (targets % layout.tokens_per_page).astype(np.int32)
    k = rng.standard_normal((n, layout.num_kv_heads, layout.head_dim)).astype(np.float32)
    v = rng.standard_normal((n, layout.num_kv_heads, layout.head_dim)).astype(np.float32)
    pool = jnp.asarray(pool0)

    # All padding: nothing changes at all.
    none = np.zeros(n, bool)
    out = _write(pool, layout, jnp.asarray(pages), jnp.asarray(slots), jnp.asarray(none), jnp.int32(1),
                 jnp.asarray(k), jnp.asarray(v))
    assert np.array_equal(np.asarray(out), pool0)

    # Mixed: exactly the valid rows change; padding aimed at the same rows does not overwrite them.
    valid = rng.random(n) < 0.5
    valid[0], valid[1] = True, False
    pages2 = pages.copy()
    pages2[~valid] = rng.choice(pages[valid], (~valid).sum())  # padding collides with real rows
    slots2 = slots.copy()
    slots2[~valid] = rng.choice(slots[valid], (~valid).sum())
    kp, vp = k.copy(), v.copy()
    kp[~valid], vp[~valid] = np.nan, 1e30
    for layer in (0, 1):
        out = _write(pool, layout, jnp.asarray(pages2), jnp.asarray(slots2), jnp.asarray(valid),
                     jnp.int32(layer), jnp.asarray(kp), jnp.asarray(vp))
        expected = model_write(pool0, layout, pages2, slots2, valid, layer, kp, vp)
        out = np.asarray(out)
        assert np.array_equal(out, expected)
        # Spelled out: no word outside the valid rows' K and V rows (values and scale rows) differs
        # from before. The rows are the words the model writes over both an all-0 and an all-1 pool.
        rows = (model_write(np.zeros_like(pool0), layout, pages2, slots2, valid, layer, k, v)
                == model_write(np.full_like(pool0, 0xFFFFFFFF), layout, pages2, slots2, valid, layer, k, v))
        assert rows.sum() == valid.sum() * 2 * (layout.row_words + layout.scale_row_words)
        assert np.array_equal(out[~rows], pool0[~rows])


def test_one_model_write_leaves_other_bytes():
    """Three models with different page sizes and KV formats format different slabs of one pool (via
    SlabAllocator); writing every row of one model's pages changes only those pages, never another
    model's or free slabs."""
    rng = np.random.default_rng()
    la = SMALL                                                                     # bf16, 2 layers
    lb = KVPageLayout(num_layers=1, num_kv_heads=1, head_dim=64, tokens_per_page=6, kv_dtype="float32")
    # Quantized, odd head count: 27 words a token per (layer, K|V) (24 of values, 3 of scales/zeros).
    lc = KVPageLayout(num_layers=2, num_kv_heads=3, head_dim=64, tokens_per_page=4, kv_dtype="int4")
    slab_bytes = 4 * la.page_bytes + 12  # B's pages (5 per slab) and C's do not tile it exactly either
    alloc = SlabAllocator(num_slabs=7, slab_bytes=slab_bytes)
    la = dataclasses.replace(la, pages_per_slab=alloc.register("a", la.page_bytes))
    lb = dataclasses.replace(lb, pages_per_slab=alloc.register("b", lb.page_bytes))
    lc = dataclasses.replace(lc, pages_per_slab=alloc.register("c", lc.page_bytes))
    assert la.pages_per_slab == 4 and lb.pages_per_slab == 5
    assert lc.page_bytes == 2 * 2 * 4 * 27 * 4 and lc.pages_per_slab == slab_bytes // lc.page_bytes == 9
    pa_first = alloc.allocate("a", 3)
    pb = alloc.allocate("b", 7)              # two slabs of b
    pc = alloc.allocate("c", 11)             # two slabs of c
    pa = pa_first + alloc.allocate("a", 3)   # fills a's slab, then a fresh one
    pool0 = np.full((alloc.num_slabs, slab_bytes // 4), POISON, np.uint32)

    def fill(pool, layout, pages, layers):
        ids = np.repeat(np.asarray(pages, np.int32), layout.tokens_per_page)
        sl = np.tile(np.arange(layout.tokens_per_page, dtype=np.int32), len(pages))
        ok = np.ones(len(ids), bool)
        expected = np.asarray(pool)
        for layer in layers:
            k = rng.standard_normal((len(ids), layout.num_kv_heads, layout.head_dim)).astype(np.float32)
            v = rng.standard_normal((len(ids), layout.num_kv_heads, layout.head_dim)).astype(np.float32)
            pool = _write(pool, layout, jnp.asarray(ids), jnp.asarray(sl), jnp.asarray(ok), jnp.int32(layer),
                          jnp.asarray(k), jnp.asarray(v))
            expected = model_write(expected, layout, ids, sl, ok, layer, k, v)
        assert np.array_equal(np.asarray(pool), expected)
        return pool

    def pages_mask(layout, pages):
        inside = np.zeros(pool0.shape, bool)
        for p in pages:
            slab, sl = page_words(layout, p)
            inside[slab, sl] = True
        return inside

    pool = fill(jnp.asarray(pool0), lb, pb, [0])
    after_b = np.asarray(pool)
    pool = fill(pool, lc, pc, [0, 1])
    before = np.asarray(pool)
    inside_c = pages_mask(lc, pc)
    assert np.array_equal(before[~inside_c], after_b[~inside_c])  # C's writes stay in C's pages
    pool = fill(pool, la, pa, [0, 1])
    after = np.asarray(pool)
    inside = pages_mask(la, pa)
    assert np.array_equal(after[~inside], before[~inside])
    assert (after[inside] != POISON).all()       # A's pages fully rewritten (two layers, K and V)
    assert not (inside & (pages_mask(lb, pb) | inside_c)).any()  # B's and C's data intact


# ---------------------------------------------------------------------------------------------------
# Rows with nothing cached

def test_empty_rows_give_zeros():
    rng = np.random.default_rng()
    layout = dataclasses.replace(SMALL, kv_dtype="float32", pages_per_slab=2)
    num_slabs, p_width = 4, 8
    pool0 = make_pool(layout, num_slabs)  # nothing written: every page is NaN
    hq, d = 4, layout.head_dim
    q = jnp.asarray(rng.standard_normal((3, 2, hq, d)).astype(np.float32))
    table = jnp.asarray(rng.integers(0, num_slabs * 2, (3, p_width)), dtype=jnp.int32)
    pos = jnp.asarray([[0, 1], [5, 6], [-1, 0]], dtype=jnp.int32)
    # All rows empty: the block loop never runs.
    out = np.asarray(_attn(q, jnp.asarray(pool0), layout, jnp.int32(0), table, pos,
                           jnp.zeros(3, jnp.int32), pages_per_block=PAGES_PER_BLOCK))
    assert not np.isnan(out).any() and not out.any()

    # One row live (its first page written), the others empty while reading the same NaN pages.
    t = layout.tokens_per_page
    n = 3
    k = rng.standard_normal((n, layout.num_kv_heads, d)).astype(np.float32)
    v = rng.standard_normal((n, layout.num_kv_heads, d)).astype(np.float32)
    page = int(table[1, 0])
    pool = _write(jnp.asarray(pool0), layout, jnp.full(n, page, jnp.int32), jnp.arange(n, dtype=jnp.int32),
                  jnp.ones(n, bool), jnp.int32(1), jnp.asarray(k), jnp.asarray(v))
    assert n < t
    out = np.asarray(_attn(q, pool, layout, jnp.int32(1), table, pos, jnp.asarray([0, n, 0], jnp.int32),
                           pages_per_block=PAGES_PER_BLOCK))
    assert not np.isnan(out).any()
    assert not out[0].any() and not out[2].any()
    ref = dense_attention(np.asarray(q[1]), k, v, np.asarray(pos[1]), n)
    np.testing.assert_allclose(out[1], ref, rtol=1e-5, atol=5e-6)


# ---------------------------------------------------------------------------------------------------
# A query's output does not depend on its step

@pytest.mark.parametrize("kv_dtype", ["bf16", "int4_fp8"])
def test_a_querys_output_does_not_depend_on_its_prefill_step(kv_dtype):
    """The same query over the same pages gives the same bits whether its prefill step holds 128
    queries, 100 or 36, with or without another sequence beside it: however a prompt is chunked (a
    prefix cache's hit, the chunk budget), its KV comes out the same."""
    rng = np.random.default_rng()
    hq, n = 9, 128                                        # SmolLM2's 3 query heads per kv head
    layout = KVPageLayout(1, 3, 64, 16, kv_dtype, pages_per_slab=4)
    pool = jnp.asarray(make_pool(layout, 3))
    keys, values = (jnp.asarray(rng.standard_normal((n, 3, 64)), jnp.float32) for _ in range(2))
    pool = _write(pool, layout, jnp.arange(n, dtype=jnp.int32) // 16, jnp.arange(n, dtype=jnp.int32) % 16,
                  jnp.ones(n, bool), jnp.int32(0), keys, values)
    q = jnp.asarray(rng.standard_normal((2, n, hq, 64)), jnp.float32)
    table = jnp.asarray(np.tile(np.arange(8, dtype=np.int32), (2, 1)))
    positions = jnp.arange(n, dtype=jnp.int32)[None].repeat(2, axis=0)
    lens = jnp.asarray([n, n], jnp.int32)

    def attend(rows, first, count):
        return np.asarray(_attn(q[rows, first:first + count], pool, layout, jnp.int32(0), table[rows],
                                positions[rows, first:first + count], lens[rows], pages_per_block=8))

    whole = attend(slice(0, 1), 0, n)[0]
    for first, count in ((92, 36), (64, 64), (3, 100), (120, 8)):
        np.testing.assert_array_equal(attend(slice(0, 1), first, count)[0], whole[first:first + count])
        np.testing.assert_array_equal(attend(slice(0, 2), first, count)[0], whole[first:first + count])
