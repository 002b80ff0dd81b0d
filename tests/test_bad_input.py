"""Every bad input gets a clear error naming the problem, in Python and in the CLI."""

from __future__ import annotations

import gc
import json
import shutil

import jax
import pytest

from fineserve_jax import LLM, SamplingParams
from fineserve_jax.cli import main as cli_main
from models.errors import ModelConfigError, ModelNotFoundError, WeightsError
from tests.helpers import FIXTURES

LLAMA = FIXTURES / "llama"


def copy_fixture(tmp_path, name="mistral"):
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def live_array_bytes() -> int:
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


@pytest.fixture(scope="module")
def llm():
    return LLM(str(LLAMA), dtype="float32", kv_cache_bytes=4 << 20, max_model_len=64)


def test_unknown_model_name():
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'"):
        LLM("no-such-model")


def test_missing_config(tmp_path):
    d = copy_fixture(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(ModelConfigError, match="no config.json"):
        LLM(str(d))


def test_malformed_config(tmp_path):
    d = copy_fixture(tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        LLM(str(d))


def test_config_missing_field(tmp_path):
    d = copy_fixture(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="hidden_size"):
        LLM(str(d))


def test_unsupported_architecture(tmp_path):
    d = copy_fixture(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="unsupported architecture.*GPT2LMHeadModel"):
        LLM(str(d))


def test_missing_weights(tmp_path):
    d = copy_fixture(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no model.safetensors"):
        LLM(str(d))


def test_missing_shard(tmp_path):
    d = copy_fixture(tmp_path, "llama")
    next(d.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(WeightsError, match="missing shard"):
        LLM(str(d))


def test_corrupt_weights_leave_nothing_loaded(tmp_path):
    d = copy_fixture(tmp_path)
    (d / "model.safetensors").write_bytes(b"\x00" * 100)
    before = live_array_bytes()
    with pytest.raises(WeightsError, match="cannot read weights"):
        LLM(str(d))
    assert live_array_bytes() <= before


def test_weights_not_matching_config_leave_nothing_loaded(tmp_path):
    d = copy_fixture(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the checkpoint has 2
    (d / "config.json").write_text(json.dumps(cfg))
    before = live_array_bytes()
    with pytest.raises(WeightsError, match="model.layers.2"):
        LLM(str(d))
    assert live_array_bytes() <= before


def test_prompt_longer_than_context(llm):
    with pytest.raises(ValueError, match="maximum context is 64 tokens"):
        llm.generate(prompt_token_ids=[[5] * 64])
    assert not llm.engine.has_unfinished_requests()


def test_bad_input_loses_nothing_queued(llm):
    """A batch with one bad prompt is rejected whole before anything is queued."""
    with pytest.raises(ValueError, match="prompt 1"):
        llm.generate(prompt_token_ids=[[5, 6], [5] * 100], sampling_params=SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate(prompt_token_ids=[[5, 6]], sampling_params=SamplingParams(max_tokens=2))[0].token_ids


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": 2.5}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"), ({"logprobs": 50}, "logprobs"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"),
])
def test_invalid_sampling_params(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_other_invalid_arguments(llm):
    with pytest.raises(ValueError, match="precision"):
        LLM(str(LLAMA), precision="int3")
    with pytest.raises(ValueError, match="dtype"):
        LLM(str(LLAMA), dtype="float16")
    with pytest.raises(ValueError, match="token ids outside"):
        llm.generate(prompt_token_ids=[[1, 10**6]])
    with pytest.raises(ValueError, match="empty"):
        llm.generate(prompt_token_ids=[[]])
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate(["hi"], {"temperature": 0})
    with pytest.raises(ValueError, match="messages"):
        llm.chat([{"role": "user"}])


@pytest.mark.parametrize("argv, needle", [
    (["generate", "--model", "no-such-model", "--prompt", "hi"], "unknown model"),
    (["generate", "--model", str(LLAMA), "--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "--model", str(LLAMA), "--prompt", "word " * 600], "maximum context"),
    (["generate", "--model", str(LLAMA), "--prompt", "hi", "--kv-dtype", "int4", "--kv-skip-layers", "0,7"],
     "kv_skip_layers [7] out of range"),
])
def test_cli_errors_are_one_line_and_nonzero(argv, needle, capsys):
    assert cli_main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("fineserve: error:") and needle in err and "\n" not in err


def test_cli_batch_bad_jsonl(tmp_path, capsys):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"prompt": "ok"}\n{oops\n')
    assert cli_main(["batch", "--model", str(LLAMA), "--input", str(bad), "--output", str(tmp_path / "o")]) != 0
    assert "in.jsonl:2" in capsys.readouterr().err
