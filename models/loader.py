"""Resolve a model name or path and load it: config, weights (as an NNX model) and tokenizer.

Names: `smollm2-135m` is SmolLM2-135M-Instruct (GGUF Q4_1), fetched by `scripts/setup.sh` into the
model cache (`$FINESERVE_CACHE`, default `~/.cache/fineserve-jax`). Paths: an HF checkpoint directory
(config.json + safetensors) or a `.gguf` file (or a directory holding exactly one).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp

from models.config import ModelConfig
from models.errors import ModelLoadError, ModelNotFoundError
from models.precision import PRESETS, PrecisionPreset, layout_kv_dtype, resolve_precision
from models.tokenizer import Tokenizer

KNOWN_MODELS = {
    "smollm2-135m": "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf",
}
DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32}


def model_cache_dir() -> Path:
    return Path(os.environ.get("FINESERVE_CACHE", Path.home() / ".cache" / "fineserve-jax")) / "models"


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    model: object  # LlamaForCausalLM
    tokenizer: Tokenizer | None
    dtype: object
    precision: PrecisionPreset = PRESETS["bf16"]

    @property
    def kv_dtype(self) -> str:
        """The KV page format this model's pages use."""
        return layout_kv_dtype(self.precision, self.dtype)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """EOS ids from the config and the tokenizer (HF configs and GGUF metadata may list different ones)."""
        ids = set(self.config.eos_token_ids) | set(self.tokenizer.eos_token_ids if self.tokenizer else ())
        return tuple(sorted(ids))


def resolve_model_path(name_or_path: str) -> Path:
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ModelNotFoundError(f"model must be a name or a path, got {name_or_path!r}")
    if str(name_or_path) in KNOWN_MODELS:
        path = model_cache_dir() / KNOWN_MODELS[str(name_or_path)]
        if not path.is_file():
            raise ModelNotFoundError(
                f"model {name_or_path!r} is not downloaded (expected {path}); run scripts/setup.sh")
        return path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"unknown model {str(name_or_path)!r}: not a known name ({', '.join(sorted(KNOWN_MODELS))}) "
            f"and no such file or directory")
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    return path


def parse_dtype(dtype) -> object:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if dtype in (jnp.bfloat16, jnp.float32):
        return dtype
    raise ValueError(f"dtype must be 'bfloat16' or 'float32', got {dtype!r}")


CALIBRATION_TEXT = Path(__file__).parent / "data" / "calib_text.txt"
CALIBRATION_WINDOW = 256


def calibration_tokens(tokenizer: Tokenizer | None, samples: int):
    """int32[n, CALIBRATION_WINDOW] windows of the shipped calibration text, or None without a tokenizer."""
    from models.quantize import calibration_windows
    if tokenizer is None or samples <= 0:
        return None
    ids = tokenizer.encode(CALIBRATION_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)
    return calibration_windows(ids, CALIBRATION_WINDOW, samples)


def load_model(name_or_path: str, dtype="bfloat16", precision: str | PrecisionPreset = "bf16",
               kv_dtype: str | None = None, calib_samples: int = 8) -> LoadedModel:
    """Load everything or raise a ModelLoadError naming the problem; nothing half-loaded survives
    a failure (intermediate arrays are dropped before the error propagates).

    precision: a preset name (`models.precision.PRESETS`); the float checkpoint is quantized after
    loading, calibrated on `calib_samples` windows of the shipped calibration text (0: plain RTN).
    kv_dtype overrides the preset's KV format."""
    from models.gguf_loader import load_gguf
    from models.hf_loader import read_hf_config, read_hf_weights
    from models.quantize import quantize_model
    from models.weights import model_from_hf_weights

    jdtype = parse_dtype(dtype)
    preset = resolve_precision(precision, kv_dtype)
    path = resolve_model_path(name_or_path)
    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelLoadError(f"{path} is not a .gguf file or an HF checkpoint directory")
            gguf = load_gguf(path)
            config, weights, tokenizer = gguf.config, gguf.weights, gguf.tokenizer
            del gguf
        else:
            config = read_hf_config(path)
            weights = read_hf_weights(path)
            tokenizer = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
        model = model_from_hf_weights(config, weights, jdtype)
        del weights
        if preset.quantized_weights:
            calib = calibration_tokens(tokenizer, calib_samples) if preset.calibration else None
            model = quantize_model(model, preset, calib)
    except BaseException:
        gc.collect()
        raise
    return LoadedModel(str(name_or_path), config, model, tokenizer, jdtype, preset)
