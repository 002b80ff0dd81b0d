"""Serving pre-quantized checkpoints: AWQ / GPTQ / FP8 HF directories and GGUF Q4_0/Q8_0 blocks
load straight into QuantLinears, and compute exactly what the dequantized float model computes.

The HF checkpoints are the tiny llama fixture's float weights, quantized here by round-to-nearest
and packed with test_quant_import's reference packers (written from the upstream packers)."""

from __future__ import annotations

import gc
import json
import shutil

import gguf
import jax
import numpy as np
import pytest

from fineserve_jax import LLM, SamplingParams
from models.errors import ModelConfigError, WeightsError
from models.hf_loader import read_hf_config, read_hf_weights
from models.loader import load_model, resolve_model_path
from models.quant_import import read_hf_quantized
from models.quant_linear import QuantLinear
from models.weights import LAYER_LINEARS, model_from_hf_weights
from pallas_kernels.quant_formats import QuantizedTensor, dequantize
from tests.gguf_writer import random_llama_weights, tiny_config, write_llama_gguf
from tests.helpers import FIXTURES, PagedForward
from tests.test_quant_import import E4M3, awq_pack, gptq_pack_cols, gptq_pack_rows, write_safetensors

LLAMA = FIXTURES / "llama"
GROUP = 64
Q = gguf.GGMLQuantizationType


def rtn_int4(kernel: np.ndarray, g: int, zmin: int):
    """Asymmetric round-to-nearest of a float32 kernel [in, out] in groups of g along `in`:
    q [in, out] in 0..15, integer zeros [in/g, out] in zmin..15, float16 scales [in/g, out]."""
    k, n = kernel.shape
    grouped = kernel.reshape(k // g, g, n)
    lo = np.minimum(grouped.min(1), 0.0)
    hi = np.maximum(grouped.max(1), 0.0)
    s = ((hi - lo) / 15.0).astype(np.float16)
    s = np.where(s == 0, np.float16(1), s)
    s32 = s.astype(np.float32)
    z = np.clip(np.round(-lo / s32), zmin, 15).astype(np.int64)
    q = np.clip(np.round(grouped / s32[:, None, :]) + z[:, None, :], 0, 15).astype(np.int64).reshape(k, n)
    return q, z, s


def write_quantized_fixture(tmp_path, method: str):
    """The llama fixture quantized with `method` ("awq", "gptq" v1, "fp8" per channel, with static
    input scales we ignore) into tmp_path/method, tokenizer files copied."""
    float_weights = read_hf_weights(LLAMA)
    tensors = {}
    for name, w in float_weights.items():
        module = name[: -len(".weight")]
        linear = name.endswith(".weight") and module.rsplit(".", 1)[-1] in LAYER_LINEARS
        if not linear:  # embeddings, norms, lm_head stay float (AWQ/GPTQ/llm-compressor defaults)
            tensors[name] = np.asarray(w, np.float32)
            continue
        if method == "fp8":
            scale = (np.abs(w).max(axis=1, keepdims=True) / 448.0).astype(np.float32)
            tensors[name] = (w / scale).astype(E4M3)
            tensors[module + ".weight_scale"] = scale
            tensors[module + ".input_scale"] = np.asarray([0.05], np.float32)
            continue
        q, z, s = rtn_int4(np.ascontiguousarray(w.T, np.float32), GROUP, zmin=1 if method == "gptq" else 0)
        tensors[module + ".scales"] = s
        if method == "awq":
            tensors[module + ".qweight"] = awq_pack(q)
            tensors[module + ".qzeros"] = awq_pack(z)
        else:  # GPTQ v1 stores zero - 1
            tensors[module + ".qweight"] = gptq_pack_rows(q)
            tensors[module + ".qzeros"] = gptq_pack_cols(z - 1)
            tensors[module + ".g_idx"] = (np.arange(q.shape[0]) // GROUP).astype(np.int32)
    qcfg = {
        "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm", "zero_point": True},
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False},
        "fp8": {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                    "num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"},
                    "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor",
                                          "dynamic": False}}}},
    }[method]
    d = tmp_path / method
    d.mkdir()
    config = json.loads((LLAMA / "config.json").read_text())
    config["quantization_config"] = qcfg
    (d / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(LLAMA / f, d / f)
    write_safetensors(d / "model.safetensors", tensors)
    return d, tensors


def dequantized_reference(d):
    """A float32 model of the checkpoint's weights, every imported QuantizedTensor dequantized."""
    weights, _ = read_hf_quantized(d)
    dense = {n: (np.asarray(dequantize(w)).T if isinstance(w, QuantizedTensor) else w) for n, w in weights.items()}
    return model_from_hf_weights(read_hf_config(d), dense, np.float32)


def assert_same_logits(out, ref, rtol=1e-5):
    """Equal up to float32 rounding."""
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


@pytest.mark.parametrize("method, fmt, act", [("awq", "int4", None), ("gptq", "int4", None), ("fp8", "fp8", "fp8")])
def test_prequantized_checkpoint_computes_the_dequantized_model(tmp_path, method, fmt, act):
    d, _ = write_quantized_fixture(tmp_path, method)
    loaded = load_model(str(d), dtype="float32")
    want_name = {"awq": "awq-w4a16", "gptq": "gptq-w4a16", "fp8": "fp8-checkpoint"}[method]
    p = loaded.precision
    assert (p.name, p.weight_format, p.activation_format, p.kv_format) == (want_name, fmt, act, "bf16")
    assert p.group_size == (GROUP if fmt == "int4" else None)
    for name in LAYER_LINEARS:
        lin = getattr(loaded.model.layers, name)
        assert isinstance(lin, QuantLinear), name
        assert (lin.fmt, lin.act_format, lin.group_size) == (fmt, act, GROUP if fmt == "int4" else None)
        assert lin.values[...].shape[0] == loaded.config.num_layers
    assert not isinstance(loaded.model.lm_head, QuantLinear)

    rng = np.random.default_rng()
    tokens = rng.integers(0, loaded.config.vocab_size, 24)
    ref = PagedForward(dequantized_reference(d)).step(tokens)
    out = PagedForward(loaded.model, kv_dtype=loaded.kv_dtype).step(tokens)
    if act is None:
        assert_same_logits(out, ref)
    else:
        # Per-token FP8 activations are an approximation; with them switched off the packed
        # weights must give exactly the dequantized model.
        rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        assert 0 < rel < 0.2, rel
        for name in LAYER_LINEARS:
            getattr(loaded.model.layers, name).act_format = None
        assert_same_logits(PagedForward(loaded.model, kv_dtype=loaded.kv_dtype).step(tokens), ref)


def test_llm_serves_prequantized_checkpoint(tmp_path):
    d, _ = write_quantized_fixture(tmp_path, "awq")
    llm = LLM(str(d), kv_cache_bytes=4 << 20, max_model_len=64)  # precision "auto", bf16 compute
    assert llm.precision.name == "awq-w4a16"
    out = llm.generate(["hello world"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert len(out.token_ids) == 6


def test_prequantized_precision_rules(tmp_path):
    d, _ = write_quantized_fixture(tmp_path, "awq")
    with pytest.raises(ModelConfigError, match=r"already quantized with awq.*precision='auto'"):
        load_model(str(d), precision="w8a8")
    with pytest.raises(ModelConfigError, match="already quantized with awq"):
        LLM(str(d), precision="bf16")
    # The same weight/activation formats are accepted, and kv_dtype applies in every case.
    same = load_model(str(d), dtype="float32", precision="w4a16", kv_dtype="int8")
    assert same.precision.weight_format == "int4" and same.kv_dtype == "int8"
    assert load_model(str(d), dtype="float32", kv_dtype="fp8").kv_dtype == "fp8"


def test_corrupted_qweight_shape_leaves_nothing_loaded(tmp_path):
    d, tensors = write_quantized_fixture(tmp_path, "awq")
    name = "model.layers.1.self_attn.k_proj.qweight"
    tensors[name] = tensors[name][:, :-1]
    write_safetensors(d / "model.safetensors", tensors)
    gc.collect()
    before = sum(a.nbytes for a in jax.live_arrays())
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.self_attn\.k_proj"):
        load_model(str(d))
    gc.collect()
    assert sum(a.nbytes for a in jax.live_arrays()) <= before


# ---- GGUF ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype, fmt, mixed", [(Q.Q4_0, "int4", False), (Q.Q8_0, "int8", False),
                                               (Q.Q4_0, "int4", True)])
def test_gguf_native_matches_dequantized(tmp_path, qtype, fmt, mixed):
    config = tiny_config()
    weights = random_llama_weights(config, seed=int(np.random.default_rng().integers(1 << 30)), scale=0.2)
    float_down = "model.layers.1.mlp.down_proj.weight"
    names = [n for n, w in weights.items() if w.ndim == 2 and (not mixed or n != float_down)]
    path = write_llama_gguf(tmp_path / "m.gguf", weights, config, qtype=qtype, quantize_names=names)
    native = load_model(path, dtype="float32", precision="native")
    auto = load_model(path, dtype="float32")  # today's behaviour: dequantized to float32
    assert auto.precision.name == "bf16"
    assert native.precision.name == ("gguf-w4a16" if fmt == "int4" else "gguf-w8a16")
    for name in LAYER_LINEARS:
        lin = getattr(native.model.layers, name)
        if mixed and name == "down_proj":  # Q4_0 in layer 0, F32 in layer 1: dense for all layers
            assert not isinstance(lin, QuantLinear)
            continue
        assert isinstance(lin, QuantLinear) and (lin.fmt, lin.group_size, lin.act_format) == (fmt, 32, None), name
    assert not isinstance(native.model.lm_head, QuantLinear)  # dequantized to the model dtype
    tokens = np.random.default_rng().integers(0, config.vocab_size, 20)
    ref = PagedForward(auto.model).step(tokens)
    assert_same_logits(PagedForward(native.model, kv_dtype=native.kv_dtype).step(tokens), ref)


@pytest.mark.slow
def test_smollm2_native_q4_1_answers():
    resolve_model_path("smollm2-135m")  # fails (rather than skips) when setup.sh was not run
    llm = LLM("smollm2-135m", precision="native", max_model_len=1024, kv_cache_bytes=64 << 20)
    assert llm.precision.name == "gguf-w4a16"  # every projection a QuantLinear (int4, group 32)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=24))[0]
    assert "Paris" in out.text, out.text
