"""GGUF loader: round trips through tiny synthetic GGUF files, error paths, and the real SmolLM2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from gguf_writer import (  # noqa: E402
    find_smollm2_gguf, random_llama_weights, tiny_config, write_llama_gguf)

from models.config import ModelConfig  # noqa: E402
from models.errors import ModelConfigError, ModelLoadError, WeightsError  # noqa: E402
from models.gguf_loader import (  # noqa: E402
    GGUFModel, config_from_gguf_metadata, expected_shapes, gguf_raw_tensors, load_gguf, open_gguf,
    permute_qk_rows, unpermute_qk_rows)

Q = gguf.GGMLQuantizationType

SMOL = find_smollm2_gguf()
needs_smol = pytest.mark.slow  # the real model; setup.sh fetches it


@pytest.fixture(scope="module")
def smol_model() -> GGUFModel:
    return load_gguf(str(SMOL))


# ---- permutation ---------------------------------------------------------------------------


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(128 * 3, dtype=np.float32).reshape(128, 3)
    for heads in (1, 2, 4, 8):
        assert np.array_equal(unpermute_qk_rows(permute_qk_rows(w, heads), heads), w)
    # The permutation is not the identity: head 0's rows (first half, second half) become interleaved.
    p = permute_qk_rows(np.arange(8, dtype=np.float32), 1)
    assert p.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


# ---- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_f32_round_trip_exact(tmp_path, tied):
    config = tiny_config(tie_word_embeddings=tied)
    weights = random_llama_weights(config, seed=1)
    path = write_llama_gguf(tmp_path / "m.gguf", weights, config)
    model = load_gguf(path)
    assert model.config == config
    assert set(model.weights) == set(weights)
    assert ("lm_head.weight" in model.weights) is (not tied)
    for name, w in weights.items():
        got = model.weights[name]
        assert got.dtype == np.float32 and got.shape == w.shape, name
        assert np.array_equal(got, w), name  # exact: proves the Q/K un-permutation
    assert model.chat_template is not None and model.chat_template == model.tokenizer.chat_template


def test_qwen2_biases_not_permuted(tmp_path):
    config = tiny_config(architecture="qwen2", attention_bias=True)
    weights = random_llama_weights(config, seed=2)
    assert "model.layers.0.self_attn.q_proj.bias" in weights
    path = write_llama_gguf(tmp_path / "q.gguf", weights, config)
    model = load_gguf(path)
    assert model.config.architecture == "qwen2" and model.config.attention_bias
    for name, w in weights.items():
        assert np.array_equal(model.weights[name], w), name


@pytest.mark.parametrize("qtype,tol", [(Q.Q8_0, 0.6 / 127), (Q.Q4_0, 1 / 8 * 0.51 * 2), (Q.Q4_1, 1 / 15 * 0.51 * 2)])
def test_quantized_round_trip_within_format_error(tmp_path, qtype, tol):
    config = tiny_config()
    weights = random_llama_weights(config, seed=3)
    path = write_llama_gguf(tmp_path / "q.gguf", weights, config, qtype=qtype)
    model = load_gguf(path)
    reader = open_gguf(path)
    raw = gguf_raw_tensors(reader)
    for name, w in weights.items():
        got = model.weights[name]
        assert got.shape == w.shape and got.dtype == np.float32
        if w.ndim == 1:
            assert np.array_equal(got, w)
            assert raw[name].qtype == Q.F32
            continue
        # Error bound per 32-wide block, as a fraction of the block absmax: Q8_0 half a step of
        # absmax/127 (+ fp16 rounding of the scale), Q4_0 absmax/8 (the clipped +8 level),
        # Q4_1 half a step of range/15.
        blocks = np.abs(w).reshape(w.shape[0], -1, 32).max(-1, keepdims=True)
        err = np.abs(got - w).reshape(w.shape[0], -1, 32)
        assert np.all(err <= tol * blocks + 1e-6), name
        # Raw blocks: same type, logical shape, and (un-permuted) they dequantize to the same values.
        assert raw[name].qtype == qtype and raw[name].shape == w.shape
        assert np.array_equal(gguf.quants.dequantize(raw[name].data, qtype), got), name


def test_partially_quantized(tmp_path):
    config = tiny_config(tie_word_embeddings=True)
    weights = random_llama_weights(config, seed=4)
    path = write_llama_gguf(tmp_path / "p.gguf", weights, config, qtype=Q.Q8_0,
                            quantize_names=["model.embed_tokens.weight"])
    model = load_gguf(path)
    assert not np.array_equal(model.weights["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])
    assert np.array_equal(model.weights["model.layers.1.self_attn.q_proj.weight"],
                          weights["model.layers.1.self_attn.q_proj.weight"])


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    import math
    config = tiny_config(head_dim=16, rope_theta=500000.0)
    theta, hd, factor, low, high, orig = 500000.0, 16, 8.0, 1.0, 4.0, 8192
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    wl = 2 * math.pi / inv
    smooth = (orig / wl - low) / (high - low)
    freqs = np.where(wl < orig / high, 1.0, np.where(wl > orig / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    path = write_llama_gguf(tmp_path / "l3.gguf", random_llama_weights(config), config,
                            extra_tensors={"rope_freqs.weight": freqs.astype(np.float32)})
    rs = load_gguf(path).config.rope_scaling
    assert rs is not None and rs.factor == pytest.approx(8.0)
    assert (rs.low_freq_factor, rs.high_freq_factor, rs.original_max_position_embeddings) == (1.0, 4.0, 8192)


# ---- errors --------------------------------------------------------------------------------


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 definitely not gguf" * 10)
    with pytest.raises(ModelLoadError, match="not a GGUF file") as e:
        load_gguf(str(p))
    assert str(p) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_gguf(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("keep_fraction", [0.5, 0.9, 0.999])
def test_truncated_file(tmp_path, keep_fraction):
    config = tiny_config()
    path = write_llama_gguf(tmp_path / "t.gguf", random_llama_weights(config), config)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(WeightsError, match="truncated") as e:
        load_gguf(path)
    assert path in str(e.value)


def test_truncated_header(tmp_path):
    config = tiny_config()
    path = write_llama_gguf(tmp_path / "t.gguf", random_llama_weights(config), config)
    Path(path).write_bytes(Path(path).read_bytes()[:200])  # cut inside the metadata
    with pytest.raises(WeightsError, match="truncated") as e:
        load_gguf(path)
    assert path in str(e.value)


@pytest.mark.parametrize("key", ["llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
                                 "llama.attention.head_count", "llama.context_length",
                                 "llama.attention.layer_norm_rms_epsilon"])
def test_missing_metadata_key(tmp_path, key):
    config = tiny_config()
    path = write_llama_gguf(tmp_path / "m.gguf", random_llama_weights(config), config, skip_keys=[key])
    with pytest.raises(ModelConfigError, match=key.replace(".", r"\.")):
        load_gguf(path)


def test_unsupported_architecture(tmp_path):
    config = tiny_config()
    path = write_llama_gguf(tmp_path / "m.gguf", random_llama_weights(config), config, architecture="mamba")
    with pytest.raises(ModelConfigError, match="mamba"):
        load_gguf(path)


def test_shape_mismatch_names_tensor(tmp_path):
    config = tiny_config()
    weights = random_llama_weights(config)
    weights["model.layers.1.mlp.up_proj.weight"] = np.zeros((96, 64), np.float32)
    path = write_llama_gguf(tmp_path / "m.gguf", weights, config)
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_gguf(path)


def test_missing_tensor_names_tensor(tmp_path):
    config = tiny_config()
    weights = random_llama_weights(config)
    del weights["model.layers.0.post_attention_layernorm.weight"]
    path = write_llama_gguf(tmp_path / "m.gguf", weights, config)
    with pytest.raises(WeightsError, match=r"model\.layers\.0\.post_attention_layernorm\.weight"):
        load_gguf(path)


def test_unsupported_tokenizer_model(tmp_path):
    config = tiny_config()
    path = write_llama_gguf(tmp_path / "m.gguf", random_llama_weights(config), config,
                            skip_keys=["tokenizer.ggml.model"])
    with pytest.raises(ModelConfigError, match="tokenizer.ggml.model"):
        load_gguf(path)


# ---- real SmolLM2 --------------------------------------------------------------------------


@needs_smol
def test_smollm2_config():
    reader = open_gguf(str(SMOL))
    c = config_from_gguf_metadata(reader)
    assert c == ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, rope_scaling=None,
        max_position_embeddings=8192, tie_word_embeddings=True, attention_bias=False, bos_token_id=1,
        eos_token_ids=(2,), sliding_window=None)
    raw = gguf_raw_tensors(reader, c)
    kinds = [r.qtype for r in raw.values()]
    assert kinds.count(Q.Q4_1) == 210 and kinds.count(Q.Q8_0) == 1
    assert raw["model.embed_tokens.weight"].qtype == Q.Q8_0
    assert raw["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert raw["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)


@needs_smol
def test_smollm2_load(smol_model):
    m = smol_model
    assert m.config.num_layers == 30 and m.config.tie_word_embeddings
    assert "lm_head.weight" not in m.weights
    assert len(m.weights) == 2 + 30 * 9
    assert set(m.weights) == set(expected_shapes(m.config))
    assert m.weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert m.weights["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert m.weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert all(w.dtype == np.float32 and np.isfinite(w).all() for w in m.weights.values())
    assert m.chat_template and "<|im_start|>" in m.chat_template
    assert m.tokenizer.vocab_size == 49152


@needs_smol
def test_smollm2_qk_unpermuted(smol_model):
    """In HF (rotate-half) layout, RoPE rotates dims (j, j + 32) of each head together, and trained
    Q/K rows show the same per-frequency norm profile in both halves. After un-permuting, the two
    halves' row norms correlate strongly; in llama.cpp's interleaved order they do not."""
    def half_corr(w, heads):
        n = np.linalg.norm(w, axis=1).reshape(heads, 2, 32)
        return np.corrcoef(n[:, 0].ravel(), n[:, 1].ravel())[0, 1]

    c = smol_model.config
    ours, theirs = [], []
    for layer in range(1, c.num_layers):  # layer 0 is an outlier in both layouts
        for proj, heads in (("q", c.num_heads), ("k", c.num_kv_heads)):
            w = smol_model.weights[f"model.layers.{layer}.self_attn.{proj}_proj.weight"]
            ours.append(half_corr(w, heads))
            theirs.append(half_corr(permute_qk_rows(w, heads), heads))
    assert np.mean(ours) > 0.4 and np.mean(ours) > np.mean(theirs) + 0.2, (np.mean(ours), np.mean(theirs))


def _reference_logits(config: ModelConfig, w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Plain numpy Llama forward (HF rotate-half RoPE, GQA, SwiGLU); logits of the last position."""
    c, T, hd = config, len(ids), config.head_dim

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.rms_norm_eps) * g

    ang = np.arange(T)[:, None] * (1.0 / c.rope_theta ** (np.arange(0, hd, 2) / hd))[None]
    cos, sin = np.concatenate([np.cos(ang)] * 2, -1)[:, None], np.concatenate([np.sin(ang)] * 2, -1)[:, None]

    def rope(q):
        return q * cos + np.concatenate([-q[..., hd // 2:], q[..., :hd // 2]], -1) * sin

    mask = np.triu(np.full((T, T), -np.inf), 1)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, c.num_heads, hd))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, c.num_kv_heads, hd))
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, c.num_kv_heads, hd)
        rep = c.num_heads // c.num_kv_heads
        k, v = np.repeat(k, rep, 1), np.repeat(v, rep, 1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", s, v).reshape(T, -1) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        a = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + (a / (1 + np.exp(-a)) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return rms(x[-1], w["model.norm.weight"]) @ head.T


@needs_smol
def test_smollm2_reference_forward_says_paris(smol_model):
    """End-to-end check of the loaded weights (incl. the Q/K un-permutation) with a numpy forward:
    after "...capital of France?" + "The capital of France is", the next token is " Paris"."""
    tok = smol_model.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(prompt + "The capital of France is")
    logits = _reference_logits(smol_model.config, smol_model.weights, ids)
    assert tok.decode([int(np.argmax(logits))]) == " Paris"
