"""Dispatcher for matmuls with quantized weights (and optionally quantized activations). Models call only this.

`kernels` picks the implementation (a static argument, so each compiles into its own program):
  "xla"        the pure-XLA reference (`quantized_matmul_ref`); the default, and what runs on CPU.
  "pallas"     the Pallas kernels (`quantized_matmul_pallas`), compiled for the GPU (Triton lowering);
               raises ValueError on other backends.
  "interpret"  the same Pallas kernels under `interpret=True` (any backend; slow, for tests).
Kernels exist for weight-only W4A16 (int4/int4_sym group-wise), W8A16 (int8 per-channel or
group-wise GGUF Q8_0, fp8 per-channel), W8A8 int8, FP8 and W4A8 (int4 x e4m3). A (weight, activation)
format pair without a kernel (`quantized_matmul_pallas.has_kernel` is False) falls back to the
reference for every implementation; the reference also raises the errors for pairs that make no sense
(e.g. fp8 weights with int8 activations).
"""

from __future__ import annotations

from pallas_kernels.implementation import IMPLEMENTATIONS, check_implementation
from pallas_kernels.quantized_matmul_pallas import has_kernel, quantized_matmul_pallas
from pallas_kernels.quantized_matmul_ref import ACTIVATION_FORMATS, quantized_matmul_reference

__all__ = ["IMPLEMENTATIONS", "quantized_matmul"]


def quantized_matmul(x, w, *, act_format=None, kernels: str = "xla"):
    """x [..., K] @ w (QuantizedTensor [K, N]) -> float32 [..., N]."""
    if kernels not in IMPLEMENTATIONS:
        check_implementation(kernels)  # raises, naming the choices
    if kernels == "xla" or act_format not in ACTIVATION_FORMATS or not has_kernel(w, act_format):
        return quantized_matmul_reference(x, w, act_format)
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={w.shape[0]}")
    check_implementation(kernels)  # "pallas" compiles for the GPU only
    return quantized_matmul_pallas(x, w, act_format, interpret=(kernels == "interpret"))
