"""Tests for the Pallas quantized matmul kernels (pallas_kernels/quantized_matmul_pallas.py) and the
dispatcher's "interpret"/"pallas" implementations, in interpret mode, against the XLA reference
(`quantized_matmul_reference`).

Inputs are fresh random numbers every run (the seed is printed, so a failure can be replayed). Plain
`interpret=True` fills every kernel output with NaN before the grid runs (and pads partial input
blocks with NaN), so an output tile the kernel forgets to write, or a read past a real row, shows up
as NaN; every output is also checked to be finite.

Tolerances (`_bound`). The kernel and the reference use the same quantizers and dequantize with the
same float32 formulas (the weight rounded to x's dtype exactly as `dequantize(w, x.dtype)`), so every
product is the same number on both sides: bf16 x bf16, e4m3 x e4m3 and e4m3 x int4 products are exact
in float32, f32 x f32 products are rounded the same way. Only the order of the float32 sums differs.
A float32 sum of K terms is off by at most K * 2^-24 * sum|terms| (each side), plus a few roundings in
the scale epilogue, hence `|kernel - ref| <= (2K + 8) * 2^-24 * mag` with `mag = |x| @ |w|` over the
operands as consumed (for W4A8, whose kernel computes `x.q - z * sum(x)` instead of `x.(q - z)`,
`mag` uses `|q| + |z|`). This is the worst case, ~3e-5 of `mag` for K = 256; a layout or scale mistake
(a swapped nibble, a neighbouring group's scale) moves outputs by ~1e-2 of `mag` or more. W8A8
accumulates in int32, which is exact, and applies the same two float32 multiplies in the same order:
its outputs must be bit-identical.

Compile budget: XLA compiling the interpreted kernel dominates (~0.3-1 s per compile). The module
compiles with most XLA optimizations off; kernels are called eagerly, so M = 1, 5 and 16 (all padded
to one 16-row tile) share one compiled kernel, and one reference call covers every M of a case. The
file takes ~55 s on a 2-core CPU machine at load average ~6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kernel_cases import consumed_operands, quantize_q8_0, random_activations, random_weight
from pallas_kernels.quant_formats import (
    QuantizedTensor,
    pack_int4,
    quantize_fp8_per_channel,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
)
from pallas_kernels.quantized_matmul import IMPLEMENTATIONS, quantized_matmul
from pallas_kernels.quantized_matmul_pallas import (
    has_kernel,
    matmul_shape_error,
    plan_blocks,
    quantized_matmul_pallas,
)
from pallas_kernels.quantized_matmul_ref import quantized_matmul_reference

EPS32 = 2.0 ** -24


pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")  # tests/conftest.py


# name: (weight quantizer taking (w, K), act_format)
FORMATS = {
    "w4a16_g32": (lambda w, k: quantize_int4_groupwise(w, 32, scale_dtype=jnp.bfloat16), None),
    "w4a16_g64": (lambda w, k: quantize_int4_groupwise(w, 64, scale_dtype=jnp.bfloat16), None),
    "w4a16_g128": (lambda w, k: quantize_int4_groupwise(w, 128, scale_dtype=jnp.bfloat16), None),
    "w4a16_sym_g64": (lambda w, k: quantize_int4_groupwise(w, 64, asymmetric=False), None),
    "w8a16": (lambda w, k: quantize_int8_per_channel(w, scale_dtype=jnp.bfloat16), None),
    "w8a16_q8_0": (lambda w, k: quantize_q8_0(w), None),
    "fp8_weight_only": (lambda w, k: quantize_fp8_per_channel(w), None),
    "w8a8": (lambda w, k: quantize_int8_per_channel(w, scale_dtype=jnp.bfloat16), "int8"),
    "fp8": (lambda w, k: quantize_fp8_per_channel(w, scale_dtype=jnp.bfloat16), "fp8"),
    "w4a8_g64": (lambda w, k: quantize_int4_groupwise(w, 64, scale_dtype=jnp.bfloat16), "fp8"),
}
MS = (1, 5, 16, 33)
# (K, N) pairs.
SHAPES = ((256, 64), (384, 48))
# With block_k = 256 (passed below), K = 384 is not a multiple of the block: the kernel takes K steps
# of 128 (the largest power of two dividing K); N = 48 gives 16-wide column tiles and a 3-wide grid.
BLOCKS = {(256, 64): {}, (384, 48): {"block_k": 256}}
DTYPES = {(256, 64): jnp.bfloat16, (384, 48): jnp.float32}


def _operands(rng, m, k, n, dtype):
    x = random_activations(rng, m, k, dtype)  # three outlier channels
    return x, random_weight(rng, k, n)


def _bound(x, qw, act, k):
    xd, wd = consumed_operands(x, qw, act)  # W4A8: |q| + |z|, the kernel's decomposition
    return (2 * k + 8) * EPS32 * (np.abs(xd) @ np.abs(wd)) + 1e-30


def _check(out, ref, x, qw, act, k):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert np.isfinite(out).all(), "NaN/inf in the kernel output (unwritten tile or poisoned read)"
    if act == "int8":
        np.testing.assert_array_equal(out, ref)  # int32 accumulation: exact
        return
    err = np.abs(out.astype(np.float64) - ref)
    bound = _bound(x, qw, act, k)
    worst = float((err / bound).max())
    assert worst <= 1.0, f"error {worst:.3g}x the bound (max abs err {err.max():.3g})"


@pytest.mark.parametrize("kn", SHAPES, ids=lambda kn: f"K{kn[0]}N{kn[1]}")
@pytest.mark.parametrize("name", list(FORMATS))
def test_kernel_matches_reference(rng, name, kn):
    k, n = kn
    quant_w, act = FORMATS[name]
    w = random_weight(rng, k, n)
    qw = quant_w(w, k)
    assert has_kernel(qw, act)
    # bf16 activations for one shape, f32 for the other (weight-only kernels compute in x's dtype).
    dtype = DTYPES[kn]
    xs = [_operands(rng, m, k, n, dtype)[0] for m in MS]
    # Rows are independent (per-token activation scales), so one reference call covers every M.
    ref = np.split(np.asarray(quantized_matmul_reference(jnp.concatenate(xs), qw, act)),
                   np.cumsum(MS)[:-1])
    for x, r in zip(xs, ref):
        # Eager call: M = 1, 5 and 16 pad to the same 16-row tile and share one compiled kernel.
        out = quantized_matmul_pallas(x, qw, act, interpret=True, **BLOCKS[kn])
        _check(out, r, x, qw, act, k)


def test_w4a16_step_smaller_than_group_and_per_channel_groups(rng):
    """bk < g (one group spans several K steps) and g = K (AWQ/GPTQ group_size -1), non-power-of-two."""
    k, n = 192, 32
    x, w = _operands(rng, 5, k, n, jnp.float32)
    for qw, blocks in ((quantize_int4_groupwise(w, 64), {"block_k": 32}),
                       (quantize_int4_groupwise(w, k), {})):
        _, _, bk = plan_blocks(5, k, n, qw, **blocks)
        assert bk < qw.group_size
        for act in (None, "fp8"):
            out = quantized_matmul_pallas(x, qw, act, interpret=True, **blocks)
            _check(out, quantized_matmul_reference(x, qw, act), x, qw, act, k)


def test_w4a8_non_integer_zero_points(rng):
    """GGUF Q4_1 imports carry float zero points (-min / d); the kernel's x.q - z.sum(x) handles them."""
    k, n, g = 128, 32, 32
    x, _ = _operands(rng, 5, k, n, jnp.float32)
    q = jnp.asarray(rng.integers(0, 16, size=(k, n)), jnp.int32)
    scales = jnp.asarray(rng.uniform(0.001, 0.01, size=(k // g, n)), jnp.float32)
    zeros = jnp.asarray(rng.uniform(0.0, 15.0, size=(k // g, n)), jnp.float32)
    qw = QuantizedTensor(pack_int4(q, axis=0), scales, zeros, "int4", 0, g)
    for act in (None, "fp8"):
        out = quantized_matmul_pallas(x, qw, act, interpret=True)
        _check(out, quantized_matmul_reference(x, qw, act), x, qw, act, k)


def test_dispatcher_interpret_leading_dims_under_jit(rng):
    k, n = 128, 32
    x, w = _operands(rng, 6, k, n, jnp.bfloat16)
    x = x.reshape(2, 3, k)
    qw = quantize_int4_groupwise(w, 32)
    f = jax.jit(lambda x, qw: quantized_matmul(x, qw, kernels="interpret"))
    out = f(x, qw)
    assert out.shape == (2, 3, n) and out.dtype == jnp.float32
    ref = quantized_matmul(x, qw)
    _check(out.reshape(6, n), ref.reshape(6, n), x.reshape(6, k), qw, None, k)


def test_dispatcher_implementations_and_errors(rng):
    assert IMPLEMENTATIONS == ("xla", "pallas", "interpret")
    x, w = _operands(rng, 3, 128, 32, jnp.float32)
    qw = quantize_int8_per_channel(w)
    with pytest.raises(ValueError, match=r"'xla', 'pallas', 'interpret'"):
        quantized_matmul(x, qw, kernels="cuda")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="interpret"):
            quantized_matmul(x, qw, kernels="pallas")
    # Pairs without a kernel go to the reference, which raises its own errors for every implementation.
    for impl in IMPLEMENTATIONS:
        with pytest.raises(ValueError, match="W8A8"):
            quantized_matmul(x, quantize_fp8_per_channel(w), act_format="int8", kernels=impl)
        with pytest.raises(ValueError, match="W8A8"):
            quantized_matmul(x, quantize_q8_0(w), act_format="int8", kernels=impl)
        with pytest.raises(ValueError, match="activation format"):
            quantized_matmul(x, qw, act_format="int2", kernels=impl)
        with pytest.raises(ValueError, match="K="):
            quantized_matmul(x[:, :64], qw, kernels=impl)
    assert not has_kernel(quantize_fp8_per_channel(w), "int8")
    with pytest.raises(ValueError, match="no Pallas kernel"):
        quantized_matmul_pallas(x, quantize_fp8_per_channel(w), "int8", interpret=True)


def test_compiled_shape_errors(rng):
    """The Triton lowering needs >= 16-wide dot operands: shapes that cannot be tiled raise a
    ValueError before lowering (compiled path only; interpret mode takes any shape)."""
    k, n = 96, 24
    x, w = _operands(rng, 3, k, n, jnp.float32)
    qw = quantize_int8_per_channel(w)
    assert "N=24" in matmul_shape_error(3, k, n, qw)                    # 24 -> 8-wide column tiles
    with pytest.raises(ValueError, match="compiled Pallas quantized matmul: N=24"):
        quantized_matmul_pallas(x, qw)
    out = quantized_matmul_pallas(x, qw, interpret=True)                # fine interpreted
    _check(out, quantized_matmul_reference(x, qw), x, qw, None, k)
    q48 = quantize_int4_groupwise(jnp.zeros((48, 32)), 48)              # K step 16 -> 8 packed rows
    assert "K=48" in matmul_shape_error(3, 48, 32, q48)
    assert matmul_shape_error(3, 256, 64, quantize_int4_groupwise(jnp.zeros((256, 64)), 32)) is None
