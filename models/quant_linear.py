"""A linear layer whose weight is stored quantized (packed int4, int8 or e4m3) on the device.

It holds the arrays of a `QuantizedTensor` as parameters, in kernel layout `[in, out]` (axis 0
reduced) or K-major `[out, in]` (axis 1: what FP8 tensor cores read; fp8 weights with FP8
activations, and int4_fp8); inside a stacked (scanned) layer they carry a leading layer axis like
every other parameter. The forward pass goes through the `quantized_matmul` dispatcher, which picks
the reference or a kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.quant_formats import QuantizedTensor
from pallas_kernels.quantized_matmul import quantized_matmul


class QuantLinear(nnx.Module):
    def __init__(self, weight: QuantizedTensor, bias: jax.Array | None, *, act_format: str | None):
        """weight: one layer's `[in, out]` (axis 0) or `[out, in]` (axis 1) QuantizedTensor; its arrays
        may carry a leading layer axis when the layer is stacked (`fmt`, `axis`, `group_size` are shared)."""
        if weight.axis not in (0, 1):
            raise ValueError(f"quantized weight must reduce its input axis (0, or 1 when K-major), "
                             f"got {weight.axis}")
        self.fmt, self.axis, self.group_size = weight.fmt, weight.axis, weight.group_size
        self.act_format = act_format
        self.values = nnx.Param(weight.values)
        self.scales = nnx.Param(weight.scales)
        self.zeros = nnx.Param(weight.zeros) if weight.zeros is not None else None
        self.bias = nnx.Param(bias) if bias is not None else None

    def weight(self) -> QuantizedTensor:
        zeros = self.zeros[...] if self.zeros is not None else None
        return QuantizedTensor(self.values[...], self.scales[...], zeros, self.fmt, self.axis, self.group_size)

    def __call__(self, x: jax.Array, kernels: str = "xla") -> jax.Array:
        """kernels: the matmul dispatcher's implementation ("xla", "pallas", "interpret")."""
        y = quantized_matmul(x, self.weight(), act_format=self.act_format, kernels=kernels)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)

