"""XLA reference matmuls for every weight format, against float64 numpy on the dequantized operands.

Random inputs are fresh each run. Each reference is checked two ways: (a) exactly what it claims to
compute (the dequantized weight times the quantized-then-dequantized activation, in float64) to
float32 rounding, which catches layout and scale mistakes; (b) against the unquantized product with a
tolerance derived from the format's step size, which catches a quantizer that silently does nothing
wrong-but-consistent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quant_formats import (
    dequantize,
    quantize_fp8_per_channel,
    quantize_fp8_per_token,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    quantize_int8_per_token,
)
from pallas_kernels.quantized_matmul import quantized_matmul

M, K, N = 7, 256, 96


def _operands(rng, dtype=jnp.float32):
    x = rng.normal(size=(M, K)).astype(np.float32)
    x[:, rng.integers(0, K, 3)] *= 20.0  # activation outlier channels, as in real LLMs
    w = (rng.normal(size=(K, N)) * 0.05).astype(np.float32)
    return jnp.asarray(x, dtype), jnp.asarray(w)


def _rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


CASES = {
    # name: (weight quantizer, activation format, activation quantizer or None, bound on relative error)
    # int8 activation step is absmax/127 per token and the x20 outlier channels set absmax (~60):
    # step/sqrt(12) * sqrt(K) / |x| ~ 0.47/3.5 * 16/38 ~ 6% (the problem SmoothQuant migrates away).
    "w8a8": (lambda w: quantize_int8_per_channel(w), "int8", quantize_int8_per_token, 0.1),
    # e4m3 has a 3-bit mantissa: relative rounding error <= 2^-4 per operand, ~4% on the product.
    "fp8": (lambda w: quantize_fp8_per_channel(w), "fp8", quantize_fp8_per_token, 0.06),
    # int4 group 128: step (max-min)/15 ~ 0.05 of the range; ~8% relative error on the product.
    "w4a16": (lambda w: quantize_int4_groupwise(w, 128), None, None, 0.12),
    "w4a8": (lambda w: quantize_int4_groupwise(w, 64), "fp8", quantize_fp8_per_token, 0.15),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_dequantized_product(name):
    rng = np.random.default_rng()
    quant_w, act, quant_x, bound = CASES[name]
    x, w = _operands(rng)
    qw = quant_w(w)
    out = jax.jit(lambda x, qw: quantized_matmul(x, qw, act_format=act))(x, qw)
    assert out.shape == (M, N) and out.dtype == jnp.float32
    xd = np.asarray(dequantize(quant_x(x)), np.float64) if quant_x else np.asarray(x, np.float64)
    exact = xd @ np.asarray(dequantize(qw), np.float64)
    np.testing.assert_allclose(np.asarray(out), exact, rtol=2e-5, atol=2e-5 * np.abs(exact).max())
    true = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    err = _rel_err(out, true)
    assert 1e-5 < err < bound, f"{name}: relative error {err:.4f} (bound {bound})"


def test_weight_only_in_bf16_accumulates_in_float32():
    rng = np.random.default_rng()
    x, w = _operands(rng, jnp.bfloat16)
    qw = quantize_int4_groupwise(w, 128)
    out = quantized_matmul(x, qw)
    assert out.dtype == jnp.float32
    exact = np.asarray(x, np.float64) @ np.asarray(dequantize(qw, jnp.bfloat16), np.float64)
    np.testing.assert_allclose(np.asarray(out), exact, rtol=1e-2, atol=1e-2 * np.abs(exact).max())


def test_fp8_activations_never_nan_on_huge_inputs():
    rng = np.random.default_rng()
    x, w = _operands(rng)
    x = x.at[0, 0].set(1e30)
    for qw in (quantize_fp8_per_channel(w), quantize_int4_groupwise(w, 128)):
        assert np.isfinite(np.asarray(quantized_matmul(x, qw, act_format="fp8"))).all()


def test_mismatched_formats_raise():
    rng = np.random.default_rng()
    x, w = _operands(rng)
    with pytest.raises(ValueError, match="W8A8"):
        quantized_matmul(x, quantize_fp8_per_channel(w), act_format="int8")
    with pytest.raises(ValueError, match="activation format"):
        quantized_matmul(x, quantize_int8_per_channel(w), act_format="int2")
    with pytest.raises(ValueError, match="K="):
        quantized_matmul(x[:, :128], quantize_int8_per_channel(w))
    with pytest.raises(ValueError, match="implementation"):
        quantized_matmul(x, quantize_int8_per_channel(w), kernels="cuda")
