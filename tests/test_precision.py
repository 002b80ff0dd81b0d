"""Precision presets and post-training quantization of whole models (tiny HF fixtures, random inputs)."""

from __future__ import annotations

import dataclasses
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import ModelConfig
from models.loader import load_model, random_model
from models.precision import (PRESETS, RTN_INT4_PER_CHANNEL, PrecisionPreset, kv_page_layout,
                              resolve_precision)
from models.quant_linear import QuantLinear
from models.weights import LAYER_LINEARS
from models.quantize import (
    CLIP_GRID,
    CLIP_MIN_RATIO,
    POST_ROPE_TOP_K,
    ActivationStats,
    _fake_int4,
    awq_clip,
    awq_factors,
    model_weight_bytes,
    quantize_model,
    collect_activation_stats,
    GPTQ_DAMP,
    WEIGHT_SCALE_DTYPE,
    gptq_int4_fp8,
    smooth_model,
)
from pallas_kernels.kv_pages import KVPageLayout, read_kv_pages
from pallas_kernels.quant_formats import dequantize, int4_fp8_multiplier, int4_fp8_scales, quantize_int4_groupwise
from tests.helpers import FIXTURES, PagedForward

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")   # compiling dominates these tests


def test_resolve_precision_names_and_kv_override():
    assert resolve_precision("W4A16") is PRESETS["w4a16"]
    p = resolve_precision("w4a16", kv_dtype="int4")
    assert p.kv_format == "int4" and p.weight_format == "int4" and p.name == "w4a16+kv-int4"
    assert resolve_precision("fp8", kv_dtype="fp8") is PRESETS["fp8"]
    assert resolve_precision("bf16", kv_dtype="bfloat16").kv_format == "bf16"
    with pytest.raises(ValueError, match="unknown precision 'int3'"):
        resolve_precision("int3")
    with pytest.raises(ValueError, match="unknown kv_dtype 'int2'"):
        resolve_precision("bf16", kv_dtype="int2")


def test_key_scaling_follows_the_kv_format():
    """int4 KV scales keys RoPE-aware (FireQ) unless the preset says otherwise (w4a8kv4: QServe's
    SmoothAttention); a KV override re-picks the scaling, except for a model already built."""
    assert PRESETS["fireq"].kv_scaling == "rope_aware" and PRESETS["w4a8kv4"].kv_scaling == "pre_rope"
    assert PRESETS["bf16"].kv_scaling == "none" and PRESETS["fp8"].kv_scaling == "none"
    assert resolve_precision("bf16", kv_dtype="int4").kv_scaling == "rope_aware"
    assert resolve_precision("w4a8kv4", kv_dtype="fp8").kv_scaling == "none"
    assert resolve_precision("fireq", kv_dtype="int8", rescale_keys=False).kv_scaling == "rope_aware"
    assert resolve_precision("bf16", kv_dtype="int4", rescale_keys=False).kv_scaling == "none"
    with pytest.raises(ValueError, match="unknown kv_scaling 'post'"):
        PrecisionPreset("x", "bf16", None, "int4", kv_scaling="post")


def test_group_size_rule():
    p = PRESETS["w4a16"]
    assert p.group_size_for(4096) == 128
    assert p.group_size_for(576) == 64      # SmolLM2 hidden size
    assert p.group_size_for(1536) == 128
    assert p.group_size_for(96) == 32
    assert RTN_INT4_PER_CHANNEL.group_size_for(576) == 576
    with pytest.raises(ValueError, match="multiple of 32"):
        p.group_size_for(100)
    assert PRESETS["w8a8"].group_size_for(576) is None


@pytest.mark.parametrize("name", list(PRESETS))
def test_weight_bytes_formula_matches_device_arrays(name):
    """The byte count the scheduler uses before loading equals what the quantized model stores."""
    preset = PRESETS[name]
    loaded = load_model(str(FIXTURES / "llama"), dtype="bfloat16", precision=preset, calib_samples=0)
    assert model_weight_bytes(loaded.model) == preset.weight_bytes(loaded.config)
    layers = loaded.model.layers
    for lin in LAYER_LINEARS:
        assert isinstance(getattr(layers, lin), QuantLinear) == preset.quantized_weights


def test_int4_is_packed_two_per_byte_on_device():
    loaded = load_model(str(FIXTURES / "llama"), dtype="bfloat16", precision="w4a16", calib_samples=0)
    cfg = loaded.config
    q = loaded.model.layers.q_proj
    assert q.values[...].dtype == np.uint8
    assert q.values[...].shape == (cfg.num_layers, cfg.hidden_size // 2, cfg.num_heads * cfg.head_dim)


@pytest.mark.parametrize("method", ["smoothquant", "awq", "pre_rope", "post_rope", "rope_aware"])
def test_smoothing_preserves_the_function(method):
    """Folding x/s into the producer and s*W into the consumers, and the key scalings (SmoothAttention's
    K/l, Q*l, which must commute with RoPE; FireQ's K*f, Q/f after RoPE) are identities before
    rounding."""
    rng = np.random.default_rng()
    int4_kv = resolve_precision("bf16", kv_dtype="int4")
    presets = {"smoothquant": PRESETS["w8a8"], "awq": PRESETS["w4a16"]}
    preset = presets[method] if method in presets else dataclasses.replace(int4_kv, kv_scaling=method)
    base = load_model(str(FIXTURES / "llama"), dtype="float32")
    smoothed = load_model(str(FIXTURES / "llama"), dtype="float32")
    if method == "awq":   # outlier input channels, AWQ's case: on plain random ones its search may keep s = 1
        outliers = rng.choice(base.config.hidden_size, 4, replace=False)
        for m in (base, smoothed):
            norm = m.model.layers.input_layernorm.weight
            norm[...] = norm[...].at[..., outliers].multiply(30.0)
    calib = rng.integers(0, base.config.vocab_size, (3, 32)).astype(np.int32)
    changed = "k_proj" if method in ("pre_rope", "rope_aware") else "q_proj"
    before = np.asarray(getattr(smoothed.model.layers, changed).kernel[...]).copy()
    smooth_model(smoothed.model, preset, collect_activation_stats(smoothed.model, calib))
    if method != "post_rope":
        assert not np.allclose(before, np.asarray(getattr(smoothed.model.layers, changed).kernel[...]))
    else:
        assert np.array_equal(before, np.asarray(smoothed.model.layers.q_proj.kernel[...]))
    key_scale = smoothed.model.layers.k_rope_scale
    assert (key_scale is not None) == preset.post_rope_key_scaling
    if key_scale is not None:                          # 3 channels and their partners per KV head
        f = np.asarray(key_scale[...]).reshape(base.config.num_layers, base.config.num_kv_heads, -1)
        assert ((f < 1).sum(-1) <= 2 * POST_ROPE_TOP_K).all() and (f < 1).any() and (f <= 1).all()
    tokens = rng.integers(0, base.config.vocab_size, 24)
    ref = PagedForward(base.model).step(tokens)
    out = PagedForward(smoothed.model).step(tokens)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_awq_search_beats_round_to_nearest_on_outlier_channels():
    """On activations with a few large channels, AWQ's scales cut the output error of int4 RTN."""
    rng = np.random.default_rng()
    k, n, g = 256, 128, 64
    x = rng.normal(size=(512, k)).astype(np.float32)
    x[:, rng.choice(k, 8, replace=False)] *= 30.0
    w = (rng.normal(size=(k, n)) * 0.02).astype(np.float32)
    stats = ActivationStats(np.abs(x).max(0)[None], np.abs(x).mean(0)[None], x[None])
    s = awq_factors(stats, [w[None]], g)[0]
    assert s.shape == (k,) and np.all(s > 0)

    def out_err(w_eff):
        return np.linalg.norm(x @ w_eff - x @ w) / np.linalg.norm(x @ w)

    rtn = np.asarray(dequantize(quantize_int4_groupwise(w, g)))
    awq = np.asarray(dequantize(quantize_int4_groupwise(w * s[:, None], g))) / s[:, None]
    assert out_err(awq) < 0.8 * out_err(rtn), (out_err(awq), out_err(rtn))


def test_awq_clip_picks_each_groups_least_output_error():
    """awq_clip scores the clipping ratios through each group's input Gram matrix; the ratio it keeps
    per (group, output channel) is the one a direct evaluation over the sampled rows ranks best, and
    the clipped kernel's int4 output error is no worse than unclipped RTN's (ratio 1 is a candidate)."""
    rng = np.random.default_rng()
    k, n, g = 256, 96, 64
    x = rng.normal(size=(384, k)).astype(np.float32)
    x[:, rng.choice(k, 6, replace=False)] *= 20.0
    w = (rng.normal(size=(k, n)) * 0.02).astype(np.float32)
    w[rng.integers(0, k, 40), rng.integers(0, n, 40)] *= 8.0          # weight outliers worth clipping
    clipped = np.asarray(awq_clip(x, w, g))
    xg, wg = x.reshape(len(x), k // g, g).astype(np.float64), w.reshape(k // g, g, n)
    amax = np.abs(wg).max(axis=1)
    ratios = np.asarray(jnp.linspace(1.0, CLIP_MIN_RATIO, CLIP_GRID))   # float32 grid and limits, as awq_clip
    losses = []
    for r in ratios:
        lim = (amax * r)[:, None, :]                                     # (a float64 limit can round a group's
                                                                         #  max, and so its scale, differently)
        d = np.asarray(_fake_int4(np.clip(wg, -lim, lim).reshape(k, n), g), np.float64).reshape(wg.shape) - wg
        losses.append(np.mean(np.einsum("nGg,Ggo->nGo", xg, d) ** 2, axis=0))
    losses = np.stack(losses)                                           # [ratios, G, out]
    chosen = np.abs(clipped.reshape(wg.shape)).max(axis=1) / amax       # each group's kept ratio
    chosen_loss = np.take_along_axis(losses, np.abs(ratios[:, None, None] - chosen).argmin(0)[None], 0)[0]
    # Within float32 rounding of the best (near-ties may order differently than in float64).
    assert (chosen_loss <= losses.min(axis=0) * (1 + 1e-4) + 1e-12).all()
    assert (chosen < 1.0).any()                                         # the outliers did get clipped
    rtn, awq = (np.asarray(_fake_int4(v, g)) for v in (w, clipped))
    assert np.linalg.norm(x @ awq - x @ w) <= np.linalg.norm(x @ rtn - x @ w) * (1 + 1e-5)


def test_gptq_cuts_the_output_error_of_int4_fp8_rounding(rng):
    """On inputs with correlated channels (x = z A, as activations are), GPTQ's int4_fp8 kernel has a
    smaller `x @ w` error than round-to-nearest (0.73-0.76x over six seeds); its values lie on the format's
    grid, so the stored quantizer reproduces nearly all of them (it re-rounds only columns of groups
    where GPTQ left no code at +-7, as the scale then shrinks)."""
    k, n, g = 256, 96, 64
    x = (rng.normal(size=(1024, k)) @ (np.eye(k) + 0.3 * rng.normal(size=(k, k)))).astype(np.float32)
    w = (rng.normal(size=(k, n)) * 0.02).astype(np.float32)
    gptq = np.asarray(gptq_int4_fp8(jnp.asarray(w), jnp.asarray(x.T @ x / len(x)), g))
    rtn = np.asarray(_fake_int4(w, g, "int4_fp8"))
    err = {name: np.linalg.norm(x @ q - x @ w) for name, q in (("gptq", gptq), ("rtn", rtn))}
    assert err["gptq"] < 0.85 * err["rtn"], err
    stored = np.asarray(_fake_int4(gptq, g, "int4_fp8"))
    assert np.mean(stored == gptq) > 0.99
    with pytest.raises(ValueError, match="gptq needs int4_fp8"):
        dataclasses.replace(PRESETS["w4a16"], gptq=True)


def test_quantized_models_track_the_float_model_in_precision_order():
    """Quantized tiny models' logits track the float model's, worse as the format gets coarser.

    The fixture's random Gaussian weights have no outliers, so the relative logit error reflects
    the formats' steps directly (measured: w8a8 ~0.05, fp8 ~0.18 (3-bit mantissa), 4-bit ~0.45);
    bounds are ~2x those, and the order w8a8 < fp8 < w4a16 must hold."""
    rng = np.random.default_rng()
    base = load_model(str(FIXTURES / "llama"), dtype="float32")
    calib = rng.integers(0, base.config.vocab_size, (2, 32)).astype(np.int32)
    tokens = rng.integers(0, base.config.vocab_size, 20)
    ref = PagedForward(base.model).step(tokens)
    rel = {}
    for name in ("w8a8", "fp8", "w4a16", "w4a8kv4"):
        q = load_model(str(FIXTURES / "llama"), dtype="float32")
        quantize_model(q.model, PRESETS[name], calib)
        out = PagedForward(q.model).step(tokens)
        rel[name] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    assert 1e-4 < rel["w8a8"] < 0.12 and rel["fp8"] < 0.35 and rel["w4a16"] < 0.8 and rel["w4a8kv4"] < 0.8, rel
    assert rel["w8a8"] < rel["fp8"] < rel["w4a16"], rel


def test_gptq_lazy_batches_do_what_updating_every_later_row_after_each_row_does(rng):
    """The group-at-a-time update against GPTQ as written in the paper's first algorithm (numpy,
    float64): every row rounded after all earlier rows' errors reached it, each group's scales from
    its rows as they then are. Equal but for float rounding, which can flip a value sitting on a
    rounding boundary to the neighbouring code."""
    k, n, g = 256, 48, 64
    x = rng.normal(size=(512, k)) @ (np.eye(k) + 0.3 * rng.normal(size=(k, k)))
    w = (rng.normal(size=(k, n)) * 0.02).astype(np.float32)
    gram = x.T @ x / len(x)
    got = np.asarray(gptq_int4_fp8(jnp.asarray(w), jnp.asarray(gram, jnp.float32), g))
    multiplier = np.asarray(int4_fp8_multiplier(jnp.max(jnp.abs(w.reshape(k // g, g, n)), axis=1)))
    damped = gram + GPTQ_DAMP * np.mean(np.diag(gram)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(damped)).T
    want, rows = np.zeros((k, n)), w.astype(np.float64)
    for i in range(k):
        if i % g == 0:
            scale = np.asarray(int4_fp8_scales(jnp.asarray(np.abs(rows[i:i + g]).max(axis=0), jnp.float32),
                                               multiplier, WEIGHT_SCALE_DTYPE), np.float64)
        want[i] = np.clip(np.round(rows[i] / scale), -7, 7) * scale
        rows[i + 1:] -= np.outer(u[i, i + 1:], (rows[i] - want[i]) / u[i, i])
    assert np.mean(got == want.astype(np.float32)) > 0.995
    assert np.linalg.norm(x @ got - x @ w) == pytest.approx(np.linalg.norm(x @ want - x @ w), rel=0.01)


def test_gptq_runs_inside_the_fireq_calibration(rng):
    """PrecisionPreset.gptq (on in fireq) runs GPTQ after AWQ: a tiny float32 model's int4_fp8 codes
    differ from AWQ alone's, and its logits track the float model's within the 4-bit bound above."""
    cfg = ModelConfig("llama", 96, 128, 256, 2, 4, 2, 32)
    seed = int(rng.integers(1 << 30))
    calib = rng.integers(0, 96, (4, 64)).astype(np.int32)
    tokens = rng.integers(0, 96, 20)
    ref = PagedForward(random_model(cfg, "bf16", "float32", seed=seed).model).step(tokens)
    codes, rel = {}, {}
    assert PRESETS["fireq"].gptq
    for preset in (dataclasses.replace(PRESETS["fireq"], gptq=False), PRESETS["fireq"]):
        model = quantize_model(random_model(cfg, "bf16", "float32", seed=seed).model, preset, calib)
        codes[preset.gptq] = np.asarray(model.layers.down_proj.values[...])
        rel[preset.gptq] = float(np.linalg.norm(PagedForward(model).step(tokens) - ref) / np.linalg.norm(ref))
    assert (codes[True] != codes[False]).mean() > 0.01
    assert rel[True] < 0.8, rel


def test_kv_skip_layers_resolve_validate_and_count_bytes():
    p = resolve_precision("fireq", kv_skip_layers=[3, 0, 0])
    assert p.kv_skip_layers == (0, 3) and p.name == "fireq+kv-skip-0-3" and p.kv_format == "int4_fp8"
    assert resolve_precision(p, kv_skip_layers=[]).kv_skip_layers == ()
    assert resolve_precision(p).kv_skip_layers == (0, 3)                  # None keeps the preset's
    assert resolve_precision("fireq", kv_skip_layers=()) is PRESETS["fireq"]
    for bad in ([-1], ["0"], [True], "0", 3, [1.0]):
        with pytest.raises(ValueError, match="kv_skip_layers"):
            resolve_precision("fireq", kv_skip_layers=bad)
    cfg = ModelConfig("llama", 64, 64, 128, 4, 4, 2, 16)
    with pytest.raises(ValueError, match=r"kv_skip_layers \[4\] out of range: the model has 4 layers"):
        resolve_precision("w4a8kv4", kv_skip_layers=[1, 4]).check_layers(cfg)
    with pytest.raises(ValueError, match="out of range"):
        random_model(cfg, "w4a8kv4", kv_skip_layers=[9])
    # Bytes: the skipped layers at bf16's per-layer size, the others at the preset's.
    per_layer = {f: KVPageLayout.bytes_per_token_for(1, 2, 16, f) for f in ("bf16", "int4")}
    skip = resolve_precision("w4a8kv4", kv_skip_layers=[0])
    assert skip.kv_bytes_per_token(cfg) == per_layer["bf16"] + 3 * per_layer["int4"]
    layout = kv_page_layout(skip, cfg, 16, jnp.float32)   # float32 models keep float32 KV there
    assert layout.layer_kv_dtypes == ((0, "float32"),) and layout.kv_dtype == "int4"
    # Weights are the same with and without skipped layers: only the KV format changes.
    assert skip.weight_bytes(cfg) == PRESETS["w4a8kv4"].weight_bytes(cfg)


def test_kv_skip_layers_store_those_layers_exactly(rng):
    """A float32 model with int4 KV but layer 0 kept float32: layer 0's cached keys are the model's
    keys bit for bit, layer 1's are int4 codes of them; logits with every layer skipped equal the
    float32 KV model's exactly."""
    loaded = random_model(ModelConfig("llama", 96, 64, 128, 2, 4, 2, 32), "bf16", "float32",
                          seed=int(rng.integers(1 << 30)))
    tokens = rng.integers(0, 96, 20)
    ref = PagedForward(loaded.model, kv_dtype="float32")
    ref_logits = ref.step(tokens)
    every = PagedForward(loaded.model, kv_dtype="int4", layer_kv_dtypes=((0, "float32"), (1, "float32")))
    np.testing.assert_allclose(every.step(tokens), ref_logits, rtol=1e-5, atol=1e-5)
    mixed = PagedForward(loaded.model, kv_dtype="int4", layer_kv_dtypes=((0, "float32"),))
    assert np.isfinite(mixed.step(tokens)).all()
    first, rest = mixed.layout.layer_groups()
    k0, k1 = (cached_keys(ref, ref.layout, layer, len(tokens)) for layer in (0, 1))
    np.testing.assert_allclose(cached_keys(mixed, first.layout, 0, len(tokens)), k0, rtol=1e-5, atol=1e-5)
    err = np.abs(cached_keys(mixed, rest.layout, 0, len(tokens)) - k1)
    step = (k1.max(-1) - k1.min(-1))[..., None] / 15       # int4 asymmetric: one step per (token, head)
    assert err.max() > 0 and (err <= step).all()            # rounding: half a step (+ bf16 scales)


def cached_keys(fwd: PagedForward, layout, layer: int, n: int) -> np.ndarray:
    """The first sequence's first n cached keys of `layer` (of `layout`, one of fwd's groups): [n, Hkv, D]."""
    ids = fwd.table[0, :layout.pages_for(n)]
    k = np.asarray(read_kv_pages(fwd.pool.words, layout, ids, layer)[0], np.float32)
    return k.reshape(-1, layout.num_kv_heads, layout.head_dim)[:n]
