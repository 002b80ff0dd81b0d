"""The Mosaic GPU FP8 tensor-core matmuls (pallas_kernels/fp8_matmul_mgpu.py: K-major fp8 weights, and
FireQ's INT4-FP8) under `plgpu.InterpretGPUParams` against the XLA reference, their place in the
dispatcher, and the presets that store their weights.

Inputs are fresh random numbers every run (the seed is printed). GPU interpret mode fills every
allocation (the output, the shared-memory tiles) with NaN before the kernel runs and raises on an
out-of-bounds read, so a tile the kernel forgets to write or reads too early shows up; one case also
runs the interpreter's happens-before race detector over the TMA pipeline.

Tolerance: kernel and reference quantize x with the same per-token quantizer and multiply the same
e4m3 codes (int4 values in [-7, 7] are exact e4m3), whose products are exact in float32; only the
float32 summation order differs (and the scale multiplies), so `|kernel - ref| <= (2K + 8) * 2^-24 *
(|x| @ |w|)` over the operands as consumed (tests/test_quantized_matmul_pallas.py derives it). A
transposed tile, a swapped nibble, a neighbouring group's, channel's or token's scale moves outputs by
~1e-2 of `|x| @ |w|` or more.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
from jax.experimental.pallas import mosaic_gpu as plgpu

from models.loader import load_model
from models.quant_linear import QuantLinear
from pallas_kernels.fp8_matmul_mgpu import fp8_matmul_mgpu, shape_error, plan_tiles
from pallas_kernels.kernel_cases import consumed_operands, random_activations, random_weight
from pallas_kernels.quant_formats import (
    quantize_fp8_k_major,
    quantize_fp8_per_channel,
    quantize_int4_fp8,
    quantize_int4_groupwise,
    weight_kn,
)
from pallas_kernels.quantized_matmul import has_kernel, quantized_matmul
from pallas_kernels.quantized_matmul_ref import quantized_matmul_reference
from tests.helpers import FIXTURES

EPS32 = 2.0 ** -24

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")  # tests/conftest.py


# Jitted like the kernel's wrapper: under jit XLA turns the quantizer's `absmax / 448` into a multiply
# by the reciprocal, so an eager reference can pick fp8 codes one step away (~1e-2 differences).
reference = jax.jit(quantized_matmul_reference, static_argnums=2)


def _bound(x, w):
    xd, wd = consumed_operands(x, w, "fp8")
    return (2 * xd.shape[-1] + 8) * EPS32 * (np.abs(xd) @ np.abs(wd)) + 1e-30


# (weight format, K, N, x dtype): fp8 with 128-deep K steps and 64-row weight tiles, 128-row tiles,
# 32-deep steps (K = 96); int4_fp8 with groups of 128 (64-row tiles) and 64 (three groups, 128 rows).
CASES = [("fp8", 256, 64, jnp.bfloat16), ("fp8", 384, 256, jnp.float32), ("fp8", 96, 128, jnp.bfloat16),
         ("int4_fp8_g128", 256, 64, jnp.bfloat16), ("int4_fp8_g64", 192, 128, jnp.float32)]
QUANTIZERS = {"fp8": lambda w: quantize_fp8_k_major(w, scale_dtype=jnp.bfloat16),
              "int4_fp8_g128": lambda w: quantize_int4_fp8(w, 128), "int4_fp8_g64": lambda w: quantize_int4_fp8(w, 64)}


@pytest.mark.parametrize("fmt, k, n, dtype", CASES)
def test_matches_the_reference(rng, fmt, k, n, dtype):
    w = QUANTIZERS[fmt](random_weight(rng, k, n))
    for m in (1, 8, 33, 130):   # one token; a full 8-wide tile; a padded 64-wide tile; two 128-wide tiles
        x = random_activations(rng, m, k, dtype)
        out = np.asarray(fp8_matmul_mgpu(x, w, interpret=True), np.float64)
        ref = np.asarray(reference(x, w, "fp8"), np.float64)
        assert out.shape == (m, n) and np.isfinite(out).all()
        assert (np.abs(out - ref) <= _bound(x, w)).all(), (m, np.abs(out - ref).max())


@pytest.mark.parametrize("fmt", ["fp8", "int4_fp8_g128"])
def test_the_pipeline_has_no_race(rng, fmt):
    """Four K steps through a two-deep TMA pipeline (fp8: a wgmma in flight; int4_fp8: each group's
    tile converted through shared memory), race detector on."""
    w = QUANTIZERS[fmt](random_weight(rng, 512, 128))
    x = random_activations(rng, 20, 512, jnp.bfloat16)
    out = fp8_matmul_mgpu(x, w, interpret=plgpu.InterpretGPUParams(detect_races=True), max_concurrent_steps=2)
    assert not get_races().races_found
    assert (np.abs(np.asarray(out, np.float64) - np.asarray(reference(x, w, "fp8")))
            <= _bound(x, w)).all()


def test_the_dispatcher_sends_k_major_fp8_to_mosaic(rng):
    k, n = 256, 128
    wf = random_weight(rng, k, n)
    kn, nk = quantize_fp8_per_channel(wf, scale_dtype=jnp.bfloat16), quantize_fp8_k_major(wf, scale_dtype=jnp.bfloat16)
    # Same codes and scales, transposed.
    assert nk.axis == 1 and nk.values.shape == (n, k) and nk.scales.shape == (n, 1)
    back = weight_kn(nk)
    assert np.array_equal(np.asarray(back.values, np.float32), np.asarray(kn.values, np.float32))
    assert np.array_equal(np.asarray(back.scales, np.float32), np.asarray(kn.scales, np.float32))
    assert has_kernel(nk, "fp8") and not has_kernel(nk, None) and not has_kernel(nk, "int8")
    x = random_activations(rng, 3, k, jnp.bfloat16)
    via = quantized_matmul(x, nk, act_format="fp8", kernels="interpret")
    assert np.array_equal(np.asarray(via), np.asarray(fp8_matmul_mgpu(x, nk, interpret=True)))
    # The reference takes either layout: the same numbers.
    assert np.array_equal(np.asarray(quantized_matmul(x, nk, act_format="fp8")),
                          np.asarray(quantized_matmul(x, kn, act_format="fp8")))
    # Weight-only use of K-major weights has no kernel: the reference runs, with the same result.
    assert np.array_equal(np.asarray(quantized_matmul(x, nk, kernels="interpret")),
                          np.asarray(quantized_matmul(x, kn)))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="GPU"):
            quantized_matmul(x, nk, act_format="fp8", kernels="pallas")
    # FireQ's INT4-FP8 goes to the Mosaic kernel too; as weight-only it is the int4_sym weight it equals.
    fq = quantize_int4_fp8(wf, 128)
    assert has_kernel(fq, "fp8")
    assert np.array_equal(np.asarray(quantized_matmul(x, fq, act_format="fp8", kernels="interpret")),
                          np.asarray(fp8_matmul_mgpu(x, fq, interpret=True)))
    assert np.array_equal(np.asarray(quantized_matmul(x, fq)), np.asarray(quantized_matmul(x, weight_kn(fq))))


def test_bad_input_is_a_clear_error(rng):
    w = quantize_fp8_k_major(random_weight(rng, 256, 64))
    x = random_activations(rng, 2, 256, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"stored \[N, K\]"):
        fp8_matmul_mgpu(x, weight_kn(w), interpret=True)
    with pytest.raises(ValueError, match="K-major weights"):   # [K, N] int4: the Triton W4A8 kernel's
        fp8_matmul_mgpu(x, quantize_int4_groupwise(random_weight(rng, 256, 64), 128), interpret=True)
    with pytest.raises(ValueError, match="one group"):
        fp8_matmul_mgpu(x, quantize_int4_fp8(random_weight(rng, 256, 64), 128), interpret=True, tile_k=64)
    with pytest.raises(ValueError, match="K=128"):
        fp8_matmul_mgpu(x[:, :128], w, interpret=True)
    with pytest.raises(ValueError, match="N=96 is not a multiple of tile_n 128"):
        fp8_matmul_mgpu(x, quantize_fp8_k_major(random_weight(rng, 256, 96)), interpret=True)
    assert shape_error(1, 80, 64) == "K=80 is not a multiple of tile_k 128"
    assert shape_error(1, 256, 64, tile_m=12) is not None
    assert plan_tiles(1, 4096, 14336) == (8, 128, 128) and plan_tiles(300, 576, 192) == (128, 64, 64)
    with pytest.raises(ValueError, match="groups"):       # int4_fp8 steps one group per K tile: 64 or 128
        fp8_matmul_mgpu(x, quantize_int4_fp8(random_weight(rng, 256, 64), 32), interpret=True)


def test_the_fireq_preset_stores_int4_fp8_weights():
    fq = load_model(str(FIXTURES / "llama"), dtype="float32", precision="fireq", calib_samples=0)
    cfg = fq.config
    lin = fq.model.layers.down_proj
    assert lin.fmt == "int4_fp8" and lin.axis == 1 and lin.act_format == "fp8"
    g = fq.precision.group_size_for(cfg.intermediate_size)
    assert lin.values[...].shape == (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size // 2)
    assert lin.scales[...].shape == (cfg.num_layers, cfg.intermediate_size // g, cfg.hidden_size)


def test_the_fp8_preset_stores_k_major_weights():
    """FP8 weights with FP8 activations are stored [out, in] for the FP8 tensor cores, with the codes
    and scales the [in, out] quantizer gives; the other presets keep [in, out]."""
    fp8 = load_model(str(FIXTURES / "llama"), dtype="float32", precision="fp8", calib_samples=0)
    cfg = fp8.config
    lin = fp8.model.layers.q_proj
    assert isinstance(lin, QuantLinear) and lin.axis == 1 and lin.act_format == "fp8"
    q_out = cfg.num_heads * cfg.head_dim
    assert lin.values[...].shape == (cfg.num_layers, q_out, cfg.hidden_size)     # [L, out, in]
    assert lin.scales[...].shape == (cfg.num_layers, q_out, 1)
    w8 = load_model(str(FIXTURES / "llama"), dtype="float32", precision="w8a8", calib_samples=0)
    assert w8.model.layers.q_proj.axis == 0
    assert w8.model.layers.q_proj.values[...].shape == (cfg.num_layers, cfg.hidden_size, q_out)
