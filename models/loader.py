"""Resolve a model name or path and load it: config, weights (as an NNX model) and tokenizer.

Names: `smollm2-135m` is SmolLM2-135M-Instruct (GGUF Q4_1), fetched by `scripts/setup.sh` into the
model cache (`$FINESERVE_CACHE`, default `~/.cache/fineserve-jax`). Paths: an HF checkpoint directory
(config.json + safetensors, float or pre-quantized AWQ/GPTQ/FP8), a `.gguf` file (or a directory
holding exactly one), or a quantized checkpoint directory written by `fineserve quantize`
(`models.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from functools import partial
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from models.checkpoint import load_quantized
from models.config import ModelConfig
from models.errors import ModelConfigError, ModelLoadError, ModelNotFoundError, WeightsError
from models.gguf_loader import config_from_gguf_metadata, load_gguf, open_gguf
from models.hf_loader import read_hf_config, read_hf_weights
from models.llama import LlamaForCausalLM
from models.loaded_model import LoadedModel, parse_dtype
from models.precision import PRESETS, PrecisionPreset, resolve_precision
from models.quant_import import (
    _quantization_config,
    gguf_quantized_tensors,
    parse_quantization_config,
    read_hf_quantized,
)
from models.quant_linear import QuantLinear
from models.quantize import calibration_windows, quantize_model
from models.quantized_cache import cache_key, cached_quantized_model
from models.tokenizer import Tokenizer
from models.weights import LAYER_LINEARS, model_from_hf_weights

KNOWN_MODELS = {
    "smollm2-135m": "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf",
}


def model_cache_dir() -> Path:
    return Path(os.environ.get("FINESERVE_CACHE", Path.home() / ".cache" / "fineserve-jax")) / "models"


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


CALIBRATION_TEXT = Path(__file__).parent / "data" / "calib_text.txt"
CALIBRATION_WINDOW = 256


def calibration_tokens(tokenizer: Tokenizer | None, samples: int):
    """int32[n, CALIBRATION_WINDOW] windows of the shipped calibration text, or None without a tokenizer."""
    if tokenizer is None or samples <= 0:
        return None
    ids = tokenizer.encode(CALIBRATION_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)
    return calibration_windows(ids, CALIBRATION_WINDOW, samples)


PRECISION_MODES = ("auto", "native")


def check_precision(precision: str | PrecisionPreset = "auto", kv_dtype: str | None = None,
                    kv_skip_layers=None) -> PrecisionPreset | None:
    """Validate a `precision` / `kv_dtype` pair (and `kv_skip_layers`' form: its range needs the
    model) before anything is loaded: the named preset (KV override applied), or None for "auto" /
    "native" (decided by the checkpoint). ValueError naming the bad value otherwise."""
    resolve_precision("bf16", kv_skip_layers=kv_skip_layers)  # validates kv_skip_layers
    if isinstance(precision, str) and precision.lower() in PRECISION_MODES:
        resolve_precision("bf16", kv_dtype)  # validates kv_dtype
        return None
    if isinstance(precision, str) and precision.lower() not in PRESETS:
        raise ValueError(f"unknown precision {precision!r}; choose from "
                         f"{', '.join(PRECISION_MODES + tuple(PRESETS))}")
    return resolve_precision(precision, kv_dtype)


def native_preset(info) -> PrecisionPreset:
    """The preset describing a pre-quantized HF checkpoint (`models.quant_import.QuantInfo`):
    AWQ/GPTQ int4 weight-only with the checkpoint's group size, FP8 weights with per-token FP8
    activations; KV bf16 (overridable with kv_dtype)."""
    if info.method == "fp8":
        return PrecisionPreset("fp8-checkpoint", "fp8", "fp8", "bf16")
    g = None if info.group_size in (None, -1) else info.group_size
    return PrecisionPreset(f"{info.method}-w4a16", "int4", None, "bf16", group_size=g)


def _gguf_native_preset(model) -> PrecisionPreset:
    """GGUF Q4_0/Q4_1 linears load as int4 (group 32), Q8_0 as group-wise int8, weight-only."""
    fmts = {getattr(model.layers, n).fmt for n in LAYER_LINEARS
            if isinstance(getattr(model.layers, n), QuantLinear)}
    if not fmts:
        return PrecisionPreset("gguf-float", "bf16", None, "bf16")
    if fmts == {"int8"}:
        return PrecisionPreset("gguf-w8a16", "int8", None, "bf16", group_size=32)
    return PrecisionPreset("gguf-w4a16" if fmts == {"int4"} else "gguf-w4w8a16", "int4", None, "bf16",
                           group_size=32)


def _base_name(preset: PrecisionPreset) -> str:
    return preset.name.split("+kv-")[0]


def _hf_quantization(path: Path):
    """QuantInfo when the HF directory holds a pre-quantized checkpoint (config.json with a
    `quantization_config`, or an AutoGPTQ/AutoAWQ side file), else None. A malformed config.json
    returns None so that the float path reports it."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    if raw.get("quantization_config") is None and not any(
            (path / f).is_file() for f in ("quantize_config.json", "quant_config.json")):
        return None
    return parse_quantization_config(_quantization_config(path, raw))


def load_model(name_or_path: str, dtype="bfloat16", precision: str | PrecisionPreset = "auto",
               kv_dtype: str | None = None, calib_samples: int = 8,
               quantized_cache: str | Path | None = None, kv_skip_layers=None) -> LoadedModel:
    """Load everything or raise a ModelLoadError naming the problem; nothing half-loaded survives
    a failure (intermediate arrays are dropped before the error propagates).

    precision:
      "auto" (default): as the checkpoint is. A float HF checkpoint or a GGUF file (dequantized to
        float) -> the bf16 preset; a pre-quantized HF checkpoint (AWQ, GPTQ, FP8; config.json has
        `quantization_config`) -> its linears loaded straight into our int4/fp8 formats
        (`native_preset`: "awq-w4a16", "gptq-w4a16", "fp8-checkpoint"); a directory written by
        `fineserve quantize` (holds fineserve_model.json) -> its stored preset.
      "native": as "auto", except that a GGUF file's Q4_0/Q4_1/Q8_0 linears are loaded straight
        into int4/int8 (weight-only) instead of being dequantized.
      a preset name (`models.precision.PRESETS`) or PrecisionPreset: a float checkpoint (HF or GGUF)
        is quantized after loading, calibrated on `calib_samples` windows of the shipped
        calibration text (0: plain RTN). A pre-quantized checkpoint accepts only a preset with its
        own weight and activation formats (e.g. "w4a16" on AWQ, "fp8" on an FP8 checkpoint, whose
        KV format then applies); anything else raises ModelConfigError. A fineserve checkpoint
        accepts only the preset it was quantized to.
    kv_dtype overrides the KV format in every case; kv_skip_layers (None: the preset's) lists layers
    whose KV stays in the model dtype (their weights are the same either way).
    quantized_cache: a folder where a float checkpoint quantized to a preset is cached
      (`models.quantized_cache`), so loading it again skips calibration; None: no cache."""
    check_precision(precision, kv_dtype, kv_skip_layers)
    loaded = _load_model(name_or_path, dtype, precision, kv_dtype, calib_samples, quantized_cache)
    return with_kv_skip_layers(loaded, kv_skip_layers)


def with_kv_skip_layers(loaded: LoadedModel, kv_skip_layers) -> LoadedModel:
    """`loaded` with its KV kept in the model dtype on `kv_skip_layers` (None: as it is); ValueError
    naming any layer the model does not have."""
    if kv_skip_layers is not None:
        preset = resolve_precision(loaded.precision, kv_skip_layers=kv_skip_layers)
        preset.check_layers(loaded.config)
        loaded = dataclasses.replace(loaded, precision=preset)
    return loaded


def _load_model(name_or_path, dtype, precision, kv_dtype, calib_samples, quantized_cache) -> LoadedModel:
    requested = check_precision(precision, kv_dtype)
    native = isinstance(precision, str) and precision.lower() == "native"
    jdtype = parse_dtype(dtype)
    path = resolve_model_path(name_or_path)
    try:
        if path.is_dir() and (path / "fineserve_model.json").is_file():
            return _load_fineserve(path, name_or_path, jdtype, requested, kv_dtype)
        if path.is_file():
            load = partial(_load_gguf, path, name_or_path, jdtype, requested, kv_dtype, native, calib_samples)
        else:
            info = _hf_quantization(path)
            if info is not None:
                return _load_prequantized(path, name_or_path, jdtype, requested, kv_dtype, info)
            load = partial(_load_float_hf, path, name_or_path, jdtype, requested, kv_dtype, calib_samples)
        if quantized_cache is None or requested is None or not requested.changes_weights:
            return load()
        key = cache_key(path, requested, jnp.dtype(jdtype).name, calib_samples, CALIBRATION_TEXT,
                        Path(quantized_cache))
        return cached_quantized_model(Path(quantized_cache), key, str(name_or_path), requested, jdtype, load)
    except BaseException:
        gc.collect()
        raise


def _finish_float(model, tokenizer, requested: PrecisionPreset | None, kv_dtype, calib_samples):
    """Quantize a float model to the requested preset (None: bf16)."""
    preset = requested or resolve_precision("bf16", kv_dtype)
    if preset.changes_weights:
        calib = calibration_tokens(tokenizer, calib_samples) if preset.needs_calibration else None
        model = quantize_model(model, preset, calib)
    return model, preset


def _load_float_hf(path, name, jdtype, requested, kv_dtype, calib_samples) -> LoadedModel:
    config = read_hf_config(path)
    weights = read_hf_weights(path)
    tokenizer = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
    model = model_from_hf_weights(config, weights, jdtype)
    del weights
    model, preset = _finish_float(model, tokenizer, requested, kv_dtype, calib_samples)
    return LoadedModel(str(name), config, model, tokenizer, jdtype, preset)


def _load_gguf(path, name, jdtype, requested, kv_dtype, native, calib_samples) -> LoadedModel:
    if path.suffix != ".gguf":
        raise ModelLoadError(f"{path} is not a .gguf file or an HF checkpoint directory")
    if native and requested is None:
        reader = open_gguf(path)
        try:
            config = config_from_gguf_metadata(reader)
        except ModelConfigError as e:
            raise ModelConfigError(f"{path}: {e}") from None
        try:
            weights = gguf_quantized_tensors(reader, config)
        except WeightsError as e:
            raise WeightsError(f"{path}: {e}") from None
        try:
            tokenizer = Tokenizer.from_gguf(reader)
        except ModelConfigError as e:
            raise ModelConfigError(f"{path}: {e}") from None
        model = model_from_hf_weights(config, weights, jdtype)  # weight-only (act_format None)
        del weights, reader
        preset = resolve_precision(_gguf_native_preset(model), kv_dtype, rescale_keys=False)
        return LoadedModel(str(name), config, model, tokenizer, jdtype, preset)
    gguf = load_gguf(path)
    config, weights, tokenizer = gguf.config, gguf.weights, gguf.tokenizer
    del gguf
    model = model_from_hf_weights(config, weights, jdtype)
    del weights
    model, preset = _finish_float(model, tokenizer, requested, kv_dtype, calib_samples)
    return LoadedModel(str(name), config, model, tokenizer, jdtype, preset)


def _load_prequantized(path, name, jdtype, requested, kv_dtype, info) -> LoadedModel:
    preset = native_preset(info)
    if requested is not None:
        if (requested.weight_format, requested.activation_format) != (preset.weight_format,
                                                                      preset.activation_format):
            raise ModelConfigError(
                f"{path} is already quantized with {info.method} ({preset.name}: {preset.weight_format} "
                f"weights); it cannot be re-quantized to precision {_base_name(requested)!r}: use "
                f"precision='auto' (kv_dtype= still picks the KV cache format)")
        preset = resolve_precision(preset, requested.kv_format, rescale_keys=False)
    else:
        preset = resolve_precision(preset, kv_dtype, rescale_keys=False)
    config = read_hf_config(path)
    weights, _ = read_hf_quantized(path)
    tokenizer = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
    model = model_from_hf_weights(config, weights, jdtype, act_format=preset.activation_format)
    del weights
    return LoadedModel(str(name), config, model, tokenizer, jdtype, preset)


def _load_fineserve(path, name, jdtype, requested, kv_dtype) -> LoadedModel:
    def refuse(stored_name):
        if requested is not None and _base_name(requested) != stored_name.split("+kv-")[0]:
            raise ModelConfigError(f"{path} holds a model quantized to {stored_name!r}; load it with "
                                   f"precision='auto' instead of {_base_name(requested)!r}")

    try:  # fail fast, before verifying and restoring (load_quantized reports a bad file properly)
        refuse(str(json.loads((path / "fineserve_model.json").read_text())["precision"]["name"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    loaded = load_quantized(path, jdtype, name=str(name))
    refuse(loaded.precision.name)
    loaded.precision = resolve_precision(loaded.precision, kv_dtype, rescale_keys=False)
    return loaded


def random_model(config: ModelConfig, precision: str | PrecisionPreset = "bf16", dtype="bfloat16", *,
                 kv_dtype: str | None = None, seed: int = 0, name: str | None = None,
                 kv_skip_layers=None) -> LoadedModel:
    """A model of this architecture with random weights (no tokenizer), quantized to `precision` by
    plain round-to-nearest: for tests, memory benchmarks and profiling shapes no checkpoint has."""
    preset = check_precision(precision, kv_dtype, kv_skip_layers) or resolve_precision("bf16", kv_dtype)
    jdtype = parse_dtype(dtype)
    model = LlamaForCausalLM(config, dtype=jdtype, rngs=nnx.Rngs(seed))
    model, preset = _finish_float(model, None, preset, kv_dtype, 0)
    loaded = LoadedModel(name or f"random-{config.num_layers}l-{preset.name}", config, model, None, jdtype, preset)
    return with_kv_skip_layers(loaded, kv_skip_layers)
