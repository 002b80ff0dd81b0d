"""Dispatcher for matmuls with quantized weights (and optionally quantized activations). Models call only this.

Implementations: "xla" (the reference; the Pallas kernels join in their own issue). The choice is a
static argument so each implementation compiles into its own program.
"""

from __future__ import annotations

from pallas_kernels.quantized_matmul_ref import quantized_matmul_reference

IMPLEMENTATIONS = ("xla",)


def quantized_matmul(x, w, *, act_format=None, implementation: str = "xla"):
    """x [..., K] @ w (QuantizedTensor [K, N]) -> float32 [..., N]."""
    if implementation == "xla":
        return quantized_matmul_reference(x, w, act_format)
    raise ValueError(f"unknown matmul implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
