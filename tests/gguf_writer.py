"""Test helper: write tiny llama-family GGUF files the way llama.cpp's converter does.

`write_llama_gguf(path, weights, config)` takes HF-named float32 weights, applies llama.cpp's Q/K
row permutation, renames to GGUF names and writes them as F32 (or Q8_0 / Q4_0 / Q4_1 for 2-D
matrices), with the metadata and a small byte-level BPE vocabulary.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import gguf
import numpy as np

from models.config import ModelConfig



def find_smollm2_gguf() -> Path:
    """Where scripts/setup.sh puts the real SmolLM2 GGUF (the loader's own resolution). Tests that
    use it fail, rather than skip, when it is missing: setup is part of running the suite."""
    from models.loader import KNOWN_MODELS, model_cache_dir

    return model_cache_dir() / KNOWN_MODELS["smollm2-135m"]


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_HF_TO_GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_HF_TO_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_bpe_vocab(merges: Iterable[tuple[str, str]] = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"),
                                                          ("Ġ", "a"), ("e", "r"), ("Ġ", "w"), ("o", "r"))):
    """(tokens, token_types, merges) for a byte-level BPE vocab: special tokens, then all 256
    byte symbols, then one token per merge. token_type 3 = control, 1 = normal."""
    tokens = list(SPECIAL_TOKENS) + list(bytes_to_unicode().values())
    types = [3] * len(SPECIAL_TOKENS) + [1] * 256
    merge_strs = []
    for a, b in merges:
        tokens.append(a + b)
        types.append(1)
        merge_strs.append(f"{a} {b}")
    return tokens, types, merge_strs


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.LlamaModel.permute (HF rotate-half -> GGUF interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_gguf_name(name: str) -> str:
    if name in _HF_TO_GGUF_GLOBAL:
        return _HF_TO_GGUF_GLOBAL[name]
    m = _LAYER_RE.match(name)
    if not m or m.group(2) not in _HF_TO_GGUF_BLOCK:
        raise KeyError(name)
    return f"blk.{m.group(1)}.{_HF_TO_GGUF_BLOCK[m.group(2)]}.{m.group(3)}"


def random_llama_weights(config: ModelConfig, seed: int = 0, scale: float = 0.5) -> dict[str, np.ndarray]:
    """Random float32 HF-named weights matching `config` (uses models.gguf_loader.expected_shapes)."""
    from models.gguf_loader import expected_shapes
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in expected_shapes(config).items()}


def tiny_config(**overrides) -> ModelConfig:
    """A small llama config whose matrices have rows divisible by 32 (quantizable)."""
    base = dict(architecture="llama", vocab_size=len(SPECIAL_TOKENS) + 256 + 8, hidden_size=64,
                intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
                tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,))
    base.update(overrides)
    return ModelConfig(**base)


def write_llama_gguf(path, weights: dict[str, np.ndarray], config: ModelConfig, *,
                     qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
                     quantize_names: Iterable[str] | None = None,
                     chat_template: str | None = CHATML_TEMPLATE,
                     skip_keys: Iterable[str] = (), architecture: str | None = None,
                     vocab: tuple[list, list, list] | None = None, add_bos_token: bool | None = False,
                     extra_tensors: dict[str, np.ndarray] | None = None) -> str:
    """Write `weights` (HF names, float32, HF layout) as a GGUF file at `path`.

    qtype: storage type for 2-D matrices named in `quantize_names` (default: all 2-D matrices);
    1-D tensors are always F32. skip_keys: metadata keys to leave out (to test error paths).
    architecture: overrides `general.architecture` (defaults to config.architecture).
    """
    arch = architecture or config.architecture
    skip = set(skip_keys)
    w = gguf.GGUFWriter(str(path), arch)
    p = arch + "."

    def kv(key, fn, *args):
        if key not in skip:
            fn(*args)

    kv(p + "block_count", w.add_block_count, config.num_layers)
    kv(p + "context_length", w.add_context_length, config.max_position_embeddings)
    kv(p + "embedding_length", w.add_embedding_length, config.hidden_size)
    kv(p + "feed_forward_length", w.add_feed_forward_length, config.intermediate_size)
    kv(p + "attention.head_count", w.add_head_count, config.num_heads)
    kv(p + "attention.head_count_kv", w.add_head_count_kv, config.num_kv_heads)
    kv(p + "attention.layer_norm_rms_epsilon", w.add_layer_norm_rms_eps, config.rms_norm_eps)
    kv(p + "rope.freq_base", w.add_rope_freq_base, config.rope_theta)
    kv(p + "rope.dimension_count", w.add_rope_dimension_count, config.head_dim)
    kv(p + "vocab_size", w.add_vocab_size, config.vocab_size)

    tokens, types, merges = vocab or tiny_bpe_vocab()
    kv("tokenizer.ggml.model", w.add_tokenizer_model, "gpt2")
    kv("tokenizer.ggml.pre", w.add_tokenizer_pre, "default")
    kv("tokenizer.ggml.tokens", w.add_token_list, tokens)
    kv("tokenizer.ggml.token_type", w.add_token_types, types)
    kv("tokenizer.ggml.merges", w.add_token_merges, merges)
    if config.bos_token_id is not None:
        kv("tokenizer.ggml.bos_token_id", w.add_bos_token_id, config.bos_token_id)
    if config.eos_token_ids:
        kv("tokenizer.ggml.eos_token_id", w.add_eos_token_id, config.eos_token_ids[0])
    if add_bos_token is not None:
        kv("tokenizer.ggml.add_bos_token", w.add_add_bos_token, add_bos_token)
    if chat_template is not None:
        kv("tokenizer.chat_template", w.add_chat_template, chat_template)

    quantize = None if quantize_names is None else set(quantize_names)
    for name, arr in weights.items():
        arr = np.asarray(arr, dtype=np.float32)
        if config.architecture == "llama" and ".self_attn.q_proj." in name:
            arr = llama_permute(arr, config.num_heads)
        elif config.architecture == "llama" and ".self_attn.k_proj." in name:
            arr = llama_permute(arr, config.num_kv_heads)
        gname = hf_to_gguf_name(name)
        if (arr.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32
                and (quantize is None or name in quantize)):
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(arr))
    for gname, arr in (extra_tensors or {}).items():
        w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
