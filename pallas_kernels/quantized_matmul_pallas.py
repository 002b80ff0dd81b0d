"""Pallas matmul kernels for quantized weights: `x[..., K] @ w[K, N]` for every weight format.

W4A16 (int4 / int4_sym group-wise, AWQ arXiv:2306.00978 / GPTQ arXiv:2210.17323 layouts), W8A16
(int8 per channel or GGUF Q8_0 groups, fp8 per channel), W8A8 int8 (SmoothQuant, arXiv:2211.10438),
FP8 e4m3 (arXiv:2209.05433) and W4A8 (int4 weights x e4m3 activations, as QServe arXiv:2405.04532 and
FireQ). Weights are dequantized in registers, never copied: memory-bound small-M matmuls read only the
packed bytes. Semantics are those of `quantized_matmul_ref` (same quantizers, same dequantization
formulas, same rounding order); only the float32 summation order differs (int32 accumulation is
exact). Per-token activation quantization runs in the wrapper with the reference's own quantizers.

Written for the Triton-style `pl.pallas_call` lowering, which also runs under `interpret=True` on CPU;
`matmul_shape_error` says which shapes the compiled path takes and `has_kernel` which format pairs
have a kernel. Tiling and the per-format inner loops: docs/kernels.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels.pow2 import is_pow2, next_pow2, pow2_factor
from pallas_kernels.quant_formats import QuantizedTensor, quantize_fp8_per_token, quantize_int8_per_token

DEFAULT_BLOCK_M = 64
DEFAULT_BLOCK_N = 128
DEFAULT_BLOCK_K = 128
MIN_DOT_DIM = 16          # Triton's tl.dot needs at least 16 along every dimension

_DOT_DIMS = (((1,), (0,)), ((), ()))


# ---------------------------------------------------------------------------------------------------
# Which (weight format, activation format) pairs have a kernel


def _kernel_kind(w: QuantizedTensor, act_format: str | None) -> str | None:
    """"weight_only", "w8a8", "fp8", "w4a8", or None (no kernel: the dispatcher uses the reference,
    which also raises the reference's errors for combinations that make no sense)."""
    if w.axis != 0 or len(w.shape) != 2:
        return None
    if act_format is None:
        if w.fmt in ("int4", "int4_sym", "int8", "fp8"):
            return "weight_only"
        return None
    if act_format == "int8" and w.fmt == "int8" and w.group_size is None:
        return "w8a8"
    if act_format == "fp8" and w.fmt == "fp8":
        return "fp8"
    if act_format == "fp8" and w.fmt == "int4":
        return "w4a8"
    return None


def has_kernel(w: QuantizedTensor, act_format: str | None = None) -> bool:
    return _kernel_kind(w, act_format) is not None


def _grouped(w: QuantizedTensor) -> bool:
    return w.fmt in ("int4", "int4_sym") or (w.fmt == "int8" and w.group_size is not None)


def _packed(w: QuantizedTensor) -> bool:
    return w.fmt in ("int4", "int4_sym")


# ---------------------------------------------------------------------------------------------------
# Tile plan


def plan_blocks(m: int, k: int, n: int, w: QuantizedTensor, act_format: str | None = None,
                block_m: int = DEFAULT_BLOCK_M, block_n: int = DEFAULT_BLOCK_N,
                block_k: int = DEFAULT_BLOCK_K) -> tuple[int, int, int]:
    """(bm, bn, bk): bm a power of two >= 16 covering small M; bn / bk the largest powers of two
    dividing N / K, capped by block_n / block_k. For grouped weights bk also divides g or is a
    multiple of it; for W4A8 bk divides g (a step never straddles a group)."""
    for name, b in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if not is_pow2(b):
            raise ValueError(f"{name} must be a power of two, got {b}")
    bm = min(block_m, max(MIN_DOT_DIM, next_pow2(m)))
    bn = min(block_n, pow2_factor(n))
    bk = min(block_k, pow2_factor(k))
    if _grouped(w):
        g = w.group_size
        if not is_pow2(g) or _kernel_kind(w, act_format) == "w4a8":
            bk = min(bk, pow2_factor(g))
    return bm, bn, bk


def matmul_shape_error(m: int, k: int, n: int, w: QuantizedTensor, act_format: str | None = None,
                       **blocks) -> str | None:
    """Why the compiled (Triton) kernel cannot take these shapes, or None. Every dot operand needs
    >= 16 rows/columns (for int4 the dots see bk / 2 packed rows); interpret mode has no limit."""
    bm, bn, bk = plan_blocks(m, k, n, w, act_format, **blocks)
    dot_k = bk // 2 if _packed(w) else bk      # int4 kernels dot the even and odd K halves
    if bn < MIN_DOT_DIM:
        return f"N={n} gives a column tile of {bn} (largest power of two dividing N), below {MIN_DOT_DIM}"
    if dot_k < MIN_DOT_DIM:
        return (f"K={k} (group size {w.group_size}) gives a K step of {bk} ({dot_k} per dot), "
                f"below {MIN_DOT_DIM}")
    return None


# ---------------------------------------------------------------------------------------------------
# In-register helpers


def _dot(a, b, acc_dtype):
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, _DOT_DIMS, precision=precision, preferred_element_type=acc_dtype)


def _nibbles(packed, signed: bool):
    """uint8 tile -> (low, high) nibbles as int32 tiles: [0, 15] or sign-extended [-8, 7]."""
    p = packed.astype(jnp.int32)
    if signed:
        return (p << 28) >> 28, (p << 24) >> 28
    return p & 15, p >> 4


def _group_rows(ref, kb, bk: int, g: int, rows: int):
    """Float32 scale (or zero) rows for the `rows` weight rows of K step `kb` (each group covers
    `g * rows // bk` of them): one broadcastable [1, bn] row when the step lies in one group, else the
    step's `bk / g` group rows repeated to [rows, bn]."""
    if bk <= g:
        return ref[pl.ds((kb * bk) // g, 1), :].astype(jnp.float32)
    ng = bk // g
    s = ref[pl.ds(kb * ng, ng), :].astype(jnp.float32)                  # [ng, bn]
    bn = s.shape[1]
    return jnp.broadcast_to(s[:, None, :], (ng, rows // ng, bn)).reshape(rows, bn)


# ---------------------------------------------------------------------------------------------------
# Kernels


def _weight_only_kernel(x_ref, w_ref, s_ref, *rest, fmt: str, group_size, bk: int, nk: int):
    """x [bm, K] (bf16/f32), weight tile columns, scales (and zeros for int4) -> out [bm, bn] f32."""
    if fmt == "int4":
        z_ref, o_ref = rest
    else:
        (o_ref,) = rest
    cdt = x_ref.dtype
    bm, bn = o_ref.shape
    packed = fmt in ("int4", "int4_sym")
    grouped = packed or group_size is not None
    rows = bk // 2 if packed else bk
    if not grouped:
        s_chan = s_ref[...].astype(jnp.float32)                           # [1, bn]

    def body(kb, acc):
        s = _group_rows(s_ref, kb, bk, group_size, rows) if grouped else s_chan
        if packed:
            lo, hi = _nibbles(w_ref[pl.ds(kb * rows, rows), :], signed=(fmt == "int4_sym"))
            lo, hi = lo.astype(jnp.float32), hi.astype(jnp.float32)
            if fmt == "int4":
                z = _group_rows(z_ref, kb, bk, group_size, rows)
                lo, hi = lo - z, hi - z
            w_lo, w_hi = (lo * s).astype(cdt), (hi * s).astype(cdt)
            x_even = x_ref[:, pl.ds(kb * bk, rows, stride=2)]
            x_odd = x_ref[:, pl.ds(kb * bk + 1, rows, stride=2)]
            return acc + _dot(x_even, w_lo, jnp.float32) + _dot(x_odd, w_hi, jnp.float32)
        q = w_ref[pl.ds(kb * bk, bk), :].astype(jnp.float32)
        w = (q * s).astype(cdt)
        return acc + _dot(x_ref[:, pl.ds(kb * bk, bk)], w, jnp.float32)

    o_ref[...] = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))


def _scaled_kernel(x_ref, sx_ref, w_ref, sw_ref, o_ref, *, bk: int, nk: int, acc_dtype):
    """W8A8 (int8 codes, int32 accumulator) and FP8 (e4m3 codes, f32 accumulator): per-token x
    per-channel scales in the epilogue."""
    bm, bn = o_ref.shape

    def body(kb, acc):
        a = x_ref[:, pl.ds(kb * bk, bk)]
        b = w_ref[pl.ds(kb * bk, bk), :]
        return acc + _dot(a, b, acc_dtype)

    acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), acc_dtype))
    o_ref[...] = acc.astype(jnp.float32) * sx_ref[...] * sw_ref[...].astype(jnp.float32)


def _w4a8_kernel(x_ref, sx_ref, w_ref, s_ref, z_ref, o_ref, *, group_size: int, bk: int, nk: int):
    """e4m3 x [bm, K] with per-token scales, int4 weights; every K step lies inside one group."""
    bm, bn = o_ref.shape
    rows = bk // 2
    e4m3 = jnp.float8_e4m3fn

    def body(kb, acc):
        lo, hi = _nibbles(w_ref[pl.ds(kb * rows, rows), :], signed=False)   # 0..15: exact in e4m3
        x_even = x_ref[:, pl.ds(kb * bk, rows, stride=2)]
        x_odd = x_ref[:, pl.ds(kb * bk + 1, rows, stride=2)]
        xq = _dot(x_even, lo.astype(jnp.float32).astype(e4m3), jnp.float32) + \
            _dot(x_odd, hi.astype(jnp.float32).astype(e4m3), jnp.float32)
        xsum = jnp.sum(x_even.astype(jnp.float32), axis=1, keepdims=True) + \
            jnp.sum(x_odd.astype(jnp.float32), axis=1, keepdims=True)        # [bm, 1]
        g_row = (kb * bk) // group_size
        z = z_ref[pl.ds(g_row, 1), :].astype(jnp.float32)                    # [1, bn]
        s = s_ref[pl.ds(g_row, 1), :].astype(jnp.float32)
        return acc + (xq - xsum * z) * s

    acc = lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc * sx_ref[...]


# ---------------------------------------------------------------------------------------------------
# Wrapper


@functools.partial(jax.jit, static_argnames=("kind", "act_format", "fmt", "group_size", "bm", "bn", "bk",
                                             "interpret", "num_warps", "num_stages"))
def _pallas_matmul(x, values, scales, *zeros, kind: str, act_format, fmt: str, group_size, bm: int,
                   bn: int, bk: int, interpret, num_warps: int, num_stages: int):
    """Activation quantization and the pallas_call on M-padded x [Mp, K] -> float32 [Mp, N]. Jitted
    on its own so that every M padded to the same Mp shares one compiled program (outside an
    enclosing jit, e.g. eager calls and tests)."""
    mp, k = x.shape
    n = values.shape[1]
    nk = k // bk
    x_spec = pl.BlockSpec((bm, k), lambda i, j: (i, 0))
    sx_spec = pl.BlockSpec((bm, 1), lambda i, j: (i, 0))
    w_spec = pl.BlockSpec((values.shape[0], bn), lambda i, j: (0, j))
    s_spec = pl.BlockSpec((scales.shape[0], bn), lambda i, j: (0, j))
    z_specs = [s_spec] * len(zeros)

    if kind == "weight_only":
        kernel = functools.partial(_weight_only_kernel, fmt=fmt, group_size=group_size, bk=bk, nk=nk)
        args = [x, values, scales, *zeros]
        specs = [x_spec, w_spec, s_spec, *z_specs]
    else:
        quant = quantize_int8_per_token if act_format == "int8" else quantize_fp8_per_token
        xq = quant(x)
        args = [xq.values, xq.scales.astype(jnp.float32), values, scales, *zeros]
        specs = [x_spec, sx_spec, w_spec, s_spec, *z_specs]
        if kind == "w4a8":
            kernel = functools.partial(_w4a8_kernel, group_size=group_size, bk=bk, nk=nk)
        else:
            acc_dtype = jnp.int32 if kind == "w8a8" else jnp.float32
            kernel = functools.partial(_scaled_kernel, bk=bk, nk=nk, acc_dtype=acc_dtype)

    compiler_params = None
    if not interpret:
        compiler_params = plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(
        kernel,
        grid=(mp // bm, n // bn),
        in_specs=specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, n), jnp.float32),
        interpret=interpret,
        compiler_params=compiler_params,
        name=f"quantized_matmul_{kind}_{fmt}",
    )(*args)


def quantized_matmul_pallas(
    x: jax.Array,
    w: QuantizedTensor,
    act_format: str | None = None,
    *,
    interpret=False,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
    block_k: int = DEFAULT_BLOCK_K,
    num_warps: int | None = None,
    num_stages: int = 3,
) -> jax.Array:
    """x [..., K] (bf16/f32) @ quantized w [K, N] -> float32 [..., N] with a Pallas kernel.

    `interpret`: False (compiled, GPU Triton lowering) or anything `pl.pallas_call` accepts. Raises
    ValueError for a (format, act_format) pair without a kernel (see `has_kernel`) and, compiled, for
    shapes the Triton lowering cannot tile (`matmul_shape_error`)."""
    kind = _kernel_kind(w, act_format)
    if kind is None:
        raise ValueError(f"no Pallas kernel for {w.fmt} weights (group {w.group_size}, axis {w.axis}, "
                         f"shape {w.shape}) with act_format {act_format!r}")
    k, n = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    blocks = dict(block_m=block_m, block_n=block_n, block_k=block_k)
    if not interpret and (why := matmul_shape_error(m, k, n, w, act_format, **blocks)):
        raise ValueError(f"compiled Pallas quantized matmul: {why}")
    bm, bn, bk = plan_blocks(m, k, n, w, act_format, **blocks)
    mp = -(-m // bm) * bm
    if mp != m:
        x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
    zeros = (w.zeros,) if w.fmt == "int4" else ()
    out = _pallas_matmul(x2, w.values, w.scales, *zeros, kind=kind, act_format=act_format, fmt=w.fmt,
                         group_size=w.group_size, bm=bm, bn=bn, bk=bk, interpret=interpret,
                         num_warps=num_warps or _default_warps(bm), num_stages=num_stages)
    return out[:m].reshape(*lead, n)


def _default_warps(bm: int) -> int:
    """8 warps for tiles of 64+ rows (wgmma): with 4, the int4 group-32 and W4A8 kernels spill on
    sm_90a (`pallas_kernels.compile_check`); small-M tiles fit in 4."""
    return 8 if bm >= 64 else 4
