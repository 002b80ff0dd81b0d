"""Tokenizer: HF-dir and GGUF construction, BOS handling, chat templates, streaming detokenization."""

from __future__ import annotations

import json
import os
import sys

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

sys.path.insert(0, os.path.dirname(__file__))
from gguf_writer import (  # noqa: E402
    CHATML_TEMPLATE, find_smollm2_gguf, random_llama_weights, tiny_config, write_llama_gguf)

from models.gguf_loader import open_gguf  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402

SMOL = find_smollm2_gguf()
needs_smol = pytest.mark.slow  # the real model; setup.sh fetches it

UNICODE_TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "héllo wörld, naïve café, Ærøskøbing",
    "你好，世界！日本語のテキスト",
    "emoji 🎉👍🏽 👨‍👩‍👧 flags 🇫🇷",
    "mixed: Привет мир, مرحبا, שלום, 12345.678",
    "",
]
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world", "héllo wörld 你好 🎉"] * 20


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A HF model dir holding a tiny byte-level BPE tokenizer trained on CORPUS."""
    d = tmp_path_factory.mktemp("hf_tok")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<|user|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "add_bos_token": True,
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
                                            "{{ m['content'] }}{{ eos_token }}{% endfor %}"
                                            "{% if add_generation_prompt %}<|assistant|>{% endif %}"},
        ]}))
    return d


@pytest.fixture(scope="module")
def hf_tok(hf_dir) -> Tokenizer:
    return Tokenizer.from_hf_dir(hf_dir)


@pytest.fixture(scope="module")
def smol_tok() -> Tokenizer:
    return Tokenizer.from_gguf(open_gguf(str(SMOL)))


# ---- HF dir --------------------------------------------------------------------------------


def test_hf_dir_properties(hf_tok):
    assert hf_tok.bos_token_id == hf_tok.token_to_id("<s>") == 0
    assert hf_tok.eos_token_ids == (1,)
    assert 256 < hf_tok.vocab_size <= 400
    assert hf_tok.chat_template.startswith("{{ bos_token }}")  # the "default" entry of the list


def test_hf_dir_bos(hf_tok):
    ids = hf_tok.encode("hello world")
    assert ids[0] == 0 and ids.count(0) == 1
    assert hf_tok.encode("hello world", add_special_tokens=False) == ids[1:]
    assert hf_tok.encode("<s>hello world") == ids  # no second BOS
    assert hf_tok.decode(ids) == "hello world"
    assert hf_tok.decode(ids, skip_special_tokens=False) == "<s>hello world"


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_hf_dir_round_trip(hf_tok, text):
    assert hf_tok.decode(hf_tok.encode(text)) == text


def test_hf_dir_chat_template(hf_tok):
    out = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out == "<s><|user|>hi</s><|assistant|>"
    assert hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False) \
        == "<s><|user|>hi</s>"


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
TOOL_USE = "{% for t in tools %}[{{ t['function']['name'] }}]{% endfor %}{{ messages[0]['content'] }}"


def test_a_tool_use_template_renders_the_chats_that_offer_tools(tmp_path, hf_tok, hf_dir):
    """As in transformers: a named "tool_use" template renders a chat given `tools`, the default one
    every other chat; named templates survive `save` and come from `additional_chat_templates/`."""
    hi = [{"role": "user", "content": "hi"}]
    assert hf_tok.named_chat_templates == {"tool_use": "TOOLS"} and hf_tok.chat_template_renders_tools
    assert hf_tok.apply_chat_template(hi, tools=TOOLS) == "TOOLS"
    assert hf_tok.apply_chat_template(hi) == "<s><|user|>hi</s><|assistant|>"
    hf_tok.save(tmp_path)
    again = Tokenizer.from_hf_dir(tmp_path)
    assert (again.chat_template, again.named_chat_templates) == (hf_tok.chat_template, hf_tok.named_chat_templates)
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text(TOOL_USE)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    files = Tokenizer.from_hf_dir(tmp_path)
    assert files.apply_chat_template(hi, tools=TOOLS) == "[f]hi" and files.apply_chat_template(hi) == "hi!"


def test_a_gguf_tool_use_template(tmp_path):
    """llama.cpp stores named templates as `tokenizer.chat_template.<name>`, listed in
    `tokenizer.chat_templates`."""
    config = tiny_config()
    path = write_llama_gguf(tmp_path / "t.gguf", random_llama_weights(config), config,
                            chat_template=[{"name": "default", "template": CHATML_TEMPLATE},
                                           {"name": "tool_use", "template": TOOL_USE}])
    tok = Tokenizer.from_gguf(open_gguf(path))
    assert tok.chat_template == CHATML_TEMPLATE and tok.named_chat_templates == {"tool_use": TOOL_USE}
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=TOOLS) == "[f]hi"
    listed_only = open_gguf(path)   # a name listed without its template is dropped, not kept as None
    del listed_only.fields["tokenizer.chat_template.tool_use"]
    assert Tokenizer.from_gguf(listed_only).named_chat_templates == {}
    plain = write_llama_gguf(tmp_path / "p.gguf", random_llama_weights(config), config)
    assert Tokenizer.from_gguf(open_gguf(plain)).named_chat_templates == {}


def test_hf_dir_string_template_and_defaults(tmp_path, hf_dir):
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "chat_template": "X"}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.chat_template == "X"
    assert tok.encode("hello")[0] != 0  # post-processor adds nothing and add_bos_token absent -> no BOS
    (tmp_path / "tokenizer_config.json").unlink()
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.bos_token_id is None and tok.chat_template is None
    with pytest.raises(ValueError, match="model has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_hf_dir_missing(tmp_path):
    from models.errors import ModelLoadError
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


# ---- chat template validation --------------------------------------------------------------


@pytest.mark.parametrize("messages,match", [
    ("hello", "list"),
    ([], "empty"),
    (["hi"], r"messages\[0\] must be a dict"),
    ([{"content": "hi"}], r"messages\[0\] needs a string 'role'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 5}], r"messages\[1\] needs a string 'content'"),
    ([{"role": 1, "content": "a"}], "role"),
])
def test_chat_validation(hf_tok, messages, match):
    with pytest.raises(ValueError, match=match):
        hf_tok.apply_chat_template(messages)


def test_raise_exception_in_template(hf_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
                         "{% endif %}{{ messages[0]['content'] | tojson }}"}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(ValueError, match="first must be user"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    assert tok.apply_chat_template([{"role": "user", "content": "é<b>"}]) == '"é<b>"'


# ---- streaming -----------------------------------------------------------------------------


def _check_stream(tok: Tokenizer, text: str, skip_special_tokens: bool = True):
    ids = tok.encode(text)
    stream = tok.decode_stream(skip_special_tokens=skip_special_tokens)
    pieces = [stream.step(i) for i in ids]
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip_special_tokens)
    return pieces


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_hf_decode_stream(hf_tok, text):
    _check_stream(hf_tok, text)
    _check_stream(hf_tok, text, skip_special_tokens=False)


def test_decode_stream_waits_for_complete_characters(hf_tok):
    pieces = _check_stream(hf_tok, "🎉")  # 4 UTF-8 bytes; likely split over several byte tokens
    assert "".join(pieces) == "🎉"
    assert all(p in ("", "🎉") for p in pieces)


# ---- GGUF (tiny synthetic) -----------------------------------------------------------------


def test_tiny_gguf_tokenizer(tmp_path):
    config = tiny_config()
    path = write_llama_gguf(tmp_path / "t.gguf", random_llama_weights(config), config)
    tok = Tokenizer.from_gguf(open_gguf(path))
    assert tok.vocab_size == config.vocab_size
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.chat_template == CHATML_TEMPLATE
    ids = tok.encode("<|im_start|>user\nin the weather<|im_end|>")
    # Special tokens recognised, no BOS added (add_bos_token False), merges applied in rank order.
    assert [tok.id_to_token(i) for i in ids] == [
        "<|im_start|>", "u", "s", "er", "Ċ", "in", "Ġthe", "Ġw", "e", "a", "t", "he", "r", "<|im_end|>"]
    assert tok.decode(ids) == "user\nin the weather"
    for text in UNICODE_TEXTS:
        assert tok.decode(tok.encode(text)) == text
        _check_stream(tok, text)


def test_tiny_gguf_add_bos(tmp_path):
    config = tiny_config()
    path = write_llama_gguf(tmp_path / "t.gguf", random_llama_weights(config), config, add_bos_token=True)
    tok = Tokenizer.from_gguf(open_gguf(path))
    assert tok.encode("hi")[0] == 1 and tok.encode("<|im_start|>hi").count(1) == 1


# ---- GGUF (real SmolLM2) -------------------------------------------------------------------

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
RAW_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@needs_smol
def test_smollm2_properties(smol_tok):
    assert smol_tok.vocab_size == 49152
    assert smol_tok.id_to_token(1) == "<|im_start|>" and smol_tok.bos_token_id == 1
    assert smol_tok.id_to_token(2) == "<|im_end|>" and smol_tok.eos_token_ids == (2,)
    assert not smol_tok.add_bos_token


@needs_smol
def test_smollm2_chat_template(smol_tok):
    # SmolLM2's template inserts a default system prompt when the first message is not a system one.
    assert smol_tok.apply_chat_template(FRANCE) == SYSTEM + RAW_PROMPT
    with_system = [{"role": "system", "content": "Be brief."}] + FRANCE
    assert smol_tok.apply_chat_template(with_system) == "<|im_start|>system\nBe brief.<|im_end|>\n" + RAW_PROMPT


@needs_smol
def test_smollm2_ids(smol_tok):
    assert smol_tok.encode(RAW_PROMPT) == [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
    ids = smol_tok.encode(smol_tok.apply_chat_template(FRANCE))
    assert ids[:3] == [1, 9690, 198] and ids[-16:] == smol_tok.encode(RAW_PROMPT)
    assert len(ids) == 37
    assert smol_tok.decode(ids) == "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\n" \
        "user\nWhat is the capital of France?\nassistant\n"
    assert smol_tok.decode(ids, skip_special_tokens=False) == SYSTEM + RAW_PROMPT
    # SmolLM2's pre-tokenizer ("smollm") splits digits individually.
    assert [smol_tok.id_to_token(i) for i in smol_tok.encode("12345")] == list("12345")


@needs_smol
@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_smollm2_round_trip_and_stream(smol_tok, text):
    assert smol_tok.decode(smol_tok.encode(text)) == text
    _check_stream(smol_tok, text)
    _check_stream(smol_tok, RAW_PROMPT + text, skip_special_tokens=False)
    _check_stream(smol_tok, RAW_PROMPT + text, skip_special_tokens=True)
