"""Load a Llama-family GGUF file (llama.cpp format) into HF-named float32 weights + ModelConfig.

Layout notes:
- GGUF stores each 2-D tensor with ggml dims (in, out); `GGUFReader` exposes it in numpy order
  (out, in), which is already HF's `nn.Linear` layout, so no transpose is needed.
- llama.cpp's converter permutes the rows of `attn_q` / `attn_k` (llama architecture only) so that
  its interleaved-pair RoPE matches HF's rotate-half RoPE. We undo that permutation, so the weights
  returned here are exactly the HF checkpoint's (up to quantization error).
- Quantized blocks lie along rows, so the row permutation can be undone on raw quantized data
  too (`gguf_raw_tensors`).
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import gguf
import numpy as np

from models.config import ModelConfig, RopeScaling
from models.errors import ModelConfigError, ModelLoadError, ModelNotFoundError, WeightsError
from models.tokenizer import Tokenizer

# GGUF `general.architecture` -> our family name.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Tensors that carry no weights we use (rope_freqs is turned into config.rope_scaling).
_IGNORED = {"rope_freqs.weight"}


@dataclass
class GGUFModel:
    config: ModelConfig
    weights: dict[str, np.ndarray]  # HF names, float32, (out, in) matrices
    tokenizer: Tokenizer
    chat_template: str | None = None
    path: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)  # scalar metadata (no token arrays)


class RawTensor(NamedTuple):
    """A GGUF tensor as stored: `qtype` (gguf.GGMLQuantizationType) and `data` in numpy order
    (rows, bytes-per-row) for quantized types, (rows, cols) for F32/F16/BF16."""

    qtype: Any
    data: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical (HF) shape of the tensor."""
        if self.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                          gguf.GGMLQuantizationType.BF16):
            return tuple(self.data.shape)
        return tuple(gguf.quants.quant_shape_from_byte_shape(self.data.shape, self.qtype))


# ---- helpers -------------------------------------------------------------------------------


def gguf_to_hf_name(name: str) -> str | None:
    """HF name for a GGUF tensor name, or None if it is not a llama/qwen2 weight."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_qk_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's HF->GGUF `permute` on the rows (axis 0) of attn_q/attn_k.
    Works on dequantized (out, in) matrices, biases (out,), and raw quantized (out, bytes) rows."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise WeightsError(f"cannot un-permute {rows} rows into {n_head} heads")
    return np.ascontiguousarray(
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def permute_qk_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF->GGUF permutation (convert_hf_to_gguf.LlamaModel.permute)."""
    rows = w.shape[0]
    return np.ascontiguousarray(
        w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _value(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32(value: Any) -> float:
    """GGUF stores these as float32; give the shortest decimal that rounds to it (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def _require(reader, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        raise ModelConfigError(f"GGUF metadata is missing required key {key!r}")
    return f.contents()


def open_gguf(path: str | os.PathLike):
    """`gguf.GGUFReader` for `path`, with ModelLoadError/WeightsError naming the path on failure.
    Readers are kept for the last few files (by path, size and modification time): parsing the
    header of a model with a large vocabulary takes seconds, and a fleet, its placement and its
    replicas open the same file again and again. The reader's tensors are read-only mappings."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    stat = os.stat(path)
    return _read_gguf(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_gguf(path: str, size: int, mtime_ns: int):
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on malformed input
        raise WeightsError(f"{path}: malformed or truncated GGUF file ({type(e).__name__}: {e})") from None
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size or t.data.nbytes != t.n_bytes:
            raise WeightsError(f"{path}: truncated GGUF file: tensor {t.name!r} needs bytes up to "
                               f"{end}, file has {size}")
    return reader


def _tensor_shape(reader, name: str) -> tuple[int, ...] | None:
    for t in reader.tensors:
        if t.name == name:
            return tuple(int(d) for d in reversed(t.shape.tolist()))  # numpy order
    return None


def _rope_scaling_from_freqs(freqs: np.ndarray, head_dim: int, theta: float, max_pos: int) -> RopeScaling:
    """Recover Llama 3 RoPE scaling from llama.cpp's `rope_freqs` tensor (per-frequency divisors).
    Tries the parameters every Llama 3.x release uses and checks they reproduce the tensor."""
    freqs = np.asarray(freqs, dtype=np.float64).reshape(-1)
    factor = float(freqs.max())
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    for low, high, orig in ((1.0, 4.0, 8192), (1.0, 4.0, 4096)):
        wavelen = 2 * math.pi / inv
        smooth = (orig / wavelen - low) / (high - low)
        expected = np.where(wavelen < orig / high, 1.0,
                            np.where(wavelen > orig / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        if expected.shape == freqs.shape and np.allclose(expected, freqs, rtol=1e-3):
            return RopeScaling(factor=factor, low_freq_factor=low, high_freq_factor=high,
                               original_max_position_embeddings=orig)
    raise ModelConfigError("unsupported 'rope_freqs' tensor: does not match Llama 3 RoPE scaling")


# ---- public API ----------------------------------------------------------------------------


def config_from_gguf_metadata(reader) -> ModelConfig:
    """ModelConfig from a `gguf.GGUFReader`'s metadata; ModelConfigError naming the missing or
    unsupported key/architecture."""
    gguf_arch = _require(reader, "general.architecture")
    arch = GGUF_ARCHITECTURES.get(gguf_arch)
    if arch is None:
        raise ModelConfigError(
            f"unsupported GGUF architecture {gguf_arch!r}; supported: {sorted(GGUF_ARCHITECTURES)}")
    p = gguf_arch + "."
    hidden = int(_require(reader, p + "embedding_length"))
    heads = int(_require(reader, p + "attention.head_count"))
    kv_heads = _value(reader, p + "attention.head_count_kv")
    head_dim = _value(reader, p + "attention.key_length") or _value(reader, p + "rope.dimension_count")
    if head_dim is None:
        head_dim = hidden // heads if heads else 0

    embd = _tensor_shape(reader, "token_embd.weight")
    if embd is not None:
        vocab = embd[0]
    else:
        vocab = _value(reader, p + "vocab_size")
        if vocab is None:
            tokens = reader.fields.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ModelConfigError("GGUF has no 'token_embd.weight', vocab_size or token list")
            vocab = len(tokens.data)

    theta = _f32(_value(reader, p + "rope.freq_base", 10000.0))
    max_pos = int(_require(reader, p + "context_length"))
    rope_scaling = None
    scaling_type = _value(reader, p + "rope.scaling.type")
    if scaling_type not in (None, "none"):
        raise ModelConfigError(f"unsupported RoPE scaling {p}rope.scaling.type = {scaling_type!r}")
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            rope_scaling = _rope_scaling_from_freqs(np.asarray(t.data), int(head_dim), theta, max_pos)

    eos_ids = [_value(reader, k) for k in
               ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
    bos = _value(reader, "tokenizer.ggml.bos_token_id")
    window = _value(reader, p + "attention.sliding_window")
    has_bias = any(t.name == "blk.0.attn_q.bias" for t in reader.tensors)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_require(reader, p + "feed_forward_length")),
        num_layers=int(_require(reader, p + "block_count")),
        num_heads=heads,
        num_kv_heads=int(kv_heads) if kv_heads else heads,
        head_dim=int(head_dim),
        rms_norm_eps=_f32(_require(reader, p + "attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        attention_bias=has_bias or arch == "qwen2",
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos_ids if i is not None)),
        sliding_window=int(window) if window else None,
    )


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every weight the model needs."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
              "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        pre = f"model.layers.{i}."
        shapes.update({
            pre + "input_layernorm.weight": (c.hidden_size,),
            pre + "self_attn.q_proj.weight": (q, c.hidden_size),
            pre + "self_attn.k_proj.weight": (kv, c.hidden_size),
            pre + "self_attn.v_proj.weight": (kv, c.hidden_size),
            pre + "self_attn.o_proj.weight": (c.hidden_size, q),
            pre + "post_attention_layernorm.weight": (c.hidden_size,),
            pre + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
            pre + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
            pre + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        })
        if c.attention_bias:
            shapes.update({pre + "self_attn.q_proj.bias": (q,), pre + "self_attn.k_proj.bias": (kv,),
                           pre + "self_attn.v_proj.bias": (kv,)})
    return shapes


def _qk_heads(hf_name: str, config: ModelConfig) -> int | None:
    """Number of heads to un-permute over, or None when the tensor was not permuted."""
    if config.architecture != "llama":  # llama.cpp permutes Q/K only for the llama architecture
        return None
    if ".self_attn.q_proj." in hf_name:
        return config.num_heads
    if ".self_attn.k_proj." in hf_name:
        return config.num_kv_heads
    return None


def gguf_raw_tensors(reader, config: ModelConfig | None = None) -> dict[str, RawTensor]:
    """HF name -> RawTensor(qtype, data) without dequantizing; Q/K rows are already un-permuted
    (valid for block-quantized data since blocks never cross rows). Data are memory-mapped views
    except for Q/K, which are copied."""
    config = config or config_from_gguf_metadata(reader)
    out = {}
    for hf_name, t in _iter_named(reader):
        data = t.data
        heads = _qk_heads(hf_name, config)
        if heads is not None:
            data = unpermute_qk_rows(np.asarray(data), heads)
        out[hf_name] = RawTensor(t.tensor_type, data)
    return out


def _iter_named(reader) -> Iterator[tuple[str, Any]]:
    for t in reader.tensors:
        if t.name in _IGNORED:
            continue
        hf_name = gguf_to_hf_name(t.name)
        if hf_name is None:
            raise WeightsError(f"unexpected tensor {t.name!r} in GGUF file (not a llama/qwen2 weight)")
        yield hf_name, t


def iter_gguf_tensors(reader, config: ModelConfig | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, float32 array in HF layout), one tensor at a time."""
    config = config or config_from_gguf_metadata(reader)
    for hf_name, t in _iter_named(reader):
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise WeightsError(f"tensor {t.name!r}: unsupported GGUF tensor type {t.tensor_type.name}") from None
        w = np.asarray(w, dtype=np.float32)
        heads = _qk_heads(hf_name, config)
        if heads is not None:
            w = unpermute_qk_rows(w, heads)
        yield hf_name, w


def check_tensor(name: str, shape: tuple[int, ...], shapes: dict, config: ModelConfig, where: str = "") -> None:
    """Raise WeightsError unless `name` is a tensor the config expects, with the expected shape."""
    want = shapes.get(name)
    if want is None:
        raise WeightsError(f"{where}unexpected tensor {name!r} for a {config.num_layers}-layer "
                           f"{config.architecture} model")
    if tuple(shape) != want:
        raise WeightsError(f"{where}tensor {name!r} has shape {tuple(shape)}, expected {want}")


def check_complete(found, shapes: dict, where: str = "") -> None:
    """Raise WeightsError naming the first expected tensor not in `found`."""
    missing = [n for n in shapes if n not in found]
    if missing:
        raise WeightsError(f"{where}missing tensor {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def load_gguf(path: str | os.PathLike) -> GGUFModel:
    """Read config, float32 HF-named weights, tokenizer and chat template from a GGUF file."""
    path = os.fspath(path)
    reader = open_gguf(path)
    try:
        config = config_from_gguf_metadata(reader)
    except ModelConfigError as e:
        raise ModelConfigError(f"{path}: {e}") from None
    shapes = expected_shapes(config)
    weights: dict[str, np.ndarray] = {}
    for name, w in iter_gguf_tensors(reader, config):
        check_tensor(name, w.shape, shapes, config, f"{path}: ")
        if name in weights:
            raise WeightsError(f"{path}: duplicate tensor {name!r}")
        weights[name] = w
    check_complete(weights, shapes, f"{path}: ")
    try:
        tokenizer = Tokenizer.from_gguf(reader)
    except ModelConfigError as e:
        raise ModelConfigError(f"{path}: {e}") from None
    metadata = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                              "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            continue
        try:
            metadata[key] = f.contents()
        except Exception:  # an exotic field type we do not need
            continue
    return GGUFModel(config=config, weights=weights, tokenizer=tokenizer,
                     chat_template=tokenizer.chat_template, path=path, metadata=metadata)
