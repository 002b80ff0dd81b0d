"""Random kernel inputs: KV pools with scattered page tables, queries, quantized weights, activations.

The one place the kernel tests, `scripts/bench_kernels.py` and `scripts/check_kernels_gpu.py` build
their cases, so a case a script reports is rebuilt by the same code. Attention pools are laid out as
the serving `KVPool` lays out a device's pool (`uint32[num_slabs, slab_words]`, slabs formatted into
one model's pages); the pages a fresh slab allocator hands that model are used in random order (a
sequence straddles slabs), page-table columns past a sequence's pages point at random valid pages, and
the pool can start filled with a NaN pattern (`POISON`) so a read of any word the result should not
depend on shows up. The slab size is the caller's (the benchmark sizes slabs as serving does).
Weights are quantized with bfloat16 scales, as the model loader stores them; activations carry a few
outlier channels. Nothing here is imported by the kernels themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.kv_pages import WORD_BYTES, KVPageLayout, write_kv_tokens
from pallas_kernels.pow2 import next_pow2
from pallas_kernels.quant_formats import (
    QuantizedTensor,
    dequantize,
    quantize_fp8_k_major,
    quantize_fp8_per_channel,
    quantize_fp8_per_token,
    quantize_int4_fp8,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    quantize_int8_per_token,
    unpack_int4,
    weight_kn,
)

POISON = 0x7FC07FC0                    # NaN as one float32 and as two bfloat16 halves
WEIGHT_SCALE_DTYPE = jnp.bfloat16      # as models/quantize.py stores scales and zero points
FILL_CHUNK_TOKENS = 1 << 16            # tokens written per pool-fill call (bounds the random K/V temp)
MIN_FILL_CHUNK_TOKENS = 1 << 12


def error_text(e: BaseException, limit: int = 2000) -> str:
    """An exception as a case records it: type and message, cut at `limit` characters."""
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + " ..."


# ---- attention ---------------------------------------------------------------------------------
@dataclass
class AttentionCase:
    layout: KVPageLayout
    pool: jax.Array          # uint32[num_slabs, slab_words]
    page_table: jax.Array    # int32[B, P]
    q: jax.Array             # [B, S, Hq, D]
    q_positions: jax.Array   # int32[B, S]
    kv_lens: jax.Array       # int32[B]
    layer: int

    @property
    def num_pool_pages(self) -> int:
        return self.pool.shape[0] * self.layout.pages_per_slab


@functools.partial(jax.jit, static_argnums=1, donate_argnums=0)
def _write_random_tokens(pool, layout: KVPageLayout, key, pages, slots, valid, layer):
    """Write random K/V rows (normal x a per-token, per-head scale in [0.5, 2], so quantization
    scales vary) for the given token slots; invalid slots are dropped by the scatter."""
    n, h, d = pages.shape[0], layout.num_kv_heads, layout.head_dim
    keys = jax.random.split(key, 4)
    k = jax.random.normal(keys[0], (n, h, d)) * jax.random.uniform(keys[1], (n, h, 1), minval=0.5, maxval=2.0)
    v = jax.random.normal(keys[2], (n, h, d)) * jax.random.uniform(keys[3], (n, h, 1), minval=0.5, maxval=2.0)
    return write_kv_tokens(pool, layout, pages, slots, valid, layer, k, v)


def token_slots(table: np.ndarray, lengths: np.ndarray, tokens_per_page: int) -> tuple[np.ndarray, np.ndarray]:
    """(page id, slot) of every live token, sequence by sequence."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.concatenate([np.arange(n) for n in lengths]) if lengths.sum() else np.zeros(0, np.int64)
    return table[rows, pos // tokens_per_page].astype(np.int32), (pos % tokens_per_page).astype(np.int32)


def page_fills(table, lengths, tokens_per_page: int) -> tuple[np.ndarray, np.ndarray]:
    """(page id, tokens written) of every page the sequences of `lengths` hold, sequence by sequence
    in table order: what `kv_write.write_bounds` takes to write those pages' key bounds."""
    table = np.asarray(table)
    pages, fill = [], []
    for b, n in enumerate(int(n) for n in lengths):
        for j in range(-(-n // tokens_per_page)):
            pages.append(table[b, j])
            fill.append(min(tokens_per_page, n - j * tokens_per_page))
    return np.asarray(pages, np.int32), np.asarray(fill, np.int32)


def build_attention_case(seed: int, *, num_kv_heads: int, head_dim: int, tokens_per_page: int,
                         kv_format: str, lengths, group: int, slab_bytes: int, seq: int = 1,
                         q_dtype=jnp.bfloat16, table_pages: int | None = None, spare_pages: int = 0,
                         fill: int = 0, num_layers: int = 1, layer: int | None = None,
                         key_bounds: bool = False) -> AttentionCase:
    """A pool of `slab_bytes` slabs holding `lengths[b]` random tokens per sequence in every layer, in
    pages 0..n-1 (what a fresh slab allocator hands one model) taken in a random order, page-table
    columns past a sequence's pages pointing at random valid pages (free ones included), and random
    queries at the last `seq` positions of each sequence. `fill` is the pool's initial word (a NaN
    pattern exposes reads of unwritten words); a slab tail no page fits is left as is. `key_bounds`:
    pages with room for key bounds (not written here: `kv_write.write_bounds`)."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int64)
    probe = KVPageLayout(num_layers, num_kv_heads, head_dim, tokens_per_page, kv_format, key_bounds=key_bounds)
    used = [probe.pages_for(int(n)) for n in lengths]
    pages_per_slab = slab_bytes // probe.page_bytes
    if slab_bytes % WORD_BYTES or not pages_per_slab:
        raise ValueError(f"a slab of {slab_bytes} bytes is not whole words or holds no page of "
                         f"{probe.page_bytes} bytes")
    num_slabs = max(1, -(-(sum(used) + spare_pages) // pages_per_slab))
    words = jnp.full((num_slabs, slab_bytes // WORD_BYTES), fill, jnp.uint32)
    layout = dataclasses.replace(probe, pages_per_slab=pages_per_slab)
    pages = rng.permutation(sum(used))

    width = max(table_pages or 0, max(used), 1)
    table = rng.integers(0, num_slabs * pages_per_slab, size=(len(lengths), width)).astype(np.int32)
    start = 0
    for b, u in enumerate(used):
        table[b, :u] = pages[start:start + u]
        start += u

    tok_pages, tok_slots = token_slots(table, lengths, tokens_per_page)
    # Power-of-two chunk sizes, at least MIN_FILL_CHUNK_TOKENS: one compiled writer per layout
    # serves many cases.
    chunk = min(FILL_CHUNK_TOKENS, max(MIN_FILL_CHUNK_TOKENS, next_pow2(len(tok_pages))))
    key = jax.random.key(seed % (1 << 32))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        for layer_i in range(num_layers):
            for lo in range(0, max(len(tok_pages), 1), chunk):
                p = np.zeros(chunk, np.int32)
                s = np.zeros(chunk, np.int32)
                n = len(tok_pages[lo:lo + chunk])
                p[:n], s[:n] = tok_pages[lo:lo + chunk], tok_slots[lo:lo + chunk]
                key, sub = jax.random.split(key)
                words = _write_random_tokens(words, layout, sub, jnp.asarray(p), jnp.asarray(s),
                                             jnp.asarray(np.arange(chunk) < n), jnp.int32(layer_i))

    key, sub = jax.random.split(key)
    q = jax.random.normal(sub, (len(lengths), seq, num_kv_heads * group, head_dim), jnp.float32).astype(q_dtype)
    q_positions = np.maximum(lengths[:, None] - seq + np.arange(seq)[None, :], 0).astype(np.int32)
    return AttentionCase(layout, words, jnp.asarray(table), q, jnp.asarray(q_positions),
                         jnp.asarray(lengths.astype(np.int32)), num_layers - 1 if layer is None else layer)


def attention_queries(key, batch: int, seq: int, q_heads: int, head_dim: int, dtype):
    """Standard-normal queries [batch, seq, q_heads, head_dim] in `dtype`."""
    return jax.random.normal(key, (batch, seq, q_heads, head_dim), jnp.float32).astype(dtype)


# ---- matmul ------------------------------------------------------------------------------------
def quantize_q8_0(w, group: int = 32) -> QuantizedTensor:
    """Group-wise symmetric int8 along K (the GGUF Q8_0 layout, f16-rounded scales), as imported."""
    k, n = w.shape
    wg = np.asarray(w, np.float32).reshape(k // group, group, n)
    d = (np.abs(wg).max(axis=1) / 127.0).astype(np.float16).astype(np.float32)
    d = np.where(d == 0, 1.0, d)
    q = np.clip(np.round(wg / d[:, None, :]), -127, 127).astype(np.int8).reshape(k, n)
    return QuantizedTensor(jnp.asarray(q), jnp.asarray(d), None, "int8", 0, group)


def random_weight(rng: np.random.Generator, k: int, n: int) -> jax.Array:
    """A float32 weight [K, N] ~ N(0, 0.05^2)."""
    return jnp.asarray((rng.normal(size=(k, n)) * 0.05).astype(np.float32))


def random_activations(rng: np.random.Generator, m: int, k: int, dtype) -> jax.Array:
    """Standard-normal x [M, K] in `dtype`, with three outlier channels (x20)."""
    x = rng.normal(size=(m, k)).astype(np.float32)
    x[:, rng.integers(0, k, 3)] *= 20.0  # activation outlier channels
    return jnp.asarray(x, dtype)


def quantized_weights(key, k: int, n: int, group_size: int, formats: dict) -> dict:
    """bf16 and every quantization in `formats` (name -> (quantizer (w, g), activation format)) of one
    random [K, N] weight (scale 0.02)."""
    w32 = jax.random.normal(key, (k, n), jnp.float32) * 0.02
    weights = {"bf16": w32.astype(jnp.bfloat16)}
    for name, (quant, _) in formats.items():
        weights[name] = jax.jit(functools.partial(quant, g=group_size))(w32)
    return weights


def consumed_operands(x, qw: QuantizedTensor, act):
    """(x, w) as the matmul consumes them, float64, for error bounds: quantized activations
    dequantized; for W4A8 the weight magnitude |q| + |z| (times the scale) of the kernel's
    x.q - z * sum(x) decomposition. K-major weights come back as [K, N]."""
    qw = weight_kn(qw)
    if act is None:
        return np.asarray(x, np.float64), np.asarray(dequantize(qw, x.dtype), np.float64)
    quant = quantize_int8_per_token if act == "int8" else quantize_fp8_per_token
    xd = np.asarray(dequantize(quant(x)), np.float64)
    if act == "fp8" and qw.fmt == "int4":
        g = qw.group_size
        q = np.asarray(unpack_int4(qw.values, signed=False, axis=0), np.float64)
        z = np.repeat(np.abs(np.asarray(qw.zeros, np.float64)), g, axis=0)
        s = np.repeat(np.asarray(qw.scales, np.float64), g, axis=0)
        return xd, (q + z) * s
    return xd, np.asarray(dequantize(qw), np.float64)


# name -> (weight quantizer w [K, N] -> QuantizedTensor, activation format); bf16 scales as loaded.
MATMUL_FORMATS = {
    "w4a16_g128": (lambda w: quantize_int4_groupwise(w, 128, scale_dtype=jnp.bfloat16), None),
    "w4a16_g32": (lambda w: quantize_int4_groupwise(w, 32, scale_dtype=jnp.bfloat16), None),
    "w4a16_sym_g32": (lambda w: quantize_int4_groupwise(w, 32, asymmetric=False, scale_dtype=jnp.bfloat16), None),
    "w8a16": (lambda w: quantize_int8_per_channel(w, scale_dtype=jnp.bfloat16), None),
    "w8a16_q8_0": (quantize_q8_0, None),
    "fp8_weight_only": (lambda w: quantize_fp8_per_channel(w, scale_dtype=jnp.bfloat16), None),
    "w8a8": (lambda w: quantize_int8_per_channel(w, scale_dtype=jnp.bfloat16), "int8"),
    "fp8": (lambda w: quantize_fp8_per_channel(w, scale_dtype=jnp.bfloat16), "fp8"),
    "fp8_k_major": (lambda w: quantize_fp8_k_major(w, scale_dtype=jnp.bfloat16), "fp8"),   # Mosaic GPU
    "int4_fp8_g128": (lambda w: quantize_int4_fp8(w, 128), "fp8"),                          # Mosaic GPU
    "w4a8_g128": (lambda w: quantize_int4_groupwise(w, 128, scale_dtype=jnp.bfloat16), "fp8"),
}
