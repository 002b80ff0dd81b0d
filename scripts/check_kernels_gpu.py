"""Correctness check of the compiled Pallas kernels on a GPU, against the XLA references.

    .venv/bin/python scripts/check_kernels_gpu.py [--json OUT] [--interpret] [filters]

Attention (through the dispatcher `pallas_kernels.paged_attention`, implementation "pallas"): every
KV format (bf16, float32, fp8, int8, int4, FireQ's int4_fp8) x page size {8, 16} x GQA ratio {1, 4} x head_dim
{64, 128}, decode (one query per sequence) and prefill (a chunk of T + 3 queries per sequence, which
crosses a page boundary), float32 queries; plus, per KV format, bfloat16 queries (what the model
passes) at T = 16, GQA 4, head_dim 128. Each pool is built as the kernel tests build theirs
(tests/test_paged_attention_pallas.py): 2 layers (layer 1 is read, so the layer offset matters),
2 KV heads, slabs of 3 pages plus a 20-byte remainder no page fits, every word first filled with a
NaN pattern (a read of any word the result should not depend on poisons it), the pages a slab
allocator hands one model in random order (sequences straddle slabs), page-table columns past a sequence's
pages pointing at random valid pages (free, NaN ones included); a 24-page table (a multiple of 8 like
the engine's, so the dispatcher's default plan gives several blocks and splits); sequence lengths 1,
T, 3T, random, the whole table, and 0 (an empty row, whose output must be exactly 0). int4_fp8 rounds
P to e4m3 against the running maximum, so its kernels match the reference only when they walk the
reference's KV blocks: they are called directly with its blocking (8 pages a step, one split; the
split-and-merge path does not depend on the format and is checked with the others). int4_fp8 prefill
runs the Mosaic GPU FP8 kernel where the dispatcher would (each prefill record names its "kernel").

Page selection (per KV format, page size and head_dim, at the largest GQA ratio, pools with key
bounds): the key-bounds kernel against `write_key_bounds`, the page-score kernel against the
reference, and the decode kernel over the per-head page tables of a bbox and a sink_window selection
(4 pages) against the reference attention over the same tables.

Matmuls (through `pallas_kernels.quantized_matmul`, "pallas"): every weight format with a kernel
(W4A16 int4 group 32/128 asymmetric and group 32 symmetric, W8A16 int8 per channel and group-wise
GGUF Q8_0, fp8 weight-only, W8A8, FP8, W4A8 on the Triton lowering; FP8 with K-major weights and
FireQ's INT4-FP8 on the Mosaic GPU kernels) on (K, N) = (256, 64) with bf16 x, (384, 192) with f32 x
(three 128-deep K steps, 64-wide column tiles, a 3-wide grid; weight-only kernels compute in x's
dtype) and (4096, 512) with bf16 x, at M in {1, 16, 33, 256} (one row, a full 16-row tile, a partial
tile, several tiles). x has a few outlier channels (x20), w ~ N(0, 0.05^2).

Inputs are fresh random numbers every run; the seed is printed (and stored in the JSON) so a failure
can be replayed with --seed. The references are traced under `jax.default_matmul_precision("highest")`:
on Ampere and newer GPUs XLA's default float32 dot is TF32, which would put the reference, not the
kernel, ~1e-3 off. The matmul kernels are traced at the default precision, as the model runs them
(they state their dot precision). The decode kernel has no dot. The prefill kernel's two dots are
checked tightly with `precision=BF16_BF16_F32_X3` (`dots=bf16x3` in the output): each float32 operand
split into two bfloat16 parts, three tensor-core dots, near-float32 accuracy without the FMA loops
(and their register spills) that "highest" compiles to; the bfloat16-query prefill cases are also
run at the serving precision (`dots=default`, TF32 on the GPU) against the TF32 bound below.

Tolerances (the interpret-mode tests' derivations; `tests/` is not importable where this runs, so they
are restated here):
  attention, float32 q: rtol = atol = 2e-5. Kernel and reference dequantize identically (same bf16
    scales/zeros, same float32 `x * s (+ z)`), so they differ only in float32 summation order (scores
    are sums of D <= 128 products) and a few ulps of exp/normalisation; outputs are convex
    combinations of V values of magnitude ~1-4. A page, slot or scale mistake moves outputs by O(1).
  attention, bfloat16 q: rtol = 2^-7, atol = 2^-7 * max|ref|: both sides round the same float32
    result to bfloat16, which can differ by one bf16 ulp at a rounding boundary.
  attention, prefill dots: the above plus the bound of `dot_attention_bound` with the dot's
    per-product relative error u (scores off by at most Delta = u * max sum|q k| of the row, so
    softmax weights by a factor exp(+-2 Delta), plus u for p.v; times max|v|). bf16x3: u = 2^-16
    (each operand is a + b with |x - a - b| <= 2^-18 |x|, and the dropped b_x b_y term is <= 2^-18 |xy|:
    3 * 2^-18 < 2^-16), a bound ~1e-3 of max|v| here against the O(1) a layout mistake causes.
    Default (TF32 operands, unit roundoff 2^-11 each): u = 2^-10, a worst case of a few % of
    max|v| (~100x the error a TF32 emulation shows), so these cases catch gross errors only.
  matmul: |kernel - ref| <= (2K + 8) * 2^-24 * (|x| @ |w|) over the operands as consumed (products
    are exact in float32 on both sides; a float32 sum of K terms is off by at most K * 2^-24 of the
    sum of |terms| per side, plus a few epilogue roundings); for W4A8 |w| uses |q| + |z| (the kernel
    computes x.q - z * sum(x)). Compiled kernels whose dots take fp8 operands (FP8, W4A8) get
    (K / 32 + 2) * 2^-13 * (|x| @ |w|) more: Hopper's fp8 tensor-core MMA accumulates with ~14 bits
    (DeepSeek-V3 report, section 3.3.2), about one such rounding per 32-deep MMA step. W8A8 accumulates
    in int32 (exact) and applies the same two multiplies: bit-identical interpreted; compiled, up to
    4 float32 ulps of |ref| (the two compilers may contract or order the epilogue differently).
  A layout mistake (a swapped nibble, a neighbouring group's scale) moves matmul outputs by ~1e-2 of
  |x| @ |w| or more: above every bound here except the compiled fp8 ones at K = 4096 (~1.6e-2), for
  which the K = 256 / 384 cases are the discriminating ones.

--interpret runs the same checks on the CPU with the kernels interpreted ("interpret"), by default a
small subset (page size 8, head_dim 64, M in {1, 16}, the (256, 64) matmul shape; the bfloat16-query
cases then use the subset's first page size and head_dim and its largest GQA ratio), compiling with
most XLA optimizations off (compile time dominates); filters below narrow or widen any run. Plain
interpret mode computes in IEEE float32 on the CPU, so there every case meets the tight tolerances.

Exit status 1 if any case fails (a mismatch, a non-finite output, or an exception).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from pallas_kernels.kernel_cases import (
    MATMUL_FORMATS,
    POISON,
    attention_queries,
    build_attention_case,
    consumed_operands,
    error_text,
    page_fills,
    random_activations,
    random_weight,
)
from pallas_kernels.kv_pages import KVPageLayout, read_kv_pages
from pallas_kernels.kv_write import write_bounds, write_kv
from pallas_kernels.page_scores_pallas import page_scores_pallas
from pallas_kernels.page_selection import POLICY_IDS, SelectionInputs, page_scores_reference, select_pages
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.paged_attention_pallas import paged_decode_attention
from pallas_kernels.paged_attention_ref import REFERENCE_PAGES_PER_BLOCK
from pallas_kernels.paged_prefill_mgpu import paged_prefill_attention_mgpu, prefill_mgpu_shape_error
from pallas_kernels.paged_prefill_pallas import paged_prefill_attention
from pallas_kernels.quant_formats import QuantizedTensor
from pallas_kernels.quantized_matmul import has_kernel, quantized_matmul

OPS = ("decode", "prefill", "kv_write", "sparse", "matmul")
KV_FORMATS = ("bf16", "float32", "fp8", "int8", "int4", "int4_fp8")
REFERENCE_BLOCKED = ("int4_fp8",)  # formats whose kernels are checked at the reference's blocking
PAGE_SIZES = (8, 16)
GQA_RATIOS = (1, 4)
HEAD_DIMS = (64, 128)
NUM_KV_HEADS = 2
NUM_LAYERS = 2
LAYER = 1                          # read the second layer: the layer offset matters
TABLE_PAGES = 24                   # page-table width: a multiple of 8, as the engine's (model_runner),
                                   # wide enough for several blocks and splits with the default plan
SPARE_PAGES = 4                    # free (NaN) pages the padding columns may point at
PAGES_PER_SLAB = 3
SLAB_REMAINDER_BYTES = 64          # a slab tail no page fits (whole int4 head rows: the Mosaic prefill's TMA view)
BF16_Q_CASE = (16, 4, 128)         # (page size, GQA ratio, head_dim) of the bfloat16-q cases

EPS32 = 2.0 ** -24
ATTN_F32_TOL = 2e-5                # rtol = atol, float32 q (module docstring)
ATTN_BF16_REL = 2.0 ** -7          # one bfloat16 ulp, bfloat16 q
FP8_MMA_STEP = 32                  # K depth of one fp8 tensor-core MMA
FP8_MMA_REL = 2.0 ** -13           # ~14-bit accumulation per fp8 MMA step (compiled only)
W8A8_COMPILED_ULPS = 4


FP8_OPERAND_FORMATS = ("fp8", "fp8_k_major", "int4_fp8_g128", "w4a8_g128")   # dots on e4m3 operands
# name -> (K, N, x dtype)
MATMUL_SHAPES = {
    "256x64-bf16": (256, 64, jnp.bfloat16),
    "384x192-f32": (384, 192, jnp.float32),
    "4096x512-bf16": (4096, 512, jnp.bfloat16),
}
MATMUL_MS = (1, 16, 33, 256)

INTERPRET_DEFAULTS = {"page_sizes": (8,), "head_dims": (64,), "matmul_shapes": ("256x64-bf16",), "ms": (1, 16)}


@dataclasses.dataclass(frozen=True)
class Selection:
    ops: tuple[str, ...]
    kv_formats: tuple[str, ...]
    page_sizes: tuple[int, ...]
    gqa: tuple[int, ...]
    head_dims: tuple[int, ...]
    matmul_formats: tuple[str, ...]
    matmul_shapes: tuple[str, ...]
    ms: tuple[int, ...]
    bf16_q: bool
    interpret: bool


# ---- tolerances --------------------------------------------------------------------------------
def attention_mismatch(out, ref, q_dtype, extra=0.0) -> tuple[float, float]:
    """(max |out - ref|, worst |out - ref| / tolerance); <= 1 passes. `extra`: an additional
    per-element bound (the TF32 one for dots at the default precision)."""
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    err = np.abs(out - ref)
    if q_dtype == jnp.bfloat16:
        tol = ATTN_BF16_REL * np.abs(ref) + ATTN_BF16_REL * float(np.abs(ref).max(initial=0.0))
    else:
        tol = ATTN_F32_TOL * np.abs(ref) + ATTN_F32_TOL
    return float(err.max(initial=0.0)), float((err / (tol + extra)).max(initial=0.0))


def matmul_bound(x, qw: QuantizedTensor, act, name: str, compiled: bool):
    """Per-element error bound (module docstring); None for W8A8 interpreted (must be exact)."""
    if act == "int8":
        return None
    k = qw.shape[0]
    xd, wd = consumed_operands(x, qw, act)
    mag = np.abs(xd) @ np.abs(wd)
    bound = (2 * k + 8) * EPS32 * mag
    if compiled and name in FP8_OPERAND_FORMATS:
        bound = bound + (k / FP8_MMA_STEP + 2) * FP8_MMA_REL * mag
    return bound + 1e-30


def matmul_mismatch(out, ref, bound, act, compiled: bool) -> tuple[float, float]:
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    err = np.abs(out - ref)
    if act == "int8":
        if not compiled:
            return float(err.max(initial=0.0)), float(np.inf if err.any() else 0.0)
        bound = W8A8_COMPILED_ULPS * EPS32 * np.abs(ref) + 1e-30
    return float(err.max(initial=0.0)), float((err / bound).max(initial=0.0))


# ---- running cases -----------------------------------------------------------------------------
# Prefill dot precision per label (the decode kernel has no dot): per-product relative error bound u.
DOT_PRECISIONS = {"bf16x3": (lax.DotAlgorithmPreset.BF16_BF16_F32_X3, 2.0 ** -16), "default": (None, 2.0 ** -10)}


@functools.lru_cache(maxsize=None)
def attention_callable(implementation: str, precision: str):
    return jax.jit(functools.partial(paged_attention, kernels=implementation,
                                     precision=DOT_PRECISIONS[precision][0]), static_argnums=2)


@functools.lru_cache(maxsize=None)
def matmul_callable(implementation: str, act_format: str | None):
    return jax.jit(functools.partial(quantized_matmul, act_format=act_format, kernels=implementation))


@functools.lru_cache(maxsize=None)
def reference_blocked_callable(op: str, implementation: str, precision: str):
    """The decode or prefill kernel walking the reference's KV blocks in one pass (module docstring)."""
    interpret = implementation == "interpret"
    if op == "decode":
        f = functools.partial(paged_decode_attention, pages_per_block=REFERENCE_PAGES_PER_BLOCK, num_splits=1,
                              interpret=interpret)
    else:
        f = functools.partial(paged_prefill_attention, pages_per_block=REFERENCE_PAGES_PER_BLOCK,
                              precision=DOT_PRECISIONS[precision][0], interpret=interpret)
    return jax.jit(f, static_argnums=2)


def reference_attention(*args):
    with jax.default_matmul_precision("highest"):
        return jax.block_until_ready(attention_callable("xla", "default")(*args))


def run_case(record: dict, body, progress) -> dict:
    """Run one check; an exception is a failure with its text."""
    t0 = time.perf_counter()
    try:
        record.update(body())
    except Exception as e:
        record.update(passed=False, error=error_text(e))
    record["seconds"] = time.perf_counter() - t0
    progress(record)
    return record


@functools.lru_cache(maxsize=None)
def mosaic_prefill_callable(implementation: str):
    return jax.jit(functools.partial(paged_prefill_attention_mgpu, interpret=implementation == "interpret"),
                   static_argnums=2)


def uses_mosaic_prefill(op: str, q, pool, layout: KVPageLayout, layer, page_table, *_) -> bool:
    """Whether the dispatcher runs the Mosaic GPU FP8 prefill for these arguments."""
    return op == "prefill" and prefill_mgpu_shape_error(layout, pool.shape, page_table.shape[1]) is None


def kernel_attention(impl: str, precision: str, op: str, *args):
    """The kernel through the dispatcher (at the reference's blocking for REFERENCE_BLOCKED formats:
    the Mosaic GPU FP8 prefill walks it always), its prefill dots at `precision` (a DOT_PRECISIONS
    label; the Mosaic kernel's are FP8)."""
    if uses_mosaic_prefill(op, *args):
        return jax.block_until_ready(mosaic_prefill_callable(impl)(*args))
    if args[2].kv_dtype in REFERENCE_BLOCKED:
        return jax.block_until_ready(reference_blocked_callable(op, impl, precision)(*args))
    return jax.block_until_ready(attention_callable(impl, precision)(*args))


def dot_attention_bound(unit: float, q, pool, layout: KVPageLayout, layer, page_table, q_positions, kv_lens):
    """Per-element bound on |kernel - exact| for attention whose two dots make a relative error of at
    most `unit` per product, accumulating in float32:
      scores: |s~ - s| <= Delta = (unit + D 2^-24) * max_j sum_i |q_i k_ji| over the row's visible keys;
      softmax: every weight moves by a factor within exp(+-2 Delta), so the output by at most
        expm1(2 Delta) * max|v| over the visible values;
      p.v: adds at most unit * max|v| (weights sum to 1).
    Returns [B, S, Hq, 1] (broadcast over head_dim)."""
    k, v = read_kv_pages(pool, layout, page_table, layer)                  # [B, P, T, Hkv, D]
    b, p, t, h, d = k.shape
    live = np.arange(p * t)[None, :] < np.asarray(kv_lens)[:, None]       # [B, J]
    k = np.where(live[:, :, None, None], np.asarray(k, np.float64).reshape(b, p * t, h, d), 0.0)
    v = np.where(live[:, :, None, None], np.asarray(v, np.float64).reshape(b, p * t, h, d), 0.0)
    seq, hq = q.shape[1], q.shape[2]
    qs = np.abs(np.asarray(q, np.float64)).reshape(b, seq, h, hq // h, d) * d ** -0.5
    visible = live[:, None, :] & (np.arange(p * t)[None, None, :] <= np.asarray(q_positions)[:, :, None])
    absdot = np.einsum("bshgd,bjhd->bshgj", qs, np.abs(k))
    absdot = np.where(visible[:, :, None, None, :], absdot, 0.0).max(axis=-1, initial=0.0)   # [B, S, H, G]
    delta = (unit + d * EPS32) * absdot
    vmax = np.where(visible[:, :, :, None], np.abs(v).max(axis=-1)[:, None], 0.0).max(axis=2)  # [B, S, H]
    bound = (np.expm1(2 * delta) + unit) * vmax[..., None]
    return bound.reshape(b, seq, hq, 1)


def attention_checks(sel: Selection, impl: str, seed: int, progress) -> list[dict]:
    records = []
    combos = [(fmt, t, d) for fmt in sel.kv_formats for t in sel.page_sizes for d in sel.head_dims]
    bf16_t, _, bf16_d = bf16_q_case(sel)
    if sel.bf16_q:
        combos += [(fmt, bf16_t, bf16_d) for fmt in sel.kv_formats if (fmt, bf16_t, bf16_d) not in combos]
    for i, (fmt, t, d) in enumerate(combos):
        records += attention_pool_checks(fmt, t, d, sel, impl, seed + 1000 * i, progress)
    return records


def bf16_q_case(sel: Selection) -> tuple[int, int, int]:
    """(page size, GQA ratio, head_dim) of the bfloat16-query cases: the 8B-like BF16_Q_CASE, or in
    an --interpret run the selection's own first page size / largest ratio / first head_dim."""
    if sel.interpret:
        return sel.page_sizes[0], max(sel.gqa), sel.head_dims[0]
    return BF16_Q_CASE


def attention_variants(op: str, t: int, d: int, sel: Selection) -> list[tuple[int, object, str]]:
    """(GQA ratio, q dtype, prefill dot precision) checked on one pool: float32 q at every selected
    ratio with bf16x3 dots (tight tolerance); for the bf16-q pool bf16 q too, and for prefill bf16 q
    with the dots at the serving precision (TF32 bound). Decode has no dot: "default"."""
    tight = "default" if op == "decode" else "bf16x3"
    out = []
    if t in sel.page_sizes and d in sel.head_dims:
        out += [(g, jnp.float32, tight) for g in sel.gqa]
    bf16_t, bf16_g, bf16_d = bf16_q_case(sel)
    if sel.bf16_q and (t, d) == (bf16_t, bf16_d):
        out.append((bf16_g, jnp.bfloat16, tight))
        if op == "prefill":
            out.append((bf16_g, jnp.bfloat16, "default"))
    return out


def attention_pool_checks(fmt: str, t: int, d: int, sel: Selection, impl: str, seed: int, progress) -> list[dict]:
    """Decode and prefill checks of every variant on one pool."""
    rng = np.random.default_rng(seed)
    lengths = [1, t, 3 * t, int(rng.integers(2, TABLE_PAGES * t + 1)), TABLE_PAGES * t, 0]
    page_bytes = KVPageLayout(NUM_LAYERS, NUM_KV_HEADS, d, t, fmt).page_bytes
    try:
        case = build_attention_case(
            seed, num_kv_heads=NUM_KV_HEADS, head_dim=d, tokens_per_page=t, kv_format=fmt, lengths=lengths,
            group=1, table_pages=TABLE_PAGES, spare_pages=SPARE_PAGES, fill=POISON, num_layers=NUM_LAYERS,
            layer=LAYER, slab_bytes=PAGES_PER_SLAB * page_bytes + SLAB_REMAINDER_BYTES)
    except Exception as e:
        record = {"kind": "pool", "kv_format": fmt, "tokens_per_page": t, "gqa": 0, "head_dim": d,
                  "q_dtype": "-", "kernel_precision": "-", "seed": seed, "passed": False,
                  "error": "building the pool: " + error_text(e), "seconds": 0.0}
        progress(record)
        return [record]
    key = jax.random.key(seed % (1 << 32))
    records = []
    for op in ("decode", "prefill"):
        if op not in sel.ops:
            continue
        seq = 1 if op == "decode" else t + 3
        q_pos = jnp.asarray(np.maximum(np.asarray(lengths)[:, None] - seq + np.arange(seq)[None, :], 0), jnp.int32)
        for group, q_dtype, precision in attention_variants(op, t, d, sel):
            key, sub = jax.random.split(key)
            q = attention_queries(sub, len(lengths), seq, NUM_KV_HEADS * group, d, q_dtype)
            args = (q, case.pool, case.layout, jnp.int32(LAYER), case.page_table, q_pos, case.kv_lens)
            record = {"kind": op, "kv_format": fmt, "tokens_per_page": t, "gqa": group, "head_dim": d,
                      "q_dtype": jnp.dtype(q_dtype).name, "kernel_precision": precision, "seq": seq,
                      "lengths": lengths, "seed": seed}

            def body(args=args, q_dtype=q_dtype, precision=precision):
                ref = reference_attention(*args)
                out = kernel_attention(impl, precision, op, *args)
                out_np = np.asarray(out, np.float32)
                finite = bool(np.isfinite(out_np).all())
                empty_row_zero = not out_np[-1].any()   # the length-0 row sees no key
                extra = dot_attention_bound(DOT_PRECISIONS[precision][1], *args) if op == "prefill" else 0.0
                max_err, ratio = attention_mismatch(out, ref, q_dtype, extra)
                return {"passed": finite and empty_row_zero and ratio <= 1.0, "finite": finite,
                        "kernel": "mosaic_gpu" if uses_mosaic_prefill(op, *args) else "triton",
                        "empty_row_zero": empty_row_zero, "max_abs_err": max_err, "err_over_tol": ratio}

            records.append(run_case(record, body, progress))
    return records


WRITE_TOKENS = 97                  # rows written per KV-write case (some invalid, some sharing a page)
WRITE_MIDPOINT_SHARE = 0.01        # compiled: share of written words allowed to differ (div.full rounding)


def kv_write_checks(sel: Selection, impl: str, seed: int, progress) -> list[dict]:
    """The in-place quantizing KV write against `write_kv_tokens` (the XLA path), over a poisoned pool:
    every word the same, interpreted; compiled, `x / scale` is an approximate division, so a code may
    differ by one at a rounding midpoint: a small share of the written words may differ, nothing else."""
    records = []
    write = {name: jax.jit(functools.partial(write_kv, kernels=name), static_argnums=1)
             for name in ("xla", impl)}
    for i, (fmt, t, d) in enumerate((f, t, d) for f in sel.kv_formats for t in sel.page_sizes for d in sel.head_dims):
        rng = np.random.default_rng(seed + 7000 + i)
        layout = KVPageLayout(NUM_LAYERS, NUM_KV_HEADS, d, t, fmt, pages_per_slab=PAGES_PER_SLAB)
        record = {"kind": "kv_write", "kv_format": fmt, "tokens_per_page": t, "gqa": 0, "head_dim": d,
                  "q_dtype": "-", "kernel_precision": "-", "seed": seed + 7000 + i}

        def body(layout=layout, rng=rng):
            slabs = 3
            pool = jnp.full((slabs, layout.page_words * PAGES_PER_SLAB), POISON, jnp.uint32)
            pages = rng.integers(0, slabs * PAGES_PER_SLAB, WRITE_TOKENS).astype(np.int32)
            slots = rng.integers(0, layout.tokens_per_page, WRITE_TOKENS).astype(np.int32)
            _, first = np.unique(np.stack([pages, slots], 1), axis=0, return_index=True)
            valid = np.zeros(WRITE_TOKENS, bool)
            valid[first] = rng.random(len(first)) < 0.9                # distinct slots; some rows padding
            k, v = (jnp.asarray(rng.standard_normal((WRITE_TOKENS, NUM_KV_HEADS, layout.head_dim)) * 3,
                                jnp.bfloat16) for _ in range(2))
            args = (layout, jnp.asarray(pages), jnp.asarray(slots), jnp.asarray(valid), jnp.int32(LAYER), k, v)
            ref = np.asarray(write["xla"](pool, *args))
            out = np.asarray(write[impl](pool, *args))
            differ = ref != out
            written = ref != np.asarray(pool)                          # poison overwritten
            outside = int((differ & ~written).sum())
            share = float(differ.sum() / max(1, written.sum()))
            limit = 0.0 if impl == "interpret" or not layout.quantized else WRITE_MIDPOINT_SHARE
            return {"passed": outside == 0 and share <= limit, "differing_words": int(differ.sum()),
                    "differing_outside_written": outside, "written_words": int(written.sum()),
                    "max_abs_err": share, "err_over_tol": share / limit if limit else float(share > 0)}

        records.append(run_case(record, body, progress))
    return records


SPARSE_BUDGET_PAGES = 4            # pages each kv head reads per sparse case (sink, last, two chosen)


def sparse_checks(sel: Selection, impl: str, seed: int, progress) -> list[dict]:
    """Query-aware page selection: the key-bounds kernel against `write_key_bounds` (every word the
    same interpreted; compiled, a bound may move by one code where the kernel's dequantized key
    differs from XLA's in its last bit: a small share of the written words, nothing else), the score
    kernel against the reference (rtol = atol = 1e-5: the same products summed in another order),
    and the decode kernel over the per-head page tables the reference's selection makes (bbox and
    sink_window), against the reference attention over the same tables (the decode tolerance)."""
    records = []
    group = max(sel.gqa)
    bounds = {name: jax.jit(functools.partial(write_bounds, kernels=name), static_argnums=1) for name in ("xla", impl)}
    scores_ref = jax.jit(page_scores_reference, static_argnums=2)
    scores_kernel = jax.jit(functools.partial(page_scores_pallas, interpret=impl == "interpret"), static_argnums=2)
    select = jax.jit(select_pages, static_argnums=4)
    for i, (fmt, t, d) in enumerate((f, t, d) for f in sel.kv_formats for t in sel.page_sizes for d in sel.head_dims):
        case_seed = seed + 9000 + i
        record = {"kind": "sparse", "kv_format": fmt, "tokens_per_page": t, "gqa": group, "head_dim": d,
                  "q_dtype": "float32", "kernel_precision": "-", "seed": case_seed}

        def body(fmt=fmt, t=t, d=d, case_seed=case_seed):
            rng = np.random.default_rng(case_seed)
            lengths = np.asarray([1, t, 3 * t, int(rng.integers(5 * t, TABLE_PAGES * t + 1)), TABLE_PAGES * t, 0])
            page_bytes = KVPageLayout(NUM_LAYERS, NUM_KV_HEADS, d, t, fmt, key_bounds=True).page_bytes
            case = build_attention_case(
                case_seed, num_kv_heads=NUM_KV_HEADS, head_dim=d, tokens_per_page=t, kv_format=fmt, lengths=lengths,
                group=group, table_pages=TABLE_PAGES, spare_pages=SPARE_PAGES, fill=POISON, num_layers=NUM_LAYERS,
                layer=LAYER, q_dtype=jnp.float32, key_bounds=True,
                slab_bytes=PAGES_PER_SLAB * page_bytes + SLAB_REMAINDER_BYTES)
            layout = case.layout
            pages, fill = page_fills(case.page_table, lengths, t)
            args = (layout, jnp.asarray(pages), jnp.asarray(fill), jnp.int32(LAYER))
            ref_pool = bounds["xla"](case.pool, *args)
            out_pool = np.asarray(bounds[impl](case.pool, *args))
            differ = np.asarray(ref_pool) != out_pool
            written = np.asarray(ref_pool) != np.asarray(case.pool)
            outside = int((differ & ~written).sum())
            share = float(differ.sum() / max(1, written.sum()))
            limit = 0.0 if impl == "interpret" else WRITE_MIDPOINT_SHARE
            call = (case.q, ref_pool, layout, jnp.int32(LAYER), case.page_table, case.kv_lens)
            s_ref, s_out = np.asarray(scores_ref(*call)), np.asarray(scores_kernel(*call))
            live = np.isfinite(s_ref)
            scores_ok = bool((np.isfinite(s_out) == live).all()) and bool(np.allclose(
                s_out[live], s_ref[live], rtol=1e-5, atol=1e-5))
            worst = 0.0
            for policy in ("bbox", "sink_window"):
                inputs = SelectionInputs(*(jnp.full((len(lengths),), x, jnp.int32)
                                           for x in (POLICY_IDS[policy], SPARSE_BUDGET_PAGES, 0)))
                chosen = select(jnp.asarray(s_ref), case.page_table, case.kv_lens, inputs, t)
                attn = (case.q, ref_pool, layout, jnp.int32(LAYER), chosen.head_table, case.q_positions,
                        chosen.head_lens)
                _, ratio = attention_mismatch(kernel_attention(impl, "default", "decode", *attn),
                                              reference_attention(*attn), jnp.float32)
                worst = max(worst, ratio)
            return {"passed": outside == 0 and share <= limit and scores_ok and worst <= 1.0,
                    "bounds_differing_words": int(differ.sum()), "bounds_differing_outside": outside,
                    "scores_match": scores_ok, "max_abs_err": share, "err_over_tol": worst}

        records.append(run_case(record, body, progress))
    return records


def matmul_checks(sel: Selection, impl: str, seed: int, progress) -> list[dict]:
    records = []
    compiled = impl == "pallas"
    for si, shape_name in enumerate(sel.matmul_shapes):
        k, n, x_dtype = MATMUL_SHAPES[shape_name]
        for fi, name in enumerate(sel.matmul_formats):
            quant, act = MATMUL_FORMATS[name]
            rng = np.random.default_rng(seed + 100 * si + fi)
            qw = quant(random_weight(rng, k, n))
            for m in sel.ms:
                x = random_activations(rng, m, k, x_dtype)
                record = {"kind": "matmul", "format": name, "act_format": act, "m": m, "k": k, "n": n,
                          "x_dtype": jnp.dtype(x_dtype).name, "seed": seed + 100 * si + fi}

                def body(x=x, qw=qw, act=act, name=name):
                    if not has_kernel(qw, act):
                        raise ValueError(f"no Pallas kernel for {name}: the dispatcher would use the reference")
                    # Both jitted, as the model runs them: XLA rewrites the quantizer's `absmax / 448`
                    # as a multiply by the reciprocal under jit, so an eager reference can pick
                    # fp8 codes one step away from the jitted kernel wrapper's (~1e-2 differences).
                    with jax.default_matmul_precision("highest"):
                        ref = jax.block_until_ready(matmul_callable("xla", act)(x, qw))
                    out = jax.block_until_ready(matmul_callable(impl, act)(x, qw))
                    finite = bool(np.isfinite(np.asarray(out)).all())
                    bound = matmul_bound(x, qw, act, name, compiled)
                    max_err, ratio = matmul_mismatch(out, ref, bound, act, compiled)
                    return {"passed": finite and ratio <= 1.0, "finite": finite, "max_abs_err": max_err,
                            "err_over_tol": ratio}

                records.append(run_case(record, body, progress))
    return records


# ---- reporting ---------------------------------------------------------------------------------
def describe(r: dict) -> str:
    if r["kind"] == "matmul":
        return f"matmul  {r['format']:<16} M={r['m']:<4} K={r['k']:<5} N={r['n']:<4} x={r['x_dtype']}"
    return (f"{r['kind']:<7} {r['kv_format']:<8} T={r['tokens_per_page']:<2} G={r['gqa']} D={r['head_dim']:<3} "
            f"q={r['q_dtype']:<8} dots={r['kernel_precision']}")


def result_line(r: dict) -> str:
    verdict = "PASS" if r.get("passed") else "FAIL"
    if "error" in r:
        detail = r["error"].splitlines()[0][:160]
    else:
        detail = f"max|err| {r['max_abs_err']:.2e}, {r['err_over_tol']:.3g} of tolerance"
        if not r.get("finite", True):
            detail += ", NON-FINITE output"
        if not r.get("empty_row_zero", True):
            detail += ", empty row not 0"
    return f"{verdict}  {describe(r)}  {detail}  ({r['seconds']:.1f} s)"


# ---- main --------------------------------------------------------------------------------------
def csv(text: str | None, allowed, cast=str) -> tuple | None:
    if text is None:
        return None
    items = tuple(cast(t.strip()) for t in text.split(",") if t.strip())
    bad = [i for i in items if i not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(allowed)}")
    return items


def selection_from(args) -> Selection:
    defaults = INTERPRET_DEFAULTS if args.interpret else {}

    def pick(value, name, full):
        return value if value is not None else tuple(defaults.get(name, full))

    return Selection(
        ops=pick(csv(args.ops, OPS), "ops", OPS),
        kv_formats=pick(csv(args.kv_formats, KV_FORMATS), "kv_formats", KV_FORMATS),
        page_sizes=pick(csv(args.page_sizes, PAGE_SIZES, int), "page_sizes", PAGE_SIZES),
        gqa=pick(csv(args.gqa, GQA_RATIOS, int), "gqa", GQA_RATIOS),
        head_dims=pick(csv(args.head_dims, HEAD_DIMS, int), "head_dims", HEAD_DIMS),
        matmul_formats=pick(csv(args.matmul_formats, tuple(MATMUL_FORMATS)), "matmul_formats", tuple(MATMUL_FORMATS)),
        matmul_shapes=pick(csv(args.matmul_shapes, tuple(MATMUL_SHAPES)), "matmul_shapes", tuple(MATMUL_SHAPES)),
        ms=pick(csv(args.ms, range(1, 1 << 16), int), "ms", MATMUL_MS),
        bf16_q=not args.no_bf16_q,
        interpret=args.interpret,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write every case's result here")
    ap.add_argument("--interpret", action="store_true",
                    help="run the kernels interpreted (any backend; CPU-testable), small subset by default")
    ap.add_argument("--seed", type=int, default=None, help="replay a run (default: fresh, printed)")
    ap.add_argument("--ops", default=None, help=f"comma list of {', '.join(OPS)}")
    ap.add_argument("--kv-formats", default=None, help=f"comma list of {', '.join(KV_FORMATS)}")
    ap.add_argument("--page-sizes", default=None, help="comma list of 8, 16")
    ap.add_argument("--gqa", default=None, help="comma list of 1, 4")
    ap.add_argument("--head-dims", default=None, help="comma list of 64, 128")
    ap.add_argument("--matmul-formats", default=None, help=f"comma list of {', '.join(MATMUL_FORMATS)}")
    ap.add_argument("--matmul-shapes", default=None, help=f"comma list of {', '.join(MATMUL_SHAPES)}")
    ap.add_argument("--ms", default=None, help="comma list of M values (default 1,16,33,256)")
    ap.add_argument("--no-bf16-q", action="store_true", help="skip the bfloat16-query attention cases")
    ap.add_argument("--quiet", action="store_true", help="print failures and the summary only")
    args = ap.parse_args(argv)
    try:
        sel = selection_from(args)
    except (argparse.ArgumentTypeError, ValueError) as e:
        ap.error(str(e))
    backend = jax.default_backend()
    if not args.interpret and backend != "gpu":
        print(f"no GPU (default backend {backend!r}): the compiled kernels need one; use --interpret")
        return 1
    impl = "interpret" if args.interpret else "pallas"
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % (1 << 31))
    print(f"implementation {impl!r} on {jax.devices()[0].device_kind}, jax {jax.__version__}, seed {seed}",
          flush=True)

    def progress(r):
        if not args.quiet or not r.get("passed"):
            print(result_line(r), flush=True)

    previous = jax.config.read("jax_disable_most_optimizations")
    if args.interpret:  # interpreted kernels: XLA compile time dominates; numerics stay IEEE float32
        jax.config.update("jax_disable_most_optimizations", True)
    t0 = time.perf_counter()
    try:
        records = []
        if {"decode", "prefill"} & set(sel.ops):
            records += attention_checks(sel, impl, seed, progress)
        if "kv_write" in sel.ops:
            records += kv_write_checks(sel, impl, seed, progress)
        if "sparse" in sel.ops:
            records += sparse_checks(sel, impl, seed, progress)
        if "matmul" in sel.ops:
            records += matmul_checks(sel, impl, seed, progress)
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
    failed = [r for r in records if not r.get("passed")]
    seconds = time.perf_counter() - t0
    print(f"\n{len(records) - len(failed)} passed, {len(failed)} failed ({impl}, seed {seed}, {seconds:.0f} s)")
    for r in failed:
        print("  " + result_line(r))
    if args.json:
        dev = jax.devices()[0]
        doc = {"command": "scripts/check_kernels_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "device": {"platform": dev.platform, "kind": dev.device_kind}, "jax": jax.__version__,
               "implementation": impl, "seed": seed, "selection": dataclasses.asdict(sel),
               "passed": len(records) - len(failed), "failed": len(failed), "seconds": seconds,
               "cases": records}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 1 if failed or not records else 0


if __name__ == "__main__":
    sys.exit(main())
