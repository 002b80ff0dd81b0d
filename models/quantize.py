"""Post-training quantization of a Llama-family model to a precision preset.

Steps, all on the float model before any weight is rounded (as AWQ and SmoothQuant do):
1. calibration statistics: per-channel |activation| max and mean (and sampled rows) at the input
   of each linear group, from one dense forward over calibration windows;
2. smoothing: per-input-channel factors `s` (`x / s`, `s * W`), with `1/s` folded into the op that
   produces the activation so serving pays nothing: SmoothQuant (arXiv:2211.10438) with a searched
   migration strength for w8a8, an AWQ (arXiv:2306.00978) output-error search for the int4
   presets, and key scaling for int4 KV (`scale_keys`): SmoothAttention (QServe, arXiv:2405.04532)
   before RoPE, FireQ's (arXiv:2505.20839) post-RoPE scaling of outlier channels, or both;
3. AWQ weight clipping (int4 presets), per group and output channel;
4. round-to-nearest into our packed formats, every layer linear replaced by a `QuantLinear`.
Without calibration data the int4 presets are plain RTN. docs/models.md has the folding sites and
the reasons behind each choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from qwix.contrib.smooth_quant import compute_scales_ratio

from models.precision import PrecisionPreset
from models.quant_linear import QuantLinear
from models.weights import LAYER_LINEARS
from pallas_kernels.quant_formats import (
    QuantizedTensor,
    INT4_SYM_MAX,
    dequantize,
    int4_fp8_multiplier,
    int4_fp8_scales,
    quantize_fp8_k_major,
    quantize_fp8_per_channel,
    quantize_int4_fp8,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
    quantize_int8_per_token,
    weight_kn,
)

# Calibration site -> (linears reading it, the module whose output the smoothing folds into).
SMOOTHED_SITES = {
    "attn_in": (("q_proj", "k_proj", "v_proj"), "input_layernorm"),
    "mlp_in": (("gate_proj", "up_proj"), "post_attention_layernorm"),
    "down_in": (("down_proj",), "up_proj"),
    "o_in": (("o_proj",), "v_proj"),
}
WEIGHT_SCALE_DTYPE = jnp.bfloat16  # scales and zero points stored as in AWQ/GPTQ checkpoints (16-bit)
SMOOTHQUANT_ALPHAS = np.linspace(0.1, 0.9, 9)
SAMPLE_STRIDE = 4      # calibration keeps every 4th token's activations for the output-error searches
AWQ_GRID = 20
CLIP_GRID = 20
CLIP_MIN_RATIO = 0.5
UNCLIPPED = ("q_proj", "k_proj")
POST_ROPE_TOP_K = 3  # outlier channels per KV head scaled after RoPE (FireQ's default)
# Post-RoPE outliers are scaled down to this quantile of their head's channel maxima (FireQ's beta).
# Int4 KV on SmolLM2, 8K tokens: median +1.07% NLL, 0.25 +0.81%, 0.1 +0.94%, the minimum +1.18%.
POST_ROPE_BETA_QUANTILE = 0.25
# GPTQ's damping, as a fraction of the Gram matrix's mean diagonal. GPTQ uses 0.01 with ~10^5
# calibration rows; ours has ~10^3 for inputs up to 1536 wide (a rank-deficient Gram matrix). fireq
# weights on SmolLM2, 8K tokens: 0.01 +8.39% NLL (worse than AWQ alone, +5.31%), 0.3 +4.22%.
GPTQ_DAMP = 0.3
REWRITE_CHUNK_BYTES = 1 << 30   # float32 scratch for the layers GPTQ / AWQ clipping rewrite together


@dataclass
class ActivationStats:
    absmax: np.ndarray   # float32[L, in] max |x| per input channel
    meanabs: np.ndarray  # float32[L, in] mean |x| per input channel
    samples: np.ndarray  # float32[L, n, in] a sample of the input rows (every SAMPLE_STRIDE-th token)


def calibration_windows(token_ids: list[int], window: int, count: int) -> np.ndarray:
    """Consecutive non-overlapping windows of `window` tokens: int32[n, window], n <= count."""
    n = min(count, len(token_ids) // window)
    if n == 0:
        raise ValueError(f"calibration text has {len(token_ids)} tokens, fewer than one window of {window}")
    return np.asarray(token_ids[: n * window], np.int32).reshape(n, window)


def collect_activation_stats(model, windows: np.ndarray, batch_size: int = 4) -> dict[str, ActivationStats]:
    """Per-layer, per-channel statistics (and sampled rows) at the input of every linear group."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens):
        def reduce(x):
            rows = x.astype(jnp.float32).reshape(-1, x.shape[-1])
            a = jnp.abs(rows)
            return {"max": a.max(axis=0), "sum": a.sum(axis=0), "rows": rows[::SAMPLE_STRIDE]}
        _, stats = nnx.merge(graphdef, state).forward_dense(tokens, reduce)
        return stats

    parts, count = [], 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        parts.append(jax.device_get(run(state, jnp.asarray(chunk))))
        count += chunk.size
    return {site: ActivationStats(np.max([p[site]["max"] for p in parts], axis=0),
                                  np.sum([p[site]["sum"] for p in parts], axis=0) / count,
                                  np.concatenate([p[site]["rows"] for p in parts], axis=1))
            for site in parts[0]}


def _fake_int4(w: jax.Array, group_size: int, weight_format: str = "int4") -> jax.Array:
    """Round-trip a [in, out] kernel through an int4 group format (what serving will compute with),
    float32: "int4" (asymmetric) or "int4_fp8" (FireQ's symmetric int4 with e4m3 group scales)."""
    if weight_format == "int4_fp8":
        return dequantize(weight_kn(quantize_int4_fp8(w, group_size, scale_dtype=WEIGHT_SCALE_DTYPE)))
    return dequantize(quantize_int4_groupwise(w, group_size, axis=0, scale_dtype=WEIGHT_SCALE_DTYPE))


# ---------------------------------------------------------------------------------------------------
# Smoothing factors


@jax.jit
def _smoothquant_loss(x, w, act_absmax, w_absmax, alpha):
    """Output error of W8A8 after smoothing with strength alpha: x [n, in], w [in, out]."""
    s = compute_scales_ratio(jnp.maximum(act_absmax, 1e-5), jnp.maximum(w_absmax, 1e-5), alpha)
    xq = dequantize(quantize_int8_per_token(x / s))
    wq = dequantize(quantize_int8_per_channel(w * s[:, None], axis=0))
    return jnp.mean((xq @ wq - x @ w) ** 2)


def smoothquant_factors(stats: ActivationStats, kernels: list[np.ndarray], alpha: float | None) -> np.ndarray:
    """s[L, in] = max|x|^a / max|w|^(1 - a), w over every linear reading the site; `a` searched per
    layer over SMOOTHQUANT_ALPHAS when alpha is None."""
    w_cat = np.concatenate(kernels, axis=-1)                                   # [L, in, out]
    w_absmax = np.abs(w_cat).max(axis=-1)
    alphas = np.zeros(len(w_cat), np.float32) + (alpha if alpha is not None else 0.0)
    if alpha is None:
        for layer in range(len(w_cat)):
            args = [jnp.asarray(a) for a in (stats.samples[layer], w_cat[layer], stats.absmax[layer],
                                              w_absmax[layer])]
            losses = [float(_smoothquant_loss(*args, a)) for a in SMOOTHQUANT_ALPHAS]
            alphas[layer] = SMOOTHQUANT_ALPHAS[int(np.argmin(losses))]
    s = compute_scales_ratio(jnp.asarray(np.maximum(stats.absmax, 1e-5)),
                             jnp.asarray(np.maximum(w_absmax, 1e-5)), jnp.asarray(alphas)[:, None])
    return np.asarray(s, np.float32)


def _tie_groups(x: np.ndarray, num_kv_heads: int, head_dim: int, reduce) -> np.ndarray:
    """[..., Hq * D] -> the same shape with every query head of a KV group given one value per
    channel (`reduce` over the group), so a factor on it can be folded into v_proj's output."""
    g = x.reshape(*x.shape[:-1], num_kv_heads, -1, head_dim)
    return np.broadcast_to(reduce(g, axis=-2, keepdims=True), g.shape).reshape(x.shape)


@jax.jit(static_argnames=("group_size", "weight_format"))
def _awq_search(x, w, meanabs, group_size, weight_format="int4"):
    """AWQ scale search for one layer: x [n, in] sampled inputs, w [in, out] (every consumer's
    kernel side by side). Returns s[in] minimising |x W - (x / s) Q(s W)|^2 over `s = mean|x|^r`."""
    ref = x @ w
    a = jnp.maximum(meanabs / meanabs.max(), 1e-4)

    def loss(ratio):
        s = a ** ratio
        s = s / jnp.sqrt(s.max() * s.min())
        wq = _fake_int4(w * s[:, None], group_size, weight_format) / s[:, None]
        return jnp.mean((x @ wq - ref) ** 2), s

    losses, scales = lax.map(loss, jnp.linspace(0.0, 1.0, AWQ_GRID))
    return scales[jnp.argmin(losses)]


def awq_factors(stats: ActivationStats, kernels: list[np.ndarray], group_size: int,
                weight_format: str = "int4") -> np.ndarray:
    """AWQ per-input-channel scales s[L, in], one output-error search per layer (through
    `weight_format`'s rounding, see `_fake_int4`)."""
    out = []
    for layer in range(stats.meanabs.shape[0]):
        w = np.concatenate([k[layer] for k in kernels], axis=-1)
        out.append(np.asarray(_awq_search(jnp.asarray(stats.samples[layer]), jnp.asarray(w, jnp.float32),
                                          jnp.asarray(stats.meanabs[layer]), group_size, weight_format)))
    return np.stack(out).astype(np.float32)


@jax.jit(static_argnames=("group_size", "weight_format"))
def awq_clip(x, w, group_size, weight_format="int4"):
    """AWQ clipping for one layer's kernel w [in, out] given sampled inputs x [n, in]: per group
    and output channel, clip to `r * max|w|` with r in [CLIP_MIN_RATIO, 1] minimising that group's
    output error after int4 rounding. Returns the clipped float kernel."""
    k, n_out = w.shape
    groups = k // group_size
    wg = w.reshape(groups, group_size, n_out)
    xg = x.reshape(x.shape[0], groups, group_size)
    amax = jnp.abs(wg).max(axis=1)                                        # [G, out]
    # mean_n (x_n . d)^2 = d^T C d with C = X^T X / n per group: the n sampled rows enter once,
    # not once per ratio (the search costs K g N per ratio instead of n K N).
    gram = jnp.einsum("nGg,nGh->Ggh", xg, xg) / x.shape[0]               # [G, g, g]

    def loss(ratio):
        lim = (amax * ratio)[:, None, :]
        d = _fake_int4(jnp.clip(wg, -lim, lim).reshape(k, n_out), group_size, weight_format).reshape(wg.shape) - wg
        return jnp.sum(d * jnp.einsum("Ggh,Gho->Ggo", gram, d), axis=1)  # [G, out]

    ratios = jnp.linspace(1.0, CLIP_MIN_RATIO, CLIP_GRID)
    best = ratios[jnp.argmin(lax.map(loss, ratios), axis=0)]              # [G, out]
    lim = (amax * best)[:, None, :]
    return jnp.clip(wg, -lim, lim).reshape(k, n_out)


def _scale(param, factor: np.ndarray) -> None:
    """param *= factor (broadcast), computed in float32 and stored back in the param's dtype."""
    param[...] = jnp.asarray(np.asarray(param[...], np.float32) * factor, param[...].dtype)


def _scale_output_columns(lin, factor: np.ndarray) -> None:
    """Scale a stacked linear's outputs: kernel [L, in, out] columns and bias [L, out] by factor [L, out]."""
    _scale(lin.kernel, factor[:, None, :])
    if lin.bias is not None:
        _scale(lin.bias, factor)


def _apply_smoothing(layers, site: str, s: np.ndarray, num_kv_heads: int, head_dim: int) -> None:
    """x -> x / s folded into the producer; W -> s * W for every consumer (rows of [in, out] kernels)."""
    linears, producer = SMOOTHED_SITES[site]
    for name in linears:
        _scale(getattr(layers, name).kernel, s[:, :, None])
    prod = getattr(layers, producer)
    if producer == "v_proj":  # tied over each KV group: keep one factor per v channel
        s = s.reshape(len(s), num_kv_heads, -1, head_dim)[:, :, 0, :].reshape(len(s), -1)
    if producer in ("up_proj", "v_proj"):
        _scale_output_columns(prod, 1.0 / s)
    else:
        _scale(prod.weight, 1.0 / s)                           # RMSNorm weight [L, in]


# ---------------------------------------------------------------------------------------------------
# Rounding into our formats


def quantize_weight(kernel: jax.Array, preset: PrecisionPreset) -> QuantizedTensor:
    """A stacked kernel [L, in, out] -> QuantizedTensor whose arrays carry the layer axis in front
    (each layer's slice is an axis-0-reduced `[in, out]` weight, or for FP8 weights with FP8
    activations a K-major `[out, in]` one, axis 1: what the FP8 tensor-core kernel reads)."""
    fmt = preset.weight_format
    if fmt == "fp8" and preset.activation_format == "fp8":
        fmt = "fp8_k_major"
    group_size = preset.group_size_for(kernel.shape[1]) if fmt in ("int4", "int4_fp8") else 0
    return _quantize_layers(kernel.astype(jnp.float32), fmt, group_size)


@jax.jit(static_argnums=(1, 2))
def _quantize_layers(kernel, fmt: str, group_size: int) -> QuantizedTensor:
    """`quantize_weight` over the layer axis; one program per format, group size and kernel shape,
    so the linears of one shape (and every model with them) share it."""
    if fmt == "int8":
        fn = lambda w: quantize_int8_per_channel(w, axis=0, scale_dtype=WEIGHT_SCALE_DTYPE)
    elif fmt == "fp8_k_major":
        fn = lambda w: quantize_fp8_k_major(w, scale_dtype=WEIGHT_SCALE_DTYPE)
    elif fmt == "fp8":
        fn = lambda w: quantize_fp8_per_channel(w, axis=0, scale_dtype=WEIGHT_SCALE_DTYPE)
    elif fmt == "int4":
        fn = lambda w: quantize_int4_groupwise(w, group_size=group_size, axis=0, asymmetric=True,
                                               scale_dtype=WEIGHT_SCALE_DTYPE)
    elif fmt == "int4_fp8":
        fn = lambda w: quantize_int4_fp8(w, group_size=group_size, scale_dtype=WEIGHT_SCALE_DTYPE)
    else:
        raise ValueError(f"no quantizer for weight format {fmt!r}")
    return jax.vmap(fn)(kernel)


def rotated_outlier_channels(amax: np.ndarray, top_k: int = POST_ROPE_TOP_K) -> np.ndarray:
    """bool[L, Hkv, D]: each KV head's `top_k` largest channels of |K| after RoPE (amax [L, Hkv, D])
    and their RoPE partners (channel c rotates with c +- D/2)."""
    d = amax.shape[-1]
    top = np.argsort(-amax, axis=-1, kind="stable")[..., :top_k]
    chosen = np.zeros(amax.shape, bool)
    np.put_along_axis(chosen, top, True, axis=-1)
    np.put_along_axis(chosen, (top + d // 2) % d, True, axis=-1)
    return chosen


def scale_keys(model, k_stats: ActivationStats, method: str, top_k: int = POST_ROPE_TOP_K) -> None:
    """Scale K (and Q inversely, so every score is unchanged) for a low-bit KV cache, in place, from
    the post-RoPE key statistics [L, Hkv * D]. `method` (models.precision.KV_SCALINGS):
    - "pre_rope": SmoothAttention: K / l, Q * l with l = sqrt(max|K|) tied over each RoPE pair (so it
      commutes with the rotation), folded into W_k / W_q;
    - "post_rope": FireQ's online scaling: each KV head's top-k outlier channels and their partners
      multiplied after RoPE by min(1, beta / max|K_c|), Q divided (beta: the POST_ROPE_BETA_QUANTILE
      of the head's channel maxima);
    - "rope_aware": both, l reset to 1 on the channels scaled after RoPE."""
    if method == "none":
        return
    layers, cfg = model.layers, model.config
    hkv, d = cfg.num_kv_heads, cfg.head_dim
    amax = np.maximum(np.asarray(k_stats.absmax, np.float32).reshape(-1, hkv, d), 1e-5)
    post = method in ("post_rope", "rope_aware")
    outliers = rotated_outlier_channels(amax, top_k) if post else np.zeros(amax.shape, bool)
    if method in ("pre_rope", "rope_aware"):
        pairs = amax.reshape(-1, hkv, 2, d // 2).max(axis=2, keepdims=True)
        lam = np.sqrt(np.broadcast_to(pairs, (len(amax), hkv, 2, d // 2))).reshape(amax.shape)
        lam = np.where(outliers, 1.0, lam)                       # outliers' partners are outliers too
        lam_q = np.repeat(lam, cfg.num_heads // hkv, axis=1).reshape(len(lam), -1)
        _scale_output_columns(layers.k_proj, 1.0 / lam.reshape(len(lam), hkv * d))
        _scale_output_columns(layers.q_proj, lam_q)
    if post:
        beta = np.quantile(amax, POST_ROPE_BETA_QUANTILE, axis=-1, keepdims=True)
        f = np.where(outliers, np.minimum(1.0, beta / amax), 1.0)
        model.scale_rotated_keys(f.reshape(len(f), hkv * d))


@jax.jit(static_argnames="group_size")
def gptq_int4_fp8(w, gram, group_size):
    """GPTQ (arXiv:2210.17323) for FireQ's int4_fp8 on one kernel w [in, out] with the Gram matrix of
    its inputs `gram` [in, in] (X^T X / n): input rows are rounded in order, each row's rounding error
    spread over the rows still to come through the Cholesky factor of the damped inverse Gram matrix,
    so later rows compensate earlier errors in `x @ w`. A group's scales are taken when its first row
    comes up, from the rows as updated so far, by the format's rule (`int4_fp8_scales`; the per-tensor
    multiplier from the original kernel). Returns the rounded kernel, dequantized (float32).

    GPTQ's lazy batch update, one group at a time: a row's error updates only the rest of its group
    at once, and the group's errors reach every later row in one matrix product when the group is
    done, which is when those rows are next read. The same arithmetic as updating every later row
    after each row, with k / group_size fewer passes over the kernel."""
    k, n = w.shape
    w = w.astype(jnp.float32)
    multiplier = int4_fp8_multiplier(jnp.max(jnp.abs(w.reshape(k // group_size, group_size, n)), axis=1))
    gram = gram + GPTQ_DAMP * jnp.mean(jnp.diag(gram)) * jnp.eye(k)
    u = jnp.linalg.cholesky(jnp.linalg.inv(gram)).T                      # upper: H^-1 = U^T U
    in_group = jnp.arange(group_size)[:, None]

    def group(b, carry):
        w, out = carry
        start = b * group_size
        rows = lax.dynamic_slice(w, (start, 0), (group_size, n))          # updated by every earlier group
        u_rows = lax.dynamic_slice(u, (start, 0), (group_size, k))
        u_group = lax.dynamic_slice(u_rows, (0, start), (group_size, group_size))
        scale = int4_fp8_scales(jnp.abs(rows).max(axis=0), multiplier, WEIGHT_SCALE_DTYPE).astype(jnp.float32)

        def row(i, carry):
            rows, errors = carry
            q = jnp.clip(jnp.round(rows[i] / scale), -INT4_SYM_MAX, INT4_SYM_MAX) * scale
            err = (rows[i] - q) / u_group[i, i]
            rows = rows - jnp.where(in_group > i, u_group[i][:, None] * err[None, :], 0.0)
            return rows.at[i].set(q), errors.at[i].set(err)

        rounded, errors = lax.fori_loop(0, group_size, row, (rows, jnp.zeros_like(rows)))
        later = jnp.arange(k)[None, :] >= start + group_size
        w = w - jnp.where(later, u_rows, 0.0).T @ errors
        return w, lax.dynamic_update_slice(out, rounded, (start, 0))

    _, out = lax.fori_loop(0, k // group_size, group, (w, jnp.zeros_like(w)))
    return out


def gptq_model(model, preset: PrecisionPreset, inputs: dict[str, np.ndarray]) -> None:
    """GPTQ on every linear from its sampled (smoothed) inputs (the preset allows it for int4_fp8
    weights only): the kernel becomes GPTQ's rounded one, which `round_model` then stores. Its
    quantizer re-derives the scales from that kernel: the same ones, except in a group column where
    GPTQ left no code at +-7 (or where the tensor's largest group moved its power-of-two multiplier);
    those re-round (under 1% of the weights on SmolLM2)."""
    _rewrite_kernels(model, preset, inputs, _gptq_kernel)


def _gptq_kernel(x, w, group_size, weight_format):
    return gptq_int4_fp8(w, x.T @ x / x.shape[0], group_size)


@jax.jit(static_argnums=(0, 3, 4))
def _rewrite_layers(fn, x, w, group_size, weight_format):
    return jax.vmap(lambda x, w: fn(x, w, group_size, weight_format))(x, w)


def _rewrite_kernels(model, preset: PrecisionPreset, inputs: dict[str, np.ndarray], fn, skip=()) -> None:
    """Replace each layer's kernel of every linear in `inputs` (but `skip`) by `fn(x, w, g, f)`: x its
    sampled inputs [n, in], w its float32 kernel [in, out], g the preset's group size for it, f its
    weight format. Layers go through together (vmapped), as many as fit in REWRITE_CHUNK_BYTES of
    float32 scratch (GPTQ's in x in Gram matrix dominates): the small per-row steps of one layer
    leave a CPU idle. Every chunk has the same number of layers (the last one padded), so linears of
    one shape share one program."""
    for name, x in inputs.items():
        if name in skip:
            continue
        lin = getattr(model.layers, name)
        kernel = np.asarray(lin.kernel[...], np.float32)
        g = preset.group_size_for(kernel.shape[1])
        layers, k, n = kernel.shape
        chunk = max(1, min(layers, REWRITE_CHUNK_BYTES // (4 * (k * k + 3 * k * n + x.shape[1] * k))))
        pad = -layers % chunk   # repeat the last layer, and drop what comes out for it
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]).astype(np.float32)
        kernel = np.concatenate([kernel, np.repeat(kernel[-1:], pad, axis=0)])
        out = [_rewrite_layers(fn, x[i:i + chunk], kernel[i:i + chunk], g, preset.weight_format)
               for i in range(0, layers, chunk)]
        lin.kernel[...] = jnp.concatenate(out)[:layers].astype(lin.kernel[...].dtype)


def smooth_model(model, preset: PrecisionPreset, stats: dict[str, ActivationStats]) -> dict[str, np.ndarray]:
    """Fold the preset's smoothing factors (SmoothQuant or AWQ) into the float model in place; the
    model's function is unchanged up to float rounding. Returns each linear's sampled inputs
    [L, n, in] as they are after smoothing."""
    layers, cfg = model.layers, model.config
    heads = (cfg.num_kv_heads, cfg.head_dim)
    scale_keys(model, stats["k"], preset.kv_scaling)
    inputs = {}
    if preset.calibration is None:
        return inputs
    for site, (linears, _) in SMOOTHED_SITES.items():
        st = stats[site]
        if site == "o_in":  # statistics tied over each KV group, so the factors come out tied
            st = ActivationStats(_tie_groups(st.absmax, *heads, np.max), _tie_groups(st.meanabs, *heads, np.mean),
                                 st.samples)
        kernels = [np.asarray(getattr(layers, n).kernel[...], np.float32) for n in linears]
        if preset.calibration == "smoothquant":
            s = smoothquant_factors(st, kernels, preset.smoothquant_alpha)
        elif preset.calibration == "awq":
            s = awq_factors(st, kernels, preset.group_size_for(kernels[0].shape[1]), preset.weight_format)
        else:
            raise ValueError(f"unknown calibration method {preset.calibration!r}")
        if site == "o_in":
            s = np.exp(_tie_groups(np.log(s), *heads, np.mean))
        _apply_smoothing(layers, site, s, *heads)
        inputs.update({n: st.samples / s[:, None, :] for n in linears})
    return inputs


def clip_model(model, preset: PrecisionPreset, inputs: dict[str, np.ndarray]) -> None:
    """AWQ clipping of every int4 kernel but q/k, from each linear's sampled inputs."""
    _rewrite_kernels(model, preset, inputs, awq_clip, skip=UNCLIPPED)


def calibrate_model(model, preset: PrecisionPreset, calibration: np.ndarray) -> None:
    """Smoothing (both methods) and clipping (AWQ) from statistics over the calibration windows."""
    inputs = smooth_model(model, preset, collect_activation_stats(model, calibration))
    if preset.calibration == "awq":
        clip_model(model, preset, inputs)
    if preset.gptq:
        gptq_model(model, preset, inputs)


def round_model(model, preset: PrecisionPreset) -> None:
    """Replace every linear of every layer by a QuantLinear holding its weight in the preset's format."""
    layers = model.layers
    for name in LAYER_LINEARS:
        lin = getattr(layers, name)
        qt = quantize_weight(lin.kernel[...], preset)
        bias = lin.bias[...] if lin.bias is not None else None
        setattr(layers, name, QuantLinear(qt, bias, act_format=preset.activation_format))


def quantize_model(model, preset: PrecisionPreset, calibration: np.ndarray | None = None):
    """Quantize `model` in place to `preset` and return it. `calibration`: int32[n, window] token
    windows for the preset's smoothing (None: no smoothing, plain round-to-nearest)."""
    if preset.needs_calibration and calibration is not None:
        calibrate_model(model, preset, calibration)
    elif preset.post_rope_key_scaling:    # the preset's parameters, without data to choose factors
        model.scale_rotated_keys()
    if preset.quantized_weights:
        round_model(model, preset)
    return model


def model_weight_bytes(model) -> int:
    """Bytes of every parameter as stored on the device (int4 is packed in uint8, so nbytes is exact)."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
