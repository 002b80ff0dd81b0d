"""Precision presets: which formats a model's weights, activations and KV cache use.

=========  =====================  ===================  =========  ================================
preset     weights                activations          KV cache   calibration
=========  =====================  ===================  =========  ================================
bf16       bf16                   bf16                 bf16       -
w8a8       int8 per channel       int8 per token       bf16       SmoothQuant migration (searched alpha)
fp8        e4m3 per channel       e4m3 per token       fp8        -
w4a16      int4 g128 asymmetric   bf16                 bf16       AWQ scale search (RTN without data)
w4a8kv4    int4 g128 asymmetric   e4m3 per token       int4       AWQ scale search (RTN without data),
                                                                  SmoothAttention
fireq      int4 g128 symmetric    e4m3 per token       int4 sym   AWQ-style factor search + clipping,
                                                                  GPTQ, RoPE-aware key scaling
           (FireQ's INT4-FP8: e4m3 group scales x one 2^i per tensor, stored K-major; KV int4_fp8:
           symmetric int4 per token and head, attended with e4m3 queries and P)
=========  =====================  ===================  =========  ================================

Keys are scaled for int4 KV (`kv_scaling`): w4a8kv4 uses QServe's SmoothAttention ("pre_rope"), every
other int4-KV model FireQ's RoPE-aware scaling ("rope_aware": SmoothAttention on most channels, the
top outlier channels scaled after RoPE instead). `kv_dtype` overrides a preset's KV format alone (and
picks that format's key scaling); the embedding stays in the model dtype; `group_size_for` is the
one group-size rule (docs/models.md: why).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax.numpy as jnp

from models.config import ModelConfig
from pallas_kernels.kv_pages import KV_DTYPE_ALIASES, KVPageLayout
from pallas_kernels.quant_formats import weight_bytes

KV_DTYPES = ("bf16", "fp8", "int8", "int4", "int4_fp8")  # a preset's KV formats (KVPageLayout's names)
# How keys are scaled before they are cached (models.quantize.scale_keys): not at all; pre-RoPE per
# RoPE pair, folded into W_k / W_q (SmoothAttention); post-RoPE on each KV head's top outlier
# channels; or both, the pre-RoPE scales reset to 1 where the post-RoPE ones act (FireQ).
KV_SCALINGS = ("none", "pre_rope", "post_rope", "rope_aware")
INT4_KV = ("int4", "int4_fp8")


def _layer_indices(layers) -> tuple[int, ...]:
    """Sorted distinct layer indices from any iterable of non-negative ints; ValueError otherwise."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"kv_skip_layers must be a list of layer indices, got {layers!r}")
    layers = list(layers)
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
        raise ValueError(f"kv_skip_layers must be non-negative layer indices, got {layers!r}")
    return tuple(sorted(set(layers)))


@dataclass(frozen=True)
class PrecisionPreset:
    name: str
    weight_format: str               # "bf16" | "int8" | "fp8" | "int4" | "int4_fp8"
    activation_format: str | None    # None: the model dtype; "int8" | "fp8": quantized per token
    kv_format: str                   # "bf16" | "fp8" | "int8" | "int4" | "int4_fp8"
    group_size: int | None = None    # int4: preferred group along K; None: per channel
    calibration: str | None = None   # "smoothquant" | "awq" | None
    smoothquant_alpha: float | None = None  # None: searched per layer and site
    kv_scaling: str | None = None    # one of KV_SCALINGS; None: "rope_aware" for int4 KVs, else "none"
    # Layers whose KV cache stays in the model dtype whatever kv_format is (vLLM's
    # kv_cache_dtype_skip_layers), e.g. (0,): the first layer, whose keys quantize worst.
    kv_skip_layers: tuple[int, ...] = ()
    # GPTQ error feedback after AWQ's smoothing and clipping (int4_fp8 weights: models.quantize.gptq_int4_fp8).
    gptq: bool = False

    def __post_init__(self):
        object.__setattr__(self, "kv_skip_layers", _layer_indices(self.kv_skip_layers))
        if self.gptq and (self.weight_format != "int4_fp8" or self.calibration != "awq"):
            raise ValueError(f"gptq needs int4_fp8 weights calibrated with awq, not {self.weight_format} "
                             f"weights with {self.calibration}")
        if self.kv_scaling is None:
            object.__setattr__(self, "kv_scaling", "rope_aware" if self.kv_format in INT4_KV else "none")
        if self.kv_scaling not in KV_SCALINGS:
            raise ValueError(f"unknown kv_scaling {self.kv_scaling!r}; choose from {', '.join(KV_SCALINGS)}")

    @property
    def quantized_weights(self) -> bool:
        return self.weight_format != "bf16"

    @property
    def pre_rope_key_scaling(self) -> bool:
        """K channels scaled before RoPE, tied over RoPE pairs and folded into W_k / W_q."""
        return self.kv_scaling in ("pre_rope", "rope_aware")

    @property
    def post_rope_key_scaling(self) -> bool:
        """K's outlier channels scaled after RoPE (a `k_rope_scale` parameter per layer)."""
        return self.kv_scaling in ("post_rope", "rope_aware")

    @property
    def needs_calibration(self) -> bool:
        return self.calibration is not None or self.kv_scaling != "none"

    @property
    def changes_weights(self) -> bool:
        return self.quantized_weights or self.kv_scaling != "none"

    def group_size_for(self, k: int) -> int | None:
        """The group size used for an input dimension `k` (None: per channel)."""
        if self.weight_format not in ("int4", "int4_fp8"):
            return None
        if self.group_size is None:
            return k
        smallest = 64 if self.weight_format == "int4_fp8" else 32   # int4_fp8: one FP8 MMA K step per group
        for g in (self.group_size, 64, 32):
            if smallest <= g <= self.group_size and k % g == 0:
                return g
        raise ValueError(f"input dimension {k} is not a multiple of {smallest}; {self.weight_format} groups "
                         "cannot tile it")

    def check_layers(self, cfg: ModelConfig) -> None:
        """ValueError naming the problem when kv_skip_layers names a layer the model does not have."""
        bad = [layer for layer in self.kv_skip_layers if layer >= cfg.num_layers]
        if bad:
            raise ValueError(f"kv_skip_layers {bad} out of range: the model has {cfg.num_layers} layers "
                             f"(0..{cfg.num_layers - 1})")

    def kv_bytes_per_token(self, cfg: ModelConfig) -> int:
        """Exact KV bytes per token over all layers (K and V, scales included)."""
        return kv_page_layout(self, cfg, 1, jnp.bfloat16).bytes_per_token

    def weight_bytes(self, cfg: ModelConfig) -> int:
        """Exact bytes of all weights (quantized linears in their packed format, the rest bf16)."""
        h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        linears = [(h, cfg.num_heads * d), (h, cfg.num_kv_heads * d), (h, cfg.num_kv_heads * d),
                   (cfg.num_heads * d, h), (h, inter), (h, inter), (inter, h)]
        total = 0
        for k, n in linears:
            if self.quantized_weights:
                total += weight_bytes(self.weight_format, (k, n), group_size=self.group_size_for(k) or 128)
            else:
                total += weight_bytes("bf16", (k, n))
        total *= cfg.num_layers
        bias = (cfg.num_heads + 2 * cfg.num_kv_heads) * d if cfg.attention_bias else 0
        key_scale = cfg.num_kv_heads * d if self.post_rope_key_scaling else 0
        return total + 2 * cfg.num_layers * (bias + key_scale) + self.replicated_weight_bytes(cfg)

    @staticmethod
    def replicated_weight_bytes(cfg: ModelConfig) -> int:
        """The bf16 weights every member of a tensor-parallel group holds whole
        (models.tensor_parallel): the norms, the embedding and the LM head."""
        h = cfg.hidden_size
        norms = cfg.num_layers * 2 * h + h
        embeds = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
        return 2 * (norms + embeds)


PRESETS: dict[str, PrecisionPreset] = {p.name: p for p in (
    PrecisionPreset("bf16", "bf16", None, "bf16"),
    PrecisionPreset("w8a8", "int8", "int8", "bf16", calibration="smoothquant"),
    PrecisionPreset("fp8", "fp8", "fp8", "fp8"),
    PrecisionPreset("w4a16", "int4", None, "bf16", group_size=128, calibration="awq"),
    PrecisionPreset("w4a8kv4", "int4", "fp8", "int4", group_size=128, calibration="awq", kv_scaling="pre_rope"),
    PrecisionPreset("fireq", "int4_fp8", "fp8", "int4_fp8", group_size=128, calibration="awq", gptq=True),
)}

# Baselines for the quality report only (not served by name): naive round-to-nearest int4.
RTN_INT4_PER_CHANNEL = PrecisionPreset("w4a16-rtn-channel", "int4", None, "bf16", group_size=None)
RTN_INT4_GROUPED = PrecisionPreset("w4a16-rtn", "int4", None, "bf16", group_size=128)


def resolve_precision(precision: str | PrecisionPreset = "bf16", kv_dtype: str | None = None, *,
                      rescale_keys: bool = True, kv_skip_layers=None) -> PrecisionPreset:
    """A preset by name (or as given), with the KV format optionally overridden. The override picks
    the new format's key scaling when `rescale_keys` (the model is still to be calibrated); False
    keeps the preset's, for a model already built (its weights hold the scaling it had).
    `kv_skip_layers` (None: the preset's) lists layers whose KV stays in the model dtype."""
    if isinstance(precision, PrecisionPreset):
        preset = precision
    elif isinstance(precision, str) and precision.lower() in PRESETS:
        preset = PRESETS[precision.lower()]
    else:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRESETS)}")
    if kv_dtype is not None:
        kv = KV_DTYPE_ALIASES.get(kv_dtype, kv_dtype)
        if kv not in KV_DTYPES:
            raise ValueError(f"unknown kv_dtype {kv_dtype!r}; choose from {', '.join(KV_DTYPES)}")
        if kv != preset.kv_format:
            scaling = None if rescale_keys else preset.kv_scaling
            preset = dataclasses.replace(preset, kv_format=kv, kv_scaling=scaling, name=f"{preset.name}+kv-{kv}")
    if kv_skip_layers is not None:
        skip = _layer_indices(kv_skip_layers)
        if skip != preset.kv_skip_layers:
            suffix = f"+kv-skip-{'-'.join(map(str, skip))}" if skip else ""
            preset = dataclasses.replace(preset, kv_skip_layers=skip, name=preset.name + suffix)
    return preset


def layout_kv_dtype(preset: PrecisionPreset, model_dtype) -> str:
    """The KVPageLayout dtype name for a preset: bf16 KV follows the model dtype (float32 models in tests)."""
    return "float32" if preset.kv_format == "bf16" and model_dtype == jnp.float32 else preset.kv_format


def layer_kv_dtypes(kv_skip_layers, model_dtype=jnp.bfloat16) -> tuple[tuple[int, str], ...]:
    """KVPageLayout.layer_kv_dtypes for a model's kv_skip_layers: those layers in the model dtype's
    KV format."""
    wide = "float32" if model_dtype == jnp.float32 else "bf16"
    return tuple((layer, wide) for layer in kv_skip_layers)


def kv_page_layout(preset: PrecisionPreset, cfg: ModelConfig, tokens_per_page: int, model_dtype, *,
                   num_kv_heads: int | None = None, key_bounds: bool = False) -> KVPageLayout:
    """A model's KV page under `preset` (not yet placed in slabs); `num_kv_heads`: one device's share
    of a tensor-parallel group (default: all); `key_bounds`: keep each page's key bounds (query-aware
    page selection)."""
    preset.check_layers(cfg)
    return KVPageLayout(cfg.num_layers, num_kv_heads or cfg.num_kv_heads, cfg.head_dim, tokens_per_page,
                        layout_kv_dtype(preset, model_dtype),
                        layer_kv_dtypes=layer_kv_dtypes(preset.kv_skip_layers, model_dtype), key_bounds=key_bounds)
