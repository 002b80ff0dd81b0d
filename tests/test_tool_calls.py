"""Tool calling without a model: the Hermes parser fed any split of a reply, the array and named
parsers, the constraints of `required` and a named function, and how tools, calls and results
reach a chat template that renders tools itself and one that does not."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from models.tokenizer import Tokenizer
from serving.http.tool_calls import ToolRequest, merge_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "time_now"}}
TOOLS = [WEATHER, CLOCK]


def _parse(request: ToolRequest, text: str, cuts: list[int]) -> tuple[str, list]:
    """Feed `text` cut at `cuts`, then finish: the content and the whole calls."""
    parser, content, deltas = request.parser(), "", []
    ends = cuts + [len(text)]
    for a, b in zip([0] + cuts, ends):
        c, d = parser.step(text[a:b], final=b == ends[-1])
        content, deltas = content + c, deltas + d
    return content, merge_calls(deltas)


def _splits(text: str, n: int = 40) -> list[list[int]]:
    rng = random.Random()
    return [[]] + [sorted(rng.sample(range(1, len(text)), rng.randint(1, min(12, len(text) - 1)))) for _ in range(n)]


REPLY = ('I will look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
         '<tool_call>{"name": "time_now", "parameters": {}}</tool_call>\n'
         '<tool_call>{"name": "no_such_tool", "arguments": {}}</tool_call> and <tool_call>not json</tool_call> '
         'a < b <tool')


def test_hermes_calls_parse_the_same_however_the_text_is_split():
    for cuts in _splits(REPLY):
        content, calls = _parse(ToolRequest(TOOLS, "auto"), REPLY, cuts)
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris"}), ("time_now", {})], cuts
        assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
        # what is not a call to an offered tool stays, as written
        assert content == ('I will look.\n\n\n<tool_call>{"name": "no_such_tool", "arguments": {}}</tool_call> and '
                           '<tool_call>not json</tool_call> a < b <tool'), cuts


def test_a_call_cut_before_its_closing_tag_still_counts_and_parallel_off_keeps_one():
    text = '<tool_call>{"name": "time_now", "arguments": {}}'
    assert [c.name for c in _parse(ToolRequest(TOOLS, "auto"), text, [7])[1]] == ["time_now"]
    content, calls = _parse(ToolRequest(TOOLS, "auto", parallel=False), REPLY, [])
    assert [c.name for c in calls] == ["get_weather"] and '"time_now"' in content
    assert _parse(ToolRequest(TOOLS, "auto"), "<tool_call>{", [])[0] == "<tool_call>{"


def test_required_calls_come_from_the_array_as_each_completes():
    text = '[{"name":"get_weather","arguments":{"city":"R, [x]"}}, {"name":"time_now","arguments":{}}]'
    for cuts in _splits(text):
        content, calls = _parse(ToolRequest(TOOLS, "required"), text, cuts)
        assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [
            ("get_weather", {"city": "R, [x]"}), ("time_now", {})], cuts


def test_a_named_function_streams_its_arguments():
    parser = ToolRequest(TOOLS, "function", function="get_weather").parser()
    first, more = parser.feed('{"ci')[1], parser.feed('ty": "Oslo"}')[1]
    assert first[0].name == "get_weather" and first[0].id and more[0].id is None
    assert merge_calls(first + more + parser.finish()[1])[0].arguments == '{"city": "Oslo"}'
    empty = ToolRequest(TOOLS, "function", function="time_now").parser()
    assert [c.name for c in merge_calls(empty.finish()[1])] == ["time_now"]


def test_constraints_of_required_and_named():
    schema = ToolRequest(TOOLS, "required").constraint().json
    assert schema["minItems"] == 1 and "maxItems" not in schema
    names = [item["properties"]["name"]["const"] for item in schema["items"]["anyOf"]]
    assert names == ["get_weather", "time_now"]
    assert ToolRequest(TOOLS, "required", parallel=False).constraint().json["maxItems"] == 1
    named = ToolRequest(TOOLS, "function", function="get_weather").constraint()
    assert named.json == WEATHER["function"]["parameters"]
    assert ToolRequest(TOOLS, "function", function="time_now").constraint().json == {"type": "object",
                                                                                     "properties": {}}
    assert ToolRequest(TOOLS, "auto").constraint() is None and not ToolRequest(TOOLS, "none").active
    with pytest.raises(ValueError, match="nope"):
        ToolRequest(TOOLS, "function", function="nope")
    with pytest.raises(ValueError, match="unknown tool_choice"):
        ToolRequest(TOOLS, "get_weather")


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
]
# A Qwen2-like template that renders tools, calls (arguments as objects) and results itself.
TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


def _tokenizer(template: str) -> Tokenizer:
    return Tokenizer(HFTokenizer(models.WordLevel({"x": 0}, unk_token="x")), chat_template=template)


def test_a_template_that_renders_tools_gets_them_as_hf_passes_them():
    tok = _tokenizer(TOOLS_TEMPLATE)
    assert tok.chat_template_renders_tools
    messages, variables = ToolRequest(TOOLS, "auto").messages(HISTORY, tok.chat_template_renders_tools)
    assert tok.apply_chat_template(messages, **variables) == (
        "<tools>get_weather;time_now;</tools>[user]Weather in Paris?[assistant]CALL get_weather Paris"
        "[tool]sunny[assistant]")
    messages, variables = ToolRequest(TOOLS, "none").messages(HISTORY, True)
    assert variables == {} and not tok.apply_chat_template(messages, **variables).startswith("<tools>")


def test_a_template_without_tools_gets_them_written_into_the_turns():
    tok = _tokenizer("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    assert not tok.chat_template_renders_tools
    system = [{"role": "system", "content": "Be brief."}]
    messages, variables = ToolRequest(TOOLS, "required").messages(system + HISTORY, False)
    assert variables == {} and [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\n# Tools") and '"name": "time_now"' in messages[0]["content"]
    assert messages[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                      '</tool_call>')
    assert messages[3]["content"] == "<tool_response>\nsunny\n</tool_response>"
    assert ToolRequest([], "none").messages(HISTORY[:1], False) == (HISTORY[:1], {})
