"""Pure-XLA reference matmuls for every quantized weight format: `x[..., K] @ w[K, N]`.

Each function computes exactly what the matching Pallas kernel computes, in the same order of
rounding, so kernels can be tested against it:

* weight-only (W4A16, W8A16 from GGUF Q8_0): dequantize the weight to the activation dtype, matmul with
  float32 accumulation (a kernel dequantizes in registers; this reference materialises it).
* W8A8 int8: per-token dynamic int8 activations x per-channel int8 weights, int32 accumulation, then
  `acc * s_x * s_w`.
* FP8: per-token e4m3 activations x per-channel e4m3 weights, float32 accumulation, then scales.
* W4A8: per-token e4m3 activations x int4 group-wise weights, asymmetric (QServe-like) or symmetric
  (FireQ's INT4-FP8, `int4_fp8`, read as the int4_sym weight it equals). `q - zero` is an integer in
  [-15, 15] for integer zero points (exact in e4m3), so each group's partial product is an fp8 x fp8
  product accumulated in float32, scaled by the group scale, then by the token scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.quant_formats import (
    QuantizedTensor,
    dequantize,
    quantize_fp8_per_token,
    quantize_int8_per_token,
    unpack_int4,
    weight_kn,
)

ACTIVATION_FORMATS = (None, "int8", "fp8")


def _contract(x, w, acc_dtype):
    """x [..., K] . w [K, N] -> [..., N] accumulated in acc_dtype."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=acc_dtype)


def weight_only_matmul(x: jax.Array, w: QuantizedTensor) -> jax.Array:
    return _contract(x, dequantize(w, x.dtype), jnp.float32)


def int8_matmul(x: jax.Array, w: QuantizedTensor) -> jax.Array:
    if w.fmt != "int8" or w.group_size is not None:
        raise ValueError(f"W8A8 needs per-channel int8 weights, got {w.fmt} (group {w.group_size})")
    xq = quantize_int8_per_token(x)
    acc = _contract(xq.values, w.values, jnp.int32)
    return acc.astype(jnp.float32) * xq.scales * w.scales.astype(jnp.float32)


def fp8_matmul(x: jax.Array, w: QuantizedTensor) -> jax.Array:
    if w.fmt != "fp8":
        raise ValueError(f"FP8 activations with {w.fmt} weights: use fp8 or int4 weights")
    xq = quantize_fp8_per_token(x)
    # fp8 x fp8 products are exact in float32, so upcasting first changes nothing but portability.
    acc = _contract(xq.values.astype(jnp.float32), w.values.astype(jnp.float32), jnp.float32)
    return acc * xq.scales * w.scales.astype(jnp.float32)


def w4a8_matmul(x: jax.Array, w: QuantizedTensor) -> jax.Array:
    """int4 group-wise weights (asymmetric, or symmetric: int4_sym, and int4_fp8 read as it) x e4m3
    per-token activations: per group an exact fp8 x int product sum, then the group scale."""
    if w.fmt not in ("int4", "int4_sym"):
        raise ValueError(f"W4A8 needs int4 weights, got {w.fmt}")
    xq = quantize_fp8_per_token(x)
    k, n = w.shape
    g = w.group_size
    q = unpack_int4(w.values, signed=w.fmt == "int4_sym", axis=0).astype(jnp.float32).reshape(k // g, g, n)
    centred = q - w.zeros.astype(jnp.float32)[:, None, :] if w.fmt == "int4" else q   # [G, g, N]
    xg = xq.values.astype(jnp.float32).reshape(*x.shape[:-1], k // g, g)
    partial = jnp.einsum("...Gg,Ggn->...Gn", xg, centred, preferred_element_type=jnp.float32)
    acc = jnp.einsum("...Gn,Gn->...n", partial, w.scales.astype(jnp.float32))
    return acc * xq.scales


def quantized_matmul_reference(x: jax.Array, w: QuantizedTensor, act_format: str | None = None) -> jax.Array:
    """x [..., K] (bf16/f32) @ quantized w [K, N] (or K-major [N, K], axis 1) -> float32 [..., N]."""
    if w.axis not in (0, 1) or len(w.shape) != 2:
        raise ValueError(f"weights must be [K, N] (axis 0 reduced) or [N, K] (axis 1), got shape {w.shape} "
                         f"axis {w.axis}")
    w = weight_kn(w)
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={w.shape[0]}")
    if act_format is None:
        return weight_only_matmul(x, w)
    if act_format == "int8":
        return int8_matmul(x, w)
    if act_format == "fp8":
        return w4a8_matmul(x, w) if w.fmt in ("int4", "int4_sym") else fp8_matmul(x, w)
    raise ValueError(f"unknown activation format {act_format!r}; choose from {ACTIVATION_FORMATS}")
