"""Importing pre-quantized checkpoints (AWQ, GPTQ v1/v2, FP8, GGUF Q4_0/Q4_1/Q8_0) into our formats.

Every packed checkpoint here is built by packing known random integers (q, zero) and scales with
explicit loops written from the upstream packers (AutoAWQ `WQLinear_GEMM.from_linear`, AutoGPTQ
`QuantLinear.pack`), independently of models/quant_import.py; the import must dequantize to
exactly `(q - z) * s`. GGUF blocks are checked against `gguf.quants.dequantize` on the same bytes.
Random data are fresh each run (np.random.default_rng() without a seed).
"""

from __future__ import annotations

import json
import os
import struct
import sys

import gguf
import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from gguf_writer import random_llama_weights, tiny_config, write_llama_gguf  # noqa: E402

from models.errors import ModelConfigError, WeightsError  # noqa: E402
from models.gguf_loader import RawTensor, load_gguf, open_gguf  # noqa: E402
from models.quant_import import (  # noqa: E402
    QuantInfo, awq_to_quantized, fp8_to_quantized, gguf_block_to_quantized, gguf_quantized_tensors,
    gptq_to_quantized, is_linear_weight, parse_quantization_config, read_hf_quantized)
from pallas_kernels.quant_formats import QuantizedTensor, dequantize, pack_int4, weight_bytes  # noqa: E402

Q = gguf.GGMLQuantizationType
E4M3 = ml_dtypes.float8_e4m3fn


def deq(qt: QuantizedTensor) -> np.ndarray:
    return np.asarray(dequantize(qt))


# ---- independent reference packers -----------------------------------------------------------


def awq_pack(intweight: np.ndarray) -> np.ndarray:
    """AutoAWQ GEMM: word `col` of each row holds columns col*8 + order_map[i] in bits 4i."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, cols = intweight.shape
    packed = np.zeros((rows, cols // 8), np.uint32)
    for col in range(cols // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + order_map[i]].astype(np.uint32) << np.uint32(4 * i)
    return packed.view(np.int32)


def gptq_pack_rows(intweight: np.ndarray) -> np.ndarray:
    """AutoGPTQ qweight: word `row` holds input rows 8*row .. 8*row+7, row 8*row+j in bits 4j."""
    rows, cols = intweight.shape
    packed = np.zeros((rows // 8, cols), np.uint32)
    for row in range(rows // 8):
        for j in range(8):
            packed[row] |= intweight[8 * row + j].astype(np.uint32) << np.uint32(4 * j)
    return packed.view(np.int32)


def gptq_pack_cols(zeros: np.ndarray) -> np.ndarray:
    """AutoGPTQ qzeros: word `col` holds columns 8*col .. 8*col+7, column 8*col+j in bits 4j."""
    rows, cols = zeros.shape
    packed = np.zeros((rows, cols // 8), np.uint32)
    for col in range(cols // 8):
        for j in range(8):
            packed[:, col] |= zeros[:, 8 * col + j].astype(np.uint32) << np.uint32(4 * j)
    return packed.view(np.int32)


def random_int4_problem(rng, k: int, n: int, g: int, zmin: int = 0):
    """q [k, n] in 0..15, integer zeros [k/g, n] in zmin..15, f16 scales [k/g, n], and the float32
    kernel-layout reference (q - z) * s."""
    q = rng.integers(0, 16, size=(k, n))
    z = rng.integers(zmin, 16, size=(k // g, n))
    s = rng.uniform(1e-3, 0.2, size=(k // g, n)).astype(np.float16)
    ref = (q.astype(np.float32) - np.repeat(z, g, 0).astype(np.float32)) * np.repeat(s, g, 0).astype(np.float32)
    return q, z, s, ref


# ---- AWQ / GPTQ / FP8 single tensors ---------------------------------------------------------


@pytest.mark.parametrize("k,n,g", [(64, 32, 32), (128, 48, 64), (256, 16, 128), (64, 24, -1)])
def test_awq_matches_reference(k, n, g):
    rng = np.random.default_rng()
    gs = k if g == -1 else g
    q, z, s, ref = random_int4_problem(rng, k, n, gs)
    qt = awq_to_quantized(awq_pack(q), awq_pack(z), s, g)
    assert qt.fmt == "int4" and qt.axis == 0 and qt.group_size == gs and qt.shape == (k, n)
    assert qt.values.dtype == np.uint8 and qt.values.shape == (k // 2, n)
    assert qt.scales.dtype == np.float32 and qt.scales.shape == (k // gs, n) == qt.zeros.shape
    # The stored bytes are exactly our pack_int4 layout of the logical q.
    assert np.array_equal(qt.values, np.asarray(pack_int4(q, axis=0)))
    assert np.array_equal(deq(qt), ref)
    assert np.array_equal(deq(qt).T, ref.T)  # HF [out, in] view


def test_awq_order_hand_checked():
    # One word, columns 0..7 holding values 1..8: AWQ stores nibbles [c0, c2, c4, c6, c1, c3, c5, c7].
    q = np.arange(1, 9).reshape(1, 8).repeat(2, 0)
    word = awq_pack(q)[0, 0].view(np.uint32)
    assert int(word) == 0x86427531
    qt = awq_to_quantized(awq_pack(q), np.zeros((1, 1), np.int32), np.ones((1, 8), np.float16), -1)
    assert deq(qt)[0].tolist() == list(range(1, 9))


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("k,n,g", [(64, 32, 32), (128, 40, 128), (256, 16, 64), (64, 8, -1)])
def test_gptq_matches_reference(fmt, k, n, g):
    rng = np.random.default_rng()
    gs = k if g == -1 else g
    # v1 stores zero - 1 unmasked (AutoGPTQ): zero 0 would corrupt the word, so v1 zeros are >= 1.
    q, z, s, ref = random_int4_problem(rng, k, n, gs, zmin=1 if fmt == "gptq" else 0)
    stored = z - 1 if fmt == "gptq" else z
    g_idx = (np.arange(k) // gs).astype(np.int32)
    qt = gptq_to_quantized(gptq_pack_rows(q), gptq_pack_cols(stored), s, g_idx, g, fmt)
    assert qt.fmt == "int4" and qt.shape == (k, n) and qt.group_size == gs
    assert np.array_equal(qt.values, np.asarray(pack_int4(q, axis=0)))
    assert np.array_equal(qt.zeros, z.astype(np.float32))
    assert np.array_equal(deq(qt), ref)
    # g_idx may be absent (trivial order assumed).
    assert np.array_equal(deq(gptq_to_quantized(gptq_pack_rows(q), gptq_pack_cols(stored), s, None, g, fmt)), ref)


def test_gptq_v1_and_v2_differ_by_one():
    rng = np.random.default_rng()
    q, z, s, _ = random_int4_problem(rng, 64, 16, 32, zmin=1)
    a = gptq_to_quantized(gptq_pack_rows(q), gptq_pack_cols(z), s, None, 32, "gptq")
    b = gptq_to_quantized(gptq_pack_rows(q), gptq_pack_cols(z), s, None, 32, "gptq_v2")
    assert np.array_equal(a.zeros, b.zeros + 1)


def test_gptq_act_order_rejected():
    rng = np.random.default_rng()
    q, z, s, _ = random_int4_problem(rng, 64, 16, 32)
    g_idx = rng.permutation(np.arange(64) // 32).astype(np.int32)
    assert not np.array_equal(g_idx, np.arange(64) // 32)
    with pytest.raises(WeightsError, match="act-order"):
        gptq_to_quantized(gptq_pack_rows(q), gptq_pack_cols(z), s, g_idx, 32, name="layers.0.q_proj")


def test_gptq_bad_bits_format_and_shapes():
    rng = np.random.default_rng()
    q, z, s, _ = random_int4_problem(rng, 64, 16, 32)
    qw, qz = gptq_pack_rows(q), gptq_pack_cols(z)
    with pytest.raises(WeightsError, match="8-bit GPTQ"):
        gptq_to_quantized(qw, qz, s, None, 32, bits=8)
    with pytest.raises(ModelConfigError, match="checkpoint_format"):
        gptq_to_quantized(qw, qz, s, None, 32, "marlin")
    with pytest.raises(WeightsError, match="scales"):
        gptq_to_quantized(qw, qz, s[:1], None, 32, name="m")
    with pytest.raises(WeightsError, match="int32"):
        gptq_to_quantized(qw.astype(np.float32), qz, s, None, 32)
    with pytest.raises(WeightsError, match="multiple of group_size"):
        gptq_to_quantized(qw, qz, s, None, 48)


@pytest.mark.parametrize("scale_shape", ["scalar", "[1]", "[out]", "[out, 1]"])
def test_fp8_matches_reference(scale_shape):
    rng = np.random.default_rng()
    n_out, k = 48, 64
    w = (rng.standard_normal((n_out, k)) * 50).astype(np.float32).astype(E4M3)
    if scale_shape in ("[out]", "[out, 1]"):  # per channel
        s = rng.uniform(1e-4, 1e-2, size=(n_out,)).astype(np.float32)
        scale = s if scale_shape == "[out]" else s[:, None]
        ref = w.astype(np.float32) * s[:, None]
    else:  # per tensor
        s = np.float32(rng.uniform(1e-4, 1e-2))
        scale = np.asarray(s) if scale_shape == "scalar" else np.asarray([s])
        ref = w.astype(np.float32) * s
    qt = fp8_to_quantized(w, scale)
    assert qt.fmt == "fp8" and qt.axis == 0 and qt.values.dtype == E4M3
    assert qt.values.shape == (k, n_out) and qt.scales.shape == (1, n_out) and qt.zeros is None
    assert np.array_equal(deq(qt).T, ref)


def test_fp8_errors():
    w = np.zeros((256, 256), E4M3)
    with pytest.raises(WeightsError, match="block-wise FP8 not supported"):
        fp8_to_quantized(w, np.ones((2, 2), np.float32), name="model.layers.0.mlp.up_proj")
    with pytest.raises(WeightsError, match="float8_e4m3fn"):
        fp8_to_quantized(np.zeros((4, 4), np.float16), np.float32(1))
    with pytest.raises(WeightsError, match="weight_scale has shape"):
        fp8_to_quantized(w, np.ones((7,), np.float32))


# ---- GGUF blocks -------------------------------------------------------------------------------


def rand_rows(rng, rows, cols):
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x *= np.exp(rng.uniform(-3, 3, size=(rows, 1))).astype(np.float32)
    x[0] = 0.0  # an all-zero row: d == 0 blocks
    x[1, :32] = 0.75  # a constant block: Q4_1 d == 0 with m != 0
    x[2] += 5.0  # all-positive rows: Q4_1 offsets far from 0
    return x


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_gguf_blocks_match_gguf_dequantize(qtype):
    rng = np.random.default_rng()
    rows, cols = 40, 128
    data = gguf.quants.quantize(rand_rows(rng, rows, cols), qtype)
    ref = gguf.quants.dequantize(data, qtype)
    qt = gguf_block_to_quantized(RawTensor(qtype, data))
    assert qt.shape == (cols, rows) and qt.axis == 0 and qt.group_size == 32
    got = deq(qt).T
    if qtype == Q.Q4_1:
        check_q4_1(got, ref, data)
    else:  # (q - 8) * d and q * d are computed exactly as gguf does
        assert np.array_equal(got, ref)
    assert qt.fmt == ("int8" if qtype == Q.Q8_0 else "int4")


def check_q4_1(got, ref, data):
    """Q4_1 is x = q*d + m; ours is (q - (-m/d)) * d: equal up to a few float32 roundings of the
    block's magnitude |m| + 15|d|."""
    b = data.reshape(data.shape[0], -1, 20)
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)
    mag = np.repeat(np.abs(m) + 15 * np.abs(d), 32, axis=1)
    assert np.all(np.abs(got - ref) <= 4 * np.finfo(np.float32).eps * mag)
    # d == 0 blocks are exactly m.
    flat = np.repeat(d == 0, 32, axis=1)
    assert np.array_equal(got[flat], ref[flat])


def raw_blocks(rng, qtype, rows, nb):
    """Random bytes in block layout (finite f16 d/m, arbitrary nibbles), some blocks with d == 0."""
    size = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}[qtype]
    b = rng.integers(0, 256, size=(rows, nb, size), dtype=np.uint8)
    n_f16 = 2 if qtype == Q.Q4_1 else 1
    f = (rng.standard_normal((rows, nb, n_f16)) * 0.1).astype(np.float16)
    f[0, :, 0] = 0  # d == 0 in the first row (nibbles stay random)
    b[..., : 2 * n_f16] = f.view(np.uint8).reshape(rows, nb, 2 * n_f16)
    return b.reshape(rows, nb * size)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_gguf_random_block_bytes(qtype):
    rng = np.random.default_rng()
    data = raw_blocks(rng, qtype, 24, 3)
    ref = gguf.quants.dequantize(data, qtype)
    got = deq(gguf_block_to_quantized(RawTensor(qtype, data))).T
    if qtype == Q.Q4_1:
        check_q4_1(got, ref, data)
    else:
        assert np.array_equal(got, ref)


def test_gguf_q4_0_hand_packed_block():
    # Element j < 16 in the low nibble of byte j, element j + 16 in its high nibble; x = (q - 8) * d.
    q = np.arange(32) % 16
    qs = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    block = np.concatenate([np.asarray([0.5], np.float16).view(np.uint8), qs])[None]
    got = deq(gguf_block_to_quantized(RawTensor(Q.Q4_0, block))).T
    assert got[0].tolist() == ((q - 8) * 0.5).tolist()


def test_gguf_unsupported_block_type():
    with pytest.raises(WeightsError, match="Q4_0, Q4_1, Q8_0"):
        gguf_block_to_quantized(RawTensor(Q.F32, np.zeros((4, 32), np.float32)), name="blk")


def test_int8_groupwise_dequantize_and_bytes():
    rng = np.random.default_rng()
    q = rng.integers(-127, 128, size=(96, 5)).astype(np.int8)
    s = rng.uniform(0.1, 1, size=(3, 5)).astype(np.float32)
    qt = QuantizedTensor(q, s, None, "int8", 0, 32)
    assert np.array_equal(deq(qt), q.astype(np.float32) * np.repeat(s, 32, 0))
    # Per-channel stays as it was; grouped adds one scale per 32 elements.
    assert weight_bytes("int8", (4096, 1024)) == 4096 * 1024 + 1024 * 2
    assert weight_bytes("int8", (4096, 1024), 32, grouped=True) == 4096 * 1024 + 4096 // 32 * 1024 * 2
    with pytest.raises(ValueError):
        weight_bytes("fp8", (4096, 1024), 32, grouped=True)
    with pytest.raises(ValueError):
        weight_bytes("int8", (100, 8), 32, grouped=True)


# ---- GGUF files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_gguf_quantized_tensors_file(tmp_path, qtype):
    config = tiny_config()
    weights = random_llama_weights(config, seed=int(np.random.default_rng().integers(1 << 30)))
    path = write_llama_gguf(tmp_path / "m.gguf", weights, config, qtype=qtype)
    ref = load_gguf(path).weights  # float32, Q/K un-permuted (checked in test_gguf_loader)
    got = gguf_quantized_tensors(open_gguf(path))
    assert set(got) == set(ref)
    for name, r in ref.items():
        g = got[name]
        if is_linear_weight(name):
            assert isinstance(g, QuantizedTensor), name
            assert g.fmt == ("int8" if qtype == Q.Q8_0 else "int4") and g.shape == r.shape[::-1], name
            d = deq(g).T
            if qtype == Q.Q4_1:
                scale = np.abs(r).reshape(r.shape[0], -1, 32).max(-1, keepdims=True)
                err = np.abs(d - r).reshape(r.shape[0], -1, 32)
                assert np.all(err <= 8 * np.finfo(np.float32).eps * (scale + 1e-30)), name
            else:
                assert np.array_equal(d, r), name
        else:
            assert isinstance(g, np.ndarray) and g.dtype == np.float32, name
            assert np.array_equal(g, r), name
    # The embedding is quantized in the file but stays a float gather table.
    assert isinstance(got["model.embed_tokens.weight"], np.ndarray)


def test_gguf_quantized_tensors_partial_and_tied(tmp_path):
    config = tiny_config(tie_word_embeddings=True)
    weights = random_llama_weights(config, seed=5)
    q = ["model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    path = write_llama_gguf(tmp_path / "p.gguf", weights, config, qtype=Q.Q8_0, quantize_names=q)
    got = gguf_quantized_tensors(open_gguf(path))
    assert "lm_head.weight" not in got
    for name, w in weights.items():
        if name in q:
            assert isinstance(got[name], QuantizedTensor) and got[name].group_size == 32
        else:  # F32 in the file: returned exactly, Q/K un-permuted
            assert np.array_equal(got[name], w), name


def test_gguf_quantized_tensors_missing(tmp_path):
    config = tiny_config()
    weights = random_llama_weights(config, seed=6)
    del weights["model.layers.1.mlp.up_proj.weight"]
    path = write_llama_gguf(tmp_path / "m.gguf", weights, config, qtype=Q.Q4_0)
    with pytest.raises(WeightsError, match="up_proj"):
        gguf_quantized_tensors(open_gguf(path))


# ---- HF checkpoint directories ------------------------------------------------------------------

_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
              np.dtype(np.int32): "I32", np.dtype(np.int64): "I64", np.dtype(E4M3): "F8_E4M3"}


def write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    """Minimal safetensors writer (safetensors' numpy API cannot write FP8)."""
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        b = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": _ST_DTYPES[arr.dtype], "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 64, 128, 2, 4, 2, 16, 96


def hf_config(quantization_config: dict | None) -> dict:
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
         "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
         "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
         "rms_norm_eps": 1e-5, "max_position_embeddings": 128, "tie_word_embeddings": False,
         "torch_dtype": "float16"}
    if quantization_config is not None:
        d["quantization_config"] = quantization_config
    return d


def linear_shapes() -> dict[str, tuple[int, int]]:
    """HF module name -> (in, out) for every quantized projection."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    out = {}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj": (HIDDEN, q), p + "self_attn.k_proj": (HIDDEN, kv),
                    p + "self_attn.v_proj": (HIDDEN, kv), p + "self_attn.o_proj": (q, HIDDEN),
                    p + "mlp.gate_proj": (HIDDEN, INTER), p + "mlp.up_proj": (HIDDEN, INTER),
                    p + "mlp.down_proj": (INTER, HIDDEN)})
    return out


def make_checkpoint(tmp_path, method: str, *, gptq_format: str = "gptq", fp8_per_channel: bool = True,
                    g: int = 32, shards: int = 1):
    """A tiny 2-layer llama checkpoint quantized with `method`; returns (dir, reference float32 HF
    tensors, raw tensors written)."""
    rng = np.random.default_rng()
    tensors: dict[str, np.ndarray] = {}
    ref: dict[str, np.ndarray] = {}

    def floating(name, shape, dtype):
        a = rng.standard_normal(shape).astype(dtype)
        tensors[name] = a
        ref[name] = a.astype(np.float32)

    floating("model.embed_tokens.weight", (VOCAB, HIDDEN), np.float16)
    floating("lm_head.weight", (VOCAB, HIDDEN), ml_dtypes.bfloat16)  # left unquantized (AWQ default)
    floating("model.norm.weight", (HIDDEN,), np.float32)
    for i in range(LAYERS):
        floating(f"model.layers.{i}.input_layernorm.weight", (HIDDEN,), np.float16)
        floating(f"model.layers.{i}.post_attention_layernorm.weight", (HIDDEN,), np.float16)
    for module, (k, n) in linear_shapes().items():
        if method == "fp8":
            w = (rng.standard_normal((n, k)) * 40).astype(np.float32).astype(E4M3)
            s = rng.uniform(1e-4, 1e-2, size=(n, 1) if fp8_per_channel else ()).astype(np.float32)
            tensors[module + ".weight"] = w
            tensors[module + ".weight_scale"] = s
            tensors[module + ".input_scale"] = np.asarray([0.02], np.float32)
            ref[module + ".weight"] = w.astype(np.float32) * s
            ref[module + ".input_scale"] = tensors[module + ".input_scale"]
            continue
        q, z, s, r = random_int4_problem(rng, k, n, g, zmin=1 if gptq_format == "gptq" else 0)
        ref[module + ".weight"] = r.T
        tensors[module + ".scales"] = s
        if method == "awq":
            tensors[module + ".qweight"] = awq_pack(q)
            tensors[module + ".qzeros"] = awq_pack(z)
        else:
            tensors[module + ".qweight"] = gptq_pack_rows(q)
            tensors[module + ".qzeros"] = gptq_pack_cols(z - 1 if gptq_format == "gptq" else z)
            tensors[module + ".g_idx"] = (np.arange(k) // g).astype(np.int32)

    if method == "awq":
        qcfg = {"quant_method": "awq", "bits": 4, "group_size": g, "version": "gemm", "zero_point": True,
                "modules_to_not_convert": None}
    elif method == "gptq":
        qcfg = {"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": False, "sym": False,
                "checkpoint_format": gptq_format}
    else:
        qcfg = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                    "num_bits": 8, "type": "float", "symmetric": True,
                    "strategy": "channel" if fp8_per_channel else "tensor"}}}}
    d = tmp_path / method
    d.mkdir()
    write_dir(d, tensors, hf_config(qcfg), shards)
    return d, ref, tensors


def write_dir(d, tensors, config: dict, shards: int = 1) -> None:
    (d / "config.json").write_text(json.dumps(config))
    if shards == 1:
        write_safetensors(d / "model.safetensors", tensors)
        return
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        write_safetensors(d / fname, part)
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def check_loaded(weights, ref, fmt):
    assert set(weights) == set(ref)
    for name, r in ref.items():
        w = weights[name]
        if name.endswith(".weight") and is_linear_weight(name) and name != "lm_head.weight":
            assert isinstance(w, QuantizedTensor) and w.fmt == fmt and w.axis == 0, name
            assert w.shape == r.shape[::-1], name
            assert np.array_equal(deq(w).T, r), name
        else:
            assert isinstance(w, np.ndarray) and w.dtype == np.float32, name
            assert np.array_equal(w, r), name


@pytest.mark.parametrize("shards", [1, 3])
def test_read_hf_awq(tmp_path, shards):
    d, ref, _ = make_checkpoint(tmp_path, "awq", shards=shards)
    weights, info = read_hf_quantized(d)
    assert info == QuantInfo("awq", 4, 32)
    check_loaded(weights, ref, "int4")


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_read_hf_gptq(tmp_path, fmt):
    d, ref, _ = make_checkpoint(tmp_path, "gptq", gptq_format=fmt, shards=2)
    weights, info = read_hf_quantized(d)
    assert (info.method, info.bits, info.group_size, info.checkpoint_format) == ("gptq", 4, 32, fmt)
    check_loaded(weights, ref, "int4")


@pytest.mark.parametrize("per_channel", [True, False])
def test_read_hf_fp8(tmp_path, per_channel):
    d, ref, _ = make_checkpoint(tmp_path, "fp8", fp8_per_channel=per_channel)
    weights, info = read_hf_quantized(d)
    assert (info.method, info.bits, info.group_size) == ("fp8", 8, None)
    check_loaded(weights, ref, "fp8")


def test_read_hf_autofp8_method(tmp_path):
    d, ref, tensors = make_checkpoint(tmp_path, "fp8", fp8_per_channel=False)
    cfg = hf_config({"quant_method": "fp8", "activation_scheme": "static"})
    (d / "config.json").write_text(json.dumps(cfg))
    weights, info = read_hf_quantized(d)
    assert info.method == "fp8"
    check_loaded(weights, ref, "fp8")


# ---- HF error paths ------------------------------------------------------------------------------


def rewrite_config(d, **qcfg_changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"].update(qcfg_changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_hf_act_order_gptq_rejected(tmp_path):
    d, _, tensors = make_checkpoint(tmp_path, "gptq")
    name = "model.layers.1.mlp.down_proj.g_idx"
    tensors[name] = np.random.default_rng().permutation(tensors[name]).astype(np.int32)
    write_safetensors(d / "model.safetensors", tensors)
    rewrite_config(d, desc_act=True)
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.mlp\.down_proj.*act-order"):
        read_hf_quantized(d)
    # desc_act=True with no g_idx at all: cannot be proven trivial.
    for n in [n for n in tensors if n.endswith(".g_idx")]:
        del tensors[n]
    write_safetensors(d / "model.safetensors", tensors)
    with pytest.raises(WeightsError, match="act-order"):
        read_hf_quantized(d)


def test_hf_8bit_gptq_rejected(tmp_path):
    d, _, _ = make_checkpoint(tmp_path, "gptq")
    rewrite_config(d, bits=8)
    with pytest.raises(ModelConfigError, match="bits = 8"):
        read_hf_quantized(d)


def test_hf_awq_gemv_rejected(tmp_path):
    d, _, _ = make_checkpoint(tmp_path, "awq")
    rewrite_config(d, version="gemv")
    with pytest.raises(ModelConfigError, match="gemv"):
        read_hf_quantized(d)


def test_hf_blockwise_fp8_rejected(tmp_path):
    d, _, tensors = make_checkpoint(tmp_path, "fp8")
    cfg = hf_config({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]})
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="block-wise FP8 not supported"):
        read_hf_quantized(d)
    # compressed-tensors block strategy
    cfg = hf_config({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {
        "g": {"weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]}}}})
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="block-wise FP8 not supported"):
        read_hf_quantized(d)
    # Block-shaped scales in a checkpoint that claims per-channel.
    cfg = hf_config({"quant_method": "fp8"})
    (d / "config.json").write_text(json.dumps(cfg))
    tensors["model.layers.0.mlp.down_proj.weight_scale"] = np.ones((2, 2), np.float32)
    write_safetensors(d / "model.safetensors", tensors)
    with pytest.raises(WeightsError, match=r"down_proj.*block-wise FP8 not supported"):
        read_hf_quantized(d)


def test_hf_missing_scales_rejected(tmp_path):
    for method, missing in (("awq", "scales"), ("gptq", "qzeros"), ("fp8", "weight_scale")):
        d, _, tensors = make_checkpoint(tmp_path, method)
        del tensors[f"model.layers.0.self_attn.v_proj.{missing}"]
        write_safetensors(d / "model.safetensors", tensors)
        with pytest.raises(WeightsError, match=rf"model\.layers\.0\.self_attn\.v_proj\.{missing}"):
            read_hf_quantized(d)


def test_hf_missing_module_and_bad_shape(tmp_path):
    d, _, tensors = make_checkpoint(tmp_path, "awq")
    t = dict(tensors)
    for suffix in ("qweight", "qzeros", "scales"):
        del t[f"model.layers.1.mlp.gate_proj.{suffix}"]
    write_safetensors(d / "model.safetensors", t)
    with pytest.raises(WeightsError, match=r"missing tensor 'model\.layers\.1\.mlp\.gate_proj\.weight'"):
        read_hf_quantized(d)
    t = dict(tensors)
    t["model.layers.0.mlp.up_proj.scales"] = t["model.layers.0.mlp.up_proj.scales"][:, :8]
    write_safetensors(d / "model.safetensors", t)
    with pytest.raises(WeightsError, match=r"up_proj: scales has shape"):
        read_hf_quantized(d)


def test_hf_unsupported_methods(tmp_path):
    d, _, _ = make_checkpoint(tmp_path, "awq")
    for qcfg, match in (({"quant_method": "bitsandbytes"}, "quant_method"),
                        ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "format"),
                        ({"quant_method": "gptq", "checkpoint_format": "marlin"}, "checkpoint_format"),
                        ({"quant_method": "awq", "bits": 3}, "bits")):
        (d / "config.json").write_text(json.dumps(hf_config(qcfg)))
        with pytest.raises(ModelConfigError, match=match):
            read_hf_quantized(d)
    (d / "config.json").write_text(json.dumps(hf_config(None)))
    with pytest.raises(ModelConfigError, match="no quantization_config"):
        read_hf_quantized(d)


def test_parse_quantization_config_defaults():
    assert parse_quantization_config({"quant_method": "gptq", "bits": 4, "group_size": -1}) == \
        QuantInfo("gptq", 4, -1, "gptq")
    assert parse_quantization_config({"quant_method": "gptq", "format": "gptq_v2", "desc_act": True}) == \
        QuantInfo("gptq", 4, 128, "gptq_v2", desc_act=True)
    assert parse_quantization_config({"quant_method": "AWQ", "w_bit": 4, "q_group_size": 64, "version": "GEMM"}) == \
        QuantInfo("awq", 4, 64)
