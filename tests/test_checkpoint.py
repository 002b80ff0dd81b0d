"""Quantized checkpoints (`fineserve quantize`): every preset round-trips bit-exactly through
save/load, `LLM(model=DIR)` serves one, and corrupt, truncated, incomplete or mismatched
checkpoints each fail with a CheckpointError naming the file and the problem."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from fineserve_jax import LLM, SamplingParams
from fineserve_jax.cli import main as cli_main
from models.checkpoint import (
    FORMAT_VERSION,
    CHECKSUM_FILE, METADATA_FILE, PARAMS_DIR, is_quantized_checkpoint, save_quantized, write_checksums)
from models.errors import CheckpointError, ModelConfigError, ModelLoadError
from models.loader import load_model
from models.precision import PRESETS
from tests.helpers import FIXTURES, PagedForward

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")   # compiling dominates these tests

LLAMA = FIXTURES / "llama"
CASES = [(name, "float32") for name in PRESETS] + [("w4a16", "bfloat16")]


def flat_params(model) -> dict[str, jax.Array]:
    out = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(nnx.to_pure_dict(nnx.state(model)), "")
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case quantized in memory and saved: {(preset, dtype): (LoadedModel, dir)}."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, dtype in CASES:
        # w4a8kv4 keeps layer 0's KV in the model dtype: the checkpoint's preset records it.
        loaded = load_model(str(LLAMA), dtype=dtype, precision=name, calib_samples=0,
                            kv_skip_layers=[0] if name == "w4a8kv4" else None)
        out[name, dtype] = loaded, save_quantized(loaded, root / f"{name}-{dtype}")
    return out


@pytest.mark.parametrize("name, dtype", CASES)
def test_round_trip_is_bit_identical(saved, name, dtype):
    loaded, d = saved[name, dtype]
    assert is_quantized_checkpoint(d)
    back = load_model(str(d), dtype=dtype)  # precision "auto"
    assert back.precision == loaded.precision and back.kv_dtype == loaded.kv_dtype
    assert back.config == loaded.config and back.dtype == loaded.dtype
    assert back.eos_token_ids == loaded.eos_token_ids
    a, b = flat_params(loaded.model), flat_params(back.model)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert np.asarray(a[key]).tobytes() == np.asarray(b[key]).tobytes(), key
    text = "the quick brown fox"
    assert back.tokenizer.encode(text) == loaded.tokenizer.encode(text)
    assert back.tokenizer.chat_template == loaded.tokenizer.chat_template
    # One compiled forward, run with each model's parameters: identical logits.
    tokens = np.random.default_rng().integers(0, loaded.config.vocab_size, 20)
    fwd = PagedForward(loaded.model, kv_dtype=loaded.kv_dtype)
    ref = fwd.step(tokens)
    fwd.reset()
    fwd.state = nnx.split(back.model)[1]
    assert np.array_equal(fwd.step(tokens), ref)


def test_imported_formats_round_trip(tmp_path):
    """GGUF blocks loaded natively (int4 with float zeros, a dense fallback linear, a dequantized
    lm_head) save and restore bit-exactly too; an empty --out directory is fine."""
    import gguf

    from models.quant_linear import QuantLinear
    from tests.gguf_writer import random_llama_weights, tiny_config, write_llama_gguf

    config = tiny_config()
    weights = random_llama_weights(config, seed=3, scale=0.2)
    names = [n for n, w in weights.items() if w.ndim == 2 and n != "model.layers.0.self_attn.v_proj.weight"]
    path = write_llama_gguf(tmp_path / "m.gguf", weights, config, qtype=gguf.GGMLQuantizationType.Q4_1,
                            quantize_names=names)
    loaded = load_model(path, dtype="float32", precision="native")
    (tmp_path / "out").mkdir()
    back = load_model(str(save_quantized(loaded, tmp_path / "out")), dtype="float32")
    assert back.precision == loaded.precision and back.precision.name == "gguf-w4a16"
    assert isinstance(back.model.layers.q_proj, QuantLinear) and not isinstance(back.model.layers.v_proj, QuantLinear)
    a, b = flat_params(loaded.model), flat_params(back.model)
    assert sorted(a) == sorted(b) and "layers.q_proj.zeros" in a
    for key in a:
        assert a[key].dtype == b[key].dtype and np.asarray(a[key]).tobytes() == np.asarray(b[key]).tobytes(), key


def test_llm_serves_a_quantized_checkpoint(saved):
    _, d = saved["w4a8kv4", "float32"]
    llm = LLM(model=str(d), kv_cache_bytes=4 << 20, max_model_len=64)
    # Saved with layer 0's KV in the model dtype: served so (bf16 here, int4 in the other layers).
    assert llm.precision.name == "w4a8kv4+kv-skip-0" and llm.precision.kv_skip_layers == (0,)
    assert llm.engine.layout.layer_kv_dtypes == ((0, "bf16"),) and llm.engine.layout.kv_dtype == "int4"
    out = llm.generate(["hello world"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5


def test_precision_and_kv_overrides(saved):
    _, d = saved["w8a8", "float32"]
    with pytest.raises(ModelConfigError, match=r"quantized to 'w8a8'.*precision='auto'"):
        load_model(str(d), precision="w4a16")
    same = load_model(str(d), dtype="float32", precision="w8a8", kv_dtype="int8")
    assert same.precision.weight_format == "int8" and same.kv_dtype == "int8"


def test_save_refuses_to_overwrite(saved, tmp_path):
    loaded, _ = saved["bf16", "float32"]
    d = tmp_path / "out"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        save_quantized(loaded, d)
    with pytest.raises(CheckpointError, match="not a fineserve checkpoint"):
        save_quantized(loaded, d, overwrite=True)
    assert (d / "notes.txt").read_text() == "mine"
    ck = save_quantized(loaded, tmp_path / "ck")
    save_quantized(loaded, ck, overwrite=True)  # replacing a checkpoint is fine
    assert load_model(str(ck), dtype="float32").precision.name == "bf16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "out"]  # no temporary leftovers


# ---- corruption -----------------------------------------------------------------------------


@pytest.fixture
def ckpt(saved, tmp_path):
    """A fresh copy of the w4a16 float32 checkpoint to damage."""
    dst = tmp_path / "ck"
    shutil.copytree(saved["w4a16", "float32"][1], dst)
    return dst


def largest_param_file(d):
    return max((p for p in (d / PARAMS_DIR).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def rel(d, p) -> str:
    return p.relative_to(d).as_posix()


def expect_error(d, pattern):
    with pytest.raises(CheckpointError, match=pattern) as e:
        load_model(str(d))
    assert isinstance(e.value, ModelLoadError)


def test_flipped_byte_is_a_checksum_mismatch(ckpt):
    f = largest_param_file(ckpt)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))
    expect_error(ckpt, rf"{rel(ckpt, f)}: checksum mismatch \(corrupt file\)")


def test_truncated_file(ckpt):
    f = largest_param_file(ckpt)
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - 7)
    expect_error(ckpt, rf"{rel(ckpt, f)}: truncated file \({size - 7} bytes, expected {size}\)")


def test_missing_files(ckpt):
    f = largest_param_file(ckpt)
    f.unlink()
    expect_error(ckpt, rf"missing file {rel(ckpt, f)} \(listed in {CHECKSUM_FILE}\)")
    (ckpt / CHECKSUM_FILE).unlink()
    expect_error(ckpt, f"missing {CHECKSUM_FILE}")


def test_unlisted_parameter_file(ckpt):
    (ckpt / PARAMS_DIR / "d" / "stray").write_bytes(b"x")
    expect_error(ckpt, r"params/d/stray: unlisted parameter file")


def test_edited_metadata_is_a_checksum_mismatch(ckpt):
    meta = json.loads((ckpt / METADATA_FILE).read_text())
    meta["precision"]["kv_format"] = "int4"
    (ckpt / METADATA_FILE).write_text(json.dumps(meta))
    expect_error(ckpt, rf"{METADATA_FILE}: checksum mismatch")


def edit_metadata(d, edit) -> None:
    """Change fineserve_model.json and re-sign the directory (a self-consistent forgery)."""
    meta = json.loads((d / METADATA_FILE).read_text())
    edit(meta)
    (d / METADATA_FILE).write_text(json.dumps(meta))
    write_checksums(d)


def test_unsupported_format_version(ckpt):
    edit_metadata(ckpt, lambda m: m.update(format_version=99))
    expect_error(ckpt, rf"unsupported format version 99 \(this fineserve reads version {FORMAT_VERSION}\)")


def test_metadata_fmt_contradicting_its_arrays(ckpt):
    edit_metadata(ckpt, lambda m: m["quant_linears"]["layers.q_proj"].update(fmt="int8"))
    expect_error(ckpt, r"metadata/param mismatch: layers\.q_proj is int8 .* values are uint8\[2, 64, 128\] "
                       r"\(expected int8\[2, 128, 128\]\)")


def test_metadata_says_int4_but_arrays_are_int8(ckpt, saved):
    """The w8a8 checkpoint's parameter files under the w4a16 metadata, re-signed."""
    shutil.rmtree(ckpt / PARAMS_DIR)
    shutil.copytree(saved["w8a8", "float32"][1] / PARAMS_DIR, ckpt / PARAMS_DIR)

    def refile(meta):
        meta["files"] = {p.relative_to(ckpt).as_posix(): p.stat().st_size for p in ckpt.rglob("*")
                         if p.is_file() and p.name not in (METADATA_FILE, CHECKSUM_FILE)}

    edit_metadata(ckpt, refile)
    expect_error(ckpt, r"metadata/param mismatch: .*layers\.down_proj\.values is int8\[2, 256, 128\] in the "
                       r"parameter files but uint8\[2, 128, 128\] in fineserve_model\.json")


# ---- CLI ------------------------------------------------------------------------------------


def test_cli_quantize_then_generate(tmp_path, capsys):
    out = tmp_path / "w8a8"
    cmd = [sys.executable, "-m", "fineserve_jax.cli"]
    res = subprocess.run(cmd + ["quantize", "--model", str(LLAMA), "--precision", "w8a8", "--out", str(out),
                                "--calib-samples", "1", "--dtype", "float32"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    assert "\n" not in line and "w8a8" in line and "weight bytes" in line and str(out) in line
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(out), "--prompt", "hello", "--max-tokens", "4", "--json",
                     "--kv-cache-bytes", str(4 << 20), "--max-model-len", "64"]) == 0  # in-process: one JAX start
    assert json.loads(capsys.readouterr().out)["token_ids"]
    # Errors: one line on stderr, exit status 2, nothing touched.
    before = sorted(p.name for p in out.rglob("*"))
    assert cli_main(["quantize", "--model", str(LLAMA), "--precision", "w8a8", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fineserve: error:") and "not empty" in err and "--force" in err and "\n" not in err
    assert cli_main(["quantize", "--model", str(LLAMA), "--precision", "int3", "--out", str(tmp_path / "x")]) == 2
    assert "unknown precision 'int3'" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before and not (tmp_path / "x").exists()
