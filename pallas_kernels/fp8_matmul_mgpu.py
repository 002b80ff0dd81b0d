"""FP8 x FP8 matmul for Hopper written for Mosaic GPU: `wgmma` on e4m3 operands, TMA loads.

`x[M, K] @ w` with per-token e4m3 activations and per-channel e4m3 weights stored K-major, `[N, K]`
(axis 1 reduced): Hopper's FP8 tensor cores read both operands K-major from shared memory (the "TN"
layout cuBLAS FP8 GEMMs require too), which the Triton lowering cannot reach (it gives `mma.sync`).
The kernel computes the transposed product `out^T[N, M] = w[N, K] . x[M, K]^T`: the weight is the
64-row-granular wgmma A operand and the tokens are its N dimension (8 to 256 wide), so one decode
token costs an 8-wide MMA instead of a 64-row one. Each program owns a (tile_n, tile_m) output
tile; a TMA pipeline streams the K tiles of both operands into swizzled shared memory; the float32
accumulator stays in registers; the epilogue applies the weight and token scales and stores the tile
through shared memory. Semantics are the reference's `fp8_matmul` (same quantizers; products exact in
float32, only the summation order differs).

Runs compiled on sm_90a, or anywhere under `plgpu.InterpretGPUParams()` (tests on CPU).
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
TILE_K_CHOICES = (128, 64, 32)   # K per pipeline step, in e4m3 bytes = the shared-memory swizzle span
MAX_TILE_M, MIN_TILE_M = 128, 8  # tokens per program: the wgmma N dimension (a multiple of 8, <= 256)


def _smem_transforms(tile_k: int) -> tuple:
    """Tiling + swizzle of an e4m3 tile in shared memory: 8 rows x one swizzle span of tile_k bytes."""
    return plgpu.TilingTransform((8, tile_k)), plgpu.SwizzleTransform(tile_k)


def plan_tiles(m: int, k: int, n: int, tile_m: int | None = None, tile_n: int | None = None,
               tile_k: int | None = None) -> tuple[int, int, int]:
    """(tile_m, tile_n, tile_k): tokens per program (the next power of two >= M, clamped to
    [MIN_TILE_M, MAX_TILE_M]; M is padded to whole tiles), and the largest TILE_N_CHOICES /
    TILE_K_CHOICES entry dividing N / K (the largest choice when none does: `fp8_shape_error` says so)."""
    tm = tile_m or min(MAX_TILE_M, max(MIN_TILE_M, next_pow2(m)))
    tn = tile_n or next((t for t in TILE_N_CHOICES if n % t == 0), TILE_N_CHOICES[0])
    tk = tile_k or next((t for t in TILE_K_CHOICES if k % t == 0), TILE_K_CHOICES[0])
    return tm, tn, tk


def fp8_shape_error(m: int, k: int, n: int, tile_m: int | None = None, tile_n: int | None = None,
                    tile_k: int | None = None) -> str | None:
    """Why the kernel cannot take this shape and tiling, or None."""
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


def _kernel(x_gmem, w_gmem, sx_gmem, sw_gmem, out_gmem, out_smem, sx_smem, sw_smem, barrier, *,
            tile_m: int, tile_n: int, tile_k: int, steps: int, max_concurrent_steps: int):
    mi, ni = lax.axis_index("m"), lax.axis_index("n")
    m_rows, n_rows = pl.ds(mi * tile_m, tile_m), pl.ds(ni * tile_n, tile_n)
    # The scales of this tile, fetched by TMA while the main loop runs.
    plgpu.copy_gmem_to_smem(sx_gmem.at[m_rows], sx_smem, barrier)
    plgpu.copy_gmem_to_smem(sw_gmem.at[n_rows], sw_smem, barrier)

    def accumulate(acc_ref):
        def step(_, x_smem, w_smem):
            plgpu.wgmma(acc_ref, w_smem, x_smem.T)      # [tile_n, tile_k] . [tile_k, tile_m]
            plgpu.wgmma_wait(1)                          # keep one wgmma in flight

        transforms = _smem_transforms(tile_k)
        plgpu.emit_pipeline(
            step,
            grid=(steps,),
            in_specs=[
                plgpu.BlockSpec((tile_m, tile_k), lambda k: (mi, k), transforms=transforms, delay_release=1),
                plgpu.BlockSpec((tile_n, tile_k), lambda k: (ni, k), transforms=transforms, delay_release=1),
            ],
            max_concurrent_steps=max_concurrent_steps,
        )(x_gmem, w_gmem)
        return acc_ref[...]

    acc = pl.run_scoped(accumulate, plgpu.ACC((tile_n, tile_m), jnp.float32))
    plgpu.barrier_wait(barrier)
    sw = plgpu.load(sw_smem, layout=plgpu.Layout.WGMMA.reduce(1))   # one per accumulator row
    sx = plgpu.load(sx_smem, layout=plgpu.Layout.WGMMA.reduce(0))   # one per accumulator column
    out_smem[...] = acc * lax.broadcast_in_dim(sw, acc.shape, (0,)) * lax.broadcast_in_dim(sx, acc.shape, (1,))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[n_rows, m_rows])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("tile_m", "tile_n", "tile_k", "max_concurrent_steps", "interpret"))
def _fp8_matmul_t(x, values, w_scales, *, tile_m: int, tile_n: int, tile_k: int, max_concurrent_steps: int,
                  interpret):
    """M-padded x [Mp, K] and K-major e4m3 weights [N, K] -> out^T float32 [N, Mp]."""
    mp, k = x.shape
    n = values.shape[0]
    xq = quantize_fp8_per_token(x)
    sx = xq.scales.astype(jnp.float32).reshape(mp)
    sw = w_scales.astype(jnp.float32).reshape(n)
    steps = k // tile_k
    kernel = functools.partial(_kernel, tile_m=tile_m, tile_n=tile_n, tile_k=tile_k, steps=steps,
                               # >= 2: one step's buffers stay held for the wgmma in flight
                               max_concurrent_steps=max(2, min(max_concurrent_steps, steps)))
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((n, mp), jnp.float32),
        grid=(mp // tile_m, n // tile_n),
        grid_names=("m", "n"),
        scratch_types=dict(
            out_smem=plgpu.SMEM((tile_n, tile_m), jnp.float32),
            sx_smem=plgpu.SMEM((tile_m,), jnp.float32),
            sw_smem=plgpu.SMEM((tile_n,), jnp.float32),
            barrier=plgpu.Barrier(num_arrivals=2),
        ),
        interpret=plgpu.InterpretGPUParams() if interpret is True else interpret,
        kernel_name="fp8_matmul_mgpu",
    )
    return call(xq.values, values, sx, sw)


def is_k_major_fp8(w: QuantizedTensor) -> bool:
    """Per-channel e4m3 weights stored [N, K] (axis 1 reduced): what this kernel reads."""
    return w.fmt == "fp8" and w.axis == 1 and w.values.ndim == 2 and w.group_size is None


def fp8_matmul_mgpu(x: jax.Array, w: QuantizedTensor, *, interpret: bool = False, tile_m: int | None = None,
                    tile_n: int | None = None, tile_k: int | None = None,
                    max_concurrent_steps: int = 4) -> jax.Array:
    """x [..., K] (bf16/f32) @ K-major e4m3 weights w ([N, K], axis 1) -> float32 [..., N].

    `interpret`: False (compiled, sm_90a), True (`plgpu.InterpretGPUParams()`: any backend) or an
    `InterpretGPUParams` (e.g. with race detection). Raises ValueError for other
    weight layouts and for shapes the kernel cannot tile (`fp8_shape_error`)."""
    if not is_k_major_fp8(w):
        raise ValueError(f"the Mosaic GPU FP8 matmul needs per-channel e4m3 weights stored [N, K] (axis 1), "
                         f"got {w.fmt} shape {w.values.shape} axis {w.axis} group {w.group_size}")
    n, k = w.values.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if why := fp8_shape_error(m, k, n, tile_m, tile_n, tile_k):
        raise ValueError(f"Mosaic GPU FP8 matmul: {why}")
    tm, tn, tk = plan_tiles(m, k, n, tile_m, tile_n, tile_k)
    mp = -(-m // tm) * tm
    if mp != m:
        x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
    out_t = _fp8_matmul_t(x2, w.values, w.scales, tile_m=tm, tile_n=tn, tile_k=tk,
                          max_concurrent_steps=max_concurrent_steps, interpret=interpret)
    return out_t[:, :m].T.reshape(*lead, n)
