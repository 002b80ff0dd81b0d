"""Tool calling (OpenAI's `tools` / `tool_choice`): the tools a chat request offers go into the
prompt, and the model's calls come back out of its text.

- `tool_choice="auto"`: the model writes its calls in its own format, which a `ToolCallFormat`
  both renders (tool definitions, earlier calls and results) and parses. Hermes' `<tool_call>`
  JSON blocks (Qwen2, SmolLM2, Hermes) is the format served; others plug into `TOOL_CALL_FORMATS`.
  A chat template that renders tools itself (it reads a `tools` variable) gets them; otherwise the
  format writes them into the system message.
- `"required"` and a named function constrain the output with structured outputs, as vLLM does:
  a JSON array of `{"name", "arguments"}` objects, or the named function's arguments object.
- `"none"`: the tools are not shown to the model and nothing is parsed.

Every mode parses incrementally (`feed` text as it is generated, then `finish`), so a stream sends
content as soon as it cannot be part of a call and each call as a tool-call delta; a whole answer
is the same parse fed at once. A block that is not a well-formed call to an offered tool stays in
the content, so nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from serving.engine.structured_output import StructuredOutputsParams

_DECODER = json.JSONDecoder()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class CallDelta:
    """A piece of the `index`-th call: its start carries id and name; `arguments` is JSON text,
    whole or (for a named function, streamed) a fragment to append."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str


def merge_calls(deltas: list[CallDelta]) -> list[ToolCall]:
    """The whole calls a list of deltas adds up to."""
    calls: dict[int, list] = {}
    for d in deltas:
        if d.index not in calls:
            calls[d.index] = [d.id, d.name, ""]
        calls[d.index][2] += d.arguments
    return [ToolCall(*calls[i]) for i in sorted(calls)]


# ---------------------------------------------------------------------------------------------------
# Parsers


class ToolCallParser:
    """Reads calls out of an output as it grows: `feed` the new text, `finish` at the end; each
    returns (content, call deltas) and `count` is the calls made so far."""

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        raise NotImplementedError

    def finish(self) -> tuple[str, list[CallDelta]]:
        raise NotImplementedError

    def step(self, text: str, final: bool) -> tuple[str, list[CallDelta]]:
        """`feed` the text, and `finish` if the output ends with it."""
        content, calls = self.feed(text)
        if final:
            rest, more = self.finish()
            content, calls = content + rest, calls + more
        return content, calls


class HermesParser(ToolCallParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in free text. Text that may
    still become an opening tag is held back; a call missing only its closing tag at the end of the
    output still counts."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, tools: dict[str, dict], parallel: bool = True):
        self.tools, self.parallel = tools, parallel
        self.buffer, self.in_call, self.count = "", False, 0

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        self.buffer += text
        content, calls = [], []
        while True:
            if not self.in_call:
                at = self.buffer.find(self.OPEN)
                if at < 0:
                    keep = _partial_suffix(self.buffer, self.OPEN)
                    content.append(self.buffer[:len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    break
                content.append(self.buffer[:at])
                self.buffer, self.in_call = self.buffer[at + len(self.OPEN):], True
            else:
                at = self.buffer.find(self.CLOSE)
                if at < 0:
                    break
                body, self.buffer, self.in_call = self.buffer[:at], self.buffer[at + len(self.CLOSE):], False
                self._block(body, self.CLOSE, content, calls)
        return "".join(content), calls

    def finish(self) -> tuple[str, list[CallDelta]]:
        content, calls = [], []
        if self.in_call:
            self._block(self.buffer, "", content, calls)
        else:
            content.append(self.buffer)
        self.buffer, self.in_call = "", False
        return "".join(content), calls

    def _block(self, body: str, close: str, content: list[str], calls: list[CallDelta]) -> None:
        call = self._call(body)
        if call is None:
            content.append(self.OPEN + body + close)
        else:
            calls.append(call)

    def _call(self, body: str) -> CallDelta | None:
        if self.count and not self.parallel:
            return None
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if not isinstance(value, dict):
            return None
        name, arguments = value.get("name"), value.get("arguments", value.get("parameters", {}))
        if name not in self.tools or not isinstance(arguments, dict):
            return None
        self.count += 1
        return CallDelta(self.count - 1, new_call_id(), name, json.dumps(arguments, ensure_ascii=False))


class ArrayParser(ToolCallParser):
    """What `tool_choice="required"` constrains the output to: `[{"name", "arguments"}, ...]`; each
    element becomes a call as soon as it is complete."""

    def __init__(self):
        self.buffer, self.pos, self.count = "", 0, 0

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        self.buffer += text
        calls = []
        while True:
            while self.pos < len(self.buffer) and self.buffer[self.pos] in " \t\r\n[,":
                self.pos += 1
            if self.pos >= len(self.buffer) or self.buffer[self.pos] == "]":
                break
            try:
                value, end = _DECODER.raw_decode(self.buffer, self.pos)
            except ValueError:   # not complete yet
                break
            self.pos = end
            if isinstance(value, dict) and isinstance(value.get("name"), str):   # as the constraint ensures
                calls.append(CallDelta(self.count, new_call_id(), value["name"],
                                       json.dumps(value.get("arguments", {}), ensure_ascii=False)))
                self.count += 1
        return "", calls

    def finish(self) -> tuple[str, list[CallDelta]]:
        return "", []


class NamedParser(ToolCallParser):
    """A named function's call: the whole output is its arguments, streamed as they come."""

    def __init__(self, name: str):
        self.name, self.count = name, 0

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        if not self.count:
            self.count = 1
            return "", [CallDelta(0, new_call_id(), self.name, text)]
        return "", [CallDelta(0, arguments=text)] if text else []

    def finish(self) -> tuple[str, list[CallDelta]]:
        return self.feed("") if not self.count else ("", [])


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that `tag` starts with."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# ---------------------------------------------------------------------------------------------------
# Formats: how a model is shown tools, calls and results


class HermesFormat:
    """Hermes / Qwen2 style: tool signatures in `<tools>` in the system message, calls as
    `<tool_call>` JSON, results as `<tool_response>` in a user turn."""

    name = "hermes"

    def system_text(self, tools: list[dict]) -> str:
        signatures = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n"
                f"<tools>\n{signatures}\n</tools>\n\n"
                "For each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')

    def call_text(self, name: str, arguments: str) -> str:
        return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {arguments or "{}"}}}\n</tool_call>'

    def result_text(self, content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"

    def parser(self, tools: dict[str, dict], parallel: bool) -> HermesParser:
        return HermesParser(tools, parallel)


TOOL_CALL_FORMATS = {"hermes": HermesFormat()}


# ---------------------------------------------------------------------------------------------------
# A request's tools


@dataclass
class ToolRequest:
    """A chat request's tools and choice: what the prompt shows, the constraint on the output (for
    required and named) and the parser of the answer. `tools` are OpenAI tool objects as dicts;
    `choice` is "none", "auto", "required" or "function" (the one named by `function`)."""

    tools: list[dict]
    choice: str
    parallel: bool = True
    format: HermesFormat = field(default_factory=HermesFormat)
    function: str | None = None

    def __post_init__(self):
        self.functions = {t["function"]["name"]: t["function"] for t in self.tools}
        if self.choice not in ("none", "auto", "required", "function"):
            raise ValueError(f"unknown tool_choice {self.choice!r}")
        if (self.choice == "function") != (self.function is not None):
            raise ValueError("a function is named for tool_choice 'function', and only then")
        if self.function is not None and self.function not in self.functions:
            raise ValueError(f"tool_choice names the function {self.function!r}, which is not among the tools "
                             f"{sorted(self.functions)}")
        if self.choice != "none" and not self.tools:
            raise ValueError(f"tool_choice {self.choice!r} needs tools")

    @property
    def active(self) -> bool:
        return self.choice != "none" and bool(self.tools)

    def constraint(self) -> StructuredOutputsParams | None:
        """The structured output a required or named choice decodes under; None for auto/none."""
        if self.choice == "required":
            schema = {"type": "array", "minItems": 1,
                      "items": {"anyOf": [_call_schema(name, f) for name, f in self.functions.items()]}}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutputsParams(json=schema)
        if self.choice == "function":
            return StructuredOutputsParams(json=_parameters(self.functions[self.function]))
        return None

    def parser(self) -> ToolCallParser:
        if self.choice == "required":
            return ArrayParser()
        if self.choice == "function":
            return NamedParser(self.function)
        return self.format.parser(self.functions, self.parallel)

    def messages(self, messages: list[dict], template_renders_tools: bool) -> tuple[list[dict], dict]:
        """The chat template's messages and extra variables. `messages` are plain dicts in OpenAI's
        shape (assistant `tool_calls` with JSON-text arguments, `tool` results). A template that
        renders tools gets them as HF passes them (arguments as objects); otherwise this format
        writes tools, calls and results into ordinary system, assistant and user turns."""
        shown = self.tools if self.active else None
        if template_renders_tools:
            return [_hf_message(m) for m in messages], ({"tools": shown} if shown else {})
        out: list[dict] = []
        after_result = False
        for m in messages:
            if m["role"] == "tool":   # results, consecutive ones in one user turn
                text = self.format.result_text(m.get("content") or "")
                if after_result:
                    out[-1]["content"] += "\n" + text
                else:
                    out.append({"role": "user", "content": text})
                after_result = True
                continue
            after_result = False
            if m["role"] == "assistant" and m.get("tool_calls"):
                parts = [m["content"]] if m.get("content") else []
                parts += [self.format.call_text(c["function"]["name"], c["function"]["arguments"])
                          for c in m["tool_calls"]]
                out.append({"role": "assistant", "content": "\n".join(parts)})
            else:
                out.append({"role": m["role"], "content": m.get("content") or ""})
        if shown:
            text = self.format.system_text(shown)
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{text}"}
            else:
                out.insert(0, {"role": "system", "content": text})
        return out, {}


def _parameters(function: dict) -> dict:
    return function.get("parameters") or {"type": "object", "properties": {}}


def _call_schema(name: str, function: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": _parameters(function)},
            "required": ["name", "arguments"], "additionalProperties": False}


def _hf_message(m: dict) -> dict:
    """An OpenAI message as HF chat templates take it: call arguments as objects, content a string."""
    out = {k: v for k, v in m.items() if v is not None}
    out["content"] = m.get("content") or ""
    if m.get("tool_calls"):
        out["tool_calls"] = [{"type": "function", "id": c.get("id"), "function": {
                                  "name": c["function"]["name"], "arguments": _object(c["function"]["arguments"])}}
                             for c in m["tool_calls"]]
    return out


def _object(arguments: str):
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments
