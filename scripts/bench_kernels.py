"""Kernel benchmark: paged attention and quantized matmuls, Pallas vs the XLA references.

    .venv/bin/python scripts/bench_kernels.py [--smoke] [--json OUT] [--markdown OUT]
                                              [--ops copy,decode,prefill,matmul] [--impls ...]
                                              [--tokens-per-page 16] [--sparse-formats bf16,int8,int4]

What is timed
-------------
* copy: a jitted `x + 1` over a uint32 buffer (1 GiB on GPU; reads and writes it once, so 2 x size
  bytes), the bandwidth reference every other row is compared with (`% copy BW`). Integer add so XLA
  cannot simplify it away.
* decode: Llama-3-8B-like attention, 32 query heads / 8 KV heads, head_dim 128, one layer, 16-token
  pages; B in {1, 16, 64} x context in {512, 4096, 16384}; KV formats bf16, fp8, int8, int4. The pool
  is laid out as serving's `KVPool` (2 MiB slabs, the pool's default size, via `slab_bytes_for`), the
  pages are those its allocator hands one model, and every page table is a random shuffle of them, so
  a sequence's pages are scattered over slabs (`pallas_kernels.kernel_cases.build_attention_case`).
  K/V are random (normal x a per-token scale, so quantization scales vary) and written with
  `write_kv_tokens`. Through the dispatcher (`pallas_kernels.paged_attention`): "pallas" (GPU),
  "xla" (reference), "interpret" (--smoke only). For bf16 KV also "jax-paged":
  `jax.experimental.pallas.ops.gpu.paged_attention` on the same K/V re-laid out in its own format
  ([kv_heads, pages, page_size, head_dim], same page ids; q pre-scaled by 1/sqrt(d) since that op does
  not scale), with its default blocking (block_h 16, 8 pages per compute block, k_splits 16; the
  last two reduced to divide the page table where it is short). Its output is compared with the XLA
  reference's like ours. Off the GPU it is skipped, except in --smoke, where it runs interpreted to
  check the re-layout.
* prefill: one 512-token chunk of one sequence over a 4096-token context (queries at positions
  3584..4095, the chunk's K/V already in the pages), every KV format and FireQ's int4_fp8, through
  the same dispatcher (S > 1 goes to the prefill kernel: for int4_fp8 the Mosaic GPU FP8 one). For
  int4_fp8 also "pallas-triton": the Triton prefill kernel (bf16 wgmma on e4m3-exact operands) at the
  reference's blocking, the kernel the FP8 one replaced, side by side (GPU only).
* sparse: decode with query-aware page selection over pools whose pages keep key bounds (B=1 at 8K
  and 32K tokens, B=16 at 8K; bf16, int8 and int4 KV): dense decode on that pool (budget "-") and
  `sparse_attention.sparse_decode_attention` with `bbox` at a 1024-token budget, the page-score
  pass and selection included, per implementation. Bytes: dense, the live tokens' KV; sparse, every
  page's key bounds plus the selected pages' KV (what the kernels read). `vs dense`: the dense row's
  time / this; `KV read`: this row's KV bytes / the dense row's. `--tokens-per-page` changes the page
  size of every op (a quantized page holds fewer bytes, so its key bounds weigh more).
* matmul: x [M, K] bf16 @ w [K, N] for M in {1, 16, 256, 4096}, (K, N) = (4096, 14336) and
  (14336, 4096) (8B MLP up / down): W4A16 (int4 group 128, asymmetric), W8A16 (int8 per channel),
  W8A8 (int8 weights, per-token int8 activations), FP8 (e4m3 weights per channel, per-token e4m3
  activations; `fp8` [K, N] on the Triton kernel, `fp8_k_major` the fp8 preset's Mosaic GPU one),
  FireQ's INT4-FP8 (`fireq`, Mosaic GPU), W4A8 (int4 group 128, per-token e4m3 activations), all
  with bfloat16 scales as the model loader stores them, through `pallas_kernels.quantized_matmul`
  ("pallas", "xla", "interpret"); and the plain XLA bf16 dot `x @ w` on the same shape (impl
  "xla-dot"), the baseline of `vs bf16`. Per-token activation quantization is part of the timed
  call (the op's wrapper does it).

Timing
------
Each variant is jitted, called once (compile; its output is compared with the XLA reference's:
`max|diff|`), then timed: `jax.block_until_ready` around N back-to-back calls (N chosen so one
repeat takes about --min-time seconds, at most --max-calls), repeated --repeats times; the median
per-call time is reported (min also kept). On the GPU the calls queue on one stream, so this is device
time plus whatever host dispatch does not overlap: for the smallest kernels (a few microseconds) the
figure is bounded below by dispatch (~5-10 us per call), so read B=1 rows with that in mind.

Reported per row: bytes moved (decode/prefill: KV bytes of the live tokens as stored, i.e.
`KVPageLayout.bytes_per_token` x tokens, scales and word padding included, + q + output; matmul:
weight values + scales + zeros + x + output), GB/s, % of the measured copy bandwidth, FLOP/s
(attention 4 x Hq x D per visible (query, key) pair; matmul 2MKN), and ratios: `vs xla` (XLA
reference time / this time), `vs jax` (jax-paged / this, bf16 decode), `vs bf16` (the bf16-KV row of
the same shape and implementation / this; matmuls: the bf16 dot / this). A variant that raises
(e.g. a shape the compiled kernel refuses, out of memory) is a row with the error text.

The performance targets (`TARGETS`) are evaluated on the "pallas" rows; without them (no GPU, --smoke)
the value is computed from the "interpret" rows when present, for the record only, and `met` is null.

The full shape set is meant for one H100/H200 (pools up to 4 GiB, plus 4 GiB for the JAX op's copy
of the largest bf16 cache; several minutes, mostly compiling: a persistent XLA cache, .cache/xla by
default, makes re-runs faster). To fit a time limit, split it: e.g. `--ops decode` and
`--ops prefill,matmul` (targets are evaluated on whatever rows a run has), or narrow it with
--batches / --contexts / --ms. --smoke runs tiny shapes on CPU (xla, interpret and interpreted
jax-paged) in well under a minute, for CI.

Exit status: 0; with --strict, 1 if any variant that was run failed (`status == "error"`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels.kernel_cases import (
    WEIGHT_SCALE_DTYPE,
    AttentionCase,
    build_attention_case,
    error_text,
    page_fills,
    quantized_weights,
)
from pallas_kernels.kv_pages import KVPageLayout, read_kv_pages
from pallas_kernels.kv_write import write_bounds
from pallas_kernels.page_selection import POLICY_IDS, SelectionInputs
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.paged_attention_ref import REFERENCE_PAGES_PER_BLOCK
from pallas_kernels.paged_prefill_pallas import paged_prefill_attention
from pallas_kernels.quant_formats import (
    quantize_fp8_k_major,
    quantize_fp8_per_channel,
    quantize_int4_fp8,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
)
from pallas_kernels.quantized_matmul import quantized_matmul
from pallas_kernels.sparse_attention import sparse_decode_attention
from serving.kv.slab_geometry import DEFAULT_SLAB_BYTES, slab_bytes_for

ROOT = Path(__file__).resolve().parent.parent

OPS = ("copy", "decode", "prefill", "sparse", "matmul")
OP_ALIASES = {"attention": ("decode", "prefill")}
IMPLS = ("pallas", "xla", "interpret", "jax-paged", "pallas-triton")
KV_FORMATS = ("bf16", "fp8", "int8", "int4")

# name -> (weight quantizer (w [K, N] float32, group size) -> QuantizedTensor, activation format)
MATMUL_FORMATS = {
    "w4a16": (lambda w, g: quantize_int4_groupwise(w, g, scale_dtype=WEIGHT_SCALE_DTYPE), None),
    "w8a16": (lambda w, g: quantize_int8_per_channel(w, scale_dtype=WEIGHT_SCALE_DTYPE), None),
    "w8a8": (lambda w, g: quantize_int8_per_channel(w, scale_dtype=WEIGHT_SCALE_DTYPE), "int8"),
    "fp8": (lambda w, g: quantize_fp8_per_channel(w, scale_dtype=WEIGHT_SCALE_DTYPE), "fp8"),
    # the fp8 preset's layout: the Mosaic GPU kernel (wgmma on FP8 tensor cores)
    "fp8_k_major": (lambda w, g: quantize_fp8_k_major(w, scale_dtype=WEIGHT_SCALE_DTYPE), "fp8"),
    # FireQ's INT4-FP8 (the fireq preset): the Mosaic GPU kernel, int4 converted to e4m3 per group
    "fireq": (lambda w, g: quantize_int4_fp8(w, g, scale_dtype=WEIGHT_SCALE_DTYPE), "fp8"),
    "w4a8": (lambda w, g: quantize_int4_groupwise(w, g, scale_dtype=WEIGHT_SCALE_DTYPE), "fp8"),
}


@dataclass(frozen=True)
class Shapes:
    q_heads: int
    kv_heads: int
    head_dim: int
    tokens_per_page: int
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    prefill: tuple[tuple[int, int, int], ...]        # (batch, chunk, context)
    prefill_formats: tuple[str, ...]
    sparse: tuple[tuple[int, int, int], ...]         # (batch, context, budget tokens)
    sparse_formats: tuple[str, ...]
    matmul_ms: tuple[int, ...]
    matmul_kn: tuple[tuple[int, int], ...]
    group_size: int
    copy_bytes: int
    slab_target: int
    target_decode: tuple[int, int]                     # (batch, context) the decode targets use
    repeats: int
    min_repeat_s: float
    max_calls: int


FULL = Shapes(q_heads=32, kv_heads=8, head_dim=128, tokens_per_page=16,
              decode_batches=(1, 16, 64), decode_contexts=(512, 4096, 16384),
              prefill=((1, 512, 4096),), prefill_formats=KV_FORMATS + ("int4_fp8",),
              sparse=((1, 8192, 1024), (1, 32768, 1024), (16, 8192, 1024)), sparse_formats=("bf16", "int8", "int4"),
              matmul_ms=(1, 16, 256, 4096), matmul_kn=((4096, 14336), (14336, 4096)), group_size=128,
              copy_bytes=1 << 30, slab_target=DEFAULT_SLAB_BYTES, target_decode=(64, 4096),
              repeats=5, min_repeat_s=0.05, max_calls=2000)
SMOKE = Shapes(q_heads=4, kv_heads=2, head_dim=64, tokens_per_page=16,
               decode_batches=(2,), decode_contexts=(128,),
               prefill=((2, 16, 128),), prefill_formats=("bf16", "int4", "int4_fp8"),
               sparse=((2, 256, 64),), sparse_formats=("bf16", "int4"),
               matmul_ms=(16,), matmul_kn=((256, 128),), group_size=128,
               copy_bytes=16 << 20, slab_target=64 << 10, target_decode=(2, 128),
               repeats=2, min_repeat_s=0.0, max_calls=2)

# Performance targets: (name, what, threshold). Evaluated by `evaluate_targets`.
TARGETS = (
    ("decode_bw_bf16", "bf16-KV decode at the target shape >= 85% of copy bandwidth", 0.85),
    ("decode_bw_int8", "int8-KV decode at the target shape >= 85% of copy bandwidth", 0.85),
    ("decode_bw_int4", "int4-KV decode at the target shape >= 85% of copy bandwidth", 0.85),
    ("int4_kv_vs_bf16_kv", "int4-KV decode >= 3.4x faster than bf16-KV decode (same tokens, target shape)", 3.4),
    ("w4a16_vs_bf16_small_m", "W4A16 at M <= 16 >= 3.3x faster than the bf16 dot (every M and shape)", 3.3),
    ("fp8_vs_bf16_large_m", "FP8 GEMM (the fp8 preset's Mosaic GPU kernel) at M >= 1024 >= 1.7x faster than "
                            "the bf16 dot (every M and shape)", 1.7),
    ("fireq_vs_w4a16_m16", "FireQ INT4-FP8 at M = 16 >= 1.2x faster than the W4A16 kernel (every shape)", 1.2),
    ("fireq_vs_bf16_large_m", "FireQ INT4-FP8 at M >= 1024 >= 1.5x faster than the bf16 dot (every M and shape)",
     1.5),
)
# Matmul targets: name -> (format, which M count, the speedup compared).
MATMUL_TARGETS = {
    "w4a16_vs_bf16_small_m": ("w4a16", lambda m: m <= 16, "vs_bf16"),
    "fp8_vs_bf16_large_m": ("fp8_k_major", lambda m: m >= 1024, "vs_bf16"),
    "fireq_vs_w4a16_m16": ("fireq", lambda m: m == 16, "vs_w4a16"),
    "fireq_vs_bf16_large_m": ("fireq", lambda m: m >= 1024, "vs_bf16"),
}


# ---- timing ------------------------------------------------------------------------------------
def time_calls(fn, args, shapes: Shapes) -> dict:
    """Median per-call seconds of `fn(*args)` (already compiled): N back-to-back calls between two
    syncs, N sized so a repeat lasts ~min_repeat_s."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    calls = max(1, min(shapes.max_calls, math.ceil(shapes.min_repeat_s / max(one, 1e-7))))
    per_call = []
    for _ in range(shapes.repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)  # one stream: the last call finishing means all have
        per_call.append((time.perf_counter() - t0) / calls)
    return {"time_s": statistics.median(per_call), "time_s_min": min(per_call), "calls": calls,
            "repeats": shapes.repeats}


def run_variant(row: dict, fn, args, shapes: Shapes, ref_out=None) -> tuple[dict, object]:
    """Compile, check against `ref_out`, time. Any exception becomes the row's error."""
    try:
        out = jax.block_until_ready(fn(*args))
        if ref_out is not None:
            diff = jnp.abs(out.astype(jnp.float32).reshape(ref_out.shape) - ref_out.astype(jnp.float32))
            row["max_abs_diff_vs_xla"] = float(jnp.max(diff))
            row["max_abs_xla"] = float(jnp.max(jnp.abs(ref_out.astype(jnp.float32))))
        row.update(time_calls(fn, args, shapes))
        row["status"] = "ok"
        return row, out
    except Exception as e:  # a refused shape, a lowering error, OOM: a row, not a crash
        row.update(status="error", error=error_text(e))
        return row, None


def skipped(row: dict, why: str) -> dict:
    return row | {"status": "skipped", "note": why}


# ---- copy bandwidth ----------------------------------------------------------------------------
def measure_copy_bandwidth(shapes: Shapes) -> dict:
    words = shapes.copy_bytes // 4
    x = jnp.zeros((words,), jnp.uint32)
    add_one = jax.jit(lambda a: a + jnp.uint32(1))
    row = {"op": "copy", "impl": "xla", "format": "uint32", "shape": {"bytes": words * 4},
           "bytes": 2 * words * 4, "flops": 0}
    row, _ = run_variant(row, add_one, (x,), shapes)
    if row["status"] == "ok":
        row["gbps"] = row["bytes"] / row["time_s"] / 1e9
    return row


# ---- attention cases ---------------------------------------------------------------------------
def attention_fn(case: AttentionCase, impl: str):
    """The dispatcher for one implementation, jitted with the layout and layer fixed."""
    layout, layer = case.layout, case.layer
    return jax.jit(lambda q, pool, table, qpos, lens: paged_attention(
        q, pool, layout, layer, table, qpos, lens, kernels=impl))


def triton_prefill_fn(case: AttentionCase):
    """The Triton prefill kernel at the reference's blocking: for int4_fp8, where the dispatcher runs
    the Mosaic GPU FP8 kernel, the bf16-wgmma alternative it replaced, side by side."""
    layout, layer = case.layout, case.layer
    return jax.jit(lambda q, pool, table, qpos, lens: paged_prefill_attention(
        q, pool, layout, layer, table, qpos, lens, pages_per_block=REFERENCE_PAGES_PER_BLOCK))


def attention_args(case: AttentionCase) -> tuple:
    return case.q, case.pool, case.page_table, case.q_positions, case.kv_lens


def jax_paged_blocking(num_pages: int) -> dict:
    """k_splits (<= 16, the op's default) must divide the table width, and pages_per_compute_block
    (<= 8, its default) the pages of one split."""
    k_splits = math.gcd(num_pages, 16)
    return {"k_splits": k_splits, "pages_per_compute_block": math.gcd(num_pages // k_splits, 8)}


@functools.partial(jax.jit, static_argnums=(1, 3, 4))
def _relayout_for_jax_paged(pool, layout: KVPageLayout, q, layer: int, num_pages: int):
    """Our bf16 pages -> the JAX op's [kv_heads, pages, page_size, head_dim] K and V (same page ids),
    and q [B, Hq, D] pre-scaled by 1/sqrt(D) (the op applies no softmax scale)."""
    k, v = read_kv_pages(pool, layout, jnp.arange(num_pages, dtype=jnp.int32), layer)  # [P, T, H, D]
    q3 = (q[:, 0].astype(jnp.float32) * layout.head_dim ** -0.5).astype(q.dtype)
    return q3, k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3)


def jax_paged_fn_and_args(case: AttentionCase, interpret: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Triton-based ops warn at import (0.11)
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as jax_paged

    q3, k_pages, v_pages = _relayout_for_jax_paged(case.pool, case.layout, case.q, case.layer,
                                                   case.num_pool_pages)
    blocking = jax_paged_blocking(case.page_table.shape[1])
    fn = jax.jit(lambda q, k, v, table, lens: jax_paged(q, k, v, table, lens, interpret=interpret, **blocking))
    return fn, (q3, k_pages, v_pages, case.page_table, case.kv_lens), blocking


def attention_bytes(case: AttentionCase, seq: int, ctx: int) -> dict:
    batch, _, hq, d = case.q.shape
    kv = batch * ctx * case.layout.bytes_per_token          # one layer: K and V, scales included
    q_out = 2 * case.q.size * case.q.dtype.itemsize          # q read, output (q's dtype) written
    visible = batch * (seq * ctx - seq * (seq - 1) // 2)     # causal (query, key) pairs
    return {"bytes": kv + q_out, "kv_bytes": kv, "flops": 4 * hq * d * visible}


def attention_rows(op: str, shapes: Shapes, impls: list[str], backend: str, smoke: bool, seed: int,
                   progress) -> list[dict]:
    if op == "decode":
        cases = [(b, 1, ctx) for ctx in shapes.decode_contexts for b in shapes.decode_batches]
        kv_formats = KV_FORMATS
    else:
        cases, kv_formats = list(shapes.prefill), shapes.prefill_formats
    rows = []
    for batch, seq, ctx in cases:
        for fmt in kv_formats:
            rows += attention_case_rows(op, batch, seq, ctx, fmt, shapes, impls, backend, smoke, seed, progress)
    return rows


def attention_case_rows(op: str, batch: int, seq: int, ctx: int, fmt: str, shapes: Shapes, impls: list[str],
                        backend: str, smoke: bool, seed: int, progress) -> list[dict]:
    """Every implementation on one pool (built here and released on return)."""
    meta = {"op": op, "format": fmt,
            "shape": {"batch": batch, "seq": seq, "context": ctx, "q_heads": shapes.q_heads,
                      "kv_heads": shapes.kv_heads, "head_dim": shapes.head_dim,
                      "tokens_per_page": shapes.tokens_per_page}}
    try:
        page_bytes = KVPageLayout(1, shapes.kv_heads, shapes.head_dim, shapes.tokens_per_page, fmt).page_bytes
        case = build_attention_case(
            seed, num_kv_heads=shapes.kv_heads, head_dim=shapes.head_dim,
            tokens_per_page=shapes.tokens_per_page, kv_format=fmt, lengths=[ctx] * batch,
            group=shapes.q_heads // shapes.kv_heads, seq=seq,
            slab_bytes=slab_bytes_for([page_bytes], shapes.slab_target))  # slabs sized as serving's pool
    except Exception as e:  # e.g. out of memory for the pool
        return [progress(meta | {"impl": "-", "status": "error", "error": "building the pool: " + error_text(e)})]
    meta |= {"pool_bytes": int(case.pool.size) * 4} | attention_bytes(case, seq, ctx)
    rows, ref_out = [], None
    for impl in impls:
        if impl == "jax-paged" and (op != "decode" or fmt != "bf16"):
            continue
        if impl == "pallas-triton" and (op != "prefill" or fmt != "int4_fp8"):
            continue
        row = meta | {"impl": impl}
        if (why := unavailable(impl, backend, smoke)) is not None:
            rows.append(progress(skipped(row, why)))
            continue
        if impl == "jax-paged":
            try:
                fn, args, blocking = jax_paged_fn_and_args(case, interpret=backend != "gpu")
                row["jax_paged_blocking"] = blocking
            except Exception as e:
                rows.append(progress(row | {"status": "error", "error": "re-layout: " + error_text(e)}))
                continue
        elif impl == "pallas-triton":
            fn, args = triton_prefill_fn(case), attention_args(case)
        else:
            fn, args = attention_fn(case, impl), attention_args(case)
        row, out = run_variant(row, fn, args, shapes, ref_out)
        if impl == "xla":
            ref_out = out
        rows.append(progress(row))
    return rows


def sparse_rows(shapes: Shapes, impls: list[str], backend: str, smoke: bool, seed: int, progress) -> list[dict]:
    rows = []
    for batch, ctx, budget in shapes.sparse:
        for fmt in shapes.sparse_formats:
            rows += sparse_case_rows(batch, ctx, budget, fmt, shapes, impls, backend, smoke, seed, progress)
    return rows


def sparse_case_rows(batch: int, ctx: int, budget: int, fmt: str, shapes: Shapes, impls: list[str], backend: str,
                     smoke: bool, seed: int, progress) -> list[dict]:
    """Dense and bbox-selected decode on one pool with key bounds (built here, released on return)."""
    t = shapes.tokens_per_page
    meta = {"op": "sparse", "format": fmt}
    shape = {"batch": batch, "context": ctx, "q_heads": shapes.q_heads, "kv_heads": shapes.kv_heads,
             "head_dim": shapes.head_dim, "tokens_per_page": t}
    try:
        page_bytes = KVPageLayout(1, shapes.kv_heads, shapes.head_dim, t, fmt, key_bounds=True).page_bytes
        case = build_attention_case(
            seed, num_kv_heads=shapes.kv_heads, head_dim=shapes.head_dim, tokens_per_page=t, kv_format=fmt,
            lengths=[ctx] * batch, group=shapes.q_heads // shapes.kv_heads, key_bounds=True,
            slab_bytes=slab_bytes_for([page_bytes], shapes.slab_target))
        layout = case.layout
        pages = layout.pages_for(ctx)
        ids, fill = page_fills(case.page_table, [ctx] * batch, t)
        pool = jax.jit(write_bounds, static_argnums=1)(case.pool, layout, jnp.asarray(ids), jnp.asarray(fill),
                                                       case.layer)
    except Exception as e:
        return [progress(meta | {"shape": shape, "impl": "-", "status": "error",
                                 "error": "building the pool: " + error_text(e)})]
    bounds = layout.num_kv_heads * layout.bounds_words * 4                        # bytes per page, one layer
    page_kv = layout.page_bytes - bounds
    q_out = 2 * case.q.size * case.q.dtype.itemsize
    rows = []
    for chosen in (None, budget):
        read = min(chosen // t, pages) if chosen else pages
        kv = batch * (read * page_kv + (pages * bounds if chosen else 0))
        row_meta = meta | {"shape": shape | {"budget": chosen or 0}, "bytes": kv + q_out, "kv_bytes": kv,
                           "flops": 4 * shapes.q_heads * shapes.head_dim * batch * min(ctx, read * t)}
        inputs = SelectionInputs(*(jnp.full((batch,), x, jnp.int32) for x in (POLICY_IDS["bbox"], read, 0)))
        ref_out = None
        for impl in impls:
            if impl not in ("xla", "pallas", "interpret"):
                continue
            row = row_meta | {"impl": impl}
            if (why := unavailable(impl, backend, smoke)) is not None:
                rows.append(progress(skipped(row, why)))
                continue
            if chosen is None:
                fn = attention_fn(case, impl)
            else:
                fn = jax.jit(lambda q, pool, table, qpos, lens, impl=impl: sparse_decode_attention(
                    q, pool, layout, case.layer, table, qpos, lens, inputs, kernels=impl)[0])
            row, out = run_variant(row, fn, (case.q, pool, case.page_table, case.q_positions, case.kv_lens),
                                   shapes, ref_out)
            if impl == "xla":
                ref_out = out
            rows.append(progress(row))
    return rows


def unavailable(impl: str, backend: str, smoke: bool) -> str | None:
    """Why an implementation cannot run here, or None."""
    if impl in ("pallas", "pallas-triton") and backend != "gpu":
        return f"no GPU (backend {backend}): '{impl}' compiles for the GPU"
    if impl == "interpret" and not smoke:
        return "'interpret' runs only with --smoke (far too slow at full shapes)"
    if impl == "jax-paged" and backend != "gpu" and not smoke:
        return f"no GPU (backend {backend}): the JAX op is a Triton kernel (interpreted only in --smoke)"
    return None


# ---- matmul cases ------------------------------------------------------------------------------
def tree_bytes(tree) -> int:
    """Bytes of every array leaf (packed int4 is uint8 here, so size x itemsize is exact)."""
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree))


def matmul_rows(shapes: Shapes, impls: list[str], backend: str, smoke: bool, seed: int, progress) -> list[dict]:
    rows = []
    for i, (k, n) in enumerate(shapes.matmul_kn):
        rows += matmul_shape_rows(k, n, shapes, impls, backend, smoke, seed + i, progress)
    return rows


def matmul_shape_rows(k: int, n: int, shapes: Shapes, impls: list[str], backend: str, smoke: bool, seed: int,
                      progress) -> list[dict]:
    key_w, key_x = jax.random.split(jax.random.key(seed % (1 << 32)))
    try:
        weights = quantized_weights(key_w, k, n, shapes.group_size, MATMUL_FORMATS)
    except Exception as e:
        return [progress({"op": "matmul", "format": "-", "impl": "-", "shape": {"m": 0, "k": k, "n": n},
                          "status": "error", "error": "quantizing the weights: " + error_text(e)})]
    bf16_dot = jax.jit(lambda x, w: x @ w)
    rows = []
    for m in shapes.matmul_ms:
        x = jax.random.normal(jax.random.fold_in(key_x, m), (m, k), jnp.float32).astype(jnp.bfloat16)
        base = {"op": "matmul", "shape": {"m": m, "k": k, "n": n}, "flops": 2 * m * k * n}
        row = base | {"format": "bf16", "impl": "xla-dot",
                      "bytes": tree_bytes(weights["bf16"]) + tree_bytes(x) + m * n * 2}
        rows.append(progress(run_variant(row, bf16_dot, (x, weights["bf16"]), shapes)[0]))
        for name, (_, act) in MATMUL_FORMATS.items():
            qw = weights[name]
            meta = base | {"format": name, "act_format": act,
                           "bytes": tree_bytes(qw) + tree_bytes(x) + m * n * 4}  # float32 output
            ref_out = None
            for impl in impls:
                if impl == "jax-paged":
                    continue
                row = meta | {"impl": impl}
                if (why := unavailable(impl, backend, smoke)) is not None:
                    rows.append(progress(skipped(row, why)))
                    continue
                fn = jax.jit(functools.partial(quantized_matmul, act_format=act, kernels=impl))
                row, out = run_variant(row, fn, (x, qw), shapes, ref_out)
                if impl == "xla":
                    ref_out = out
                rows.append(progress(row))
    return rows


# ---- derived figures ---------------------------------------------------------------------------
def shape_key(row: dict, **replace) -> tuple:
    return (row["op"],) + tuple(sorted((row["shape"] | replace).items()))


def add_rates(r: dict, copy_gbps: float | None) -> dict:
    """GB/s, share of the copy bandwidth and TFLOP/s of a timed row."""
    if r.get("status") == "ok":
        r["gbps"] = r["bytes"] / r["time_s"] / 1e9
        r["pct_copy_bw"] = r["gbps"] / copy_gbps if copy_gbps else None
        r["tflops"] = r["flops"] / r["time_s"] / 1e12
    return r


def add_derived(rows: list[dict], copy_gbps: float | None) -> None:
    """Rates, and the speedup ratios (the other row's time / this row's time)."""
    times = {(shape_key(r), r["format"], r["impl"]): r["time_s"] for r in rows if r.get("status") == "ok"}
    for r in rows:
        if add_rates(r, copy_gbps).get("status") != "ok":
            continue
        t = r["time_s"]
        key = shape_key(r)
        speedups = {}
        if r["impl"] not in ("xla", "xla-dot") and (key, r["format"], "xla") in times:
            speedups["vs_xla"] = times[(key, r["format"], "xla")] / t
        if r["op"] == "decode" and r["format"] == "bf16" and r["impl"] != "jax-paged" \
                and (key, "bf16", "jax-paged") in times:
            speedups["vs_jax_paged"] = times[(key, "bf16", "jax-paged")] / t
        if r["op"] == "matmul" and r["format"] != "bf16" and (key, "bf16", "xla-dot") in times:
            speedups["vs_bf16"] = times[(key, "bf16", "xla-dot")] / t
        if r["op"] == "matmul" and r["format"] == "fireq" and (key, "w4a16", r["impl"]) in times:
            speedups["vs_w4a16"] = times[(key, "w4a16", r["impl"])] / t
        if r["op"] in ("decode", "prefill") and r["format"] != "bf16" and (key, "bf16", r["impl"]) in times:
            speedups["vs_bf16"] = times[(key, "bf16", r["impl"])] / t
        if r["op"] == "sparse" and r["shape"]["budget"]:
            dense = shape_key(r, budget=0)
            if (dense, r["format"], r["impl"]) in times:
                speedups["vs_dense"] = times[(dense, r["format"], r["impl"])] / t
            dense_kv = [d["kv_bytes"] for d in rows
                        if d["op"] == "sparse" and d["format"] == r["format"] and shape_key(d) == dense]
            r["kv_read_share"] = r["kv_bytes"] / dense_kv[0] if dense_kv else None
        r["speedups"] = speedups


def kernel_impl(rows: list[dict]) -> str | None:
    """The implementation targets are measured on: "pallas", else "interpret" (not meaningful)."""
    for impl in ("pallas", "interpret"):
        if any(r["impl"] == impl and r.get("status") == "ok" for r in rows):
            return impl
    return None


def evaluate_targets(rows: list[dict], shapes: Shapes) -> list[dict]:
    impl = kernel_impl(rows)
    ok = [r for r in rows if r.get("status") == "ok" and r["impl"] == impl]
    batch, ctx = shapes.target_decode

    def decode_row(fmt):
        return next((r for r in ok if r["op"] == "decode" and r["format"] == fmt
                     and r["shape"]["batch"] == batch and r["shape"]["context"] == ctx), None)

    def matmul_cases(fmt, keep, speedup):
        return [r for r in ok if r["op"] == "matmul" and r["format"] == fmt and keep(r["shape"]["m"])
                and speedup in r["speedups"]]

    out = []
    for name, what, threshold in TARGETS:
        cases, value = [], None
        if name.startswith("decode_bw_"):
            r = decode_row(name.removeprefix("decode_bw_"))
            if r is not None and r["pct_copy_bw"] is not None:
                value = r["pct_copy_bw"]
                cases = [{"shape": r["shape"], "gbps": r["gbps"], "pct_copy_bw": value}]
        elif name == "int4_kv_vs_bf16_kv":
            r = decode_row("int4")
            if r is not None and "vs_bf16" in r["speedups"]:
                value = r["speedups"]["vs_bf16"]
                cases = [{"shape": r["shape"], "speedup": value}]
        else:
            fmt, keep, speedup = MATMUL_TARGETS[name]
            found = matmul_cases(fmt, keep, speedup)
            cases = [{"shape": r["shape"], "speedup": r["speedups"][speedup]} for r in found]
            value = min((c["speedup"] for c in cases), default=None)
        met = None if value is None or impl != "pallas" else bool(value >= threshold)
        note = None
        if value is None:
            note = "not measured (no matching row)"
        elif impl != "pallas":
            note = f"measured on '{impl}' rows: not a performance figure"
        out.append({"name": name, "description": what, "threshold": threshold, "value": value,
                    "impl": impl, "met": met, "note": note, "cases": cases,
                    "target_decode_shape": {"batch": batch, "context": ctx} if "decode" in name else None})
    return out


# ---- reporting ---------------------------------------------------------------------------------
def shape_text(r: dict) -> str:
    s = r["shape"]
    if r["op"] == "decode":
        return f"B={s['batch']} ctx={s['context']}"
    if r["op"] == "prefill":
        return f"B={s['batch']} S={s['seq']} ctx={s['context']}"
    if r["op"] == "matmul":
        return f"M={s['m']} K={s['k']} N={s['n']}"
    if r["op"] == "sparse":
        return f"B={s['batch']} ctx={s['context']} budget={s['budget'] or '-'}"
    return f"{s['bytes'] / 2**20:g} MiB"


def fmt_num(x, spec: str, suffix: str = "") -> str:
    return "" if x is None else f"{x:{spec}}{suffix}"


COLUMNS = ("op", "format", "impl", "shape", "time (us)", "GB/s", "% copy BW", "TFLOP/s", "vs xla",
           "vs jax", "vs bf16", "vs dense", "KV read", "status")


def row_cells(r: dict) -> list[str]:
    sp = r.get("speedups", {})
    if r.get("status") == "ok":
        status = "ok"
    else:
        status = f"{r.get('status')}: {(r.get('error') or r.get('note') or '').splitlines()[0][:90]}"
    return [r["op"], r["format"], r["impl"], shape_text(r), fmt_num(r.get("time_s") and 1e6 * r["time_s"], ".1f"),
            fmt_num(r.get("gbps"), ".1f"), fmt_num(r.get("pct_copy_bw") and 100 * r["pct_copy_bw"], ".1f", "%"),
            fmt_num(r.get("tflops"), ".3f"), fmt_num(sp.get("vs_xla"), ".2f", "x"),
            fmt_num(sp.get("vs_jax_paged"), ".2f", "x"), fmt_num(sp.get("vs_bf16"), ".2f", "x"),
            fmt_num(sp.get("vs_dense"), ".2f", "x"),
            fmt_num(r.get("kv_read_share") and 100 * r["kv_read_share"], ".1f", "%"), status]


def progress_line(r: dict) -> str:
    what = f"  {r['op']:<7} {r['format']:<5} {r['impl']:<9} {shape_text(r):<22}"
    if r.get("status") != "ok":
        return what + row_cells(r)[-1]
    pct = f" ({100 * r['pct_copy_bw']:.1f}% of copy)" if r.get("pct_copy_bw") else ""
    return (what + f"{1e6 * r['time_s']:10.1f} us {r['gbps']:9.1f} GB/s{pct} {r['tflops']:8.3f} TFLOP/s "
            f"({r['calls']} calls x {r['repeats']})")


def plain_table(rows: list[dict]) -> str:
    cells = [list(COLUMNS)] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def targets_text(targets: list[dict], markdown: bool) -> str:
    def verdict(t):
        return {True: "met", False: "MISSED", None: "n/a"}[t["met"]]

    if markdown:
        lines = ["| target | threshold | value | result | note |", "|---|---|---|---|---|"]
        lines += [f"| {t['description']} | {t['threshold']:g} | {fmt_num(t['value'], '.3f')} | {verdict(t)} | "
                  f"{t['note'] or ''} |" for t in targets]
    else:
        lines = [f"  {verdict(t):>6}  {t['name']:<24} value {fmt_num(t['value'], '.3f') or '-':>7} "
                 f"(>= {t['threshold']:g})  {t['note'] or ''}".rstrip() for t in targets]
    return "\n".join(lines)


def header_text(doc: dict) -> str:
    copy = doc["copy_bandwidth"]
    bw = f"{copy['gbps']:.1f} GB/s" if copy.get("gbps") else f"unavailable ({copy.get('error', '')[:80]})"
    return (f"device {doc['device']['kind']} ({doc['device']['platform']}), jax {doc['jax']}, {doc['date']}; "
            f"copy bandwidth ({copy['shape']['bytes'] / 2**20:g} MiB x + 1): {bw}")


def markdown_report(doc: dict) -> str:
    parts = [f"# Kernel benchmark\n\n`{doc['command']}`\n\n{header_text(doc)}\n", "## Targets\n",
             targets_text(doc["targets"], markdown=True) + "\n"]
    for op in ("decode", "prefill", "matmul"):
        rows = [r for r in doc["rows"] if r["op"] == op]
        if rows:
            parts += [f"## {op}\n", markdown_table(rows) + "\n"]
    return "\n".join(parts)


# ---- main --------------------------------------------------------------------------------------
def parse_list(text: str, allowed: tuple[str, ...], aliases: dict | None = None) -> list[str]:
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        for name in (aliases or {}).get(item, (item,)):
            if name not in allowed:
                raise argparse.ArgumentTypeError(f"unknown {name!r}; choose from {', '.join(allowed)}")
            if name not in out:
                out.append(name)
    return out


def int_list(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(int(t) for t in text.split(",") if t.strip())


def default_impls(backend: str, smoke: bool) -> list[str]:
    if smoke:
        return ["xla", "interpret", "jax-paged"] + (["pallas"] if backend == "gpu" else [])
    return ["xla", "pallas", "jax-paged", "pallas-triton"] if backend == "gpu" else ["xla"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU-friendly), impls xla + interpret")
    ap.add_argument("--json", default=None, help="write every row, the targets and the configuration here")
    ap.add_argument("--markdown", default=None, help="write the tables as markdown here")
    ap.add_argument("--ops", default="copy,decode,prefill,matmul",
                    help=f"comma list of {', '.join(OPS)} ('attention' = decode,prefill); copy always runs")
    ap.add_argument("--impls", default=None,
                    help=f"comma list of {', '.join(IMPLS)} (default: GPU xla,pallas,jax-paged; CPU xla; "
                         f"--smoke xla,interpret,jax-paged)")
    ap.add_argument("--batches", default=None, help="decode batch sizes, comma list (default 1,16,64)")
    ap.add_argument("--contexts", default=None, help="decode context lengths, comma list (default 512,4096,16384)")
    ap.add_argument("--ms", default=None, help="matmul M values, comma list (default 1,16,256,4096)")
    ap.add_argument("--tokens-per-page", type=int, default=None, help="KV page size in tokens (default 16)")
    ap.add_argument("--sparse-formats", default=None, help="KV formats of the sparse op, comma list "
                    "(default bf16,int8,int4)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (median reported)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per repeat (sets calls per repeat)")
    ap.add_argument("--max-calls", type=int, default=None, help="cap on calls per repeat")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--xla-cache", default=str(ROOT / ".cache" / "xla"),
                    help="persistent compilation cache ('' for none; default: %(default)s)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--strict", action="store_true", help="exit status 1 if any variant raised")
    args = ap.parse_args(argv)
    try:
        ops = parse_list(args.ops, OPS, OP_ALIASES)
        backend = jax.default_backend()
        impls = parse_list(args.impls, IMPLS) if args.impls else default_impls(backend, args.smoke)
        sparse_formats = (tuple(parse_list(args.sparse_formats, KV_FORMATS + ("int4_fp8",)))
                          if args.sparse_formats else None)
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    shapes = SMOKE if args.smoke else FULL
    over = {"repeats": args.repeats, "min_repeat_s": args.min_time, "max_calls": args.max_calls,
            "decode_batches": int_list(args.batches),
            "decode_contexts": int_list(args.contexts), "matmul_ms": int_list(args.ms),
            "tokens_per_page": args.tokens_per_page,
            "sparse_formats": sparse_formats}
    shapes = dataclasses.replace(shapes, **{k: v for k, v in over.items() if v is not None})
    if "xla" in impls:  # the reference first: the other implementations' outputs are compared with it
        impls = ["xla"] + [i for i in impls if i != "xla"]

    previous = {name: jax.config.read(name) for name in ("jax_disable_most_optimizations",)}
    if args.smoke:  # tiny shapes: compile time dominates, and smoke timings are not performance anyway
        jax.config.update("jax_disable_most_optimizations", True)
    if args.xla_cache:
        jax.config.update("jax_compilation_cache_dir", args.xla_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

    copy_gbps = None

    def progress(row):
        if not args.no_progress:
            print(progress_line(add_rates(row, copy_gbps)), flush=True)
        return row

    t0 = time.perf_counter()
    try:
        copy = measure_copy_bandwidth(shapes)
        copy_gbps = copy.get("gbps")
        if not args.no_progress:
            print(f"copy bandwidth: {fmt_num(copy_gbps, '.1f', ' GB/s') or copy.get('error')}", flush=True)
        rows = []
        for op in ("decode", "prefill"):
            if op in ops:
                rows += attention_rows(op, shapes, impls, backend, args.smoke, args.seed, progress)
        if "sparse" in ops:
            rows += sparse_rows(shapes, impls, backend, args.smoke, args.seed, progress)
        if "matmul" in ops:
            rows += matmul_rows(shapes, impls, backend, args.smoke, args.seed, progress)
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
    add_derived(rows, copy_gbps)
    targets = evaluate_targets(rows, shapes)
    dev = jax.devices()[0]
    doc = {
        "command": "scripts/bench_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": {"platform": dev.platform, "kind": dev.device_kind, "count": jax.device_count(),
                   "machine": platform.machine()},
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "smoke": args.smoke,
        "ops": ops,
        "impls": impls,
        "shapes": dataclasses.asdict(shapes),
        "copy_bandwidth": copy,
        "rows": rows,
        "targets": targets,
        "seconds": time.perf_counter() - t0,
    }
    print(f"\n{header_text(doc)}; {doc['seconds']:.0f} s\n")
    print(plain_table(rows))
    print("\nTargets:")
    print(targets_text(targets, markdown=False))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown_report(doc))
    errors = [r for r in rows + [copy] if r.get("status") == "error"]
    if errors:
        print(f"\n{len(errors)} variant(s) failed (see the status column)")
    return 1 if errors and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
