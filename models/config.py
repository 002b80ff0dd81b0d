"""Architecture description of a Llama-family decoder, read from HF `config.json` or GGUF metadata."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from models.errors import ModelConfigError

# HF `architectures` entries we can serve, mapped to our family name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has biases on q/k/v
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def max_model_len(self) -> int:
        """Longest context we serve. We do not implement sliding-window attention, so a Mistral
        model is served only up to its window, where full attention is exact."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @property
    def layer_linear_params(self) -> int:
        """Parameters of all decoder layers' linear layers (q, k, v, o, gate, up, down)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2
        return self.num_layers * (attn + 3 * h * self.intermediate_size)

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        """All parameters (embedding, a separate LM head unless tied, norms)."""
        embeds = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.layer_linear_params + embeds + (2 * self.num_layers + 1) * self.hidden_size

    @property
    def attention_flops_per_pair(self) -> int:
        """FLOPs of one (query, cached key) pair over all layers: QK^T and PV, 2 FLOPs per MAC each."""
        return 4 * self.num_layers * self.num_heads * self.head_dim

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Every field as plain JSON values (`from_dict` inverts it exactly)."""
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of `to_dict`; ModelConfigError naming an unknown, missing or malformed field."""
        if not isinstance(d, dict):
            raise ModelConfigError("model config must be a JSON object")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ModelConfigError(f"unknown model config field {unknown[0]!r}")
        d = dict(d)
        scaling = d.get("rope_scaling")
        if scaling is not None:
            try:
                d["rope_scaling"] = RopeScaling(**scaling)
            except TypeError as e:
                raise ModelConfigError(f"malformed rope_scaling {scaling!r}: {e}") from None
        if "eos_token_ids" in d:
            d["eos_token_ids"] = tuple(d["eos_token_ids"] or ())
        try:
            return cls(**d)
        except TypeError as e:
            raise ModelConfigError(f"malformed model config: {e}") from None

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Build from a parsed HF `config.json`; raises ModelConfigError naming what is wrong."""
        if not isinstance(d, dict):
            raise ModelConfigError("config.json must hold a JSON object")
        archs = d.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            model_type = d.get("model_type")
            if model_type in SUPPORTED_ARCHITECTURES.values() and not archs:
                arch = model_type
            else:
                raise ModelConfigError(
                    f"unsupported architecture {archs or model_type!r}; supported: "
                    f"{sorted(SUPPORTED_ARCHITECTURES)}")

        def need(key):
            if key not in d:
                raise ModelConfigError(f"config.json is missing required field {key!r}")
            return d[key]

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        head_dim = d.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) else None)
        scaling = d.get("rope_scaling") or (d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else None)
        rope_theta = d.get("rope_theta")
        rope_scaling = None
        if isinstance(scaling, dict):
            rope_theta = rope_theta or scaling.get("rope_theta")
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                try:
                    rope_scaling = RopeScaling(
                        factor=float(scaling["factor"]),
                        low_freq_factor=float(scaling["low_freq_factor"]),
                        high_freq_factor=float(scaling["high_freq_factor"]),
                        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
                    )
                except KeyError as e:
                    raise ModelConfigError(f"llama3 rope_scaling is missing {e.args[0]!r}") from None
            elif kind not in (None, "default"):
                raise ModelConfigError(f"unsupported rope_scaling type {kind!r} (supported: llama3)")
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        window = d.get("sliding_window") if d.get("use_sliding_window", arch == "mistral") else None
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", arch == "qwen2")),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=window if isinstance(window, int) else None,
        )
