"""Numerics against HF transformers: tiny random Llama (llama3 RoPE, sharded), Mistral and Qwen2
(q/k/v bias, tied embeddings) saved by transformers load here and, in float32, give HF's logits
(max abs diff <= 1e-4) and HF's 32 greedy tokens, through prefill, chunked prefill and decode.

The reference arrays are fixtures made by scripts/make_hf_fixtures.py; when torch and transformers
are importable they are recomputed live from the checkpoints instead.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from fineserve_jax import LLM, SamplingParams
from models.loader import load_model
from tests.helpers import FIXTURES, HF_MODELS, PagedForward

TOL = 1e-4  # float32 end to end; observed differences are ~1e-6


def reference(name: str) -> dict[str, np.ndarray]:
    model_dir = FIXTURES / name
    if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
        spec = importlib.util.spec_from_file_location(
            "make_hf_fixtures", FIXTURES.parents[2] / "scripts" / "make_hf_fixtures.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.compute_reference(str(model_dir))
    return dict(np.load(model_dir / "reference.npz"))


@pytest.fixture(scope="module", params=HF_MODELS)
def case(request):
    loaded = load_model(str(FIXTURES / request.param), dtype="float32")
    return request.param, loaded, reference(request.param)


def test_config_read_from_hf(case):
    name, loaded, _ = case
    cfg = loaded.config
    raw = json.loads((FIXTURES / name / "config.json").read_text())
    assert cfg.num_layers == raw["num_hidden_layers"] and cfg.num_kv_heads == raw["num_key_value_heads"]
    assert cfg.architecture == name
    assert cfg.attention_bias == (name == "qwen2")
    assert cfg.tie_word_embeddings == (name == "qwen2")
    assert (cfg.rope_scaling is not None) == (name == "llama")


@pytest.mark.parametrize("prompt", [0, 1])
@pytest.mark.parametrize("chunk", [None, 3])
def test_prefill_logits_match_hf(case, prompt, chunk):
    _, loaded, ref = case
    ids = ref[f"ids_{prompt}"]
    fwd = PagedForward(loaded.model)
    size = chunk or len(ids)
    logits = np.concatenate([fwd.step(ids[i:i + size]) for i in range(0, len(ids), size)])
    np.testing.assert_allclose(logits, ref[f"logits_{prompt}"], atol=TOL, rtol=0)


@pytest.mark.parametrize("prompt", [0, 1])
def test_decode_logits_and_greedy_tokens_match_hf(case, prompt):
    _, loaded, ref = case
    fwd = PagedForward(loaded.model)
    last = fwd.step(ref[f"ids_{prompt}"])[-1]
    tokens = []
    for step in range(32):
        np.testing.assert_allclose(last, ref[f"greedy_logits_{prompt}"][step], atol=TOL, rtol=0)
        tokens.append(int(np.argmax(last)))
        last = fwd.step([tokens[-1]])[-1]
    assert tokens == ref[f"greedy_{prompt}"].tolist()


def test_llm_generate_greedy_matches_hf(case):
    name, _, ref = case
    llm = LLM(str(FIXTURES / name), dtype="float32", kv_cache_bytes=8 << 20)
    outs = llm.generate(prompt_token_ids=[ref["ids_0"].tolist(), ref["ids_1"].tolist()],
                        sampling_params=SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert [o.token_ids for o in outs] == [ref["greedy_0"].tolist(), ref["greedy_1"].tolist()]
    assert all(o.finish_reason == "length" for o in outs)


def test_gguf_conversion_of_hf_model_matches_hf(tmp_path):
    """The Mistral fixture written as llama.cpp would (Q/K rows permuted, GGUF names and vocab)
    loads through the GGUF path and reproduces HF's logits and greedy tokens."""
    from models.hf_loader import read_hf_config, read_hf_weights
    from tests.gguf_writer import write_llama_gguf

    src = FIXTURES / "mistral"
    cfg = read_hf_config(src).replace(architecture="llama")
    weights = {k: v.astype(np.float32) for k, v in read_hf_weights(src).items()}
    tok = json.loads((src / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {a["content"] for a in tok["added_tokens"] if a["special"]}
    tokens = [t for t, _ in vocab]
    types = [3 if t in specials else 1 for t in tokens]
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    path = write_llama_gguf(tmp_path / "mistral.gguf", weights, cfg, vocab=(tokens, types, merges))

    ref = reference("mistral")
    loaded = load_model(path, dtype="float32")
    assert loaded.config.num_layers == cfg.num_layers and not loaded.config.tie_word_embeddings
    logits = PagedForward(loaded.model).step(ref["ids_0"])
    np.testing.assert_allclose(logits, ref["logits_0"], atol=TOL, rtol=0)
    llm = LLM(path, dtype="float32", kv_cache_bytes=8 << 20)
    out = llm.generate(prompt_token_ids=[ref["ids_1"].tolist()],
                       sampling_params=SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    assert out.token_ids == ref["greedy_1"].tolist()
