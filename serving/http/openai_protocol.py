"""The OpenAI API's request and response bodies (the subset served), as pydantic models.

Known fields are strict: a wrong type or a value out of range is a 400 with an OpenAI-style error
body naming the parameter, never a silent default; so is a known feature the server does not
offer (the legacy `functions`). Tool calling is `tools` / `tool_choice` (tool_calls). Structured
outputs come as OpenAI's `response_format` (json_object, json_schema) or vLLM's `guided_json` /
`guided_regex` / `guided_choice` / `guided_grammar` / `structured_outputs`. Unknown top-level
fields are accepted and ignored, as vLLM does (clients send vendor fields), and the server names
them in its log and in the `X-Fineserve-Ignored-Fields` response header; inside nested objects
unknown fields stay errors.
Besides OpenAI's sampling fields, the vLLM extensions are accepted (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids, skip_special_tokens,
include_stop_str_in_output, stream_options.continuous_usage_stats, /tokenize, /detokenize), and
ours: `sparse`, the request's query-aware page selection. The bounds below are also what the
served OpenAPI schema advertises, so a schema-driven client (or fuzzer) sees the real limits.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pallas_kernels.page_selection import POLICY_IDS
from serving.engine.sampling import MAX_ABS_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES, MAX_LOGPROBS

MAX_N = 8            # samples per request
MAX_STOP = 8         # stop strings per request
MAX_STOP_LEN = 256   # characters per stop string
MAX_SEED = 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # JSON types as the schema says: no true for 1


class _Body(BaseModel):
    """A request body: strict about its fields, lenient about fields it does not know."""
    model_config = ConfigDict(extra="allow", strict=True)

    @property
    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


# ---- errors -------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---- requests -----------------------------------------------------------------------------------
class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False   # vLLM's: usage so far in every chunk


class SparseOptions(_Strict):
    """Page selection for this request's decoding (an extension): a policy and a budget, in tokens
    or as a fraction of the context."""
    policy: Literal[tuple(POLICY_IDS)] = "bbox"
    budget_tokens: int | None = Field(None, ge=1, le=1 << 24)
    budget_fraction: float | None = Field(None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_budget(self):
        if self.budget_tokens is not None and self.budget_fraction is not None:
            raise ValueError("give budget_tokens or budget_fraction, not both")
        return self


StopField = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LEN)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


Unserved = Any | None   # a known field whose feature is not served: a 400 when a request asks for it

LogitBias = Annotated[dict[str, Annotated[float, Field(ge=-MAX_ABS_LOGIT_BIAS, le=MAX_ABS_LOGIT_BIAS)]],
                      Field(max_length=MAX_LOGIT_BIAS_ENTRIES)]


class _SamplingRequest(_Body):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=1 << 20)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopField | Annotated[list[StopField], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=-MAX_SEED, le=MAX_SEED)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = Field(None, max_length=256)
    logit_bias: LogitBias | None = None   # token id (as a string) -> bias
    # vLLM extensions
    top_k: int = Field(0, ge=-1, le=1 << 20)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0, le=1 << 20)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured outputs (vLLM's; one at most, or response_format on chat)
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1, max_length=256)] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None   # {"json" | "regex" | "choice" | "grammar" | "json_object": ...}
    # ours
    sparse: SparseOptions | None = None


class CompletionRequest(_SamplingRequest):
    prompt: (Annotated[str, Field(min_length=1)]
             | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=16)]
             | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=16)])
    max_tokens: int | None = Field(16, ge=1, le=1 << 20)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N)  # only best_of == n (no re-ranking)
    suffix: None = None  # insertion is not supported


class TextPart(_Strict):
    type: Literal["text"]
    text: str


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class CalledFunction(_Strict):
    name: FunctionName
    arguments: str = Field(max_length=1 << 20)   # JSON text, as the model wrote it


class MessageToolCall(_Strict):
    """A call an earlier assistant turn made."""
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None   # null only on an assistant turn that made tool calls
    name: str | None = Field(None, max_length=64)
    tool_calls: Annotated[list[MessageToolCall], Field(min_length=1, max_length=64)] | None = None  # assistant
    tool_call_id: str | None = Field(None, min_length=1, max_length=256)   # a tool result's call

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (null only on an assistant message with tool_calls)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs tool_call_id, and only a tool message has one")
        return self


class FunctionDefinition(_Strict):
    name: FunctionName
    description: str | None = Field(None, max_length=1 << 16)
    parameters: dict[str, Any] | None = None   # a JSON schema of the arguments object
    strict: bool | None = None                 # arguments always follow `parameters` when constrained


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None   # {"name", "schema", "strict"}: the output follows "schema"


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 20)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: bool = True
    functions: Unserved = None   # the legacy form of tools
    function_call: Unserved = None


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a completion prompt, or chat messages through the model's chat template
    (one of the two)."""
    model: str = Field(min_length=1, max_length=256)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=256)
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None   # shown to the model, with messages
    add_special_tokens: bool | None = None     # default: True for a prompt, False for messages
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str = Field(min_length=1, max_length=256)
    tokens: list[TokenId]


# ---- responses ----------------------------------------------------------------------------------
FinishReason = Literal["stop", "length", "tool_calls", "abort"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class _Choice(BaseModel):
    index: int
    finish_reason: FinishReason = None


class _Response(BaseModel):
    """What every completion body and chunk starts with."""

    id: str
    created: int
    model: str


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(_Response):  # also each chunk of a completions stream, as in OpenAI's API
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A piece of a streamed call: the first names it (id, type, function.name), later ones add
    to its arguments."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Choice):
    delta: Delta
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fineserve"
    max_model_len: int
    precision: str
    kv_dtype: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "draining"]
    models: dict[str, dict[str, int]]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
