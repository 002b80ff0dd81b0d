"""FP8 tensor-core matmuls for Hopper written for Mosaic GPU: `wgmma` on e4m3 operands, TMA loads.

`x[M, K] @ w` with per-token e4m3 activations and K-major weights: per-channel e4m3 `[N, K]`
(`quantize_fp8_k_major`), or FireQ's INT4-FP8 (`quantize_int4_fp8`), whose K steps are its groups:
each int4 tile is converted to e4m3 (exact: values in [-7, 7]) and its product scaled into a float32
sum. FP8 tensor cores read both operands K-major (the "TN" layout cuBLAS FP8 GEMMs require too); the
Triton lowering cannot reach them (it gives `mma.sync`). The kernel computes `out^T = w . x^T`: weight
rows are the 64-row wgmma M granule, tokens its N dimension (8 to 128 wide), so a decode token costs
an 8-wide MMA. Each program owns a (tile_n, tile_m) output tile; a TMA pipeline streams K tiles into
swizzled shared memory; the epilogue applies the scales and stores through shared memory. The
converted int4 tile goes through shared memory because the Mosaic GPU interpreter takes wgmma
operands from there only (A in registers is for when a GPU can measure it). Semantics are
`quantized_matmul_ref`'s (same quantizers, exact products, only the summation order differs). Runs
compiled on sm_90a, or anywhere under `plgpu.InterpretGPUParams()` (the tests, on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.pow2 import next_pow2
from pallas_kernels.quant_formats import QuantizedTensor, quantize_fp8_per_token

TILE_N_CHOICES = (128, 64)       # weight rows per program: multiples of 64 (the wgmma M granule)
TILE_K_CHOICES = (128, 64, 32)   # K per pipeline step (fp8), in e4m3 bytes = the shared-memory swizzle span
INT4_GROUPS = (128, 64)          # int4_fp8 group sizes (one K step each: 64 or 32 bytes of int4 a row)
MAX_TILE_M, MIN_TILE_M = 128, 8  # tokens per program: the wgmma N dimension (a multiple of 8, <= 256)


def _transforms(row_bytes: int) -> tuple:
    """Tiling + swizzle of a shared-memory tile whose rows are `row_bytes` long (8 rows x the row)."""
    return plgpu.TilingTransform((8, row_bytes)), plgpu.SwizzleTransform(row_bytes)


def _int4_transforms(tile_k: int) -> tuple:
    return plgpu.TilingTransform((8, tile_k)), plgpu.SwizzleTransform(tile_k // 2)


def is_mosaic_weight(w: QuantizedTensor) -> bool:
    """K-major weights these kernels read: per-channel e4m3 `[N, K]`, or int4_fp8."""
    if w.axis != 1 or w.values.ndim != 2:
        return False
    return (w.fmt == "fp8" and w.group_size is None) or (w.fmt == "int4_fp8" and w.group_size in INT4_GROUPS)


def plan_tiles(m: int, k: int, n: int, tile_m: int | None = None, tile_n: int | None = None,
               tile_k: int | None = None) -> tuple[int, int, int]:
    """(tile_m, tile_n, tile_k) for fp8 weights: tokens per program (the next power of two >= M,
    clamped to [MIN_TILE_M, MAX_TILE_M]; M is padded to whole tiles), and the largest TILE_N_CHOICES /
    TILE_K_CHOICES entry dividing N / K (the largest choice when none does: `shape_error` says so).
    int4_fp8 weights pass their group size as tile_k."""
    tm = tile_m or min(MAX_TILE_M, max(MIN_TILE_M, next_pow2(m)))
    tn = tile_n or next((t for t in TILE_N_CHOICES if n % t == 0), TILE_N_CHOICES[0])
    tk = tile_k or next((t for t in TILE_K_CHOICES if k % t == 0), TILE_K_CHOICES[0])
    return tm, tn, tk


def shape_error(m: int, k: int, n: int, tile_m: int | None = None, tile_n: int | None = None,
                tile_k: int | None = None) -> str | None:
    """Why the kernels cannot take this shape and tiling, or None."""
    tm, tn, tk = plan_tiles(m, k, n, tile_m, tile_n, tile_k)
    if tn % 64:
        return f"tile_n {tn} is not a multiple of 64 (the wgmma M granule)"
    if tm % 8 or not 8 <= tm <= 256:
        return f"tile_m {tm} is not a multiple of 8 in [8, 256] (the wgmma N dimension)"
    if tk not in TILE_K_CHOICES:
        return f"tile_k {tk} is not one of {TILE_K_CHOICES} (a shared-memory swizzle span in bytes)"
    if n % tn:
        return f"N={n} is not a multiple of tile_n {tn}"
    if k % tk:
        return f"K={k} is not a multiple of tile_k {tk}"
    return None


def _row_vector(ref, axis: int, shape):
    """A vector in shared memory, as float32, broadcast along `axis` of a wgmma accumulator of `shape`."""
    v = plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(1 - axis)).astype(jnp.float32)
    return lax.broadcast_in_dim(v, shape, (axis,))


def _kernel(x_gmem, w_gmem, sx_gmem, sw_gmem, out_gmem, out_smem, sx_smem, w_smem_extra, barrier, *, int4: bool,
            tile_m: int, tile_n: int, tile_k: int, steps: int, max_concurrent_steps: int):
    """`w_smem_extra`: fp8, the tile's channel scales [tile_n]; int4_fp8, its converted e4m3 weight
    tile [tile_n, tile_k]."""
    mi, ni = lax.axis_index("m"), lax.axis_index("n")
    m_rows, n_rows = pl.ds(mi * tile_m, tile_m), pl.ds(ni * tile_n, tile_n)
    shape = (tile_n, tile_m)
    # The token (and fp8 channel) scales of this tile, fetched by TMA while the main loop runs.
    plgpu.copy_gmem_to_smem(sx_gmem.at[m_rows], sx_smem, barrier)
    if not int4:
        plgpu.copy_gmem_to_smem(sw_gmem.at[n_rows], w_smem_extra, barrier)
    # fp8 keeps one wgmma in flight, so a step's tiles are released one step late; int4_fp8 waits.
    x_spec = plgpu.BlockSpec((tile_m, tile_k), lambda k: (mi, k), transforms=_transforms(tile_k),
                             delay_release=0 if int4 else 1)

    if int4:
        w8 = w_smem_extra

        def group_step(_, x_smem, w_smem, s_smem, total):
            w8[...] = plgpu.load(w_smem, layout=plgpu.Layout.WGMMA, optimized=False).astype(jnp.float8_e4m3fn)
            plgpu.commit_smem()

            def product(acc_ref):
                plgpu.wgmma(acc_ref, w8, x_smem.T)      # [tile_n, g] . [g, tile_m]
                plgpu.wgmma_wait(0)                     # w8 is rewritten next step
                return acc_ref[...]

            partial = pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))
            return total + partial * _row_vector(s_smem.at[0], 0, shape)

        acc = plgpu.emit_pipeline(
            group_step,
            grid=(steps,),
            in_specs=[
                x_spec,
                plgpu.BlockSpec((tile_n, tile_k), lambda k: (ni, k), transforms=_int4_transforms(tile_k)),
                # The group's scales, read into registers: the slot is refilled one step later, or
                # the next TMA into it races those reads (the interpreter's race detector shows it).
                plgpu.BlockSpec((1, tile_n), lambda k: (k, ni), delay_release=1),
            ],
            max_concurrent_steps=max_concurrent_steps,
            init_carry=plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA),
        )(x_gmem, w_gmem, sw_gmem)
    else:
        def accumulate(acc_ref):
            def step(_, x_smem, w_smem):
                plgpu.wgmma(acc_ref, w_smem, x_smem.T)  # [tile_n, tile_k] . [tile_k, tile_m]
                plgpu.wgmma_wait(1)                      # keep one wgmma in flight

            plgpu.emit_pipeline(
                step,
                grid=(steps,),
                in_specs=[x_spec, plgpu.BlockSpec((tile_n, tile_k), lambda k: (ni, k),
                                                  transforms=_transforms(tile_k), delay_release=1)],
                max_concurrent_steps=max_concurrent_steps,
            )(x_gmem, w_gmem)
            return acc_ref[...]

        acc = pl.run_scoped(accumulate, plgpu.ACC(shape, jnp.float32))
    plgpu.barrier_wait(barrier)
    out = acc * _row_vector(sx_smem, 1, shape)
    if not int4:
        out = out * _row_vector(w_smem_extra, 0, shape)
    out_smem[...] = out
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[n_rows, m_rows])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("tile_m", "tile_n", "tile_k", "max_concurrent_steps", "interpret"))
def _matmul_t(x, values, w_scales, *, tile_m: int, tile_n: int, tile_k: int, max_concurrent_steps: int, interpret):
    """M-padded x [Mp, K] and K-major weights -> out^T float32 [N, Mp]. fp8: values e4m3 [N, K],
    w_scales [N, 1]; int4_fp8: values packed uint8 [N, K // 2], w_scales [K // tile_k, N]."""
    mp, k = x.shape
    n = values.shape[0]
    int4 = values.dtype == jnp.uint8
    if int4:   # the same bytes as int4 [N, K] (element 2i in the low nibble, as pack_int4)
        values = lax.bitcast_convert_type(values, jnp.int4).reshape(n, k)
    xq = quantize_fp8_per_token(x)
    sx = xq.scales.astype(jnp.float32).reshape(mp)
    # int4_fp8's group scales stay as stored (the kernel streams a row per group and widens it in
    # registers: no per-call conversion of the whole array); fp8's N channel scales are fetched once.
    sw = w_scales if int4 else w_scales.astype(jnp.float32).reshape(n)
    steps = k // tile_k
    # >= 2 (fp8: one step's buffers stay held for the wgmma in flight)
    kernel = functools.partial(_kernel, int4=int4, tile_m=tile_m, tile_n=tile_n, tile_k=tile_k, steps=steps,
                               max_concurrent_steps=max(2, min(max_concurrent_steps, steps)))
    w_smem_extra = (plgpu.SMEM((tile_n, tile_k), jnp.float8_e4m3fn, transforms=_transforms(tile_k)) if int4 else
                    plgpu.SMEM((tile_n,), jnp.float32))
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((n, mp), jnp.float32),
        grid=(mp // tile_m, n // tile_n),
        grid_names=("m", "n"),
        scratch_types=[
            plgpu.SMEM((tile_n, tile_m), jnp.float32),
            plgpu.SMEM((tile_m,), jnp.float32),
            w_smem_extra,
            plgpu.Barrier(num_arrivals=1 if int4 else 2),
        ],
        interpret=plgpu.InterpretGPUParams() if interpret is True else interpret,
        kernel_name="int4_fp8_matmul_mgpu" if int4 else "fp8_matmul_mgpu",
    )
    return call(xq.values, values, sx, sw)


def fp8_matmul_mgpu(x: jax.Array, w: QuantizedTensor, *, interpret=False, tile_m: int | None = None,
                    tile_n: int | None = None, tile_k: int | None = None,
                    max_concurrent_steps: int = 4) -> jax.Array:
    """x [..., K] (bf16/f32) @ K-major fp8 or int4_fp8 weights w -> float32 [..., N], with e4m3
    per-token activations.

    `interpret`: False (compiled, sm_90a), True (`plgpu.InterpretGPUParams()`: any backend) or an
    `InterpretGPUParams` (e.g. with race detection). int4_fp8 takes its group size as tile_k. Raises
    ValueError for other weight layouts and for shapes the kernels cannot tile (`shape_error`)."""
    if not is_mosaic_weight(w):
        raise ValueError(f"the Mosaic GPU FP8 matmul needs K-major weights: per-channel e4m3 stored [N, K] "
                         f"(axis 1) or int4_fp8 with groups {INT4_GROUPS}; got {w.fmt} shape {w.values.shape} "
                         f"axis {w.axis} group {w.group_size}")
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={k}")
    if w.fmt == "int4_fp8":
        if tile_k not in (None, w.group_size):
            raise ValueError(f"int4_fp8 steps one group ({w.group_size}) per K tile, not {tile_k}")
        tile_k = w.group_size
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if why := shape_error(m, k, n, tile_m, tile_n, tile_k):
        raise ValueError(f"Mosaic GPU FP8 matmul: {why}")
    tm, tn, tk = plan_tiles(m, k, n, tile_m, tile_n, tile_k)
    mp = -(-m // tm) * tm
    if mp != m:
        x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
    out_t = _matmul_t(x2, w.values, w.scales, tile_m=tm, tile_n=tn, tile_k=tk,
                      max_concurrent_steps=max_concurrent_steps, interpret=interpret)
    return out_t[:, :m].T.reshape(*lead, n)
