"""Post-training quantization of a Llama-family model to a precision preset.

Steps, all on the float model before any weight is rounded (as AWQ and SmoothQuant do):
1. calibration statistics: one dense forward over calibration windows records, per layer, the
   per-channel |activation| max and mean at the input of each linear group;
2. smoothing: per-input-channel factors `s` move difficulty between activations and weights
   (`x / s` and `s * W`, an exact identity in real arithmetic); `1/s` is folded into the op that
   produces the activation, so serving pays nothing:
       attn_in (q, k, v)    <- input_layernorm weight
       mlp_in  (gate, up)   <- post_attention_layernorm weight
       down_in (down)       <- up_proj output columns
   (o_proj is left alone: with GQA its input channels do not map one-to-one onto v_proj outputs);
   w8a8 uses SmoothQuant's `s = max|x|^a / max|w|^(1-a)` (Qwix's `compute_scales_ratio`); the int4
   presets use AWQ's grid search over `s = mean|x|^r` minimising activation-weighted weight error
   (Qwix's `awq_core.search_optimal_scales`, with a Qwix int4 min/max group quantizer that matches
   our asymmetric group format);
3. round-to-nearest into our packed formats (`pallas_kernels.quant_formats`), every linear of every
   layer replaced by a `QuantLinear`. Without calibration data the int4 presets are plain RTN.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from qwix._src.core import qarray
from qwix.contrib import awq_core
from qwix.contrib.smooth_quant import compute_scales_ratio

from models.precision import PrecisionPreset
from models.quant_linear import QuantLinear
from pallas_kernels.quant_formats import (
    QuantizedTensor,
    quantize_fp8_per_channel,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
)

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Calibration site -> (linears reading it, the module whose output the smoothing folds into).
SMOOTHED_SITES = {
    "attn_in": (("q_proj", "k_proj", "v_proj"), "input_layernorm"),
    "mlp_in": (("gate_proj", "up_proj"), "post_attention_layernorm"),
    "down_in": (("down_proj",), "up_proj"),
}
WEIGHT_SCALE_DTYPE = jnp.bfloat16  # scales and zero points stored as in AWQ/GPTQ checkpoints (16-bit)


@dataclass
class ActivationStats:
    absmax: np.ndarray   # float32[L, in] max |x| per input channel
    meanabs: np.ndarray  # float32[L, in] mean |x| per input channel


def calibration_windows(token_ids: list[int], window: int, count: int) -> np.ndarray:
    """Consecutive non-overlapping windows of `window` tokens: int32[n, window], n <= count."""
    n = min(count, len(token_ids) // window)
    if n == 0:
        raise ValueError(f"calibration text has {len(token_ids)} tokens, fewer than one window of {window}")
    return np.asarray(token_ids[: n * window], np.int32).reshape(n, window)


def collect_activation_stats(model, windows: np.ndarray, batch_size: int = 4) -> dict[str, ActivationStats]:
    """Per-layer, per-channel statistics at the input of every linear group over all windows."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens):
        def reduce(x):
            a = jnp.abs(x.astype(jnp.float32)).reshape(-1, x.shape[-1])
            return {"max": a.max(axis=0), "sum": a.sum(axis=0)}
        _, stats = nnx.merge(graphdef, state).forward_dense(tokens, reduce)
        return stats

    total, count = None, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        stats = jax.device_get(run(state, jnp.asarray(chunk)))
        count += chunk.size
        if total is None:
            total = stats
        else:
            total = {site: {"max": np.maximum(total[site]["max"], s["max"]), "sum": total[site]["sum"] + s["sum"]}
                     for site, s in stats.items()}
    return {site: ActivationStats(np.asarray(s["max"], np.float32), np.asarray(s["sum"] / count, np.float32))
            for site, s in total.items()}


# ---------------------------------------------------------------------------------------------------
# Smoothing factors


def smoothquant_factors(stats: ActivationStats, kernels: list[np.ndarray], alpha: float) -> np.ndarray:
    """s[L, in] = max|x|^alpha / max|w|^(1 - alpha), w over every linear reading the site."""
    w_absmax = np.max(np.concatenate([np.abs(k) for k in kernels], axis=-1), axis=-1)  # [L, in]
    act = np.maximum(stats.absmax, 1e-5)
    s = compute_scales_ratio(jnp.asarray(act), jnp.asarray(np.maximum(w_absmax, 1e-5)), alpha)
    return np.asarray(s, np.float32)


def awq_factors(stats: ActivationStats, kernels: list[np.ndarray], group_size: int, n_grid: int = 20) -> np.ndarray:
    """AWQ per-input-channel scales s[L, in] from Qwix's grid search, one search per layer."""
    how = qarray.HowToQuantize(qtype=jnp.int4, channelwise_axes=(0,), tiled_axes={1: group_size},
                               calibration_method="minmax")
    search = jax.jit(lambda w, act: awq_core.search_optimal_scales(w, act, how, n_grid)[0])
    out = []
    for layer in range(stats.meanabs.shape[0]):
        w_out_in = np.concatenate([k[layer] for k in kernels], axis=-1).T  # [out, in] as Qwix expects
        out.append(np.asarray(search(jnp.asarray(w_out_in, jnp.float32), jnp.asarray(stats.meanabs[layer]))))
    return np.stack(out).astype(np.float32)


def _apply_smoothing(layers, site: str, s: np.ndarray) -> None:
    """x -> x / s folded into the producer; W -> s * W for every consumer (rows of [in, out] kernels)."""
    linears, producer = SMOOTHED_SITES[site]
    for name in linears:
        lin = getattr(layers, name)
        k = np.asarray(lin.kernel[...], np.float32)
        lin.kernel[...] = jnp.asarray(k * s[:, :, None], lin.kernel[...].dtype)
    prod = getattr(layers, producer)
    if producer == "up_proj":
        k = np.asarray(prod.kernel[...], np.float32)          # [L, in, inter]: scale output columns
        prod.kernel[...] = jnp.asarray(k / s[:, None, :], prod.kernel[...].dtype)
        if prod.bias is not None:
            prod.bias[...] = jnp.asarray(np.asarray(prod.bias[...], np.float32) / s, prod.bias[...].dtype)
    else:
        w = np.asarray(prod.weight[...], np.float32)           # RMSNorm weight [L, in]
        prod.weight[...] = jnp.asarray(w / s, prod.weight[...].dtype)


# ---------------------------------------------------------------------------------------------------
# Rounding into our formats


def quantize_weight(kernel: jax.Array, preset: PrecisionPreset) -> QuantizedTensor:
    """A stacked kernel [L, in, out] -> QuantizedTensor whose arrays carry the layer axis in front
    (each layer's slice is an axis-0-reduced `[in, out]` weight)."""
    k = kernel.shape[1]
    fmt = preset.weight_format
    if fmt == "int8":
        fn = lambda w: quantize_int8_per_channel(w, axis=0, scale_dtype=WEIGHT_SCALE_DTYPE)
    elif fmt == "fp8":
        fn = lambda w: quantize_fp8_per_channel(w, axis=0, scale_dtype=WEIGHT_SCALE_DTYPE)
    elif fmt == "int4":
        g = preset.group_size_for(k)
        fn = lambda w: quantize_int4_groupwise(w, group_size=g, axis=0, asymmetric=True,
                                               scale_dtype=WEIGHT_SCALE_DTYPE)
    else:
        raise ValueError(f"no quantizer for weight format {fmt!r}")
    return jax.jit(jax.vmap(fn))(kernel.astype(jnp.float32))


def smooth_model(model, preset: PrecisionPreset, calibration: np.ndarray) -> None:
    """Fold the preset's smoothing factors (SmoothQuant or AWQ) into the float model in place.
    The function the model computes is unchanged up to float rounding."""
    layers = model.layers
    stats = collect_activation_stats(model, calibration)
    for site, (linears, _) in SMOOTHED_SITES.items():
        kernels = [np.asarray(getattr(layers, n).kernel[...], np.float32) for n in linears]
        if preset.calibration == "smoothquant":
            s = smoothquant_factors(stats[site], kernels, preset.smoothquant_alpha)
        elif preset.calibration == "awq":
            s = awq_factors(stats[site], kernels, preset.group_size_for(kernels[0].shape[1]))
        else:
            raise ValueError(f"unknown calibration method {preset.calibration!r}")
        _apply_smoothing(layers, site, s)


def round_model(model, preset: PrecisionPreset) -> None:
    """Replace every linear of every layer by a QuantLinear holding its weight in the preset's format."""
    layers = model.layers
    for name in LINEARS:
        lin = getattr(layers, name)
        qt = quantize_weight(lin.kernel[...], preset)
        bias = lin.bias[...] if lin.bias is not None else None
        setattr(layers, name, QuantLinear(qt, bias, act_format=preset.activation_format))


def quantize_model(model, preset: PrecisionPreset, calibration: np.ndarray | None = None):
    """Quantize `model` in place to `preset` and return it. `calibration`: int32[n, window] token
    windows for the preset's smoothing (None: no smoothing, plain round-to-nearest)."""
    if not preset.quantized_weights:
        return model
    if preset.calibration is not None and calibration is not None:
        smooth_model(model, preset, calibration)
    round_model(model, preset)
    return model


def model_weight_bytes(model) -> int:
    """Bytes of every parameter as stored on the device (int4 is packed in uint8, so nbytes is exact)."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
