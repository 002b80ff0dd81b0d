"""The OpenAI-compatible server through the official `openai` client and raw HTTP: completions,
chat, streaming, n, logprobs, stop, usage, the error bodies, /v1/models, /health, /metrics and the
per-request log line. Three tiny random models (bf16, w8a8, w4a16) share one pool, as in the demo."""

from __future__ import annotations

import json
import logging
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.server_helpers import MAX_MODEL_LEN, running_server, tiny_models, tokenizer

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")   # tiny models: compiling dominates


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


TOOLS_MODEL, TOOLS_MODEL_LEN = "tiny-w4a16", 640   # room for the tools in the prompt


@pytest.fixture(scope="module")
def srv(tok):
    options = {TOOLS_MODEL: {"max_model_len": TOOLS_MODEL_LEN}, "tiny-w8a8": {"tool_call_parser": "none"}}
    with running_server(tiny_models(tok), model_options=options) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=120)


def test_models_and_health(srv, client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny-bf16", "tiny-w8a8", "tiny-w4a16"]
    body = httpx.get(srv.base_url + "/models").json()
    assert body["object"] == "list"
    assert {m["id"]: m["max_model_len"] for m in body["data"]} == {
        "tiny-bf16": MAX_MODEL_LEN, "tiny-w8a8": MAX_MODEL_LEN, TOOLS_MODEL: TOOLS_MODEL_LEN}
    assert [m["precision"] for m in body["data"]] == ["bf16", "w8a8", "w4a16"]
    health = httpx.get(srv.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert set(health.json()["models"]) == set(ids)
    schema = httpx.get(srv.url + "/openapi.json").json()
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"} <= set(schema["paths"])


def test_completion_matches_its_stream_and_counts_usage(srv, client, tok):
    prompt = "The capital of France is"
    r = client.completions.create(model="tiny-w4a16", prompt=prompt, max_tokens=7, temperature=0)
    c = r.choices[0]
    assert r.object == "text_completion" and r.model == "tiny-w4a16" and r.id.startswith("cmpl-")
    assert c.finish_reason == "length" and c.text
    assert r.usage.prompt_tokens == len(tok.encode(prompt)) and r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    chunks = list(client.completions.create(model="tiny-w4a16", prompt=prompt, max_tokens=7, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text  # greedy: same tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 7 and not chunks[-1].choices
    assert len({ch.id for ch in chunks}) == 1


def test_chat_matches_its_stream(srv, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model="tiny-w8a8", messages=messages, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model="tiny-w8a8", messages=messages, max_tokens=6, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_seed_and_logprobs(client):
    kw = dict(model="tiny-bf16", prompt=[1, 2, 3, 4], max_tokens=5, temperature=1.0, seed=7, n=3, logprobs=2)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len({c.text for c in a.choices}) > 1  # the samples use distinct seeds
    assert a.usage.completion_tokens == 15 and a.usage.prompt_tokens == 4
    for c in a.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
        assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
        assert "".join(lp.tokens) == c.text and lp.text_offset[0] == 0
    chat = client.chat.completions.create(model="tiny-bf16", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].logprob - 1e-4  # greedy takes the most likely


def test_several_prompts_and_echo(client, tok):
    r = client.completions.create(model="tiny-bf16", prompt=["one", "two three"], max_tokens=2, temperature=0,
                                  n=2, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text.startswith("one") and r.choices[2].text.startswith("two three")
    assert r.choices[0].text == r.choices[1].text  # greedy
    assert r.usage.prompt_tokens == len(tok.encode("one")) + len(tok.encode("two three"))


def test_stop_string_ends_the_text(client):
    base = client.completions.create(model="tiny-bf16", prompt="a b c", max_tokens=8, temperature=0,
                                     logprobs=0).choices[0]
    stop = next(t for t in base.logprobs.tokens[2:] if t.strip())  # a later token's text
    r = client.completions.create(model="tiny-bf16", prompt="a b c", max_tokens=8, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base.text[:base.text.index(stop)]


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny-bf16", "prompt": "x", "temperature": 3}, "temperature"),
    ({"model": "tiny-bf16", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny-bf16", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "tiny-bf16", "prompt": "x", "n": 100}, "n"),
    ({"model": "tiny-bf16", "prompt": ["a", "b", "c", "d"], "n": 4}, "n"),  # 16 > the queue bound, 12
    ({"model": "tiny-bf16", "prompt": ["x"] * 13}, "prompt"),
    ({"model": "tiny-bf16", "prompt": "x", "logit_bias": {"one": 5}}, "logit_bias"),
    ({"model": "tiny-bf16", "prompt": "x", "logit_bias": {"1": 101}}, "logit_bias"),
    ({"model": "tiny-bf16", "prompt": "x", "logit_bias": {"1": "5"}}, "logit_bias"),
    ({"model": "tiny-bf16", "prompt": "x", "logit_bias": {str(10**6): 5}}, "logit_bias"),   # not in the vocabulary
    ({"model": "tiny-bf16", "prompt": "x", "guided_regex": "[a-"}, "guided_regex"),   # does not compile
    ({"model": "tiny-bf16", "prompt": "x", "guided_choice": "yes"}, "guided_choice"),
    ({"model": "tiny-bf16", "prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}, "guided_regex"),
    ({"model": "tiny-bf16", "prompt": "x", "structured_outputs": {"regex": "a", "choice": ["a"]}},
     "structured_outputs"),
    ({"model": "tiny-bf16", "prompt": "x", "stream": True, "stream_options": {"include_usage": True, "x": 1}},
     "stream_options"),   # unknown fields inside known objects stay errors
    ({"model": "tiny-bf16", "prompt": ""}, "prompt"),
    ({"model": "tiny-bf16", "prompt": [10**9]}, "prompt"),
    ({"model": "tiny-bf16"}, "prompt"),
    ({"model": "tiny-bf16", "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": "tiny-bf16", "prompt": "x", "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ({"model": "tiny-bf16", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "tiny-bf16", "prompt": "x", "max_tokens": True}, "max_tokens"),  # JSON types, not coerced
    ({"model": "tiny-bf16", "prompt": "x", "seed": False}, "seed"),
    ({"model": "tiny-bf16", "prompt": "x", "stream": 0}, "stream"),
])
def test_invalid_completion_parameters_are_400(srv, body, param):
    r = httpx.post(srv.base_url + "/completions", json=body)
    assert r.status_code == 400, r.text
    err = _error(r)
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny-bf16", "messages": []}, "messages"),
    ({"model": "tiny-bf16", "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"model": "tiny-bf16", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
     "response_format"),
    ({"model": "tiny-bf16", "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"model": "tiny-bf16", "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "response_format"),   # a schema llguidance cannot compile
    ({"model": "tiny-bf16", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": "tiny-bf16", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"},
      "guided_json": {"type": "object"}}, "response_format"),
    ({"model": "tiny-bf16", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
])
def test_invalid_chat_parameters_are_400(srv, body, param):
    r = httpx.post(srv.base_url + "/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert _error(r)["param"] == param


def test_prompt_too_long_unknown_model_and_bad_json(srv, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-bf16", prompt=list(range(1, MAX_MODEL_LEN + 5)), max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:  # fits, but not with the tokens asked for
        client.completions.create(model="tiny-bf16", prompt=[1, 2, 3], max_tokens=MAX_MODEL_LEN)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    r = httpx.post(srv.base_url + "/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and _error(r)["type"] == "invalid_request_error"
    r = httpx.get(srv.base_url + "/nothing-here")
    assert r.status_code == 404 and _error(r)
    # None of it was queued: nothing waits, nothing holds pages.
    assert srv.used_pages() == 0 and all(rt.pending(m) == 0 for rt in srv.state.runtimes for m in rt.model_names)


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(client, tok):
    r = client.chat.completions.create(model="tiny-w8a8", messages=[{"role": "user", "content": "go on"}],
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == MAX_MODEL_LEN


def test_metrics_and_the_request_log_line(srv, client, caplog):
    with caplog.at_level(logging.INFO, logger="fineserve.requests"):
        client.completions.create(model="tiny-w8a8", prompt="count", max_tokens=4, temperature=0)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "fineserve.requests"]
    line = lines[-1]
    assert line["model"] == "tiny-w8a8" and line["status"] == "ok" and line["output_tokens"] == 4
    assert line["prompt_tokens"] > 0 and line["ttft_s"] > 0 and line["id"].startswith("cmpl-")
    text = httpx.get(srv.url + "/metrics").text
    for name in ("fineserve_time_to_first_token_seconds_bucket", "fineserve_time_per_output_token_seconds_count",
                 "fineserve_queue_length", "fineserve_pool_utilization", "fineserve_slo_attainment",
                 "fineserve_preemptions_total", "fineserve_requests_total"):
        assert name in text, name
    count = [ln for ln in text.splitlines()
             if ln.startswith('fineserve_time_to_first_token_seconds_count{model="tiny-w8a8"}')]
    assert count and float(count[0].split()[-1]) >= 1
    head = httpx.head(srv.url + "/metrics")   # how some scrapers (aiperf's) probe it
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/plain") and not head.content


def test_unknown_fields_are_ignored_and_named_known_ones_stay_strict(srv, tok, caplog):
    """As vLLM: a client's vendor fields do not fail the request; the server names them in its log
    and in a response header. guidellm's streamed body, exactly as it sends it, is answered."""
    body = {"model": "tiny-bf16", "prompt": "Hello there", "max_tokens": 4, "temperature": 0,
            "stop": None, "ignore_eos": True, "some_vendor_field": {"x": 1}, "another": 2}
    with caplog.at_level(logging.WARNING, logger="fineserve.server"):
        r = httpx.post(srv.base_url + "/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert r.headers["x-fineserve-ignored-fields"] == "another, some_vendor_field"
    assert "ignored unknown request field(s) 'another', 'some_vendor_field'" in caplog.text
    plain = httpx.post(srv.base_url + "/completions", json={k: v for k, v in body.items() if k in (
        "model", "prompt", "max_tokens", "temperature", "ignore_eos")}, timeout=60)
    assert plain.json()["choices"][0]["text"] == r.json()["choices"][0]["text"]
    assert "x-fineserve-ignored-fields" not in plain.headers
    odd = httpx.post(srv.base_url + "/completions", json=body | {"bad\u001fname": 1, **{f"f{i}": i for i in range(40)}})
    assert odd.status_code == 200   # names a header cannot hold, and those past the first 32, are counted
    assert odd.headers["x-fineserve-ignored-fields"].endswith(", (11 more)")   # 43 unknown, 32 named
    guidellm = body | {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    r = httpx.post(srv.base_url + "/completions", json=guidellm, timeout=60)
    assert r.status_code == 200 and r.headers["x-fineserve-ignored-fields"] == "another, some_vendor_field"
    events = [json.loads(e.removeprefix("data: ")) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]
    # usage in every chunk, growing by one token per chunk; the last (include_usage) is the total
    prompt_tokens = len(tok.encode("Hello there"))
    assert all(e["usage"]["prompt_tokens"] == prompt_tokens for e in events)
    assert [e["usage"]["completion_tokens"] for e in events] == [1, 2, 3, 4, 4] and not events[-1]["choices"]


def test_chat_stream_with_continuous_usage_counts_from_zero(srv, client):
    stream = client.chat.completions.create(
        model="tiny-w8a8", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"stream_options": {"include_usage": True,
                                                                              "continuous_usage_stats": True},
                                                            "ignore_eos": True})
    counts = [ch.usage.completion_tokens for ch in stream]   # the role chunk first, then one per token
    assert counts[0] == 0 and counts[-1] == 3 and counts == sorted(counts) and {1, 2, 3} <= set(counts)


def test_logit_bias_bans_and_forces_tokens(client, tok):
    kw = dict(model="tiny-bf16", prompt=[5, 6, 7], max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    greedy = client.completions.create(**kw).choices[0].text
    hello = tok.encode("hello", add_special_tokens=False)[0]
    forced = client.completions.create(**kw, logit_bias={str(hello): 100}).choices[0].text
    assert forced == tok.decode([hello] * 6)
    ids = tok.encode(greedy, add_special_tokens=False)
    banned = client.completions.create(**kw, logit_bias={str(i): -100 for i in ids}).choices[0].text
    assert banned != greedy and not banned.startswith(tok.decode(ids[:1]))


def test_tokenize_and_detokenize_as_vllm(srv, tok):
    url = srv.url
    r = httpx.post(url + "/tokenize", json={"model": "tiny-bf16", "prompt": "Hello world"}).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == MAX_MODEL_LEN
    back = httpx.post(url + "/detokenize", json={"model": "tiny-bf16", "tokens": r["tokens"]}).json()
    assert back["prompt"] == tok.decode(r["tokens"], skip_special_tokens=False)
    messages = [{"role": "user", "content": "Hi"}]
    chat = httpx.post(url + "/tokenize", json={"model": "tiny-bf16", "messages": messages}).json()
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(text, add_special_tokens=False)
    for body, param in (({"model": "tiny-bf16", "tokens": [10**6]}, "tokens"),):
        assert _error(httpx.post(url + "/detokenize", json=body))["param"] == param
    both = httpx.post(url + "/tokenize", json={"model": "tiny-bf16", "prompt": "x", "messages": messages})
    assert both.status_code == 400 and "either prompt or messages" in _error(both)["message"]
    assert httpx.post(url + "/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404


def test_structured_outputs_over_http(client):
    """OpenAI's response_format and vLLM's guided_* hold even a random model to the constraint."""
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}}, "required": ["colour"],
              "additionalProperties": False}
    r = client.chat.completions.create(
        model="tiny-w8a8", messages=[{"role": "user", "content": "Pick a colour."}], max_tokens=30, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema, "strict": True}})
    assert json.loads(r.choices[0].message.content)["colour"] in ("red", "blue")
    assert r.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model="tiny-w8a8", messages=[{"role": "user", "content": "Pick a colour."}], max_tokens=30, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}}, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.choices[0].message.content
    choice = client.completions.create(model="tiny-bf16", prompt="Answer:", max_tokens=10, temperature=0,
                                       extra_body={"guided_choice": ["maybe", "never"]})
    assert choice.choices[0].text in ("maybe", "never")
    regex = client.completions.create(model="tiny-bf16", prompt="Code:", max_tokens=10, temperature=1.0, n=3,
                                      extra_body={"structured_outputs": {"regex": "[A-Z]{2}[0-9]"}})
    assert all(re.fullmatch("[A-Z]{2}[0-9]", c.text) for c in regex.choices)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
BOOKING = {"type": "function", "function": {
    "name": "book_table", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["guests", "when"],
        "properties": {"guests": {"type": "integer", "minimum": 1, "maximum": 8},
                       "when": {"type": "object", "additionalProperties": False, "required": ["day"],
                                "properties": {"day": {"enum": ["mon", "tue"]}}},
                       "notes": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2}}}}}
TOOLS = [WEATHER, BOOKING]
ASK = [{"role": "user", "content": "Is it raining in Paris? Book for two on Monday."}]


def _valid_call(call) -> dict:
    """The call's arguments, checked against its tool's schema."""
    tool = {t["function"]["name"]: t["function"] for t in TOOLS}[call.function.name]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["parameters"])
    assert call.type == "function" and call.id.startswith("call_")
    return arguments


def _streamed_calls(stream) -> tuple[str, list[dict], str]:
    """Content, the calls the tool-call deltas add up to, and the finish reason of a chat stream."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
                call["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_tool_choice_required_and_named_give_calls_that_follow_the_schemas(client):
    """`required` and a named function decode under the tools' schemas (even a random model's calls
    validate), stream as tool-call deltas adding up to the same call, and finish with tool_calls."""
    r = client.chat.completions.create(model=TOOLS_MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=120, temperature=1.0, n=3, seed=5)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls and all(_valid_call(c) is not None for c in choice.message.tool_calls)
    one = client.chat.completions.create(model=TOOLS_MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=120, temperature=1.0, n=4, seed=2)
    assert all(len(c.message.tool_calls) == 1 for c in one.choices)
    named = {"type": "function", "function": {"name": "book_table"}}
    r = client.chat.completions.create(model=TOOLS_MODEL, messages=ASK, tools=TOOLS, tool_choice=named,
                                       max_tokens=120, temperature=0)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "book_table" and 1 <= _valid_call(call)["guests"] <= 8
    assert r.choices[0].finish_reason == "tool_calls"
    content, calls, finish = _streamed_calls(client.chat.completions.create(
        model=TOOLS_MODEL, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=120, temperature=0, stream=True))
    assert content == "" and finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [("book_table", call.function.arguments)]


def test_tool_choice_auto_parses_hermes_calls_out_of_the_text(client):
    """With tool_choice auto the answer is free text, and `<tool_call>` blocks in it become calls:
    here a regex holds the random model to a reply that holds one, so the parse is exercised
    end to end, whole and streamed."""
    reply = (r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", '
             r'"unit": "C"\}\}\n</tool_call>')
    kwargs = dict(model=TOOLS_MODEL, messages=ASK, tools=TOOLS, max_tokens=80, temperature=0,
                  extra_body={"structured_outputs": {"regex": reply}})
    r = client.chat.completions.create(**kwargs)
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].message.content == "Checking." and r.choices[0].finish_reason == "tool_calls"
    assert _valid_call(call)["city"] in ("Paris", "Rome")
    content, calls, finish = _streamed_calls(client.chat.completions.create(**kwargs, stream=True))
    assert content.strip() == "Checking." and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", json.loads(call.function.arguments))]
    plain = client.chat.completions.create(model=TOOLS_MODEL, messages=ASK, tools=TOOLS, max_tokens=8, temperature=0,
                                           extra_body={"guided_choice": ["<tool_call> not JSON"]})
    assert plain.choices[0].message.content == "<tool_call> not JSON" and not plain.choices[0].message.tool_calls


def test_tool_calls_and_results_go_back_through_the_template(srv, client, tok):
    """A conversation with an assistant's calls and the tools' results renders (the tiny models'
    ChatML template knows no tools, so the Hermes format writes them into the turns) and is answered."""
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain, 12 C"}]
    ids = httpx.post(srv.url + "/tokenize", json={"model": TOOLS_MODEL, "messages": history, "tools": TOOLS}).json()
    text = tok.decode(ids["tokens"], skip_special_tokens=False)
    assert "<tools>" in text and '"name": "book_table"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nrain, 12 C\n</tool_response>" in text
    r = client.chat.completions.create(model=TOOLS_MODEL, messages=history, tools=TOOLS, max_tokens=4)
    assert r.usage.prompt_tokens == ids["count"]
    none = httpx.post(srv.url + "/tokenize", json={"model": TOOLS_MODEL, "messages": ASK}).json()
    r = client.chat.completions.create(model=TOOLS_MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert r.usage.prompt_tokens == none["count"] and not r.choices[0].message.tool_calls   # tools not shown
    shown = httpx.post(srv.url + "/tokenize", json={"model": "tiny-w8a8", "messages": ASK, "tools": TOOLS})
    assert shown.status_code == 200 and shown.json()["count"] > none["count"]   # no parser needed to render


def test_openai_parse_helpers_get_typed_answers(client):
    """The openai client's `parse` with a pydantic model, as response_format and as a strict tool."""
    class Weather(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=10)
        rain: bool

    r = client.chat.completions.parse(model=TOOLS_MODEL, messages=ASK, response_format=Weather, max_tokens=60,
                                      temperature=0)
    assert isinstance(r.choices[0].message.parsed, Weather)
    r = client.chat.completions.parse(model=TOOLS_MODEL, messages=ASK, tools=[openai.pydantic_function_tool(Weather)],
                                      tool_choice="required", max_tokens=80, temperature=0)
    assert isinstance(r.choices[0].message.tool_calls[0].function.parsed_arguments, Weather)


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}, "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}],
      "tool_choice": "required"}, "tools"),   # a parameters schema that does not compile
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": None}]}, "messages"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"model": "tiny-w8a8"}, "tool_choice"),   # no tool-call parser: no auto
])
def test_invalid_tool_requests_are_400(srv, extra, param):
    body = {"model": TOOLS_MODEL, "messages": ASK, "tools": TOOLS} | extra
    r = httpx.post(srv.base_url + "/chat/completions", json={k: v for k, v in body.items() if v is not None})
    assert r.status_code == 400, r.text
    assert _error(r)["param"] == param, r.text


def test_a_repeated_system_prompt_hits_the_prefix_cache(srv, client):
    """The second chat with the same long system prompt reuses its pages; /metrics counts the hit."""
    def counter(name: str) -> float:
        text = httpx.get(srv.url + "/metrics").text
        return float(re.search(rf'^{name}{{model="{TOOLS_MODEL}"}} (\S+)$', text, re.M).group(1))

    system = {"role": "system", "content": "You answer questions about the weather, briefly. " * 12}
    before = counter("fineserve_prefix_cache_hits_total")
    for question in ("Rain in Oslo?", "Sun in Rome?"):
        r = client.chat.completions.create(model=TOOLS_MODEL, messages=[system, {"role": "user", "content": question}],
                                           max_tokens=2)
    assert counter("fineserve_prefix_cache_hits_total") - before >= 0.9 * r.usage.prompt_tokens - 16
    assert counter("fineserve_prefix_cache_queries_total") >= r.usage.prompt_tokens
