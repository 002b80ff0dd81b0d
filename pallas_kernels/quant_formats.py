"""Numeric formats for quantized weights, activations and KV caches: the single owner of packed layouts.

Every Pallas kernel and XLA reference that reads a quantized tensor goes through the layouts defined
here: int8 (per channel / per token, or GGUF Q8_0 groups), fp8 e4m3 (arXiv:2209.05433; casts saturate
via `saturating_cast_e4m3`, since XLA's fp8 convert does not), asymmetric group-wise int4 with
integer zero points (the AWQ / GPTQ convention, arXiv:2306.00978, arXiv:2210.17323), symmetric
int4_sym, FireQ's int4_fp8 (arXiv:2505.20839: symmetric int4, e4m3 group scales, stored K-major), and
per-token-per-head KV formats kv_int8 / kv_fp8 / kv_int4 / kv_int4_fp8 (FireQ's symmetric int4 KV).
int4 is packed two per byte (`pack_int4`, element 2i in the low nibble) or eight per word
(`pack_int4_u32`). Scales are computed in float32; with a narrower `scale_dtype` values are
quantized against the rounded scale, so dequantization matches what is stored. All functions are
pure `jnp` and work under `jax.jit`.

Byte accounting (`weight_bytes`; KV bytes: `kv_pages.KVPageLayout`) is computed from bit widths, never
from `.nbytes` (XLA:CPU reports one byte per int4 element). Format table and packing: docs/kernels.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

E4M3_MAX = 448.0
INT8_MAX = 127.0
INT4_SYM_MAX = 7.0
UINT4_MAX = 15.0

WEIGHT_FORMATS = ("bf16", "float32", "int8", "fp8", "int4", "int4_sym", "int4_fp8")
E4M3_MIN_SUBNORMAL = 2.0 ** -9
FIREQ_MAX_EXPONENT = 14    # the per-tensor multiplier of int4_fp8 scales is 2^i, i in [0, 14]
# Serving-level format names -> weight storage format.
WEIGHT_FORMAT_ALIASES = {
    "bfloat16": "bf16",
    "f32": "float32",
    "w8a8": "int8",
    "w4a16": "int4",
    "w4a8kv4": "int4",
    "fireq": "int4_fp8",
}


# ---------------------------------------------------------------------------------------------------
# int4 packing


def _check_packable(n: int, per: int, axis: int) -> None:
    if n % per:
        raise ValueError(f"int4 packing needs the packed axis ({axis}) length {n} divisible by {per}")


def pack_int4(q: jax.Array, axis: int = -1) -> jax.Array:
    """Pack int4 values two per byte along `axis` -> uint8 with that axis halved.

    `q` holds signed values in [-8, 7] (int8/int32) or unsigned values in [0, 15] (any int dtype);
    only the low nibble of each element is kept (not range-checked: values are traced under jit).
    Element 2i goes to the low nibble, element 2i+1 to the high nibble.
    """
    q = jnp.moveaxis(jnp.asarray(q), axis, -1)
    _check_packable(q.shape[-1], 2, axis)
    nib = (q.astype(jnp.int32) & 0xF).astype(jnp.uint8)
    pairs = nib.reshape(*nib.shape[:-1], nib.shape[-1] // 2, 2)
    packed = pairs[..., 0] | (pairs[..., 1] << 4)
    return jnp.moveaxis(packed, -1, axis)


def unpack_int4(packed: jax.Array, signed: bool, axis: int = -1) -> jax.Array:
    """Inverse of `pack_int4`: uint8 -> int8 with `axis` doubled; signed in [-8, 7] or unsigned in [0, 15]."""
    p = jnp.moveaxis(jnp.asarray(packed, jnp.uint8), axis, -1)
    if signed:
        # Sign-extend each nibble with arithmetic shifts on the int8 view of the byte.
        s = lax.bitcast_convert_type(p, jnp.int8)
        lo = (s << 4) >> 4
        hi = s >> 4
    else:
        lo = (p & 0xF).astype(jnp.int8)
        hi = (p >> 4).astype(jnp.int8)
    out = jnp.stack([lo, hi], axis=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return jnp.moveaxis(out, -1, axis)


_U32_SHIFTS = np.arange(8, dtype=np.uint32) * 4


def pack_int4_u32(q: jax.Array, axis: int = -1) -> jax.Array:
    """Pack int4 values eight per uint32 along `axis`: element 8j+i in bits 4i..4i+3 of word j."""
    q = jnp.moveaxis(jnp.asarray(q), axis, -1)
    _check_packable(q.shape[-1], 8, axis)
    nib = (q.astype(jnp.int32) & 0xF).astype(jnp.uint32)
    nib = nib.reshape(*nib.shape[:-1], nib.shape[-1] // 8, 8) << _U32_SHIFTS
    # The nibbles occupy disjoint bits, so an integer sum is the bitwise OR.
    words = jnp.sum(nib, axis=-1, dtype=jnp.uint32)
    return jnp.moveaxis(words, -1, axis)


def unpack_int4_u32(packed: jax.Array, signed: bool, axis: int = -1) -> jax.Array:
    """Inverse of `pack_int4_u32`: uint32 -> int8 with `axis` multiplied by 8."""
    w = jnp.moveaxis(jnp.asarray(packed, jnp.uint32), axis, -1)[..., None]
    if signed:
        # Move nibble i to the top 4 bits, then an arithmetic right shift sign-extends it.
        s = lax.bitcast_convert_type(w, jnp.int32)
        nib = (s << (28 - _U32_SHIFTS.astype(np.int32))) >> 28
    else:
        nib = (w >> _U32_SHIFTS) & 0xF
    out = nib.astype(jnp.int8).reshape(*w.shape[:-2], w.shape[-2] * 8)
    return jnp.moveaxis(out, -1, axis)


# ---------------------------------------------------------------------------------------------------
# FP8


def saturating_cast_e4m3(x: jax.Array) -> jax.Array:
    """Cast to float8_e4m3fn, clipping to +-448 first (XLA's convert maps out-of-range values to NaN).

    NaN stays NaN (clip propagates NaN); +-inf saturates to +-448.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return jnp.clip(x, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)


# ---------------------------------------------------------------------------------------------------
# Quantized containers


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A quantized tensor plus what is needed to dequantize it (a pytree; `fmt`, `axis`,
    `group_size` are static metadata).

    values: int8 | float8_e4m3fn | uint8 (int4 packed two per byte along `axis`).
    scales: per-channel/per-token scales with size 1 on the reduced axis (int8, fp8, KV), or
            per-group scales `[..., K // group_size, ...]` in place of the K axis (int4 weights,
            and int8 weights when `group_size` is set); int4_fp8 (values K-major `[N, K // 2]`,
            axis 1) keeps its group scales `[K // group_size, N]`, the rows its kernel streams.
    zeros:  None, the integer zero point stored as float (int4), or the float offset `min` (kv_int4).
    axis:   the reduced axis (weights: K axis; activations/KV: last axis). Non-negative.
    """

    values: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    fmt: str
    axis: int
    group_size: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical (unpacked) shape."""
        s = list(self.values.shape)
        if self.fmt in ("int4", "int4_sym", "int4_fp8", "kv_int4", "kv_int4_fp8"):
            s[self.axis] *= 2
        return tuple(s)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        return dequantize(self, dtype)


jax.tree_util.register_dataclass(
    QuantizedTensor,
    data_fields=["values", "scales", "zeros"],
    meta_fields=["fmt", "axis", "group_size"],
)


def weight_kn(w: QuantizedTensor) -> QuantizedTensor:
    """A 2-D weight as `[K, N]` (axis 0 reduced): K-major `[N, K]` weights (axis 1, the layout FP8
    tensor cores read) transposed, values, scales and zeros alike (exact; int4_fp8 becomes the
    int4_sym weight with the same nibbles and scales); `[K, N]` ones unchanged."""
    if w.values.ndim != 2 or w.axis not in (0, 1):
        raise ValueError(f"not a 2-D weight: values {w.values.shape}, axis {w.axis}")
    if w.axis == 0:
        return w
    if w.fmt == "int4_fp8":   # the same nibbles and scales read as [K, N] int4_sym (exact)
        return QuantizedTensor(w.values.T, w.scales, None, "int4_sym", 0, w.group_size)
    zeros = None if w.zeros is None else w.zeros.T
    return QuantizedTensor(w.values.T, w.scales.T, zeros, w.fmt, 0, w.group_size)


def quantize_fp8_k_major(w: jax.Array, scale_dtype: Any = jnp.float32) -> QuantizedTensor:
    """float8_e4m3fn weights `[K, N]` stored K-major, `[N, K]` (axis 1), one scale per output channel:
    what FP8 tensor cores read (`fp8_matmul_mgpu`). Same codes and scales as `quantize_fp8_per_channel`."""
    return quantize_fp8_per_channel(jnp.swapaxes(w, -1, -2), axis=-1, scale_dtype=scale_dtype)


def dequantize(qt: QuantizedTensor, dtype: Any = jnp.float32) -> jax.Array:
    """Dequantize any `QuantizedTensor` (computed in float32, returned in `dtype`)."""
    fmt = qt.fmt
    s = qt.scales.astype(jnp.float32)
    if fmt == "int8" and qt.group_size is not None:
        # Group-wise int8 (imported GGUF Q8_0): one scale per `group_size` run along `axis`.
        v = qt.values.astype(jnp.float32)
        grouped = _split_groups(v, qt.axis, qt.group_size)
        out = (grouped * jnp.expand_dims(s, qt.axis + 1)).reshape(v.shape)
    elif fmt in ("int8", "fp8", "kv_int8", "kv_fp8"):
        out = qt.values.astype(jnp.float32) * s
    elif fmt == "kv_int4":
        q = unpack_int4(qt.values, signed=False, axis=qt.axis).astype(jnp.float32)
        out = q * s + qt.zeros.astype(jnp.float32)
    elif fmt == "kv_int4_fp8":
        out = unpack_int4(qt.values, signed=True, axis=qt.axis).astype(jnp.float32) * s
    elif fmt == "int4_fp8":
        if qt.values.ndim != 2:
            raise ValueError(f"int4_fp8 weights are 2-D [N, K // 2], got {qt.values.shape}")
        return dequantize(weight_kn(qt), dtype).T
    elif fmt in ("int4", "int4_sym"):
        q = unpack_int4(qt.values, signed=(fmt == "int4_sym"), axis=qt.axis).astype(jnp.float32)
        grouped = _split_groups(q, qt.axis, qt.group_size)
        sg = jnp.expand_dims(s, qt.axis + 1)
        if fmt == "int4":
            grouped = grouped - jnp.expand_dims(qt.zeros.astype(jnp.float32), qt.axis + 1)
        out = (grouped * sg).reshape(q.shape)
    else:
        raise ValueError(f"unknown quantized format {fmt!r}")
    return out.astype(dtype)


def dequantize_kv(qt: QuantizedTensor, dtype: Any = jnp.float32) -> jax.Array:
    """Dequantize a KV tensor produced by `quantize_kv` back to `[..., heads, head_dim]`."""
    if not qt.fmt.startswith("kv_"):
        raise ValueError(f"not a KV format: {qt.fmt!r}")
    return dequantize(qt, dtype)


# ---------------------------------------------------------------------------------------------------
# Quantizers


def _norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for rank {ndim}")
    return axis % ndim


def _safe_scale(scale: jax.Array, scale_dtype: Any) -> jax.Array:
    """Round the scale to its storage dtype; an all-zero row/group gets scale 1 so q = 0 exactly."""
    scale = scale.astype(scale_dtype)
    return jnp.where(scale == 0, jnp.ones_like(scale), scale)


def _symmetric_int(x, axis: int, qmax: float, scale_dtype, out_dtype):
    x = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    scale = _safe_scale(absmax / qmax, scale_dtype)
    # Quantize against the stored (possibly rounded) scale; clip covers rounding of the scale down.
    q = jnp.clip(jnp.round(x / scale.astype(jnp.float32)), -qmax, qmax)
    return q.astype(out_dtype), scale


def quantize_int8_per_channel(w: jax.Array, axis: int = 0, scale_dtype: Any = jnp.float32) -> QuantizedTensor:
    """Symmetric int8 weights, one scale per output channel: `axis` is the reduced (K/input) axis.

    For an `[in, out]` kernel use axis=0: scales have shape `[1, out]`, `scale = absmax / 127`.
    """
    axis = _norm_axis(axis, w.ndim)
    q, scale = _symmetric_int(w, axis, INT8_MAX, scale_dtype, jnp.int8)
    return QuantizedTensor(q, scale, None, "int8", axis)


def quantize_int8_per_token(x: jax.Array, scale_dtype: Any = jnp.float32) -> QuantizedTensor:
    """Dynamic symmetric int8 activations, one scale per token (last axis reduced; scales `[..., 1]`)."""
    axis = x.ndim - 1
    q, scale = _symmetric_int(x, axis, INT8_MAX, scale_dtype, jnp.int8)
    return QuantizedTensor(q, scale, None, "int8", axis)


def _fp8(x, axis: int, scale_dtype):
    x = x.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    scale = _safe_scale(absmax / E4M3_MAX, scale_dtype)
    return saturating_cast_e4m3(x / scale.astype(jnp.float32)), scale


def quantize_fp8_per_channel(w: jax.Array, axis: int = 0, scale_dtype: Any = jnp.float32) -> QuantizedTensor:
    """float8_e4m3fn weights, one scale per output channel (`axis` reduced), `scale = absmax / 448`."""
    axis = _norm_axis(axis, w.ndim)
    q, scale = _fp8(w, axis, scale_dtype)
    return QuantizedTensor(q, scale, None, "fp8", axis)


def quantize_fp8_per_token(x: jax.Array, scale_dtype: Any = jnp.float32) -> QuantizedTensor:
    """Dynamic float8_e4m3fn activations, one scale per token (last axis reduced)."""
    axis = x.ndim - 1
    q, scale = _fp8(x, axis, scale_dtype)
    return QuantizedTensor(q, scale, None, "fp8", axis)


def _split_groups(x: jax.Array, axis: int, group_size: int) -> jax.Array:
    """[..., K, ...] -> [..., K // g, g, ...] (groups are contiguous runs along `axis`)."""
    k = x.shape[axis]
    return x.reshape(*x.shape[:axis], k // group_size, group_size, *x.shape[axis + 1:])


def quantize_int4_groupwise(
    w: jax.Array,
    group_size: int = 128,
    axis: int = 0,
    asymmetric: bool = True,
    scale_dtype: Any = jnp.float32,
) -> QuantizedTensor:
    """Round-to-nearest int4 weights with one scale (and zero point) per group of `group_size`
    consecutive elements along `axis` (the K/input axis of an `[in, out]` kernel).

    values: uint8, packed two per byte along `axis` (shape `[K // 2, out]` for axis=0).
    scales, zeros: `[K // group_size, out]` (the K axis replaced by the group axis).
    asymmetric: unsigned q in [0, 15], `x ~= (q - zero) * scale` (zero is an integer stored as float).
    symmetric:  signed q in [-8, 7], `scale = absmax / 7`, `x ~= q * scale`, zeros None.
    """
    axis = _norm_axis(axis, w.ndim)
    k = w.shape[axis]
    if group_size <= 0 or group_size % 2 or k % group_size:
        raise ValueError(f"K axis length {k} must be a multiple of an even group_size ({group_size})")
    g = _split_groups(w.astype(jnp.float32), axis, group_size)
    red = axis + 1
    if asymmetric:
        # Widen the range to include 0 (GPTQ) so the zero point is always representable in [0, 15].
        gmin = jnp.minimum(jnp.min(g, axis=red, keepdims=True), 0.0)
        gmax = jnp.maximum(jnp.max(g, axis=red, keepdims=True), 0.0)
        scale = _safe_scale((gmax - gmin) / UINT4_MAX, scale_dtype)
        s32 = scale.astype(jnp.float32)
        zero = jnp.clip(jnp.round(-gmin / s32), 0.0, UINT4_MAX)
        q = jnp.clip(jnp.round(g / s32) + zero, 0.0, UINT4_MAX)
        zeros = jnp.squeeze(zero, red).astype(scale_dtype)
        fmt = "int4"
    else:
        absmax = jnp.max(jnp.abs(g), axis=red, keepdims=True)
        scale = _safe_scale(absmax / INT4_SYM_MAX, scale_dtype)
        q = jnp.clip(jnp.round(g / scale.astype(jnp.float32)), -8.0, INT4_SYM_MAX)
        zeros = None
        fmt = "int4_sym"
    q = q.astype(jnp.int32).reshape(w.shape)
    return QuantizedTensor(pack_int4(q, axis=axis), jnp.squeeze(scale, red), zeros, fmt, axis, group_size)


def int4_fp8_multiplier(absmax: jax.Array) -> jax.Array:
    """int4_fp8's per-tensor multiplier from every group's absmax: 2^i, the largest i in [0, 14] that
    keeps every scale `absmax / 7` times it <= 448."""
    top = jnp.max(absmax) / INT4_SYM_MAX
    exponent = jnp.where(top > 0, jnp.floor(jnp.log2(E4M3_MAX / jnp.where(top > 0, top, 1.0))), 0.0)
    return 2.0 ** jnp.clip(exponent, 0, FIREQ_MAX_EXPONENT)


def int4_fp8_scales(absmax: jax.Array, multiplier: jax.Array, scale_dtype: Any = jnp.bfloat16) -> jax.Array:
    """int4_fp8 group scales as stored: `absmax / 7` times `multiplier`, clamped to e4m3's range,
    rounded to e4m3 and divided back (exact in bfloat16)."""
    e4m3 = jnp.clip(absmax / INT4_SYM_MAX * multiplier, E4M3_MIN_SUBNORMAL, E4M3_MAX).astype(jnp.float8_e4m3fn)
    return (e4m3.astype(jnp.float32) / multiplier).astype(scale_dtype)


def quantize_int4_fp8(w: jax.Array, group_size: int = 128, scale_dtype: Any = jnp.bfloat16) -> QuantizedTensor:
    """FireQ's INT4-FP8 weights from a `[K, N]` kernel: symmetric int4 per group of `group_size` along
    K, stored K-major (values `[N, K // 2]`, axis 1, for the FP8 tensor-core kernel), with e4m3 group
    scales under one per-tensor power-of-two multiplier.

    Each group's scale `absmax / 7` is multiplied by `2^i`, the largest `i` in [0, 14] that keeps every
    scale of the tensor <= 448 (fewest underflows), clamped at the smallest e4m3 subnormal 2^-9, rounded
    to e4m3, and divided back: `scales [K // group_size, N]` hold `e4m3 / 2^i` exactly (bfloat16 holds
    every such value). q = round(w / scale) in [-7, 7], against the stored scale.
    """
    if w.ndim != 2:
        raise ValueError(f"int4_fp8 quantizes a 2-D [K, N] kernel, got shape {w.shape}")
    k, n = w.shape
    if group_size <= 0 or group_size % 2 or k % group_size:
        raise ValueError(f"K={k} must be a multiple of an even group_size ({group_size})")
    g = w.astype(jnp.float32).reshape(k // group_size, group_size, n)
    absmax = jnp.max(jnp.abs(g), axis=1)                                               # [G, N]
    stored = int4_fp8_scales(absmax, int4_fp8_multiplier(absmax), scale_dtype)
    q = jnp.clip(jnp.round(g / stored.astype(jnp.float32)[:, None, :]), -INT4_SYM_MAX, INT4_SYM_MAX)
    values = pack_int4(q.astype(jnp.int32).reshape(k, n).T, axis=1)                     # [N, K // 2]
    return QuantizedTensor(values, stored, None, "int4_fp8", 1, group_size)


def quantize_kv(x: jax.Array, kv_format: str, scale_dtype: Any = jnp.float32) -> QuantizedTensor:
    """Quantize K or V `[..., heads, head_dim]` with one scale per token per head (head_dim reduced).

    kv_format "int8": symmetric, `scale = absmax / 127`.
    kv_format "fp8":  e4m3, `scale = absmax / 448`.
    kv_format "int4": asymmetric, `scale = (max - min) / 15`, zeros = float offset `min`,
                      q in [0, 15] packed two per byte along head_dim, `x ~= q * scale + min`.
    kv_format "int4_fp8": FireQ's KV, symmetric, `scale = absmax / 7`, q in [-7, 7] (two's
                      complement nibbles, two per byte): every code is exact in e4m3, so attention
                      multiplies the codes on FP8 tensor cores and applies the scales outside.
    scales (and zeros) have shape `[..., heads, 1]`.
    """
    if x.ndim < 2:
        raise ValueError("KV tensors must be [..., heads, head_dim]")
    axis = x.ndim - 1
    if kv_format == "int8":
        q, scale = _symmetric_int(x, axis, INT8_MAX, scale_dtype, jnp.int8)
        return QuantizedTensor(q, scale, None, "kv_int8", axis)
    if kv_format == "fp8":
        q, scale = _fp8(x, axis, scale_dtype)
        return QuantizedTensor(q, scale, None, "kv_fp8", axis)
    if kv_format == "int4":
        _check_packable(x.shape[-1], 2, axis)
        x = x.astype(jnp.float32)
        xmin = jnp.min(x, axis=axis, keepdims=True)
        xmax = jnp.max(x, axis=axis, keepdims=True)
        # A constant row gets scale 1: q = 0 and dequant gives `min` exactly.
        scale = _safe_scale((xmax - xmin) / UINT4_MAX, scale_dtype)
        zero = xmin.astype(scale_dtype)
        q = jnp.round((x - zero.astype(jnp.float32)) / scale.astype(jnp.float32))
        q = jnp.clip(q, 0.0, UINT4_MAX).astype(jnp.int32)
        return QuantizedTensor(pack_int4(q, axis=axis), scale, zero, "kv_int4", axis)
    if kv_format == "int4_fp8":
        _check_packable(x.shape[-1], 2, axis)
        q, scale = _symmetric_int(x, axis, INT4_SYM_MAX, scale_dtype, jnp.int32)
        return QuantizedTensor(pack_int4(q, axis=axis), scale, None, "kv_int4_fp8", axis)
    raise ValueError(f"unsupported kv_format {kv_format!r}; quantized KV formats: fp8, int8, int4, int4_fp8")


# ---------------------------------------------------------------------------------------------------
# Stored layouts of 2-D weights

# fmt -> (dtype name of `values`, logical K elements per stored element)
_VALUES_LAYOUT = {"int8": ("int8", 1), "fp8": ("float8_e4m3fn", 1), "int4": ("uint8", 2),
                  "int4_sym": ("uint8", 2), "int4_fp8": ("uint8", 2)}


def stored_weight_arrays(fmt: str, k: int, n: int, group_size: int | None, axis: int) -> dict:
    """What a `[K, N]` weight in `fmt` stores: {"values": (shape, dtype name), "scales": shape,
    "zeros": shape or None}. Raises ValueError for a layout the format does not have."""
    if fmt not in _VALUES_LAYOUT:
        raise ValueError(f"unknown weight format {fmt!r}; stored formats: {', '.join(_VALUES_LAYOUT)}")
    k_major_ok = fmt == "int4_fp8" or (fmt == "fp8" and group_size is None)
    if axis not in (0, 1) or (axis == 1 and not k_major_ok) or (fmt == "int4_fp8" and axis != 1):
        raise ValueError(f"{fmt} weights are not stored with axis {axis!r} (K-major, axis 1: per-channel fp8 "
                         "or int4_fp8 only, which is always K-major)")
    groups = 1 if group_size is None else (k // group_size if group_size > 0 and k % group_size == 0 else None)
    if groups is None or (fmt.startswith("int4") and group_size is None):
        raise ValueError(f"group size {group_size!r} does not tile K={k} for {fmt}")
    vdtype, per = _VALUES_LAYOUT[fmt]
    values, scales = (k // per, n), (groups, n)
    if axis == 1:
        values = (n, k // per)
        scales = scales if fmt == "int4_fp8" else (n, groups)
    return {"values": (values, vdtype), "scales": scales, "zeros": scales if fmt == "int4" else None}


# ---------------------------------------------------------------------------------------------------
# Byte accounting (from bit widths)


def _dtype_bits(dtype: Any) -> int:
    return np.dtype(dtype).itemsize * 8


def _bits_to_bytes(bits: int, what: str) -> int:
    if bits % 8:
        raise ValueError(f"{what} is not a whole number of bytes ({bits} bits)")
    return bits // 8


def weight_bytes(
    fmt: str,
    shape: tuple[int, ...],
    group_size: int = 128,
    axis: int = 0,
    scale_dtype: Any = jnp.bfloat16,
    zero_dtype: Any = jnp.bfloat16,
    grouped: bool = False,
) -> int:
    """Exact storage bytes of a weight of logical `shape` in `fmt` (aliases such as "w4a16" accepted).

    int8/fp8: 1 byte/element + one scale per output channel (every index of the non-`axis` dims).
    int8 with grouped=True: 1 byte/element + one scale per group of `group_size` along `axis`
    (int4 formats are always grouped; fp8 has no grouped form).
    int4: 4 bits/element + per group of `group_size` along `axis`: a scale and a zero point.
    int4_sym, int4_fp8: 4 bits/element + a scale per group.
    """
    fmt = WEIGHT_FORMAT_ALIASES.get(fmt, fmt)
    n = int(np.prod(shape, dtype=np.int64))
    axis = _norm_axis(axis, len(shape))
    k = shape[axis]
    sbits, zbits = _dtype_bits(scale_dtype), _dtype_bits(zero_dtype)
    if fmt == "bf16":
        bits = n * 16
    elif fmt == "float32":
        bits = n * 32
    elif grouped and fmt == "fp8":
        raise ValueError("grouped scales are supported for int8 weights, not fp8")
    elif fmt == "int8" and grouped:
        if k % group_size:
            raise ValueError(f"K axis length {k} not divisible by group_size {group_size}")
        bits = n * 8 + (n // group_size) * sbits
    elif fmt in ("int8", "fp8"):
        bits = n * 8 + (n // k) * sbits
    elif fmt in ("int4", "int4_sym", "int4_fp8"):
        if k % group_size:
            raise ValueError(f"K axis length {k} not divisible by group_size {group_size}")
        groups = n // group_size
        bits = n * 4 + groups * (sbits + (zbits if fmt == "int4" else 0))
    else:
        raise ValueError(f"unsupported weight format {fmt!r}; supported: {WEIGHT_FORMATS}")
    return _bits_to_bytes(bits, "the weight")
