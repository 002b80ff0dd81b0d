"""Structured outputs: the constraint's parameters, llguidance's matchers against SmolLM2's tokenizer,
and the engine holding a tiny random model (its text is gibberish unconstrained) to a JSON schema,
a choice, a regex and a grammar, batched beside unconstrained requests that answer as they do
alone, with no new compilation for a new schema."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from fineserve_jax.fleet import Fleet, ModelSpec
from serving.engine.sampling import SamplingParams, apply_token_mask
from serving.engine.structured_output import MAX_NUMBER_DIGITS, GrammarCache, StructuredOutputsParams, mask_width
from tests.server_helpers import tiny_models, tokenizer

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")   # tiny models: compiling dominates

SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                          "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["answer", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def fleet(tok):
    [model] = tiny_models(tok, ("bf16",))
    return Fleet([ModelSpec(model, max_model_len=96, max_num_seqs=4, tokens_per_page=8)], "4MiB",
                 slab_bytes="256KiB")


@pytest.mark.parametrize("value, message", [
    ({}, "exactly one of"),
    ({"json": SCHEMA, "regex": "a+"}, r"exactly one of .*\['json', 'regex'\]"),
    ({"choice": "yes"}, "choice must be a non-empty list of strings"),
    ({"choice": []}, "choice must be a non-empty list"),
    ({"regex": 5}, "regex has the wrong type"),
    ({"json_object": "yes"}, "json_object must be a bool"),
    ({"jsonschema": {}}, r"unknown field\(s\) \['jsonschema'\]"),
    ("a+", "must be an object"),
])
def test_a_malformed_constraint_is_refused_naming_the_problem(value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(structured_outputs=value)


def mask_bits(row: np.ndarray, vocab_size: int) -> np.ndarray:
    """An int32 bitmask row -> bool[vocab_size], token t at bit t % 32 of word t // 32."""
    return np.array([(row[t // 32] >> (t % 32)) & 1 for t in range(vocab_size)], bool)


def allowed_tokens(constraint, vocab_size: int) -> set[int]:
    masks = np.zeros((1, mask_width(vocab_size)), np.int32)
    constraint.fill_bitmask(masks, 0)
    return set(np.flatnonzero(mask_bits(masks[0], vocab_size)).tolist())


def test_matchers_come_from_a_cache_and_each_request_gets_its_own(tok):
    cache = GrammarCache(tok, tok.vocab_size, tok.eos_token_ids)
    params = StructuredOutputsParams(choice=("yes", "no"))
    a, b = cache.constraint(params), cache.constraint(StructuredOutputsParams.of({"choice": ["yes", "no"]}))
    assert len(cache._compiled) == 1
    assert all(a.consume_token(t) for t in tok.encode("yes", add_special_tokens=False)) and a.is_stopped()
    assert not b.matcher.is_accepting()   # its own state
    allowed = allowed_tokens(b, tok.vocab_size)
    assert tok.encode("yes", add_special_tokens=False)[0] in allowed and len(allowed) < 10
    for bad, message in ((StructuredOutputsParams(regex="[a-"), "does not compile"),
                         (StructuredOutputsParams(grammar="start: undefined_rule"), "does not compile"),
                         (StructuredOutputsParams(grammar="\x86 ::= x"), "Expected name")):   # GBNF, garbled
        with pytest.raises(ValueError, match=message):
            cache.constraint(bad)


def feed(constraint, tok, text: str) -> None:
    for t in tok.encode(text, add_special_tokens=False):
        assert constraint.consume_token(t), text


@pytest.mark.parametrize("schema, answer, capped", [
    ({"type": "object", "properties": {"n": {"type": "integer"}}}, '{"n":-', True),
    ({"type": "object", "properties": {"x": {"type": "number"}}}, '{"x":3.', True),   # the fraction's run
    ({"type": "array", "items": {"type": "number"}}, '[1e', True),                     # the exponent's
    ({"type": "object", "properties": {"s": {"type": "string"}}}, '{"s":"a\\"', False),   # in a string
])
def test_a_json_number_closes_after_its_digit_cap(tok, schema, answer, capped):
    cache = GrammarCache(tok, tok.vocab_size, tok.eos_token_ids)
    digits = {t for t in range(tok.vocab_size) if cache.digits.leading[t]}
    assert len(digits) >= 10
    rng = np.random.default_rng()
    for params, cap_applies in ((StructuredOutputsParams(json=schema), capped),
                                (StructuredOutputsParams(regex=r"\d+"), False)):   # not JSON: no cap
        constraint = cache.constraint(params)
        if params.is_json:
            feed(constraint, tok, answer)
        run = "".join(rng.choice(list("123456789"), size=MAX_NUMBER_DIGITS - 1))
        feed(constraint, tok, run)
        assert digits <= allowed_tokens(constraint, tok.vocab_size)   # one digit left to write
        feed(constraint, tok, "7")
        after = allowed_tokens(constraint, tok.vocab_size)
        assert not (after & digits) if cap_applies else digits <= after
        assert after   # the grammar always has a way on
    closing = cache.constraint(StructuredOutputsParams(json=schema))
    feed(closing, tok, answer + "9" * MAX_NUMBER_DIGITS)
    if capped:   # what is left closes the number and then the answer
        end = {"{": "}", "[": "]"}[answer[0]]
        assert tok.encode(end, add_special_tokens=False)[0] in allowed_tokens(closing, tok.vocab_size)
        feed(closing, tok, end)
        assert closing.is_stopped()


def test_the_sampler_never_picks_a_masked_token():
    rng = np.random.default_rng()
    logits = rng.normal(scale=3.0, size=(4, 100)).astype(np.float32)
    mask = rng.integers(-2**31, 2**31, size=(4, mask_width(100)), dtype=np.int64).astype(np.int32)
    mask[3] = -1   # a row without a constraint
    allowed = np.stack([mask_bits(row, 100) for row in mask])
    out = np.asarray(apply_token_mask(jnp.asarray(logits), jnp.asarray(mask)))
    np.testing.assert_array_equal(out[allowed], logits[allowed])
    assert np.all(np.isneginf(out[~allowed])) and allowed[3].all()


def greedy(**structured) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=40, structured_outputs=structured or None)


def test_constrained_requests_follow_their_constraint_beside_free_ones(fleet, tok):
    name = fleet.model_names[0]
    engine = fleet.runtime.engines[name]
    free_prompt = [[5, 6, 7, 8]]
    alone = fleet.generate(prompt_token_ids=free_prompt, sampling_params=SamplingParams(temperature=0, max_tokens=12),
                           model=name)[0].outputs[0].token_ids
    params = [greedy(json=SCHEMA), greedy(choice=["red", "green", "blue"]), greedy(regex=r"[0-9]{3}-[a-z]{2}"),
              greedy(grammar='start: "(" NUMBER ")"\nNUMBER: /[1-9][0-9]?/'), greedy(json_object=True),
              SamplingParams(temperature=0, max_tokens=12)]
    prompts = [[11, 12, 13]] * 5 + free_prompt
    outs = fleet.generate(prompt_token_ids=prompts, sampling_params=params, model=[name] * 6)
    texts = [o.outputs[0].text for o in outs]
    answer = json.loads(texts[0])
    assert answer["answer"] in ("yes", "no") and 0 <= answer["n"] <= 99 and set(answer) == {"answer", "n"}
    assert texts[1] in ("red", "green", "blue")
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", texts[2])
    assert re.fullmatch(r"\([1-9][0-9]?\)", texts[3])
    # any object: a random model's keys run on, so it may end at max_tokens, but as an object's start
    assert texts[4].startswith('{"') and (outs[4].outputs[0].finish_reason == "length"
                                          or isinstance(json.loads(texts[4]), dict))
    assert all(o.outputs[0].finish_reason == "stop" for o in outs[:4])
    assert outs[5].outputs[0].token_ids == alone   # the free request is untouched by its neighbours
    # a new schema is a new mask, not a new program
    compiled = engine.num_compilations
    other = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
             "additionalProperties": False}
    [out] = fleet.generate(prompt_token_ids=[[11, 12, 13]], sampling_params=greedy(json=other), model=name)
    assert json.loads(out.outputs[0].text)["city"] in ("Paris", "Rome")
    assert engine.num_compilations == compiled


def test_a_constraint_that_does_not_compile_is_refused_before_queueing(fleet):
    name = fleet.model_names[0]
    with pytest.raises(ValueError, match="does not compile"):
        fleet.generate(prompt_token_ids=[[1, 2]], sampling_params=greedy(regex="(unclosed"), model=name)
    assert not fleet.runtime.engines[name].has_unfinished_requests()


def test_a_model_stuck_on_digits_still_closes_its_json_number(fleet, tok):
    """Every digit's logit pushed up by 100: free, the answer is all digits; held to a schema with an
    unbounded integer, the number stops at the cap and the object closes before max_tokens."""
    digits = {t: 100.0 for t in tok.encode("0123456789", add_special_tokens=False)}
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    params = [SamplingParams(temperature=0, max_tokens=60, logit_bias=digits, structured_outputs=s)
              for s in ({"json": schema}, None)]
    held, free = fleet.generate(prompt_token_ids=[[11, 12, 13]] * 2, sampling_params=params,
                                model=[fleet.model_names[0]] * 2)
    assert free.outputs[0].text.isdigit() and free.outputs[0].finish_reason == "length"
    answer = held.outputs[0]
    assert answer.finish_reason == "stop" and json.loads(answer.text) == {"n": int(answer.text[5:-1])}
    assert len(answer.text[5:-1].lstrip("-")) == MAX_NUMBER_DIGITS
