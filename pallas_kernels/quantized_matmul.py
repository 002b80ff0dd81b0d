"""Dispatcher for matmuls with quantized weights (and optionally quantized activations). Models call only this.

`kernels` picks the implementation (a static argument, so each compiles into its own program):
  "xla"        the pure-XLA reference (`quantized_matmul_ref`); the default, and what runs on CPU.
  "pallas"     the Pallas kernels (`quantized_matmul_pallas`), compiled for the GPU (Triton lowering);
               raises ValueError on other backends.
  "interpret"  the same Pallas kernels under `interpret=True` (any backend; slow, for tests).
Kernels exist for weight-only W4A16 (int4/int4_sym group-wise), W8A16 (int8 per-channel or
group-wise GGUF Q8_0, fp8 per-channel), W8A8 int8, FP8 and W4A8 (int4 x e4m3), all Triton-lowered
on `[K, N]` weights; FP8 activations with K-major weights, e4m3 `[N, K]` (`quantize_fp8_k_major`) or
FireQ's INT4-FP8 (`quantize_int4_fp8`), go to the Mosaic GPU kernels (`fp8_matmul_mgpu`: wgmma on FP8
tensor cores, which the Triton lowering cannot reach), under `plgpu.InterpretGPUParams()` for
"interpret". A (weight, activation) format pair without a kernel (`has_kernel` is False) falls back
to the reference for every implementation; the reference also raises the errors for pairs that make
no sense (e.g. fp8 weights with int8 activations).
"""

from __future__ import annotations

from pallas_kernels.fp8_matmul_mgpu import fp8_matmul_mgpu, is_mosaic_weight
from pallas_kernels.implementation import IMPLEMENTATIONS, check_implementation
from pallas_kernels.quantized_matmul_pallas import has_kernel as has_triton_kernel
from pallas_kernels.quantized_matmul_pallas import quantized_matmul_pallas
from pallas_kernels.quantized_matmul_ref import ACTIVATION_FORMATS, quantized_matmul_reference

__all__ = ["IMPLEMENTATIONS", "has_kernel", "quantized_matmul"]


def uses_mosaic(w, act_format) -> bool:
    """FP8 activations with K-major e4m3 or int4_fp8 weights: the Mosaic GPU kernels."""
    return act_format == "fp8" and is_mosaic_weight(w)


def has_kernel(w, act_format=None) -> bool:
    """Whether "pallas"/"interpret" run a kernel for this (weight, activation format) pair (else the
    reference runs for every implementation)."""
    return act_format in ACTIVATION_FORMATS and (uses_mosaic(w, act_format) or has_triton_kernel(w, act_format))


def quantized_matmul(x, w, *, act_format=None, kernels: str = "xla"):
    """x [..., K] @ w (QuantizedTensor [K, N], or K-major [N, K] with axis 1) -> float32 [..., N]."""
    if kernels not in IMPLEMENTATIONS:
        check_implementation(kernels)  # raises, naming the choices
    if kernels == "xla" or not has_kernel(w, act_format):
        return quantized_matmul_reference(x, w, act_format)
    if x.shape[-1] != w.shape[w.axis]:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={w.shape[w.axis]}")
    check_implementation(kernels)  # "pallas" compiles for the GPU only
    if uses_mosaic(w, act_format):
        return fp8_matmul_mgpu(x, w, interpret=(kernels == "interpret"))
    return quantized_matmul_pallas(x, w, act_format, interpret=(kernels == "interpret"))
