"""The OpenAI-compatible HTTP server: FastAPI routes over one AsyncRuntime per device.

    app = build_app({name: ServedModel(...), ...})      # fineserve_jax.serve builds these from a fleet
    serve(app, host="127.0.0.1", port=8000)             # uvicorn, with a graceful SIGTERM/SIGINT drain

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming with SSE or
not), POST /tokenize and /detokenize (vLLM's), GET /health, GET /metrics (Prometheus), and the
OpenAPI schema at /openapi.json. Unknown top-level request fields are ignored, logged and named in
the `X-Fineserve-Ignored-Fields` response header (openai_protocol).

Errors have OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 for invalid
parameters or a prompt longer than the context, 404 for an unknown model, 429 (with Retry-After)
when the model's bounded queue is full, 503 (with Retry-After) while shutting down or when the
admission policy dropped the request, 500 when the model failed during the request (the model
recovers; other models are untouched). A client that disconnects has its request aborted and its
KV pages freed. Every request ends with one structured log line on the "fineserve.requests" logger.
Design notes: docs/serving.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.http import openai_protocol as api
from serving.runtime.async_runtime import AsyncRuntime, ModelFailed, Overloaded, RequestStream, ShuttingDown
from serving.engine.llm_engine import PromptTooLongError
from serving.engine.sampling import SamplingParams
from serving.engine.sequence import RequestOutput
from serving.engine.structured_output import StructuredOutputsParams
from serving.http.server_metrics import ServerMetrics
from serving.http.tool_calls import TOOL_CALL_FORMATS, ToolRequest, merge_calls

request_log = logging.getLogger("fineserve.requests")
log = logging.getLogger("fineserve.server")

IGNORED_FIELDS_HEADER = "X-Fineserve-Ignored-Fields"
MAX_NAMED_FIELDS = 32
PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


@dataclass
class ServedModel:
    """One model as the server sees it: where it runs and what it accepts."""

    runtime: AsyncRuntime
    tokenizer: object | None          # models.tokenizer.Tokenizer; None: token-id prompts only
    max_model_len: int
    validate_prompt: Callable[[list[int]], None]  # the engine's; raises ValueError
    validate_params: Callable[[SamplingParams], None] = lambda params: None  # the engine's; raises ValueError
    precision: str = "bf16"
    kv_dtype: str = "bf16"
    slo_ttft_s: float = 2.0
    tool_call_parser: str | None = "hermes"   # how tool_choice="auto" reads calls (tool_calls); None: no auto
    created: int = field(default_factory=lambda: int(time.time()))


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *,
                 param: str | None = None, code: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.retry_after = status, type_, param, code, retry_after

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(math.ceil(self.retry_after))} if self.retry_after is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


ERROR_RESPONSES = {status: {"model": api.ErrorResponse, "description": text} for status, text in (
    (400, "invalid request"), (404, "unknown model"), (429, "the model's queue is full (see Retry-After)"),
    (500, "the model failed while serving the request"),
    (503, "shutting down, or dropped by admission (see Retry-After)"))}


# ---------------------------------------------------------------------------------------------------
# Building requests


@dataclass
class _Prompt:
    ids: list[int]
    text: str | None


def _ignored_fields(req, endpoint: str) -> dict[str, str]:
    """The response header naming the request's unknown fields (logged too); {} when none. Names
    that are not plain identifiers (a header holds visible ASCII only), and any past the first
    MAX_NAMED_FIELDS, are counted instead."""
    if not (ignored := req.ignored_fields):
        return {}
    log.warning("%s: ignored unknown request field(s) %s", endpoint, ", ".join(map(repr, ignored[:MAX_NAMED_FIELDS])))
    named = [n for n in ignored if PLAIN_NAME.fullmatch(n)][:MAX_NAMED_FIELDS]
    rest = len(ignored) - len(named)
    return {IGNORED_FIELDS_HEADER: ", ".join(named + ([f"({rest} more)"] if rest else []))}


def _constraints(req, tools: ToolRequest | None = None) -> dict[str, object]:
    """The request's fields that constrain its output (response_format's JSON modes, vLLM's
    guided_* and structured_outputs, a required or named tool_choice), as StructuredOutputsParams
    (or their fields), by field name."""
    given = {}
    if tools is not None and (constraint := tools.constraint()) is not None:
        given["tools"] = constraint
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        given["response_format"] = {"json_object": True}
    elif fmt is not None and fmt.type == "json_schema":
        schema = (fmt.json_schema or {}).get("schema")
        if not isinstance(schema, dict):
            raise APIError(400, "response_format: json_schema needs a 'schema' object", param="response_format")
        given["response_format"] = {"json": schema}
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        if getattr(req, name) is not None:
            given[name] = {key: getattr(req, name)}
    if req.structured_outputs is not None:
        given["structured_outputs"] = req.structured_outputs
    return given


def _structured_outputs(given: dict[str, object]) -> StructuredOutputsParams | None:
    """The request's output constraint (one at most), a 400 naming the field when it is malformed."""
    if len(given) > 1:
        raise APIError(400, f"give one output constraint, got {sorted(given)}", param=sorted(given)[1])
    if not given:
        return None
    [(param, value)] = given.items()
    try:
        return StructuredOutputsParams.of(value)
    except (TypeError, ValueError) as e:
        raise APIError(400, f"{param}: {str(e).removeprefix('structured_outputs: ')}", param=param) from None


def _refuse_functions(req) -> None:
    """A 400 for the legacy `functions`, rather than an answer that ignores them."""
    if getattr(req, "functions", None) and getattr(req, "function_call", None) != "none":
        raise APIError(400, "functions: the legacy function calling is not served; send the functions as tools",
                       param="functions")


def _tool_request(model: ServedModel, tools: list[api.Tool] | None, choice=None, parallel: bool = True, *,
                  generating: bool = True) -> ToolRequest:
    """A chat request's tools and tool_choice, checked against the model (a 400 naming the field;
    `generating` False: only to render a prompt, so no parser is needed)."""
    if choice is not None and choice != "none" and not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    dumped = [t.model_dump(exclude_none=True) for t in tools or []]
    names = [t["function"]["name"] for t in dumped]
    if len(set(names)) != len(names):
        raise APIError(400, f"tools: function names must be unique, got {names}", param="tools")
    function = choice.function.name if isinstance(choice, api.NamedToolChoice) else None
    choice = "function" if function is not None else choice or ("auto" if tools else "none")
    if choice == "auto" and tools and model.tool_call_parser is None and generating:
        raise APIError(400, "tool_choice: this model has no tool-call parser, so no 'auto'; use 'required' or "
                            "name a function", param="tool_choice")
    try:
        return ToolRequest(dumped, choice, parallel, TOOL_CALL_FORMATS[model.tool_call_parser or "hermes"], function)
    except ValueError as e:
        raise APIError(400, str(e), param="tool_choice") from None


def _logit_bias(req) -> dict[int, float] | None:
    if req.logit_bias is None:
        return None
    if bad := [k for k in req.logit_bias if not k.isdigit()]:
        raise APIError(400, f"logit_bias keys must be token ids (decimal strings), got {bad[:5]}", param="logit_bias")
    return {int(k): v for k, v in req.logit_bias.items()}


def _sampling_params(req, max_tokens: int | None, logprobs: int | None,
                     constraints: dict[str, object]) -> SamplingParams:
    if getattr(req, "best_of", None) not in (None, req.n):
        raise APIError(400, "best_of must equal n (no server-side re-ranking)", param="best_of")
    _refuse_functions(req)
    structured = _structured_outputs(constraints)
    try:
        return SamplingParams(
            n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
            seed=None if req.seed is None else req.seed % 2**31, repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, stop=req.stop,
            stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, max_tokens=max_tokens,
            min_tokens=req.min_tokens, logprobs=logprobs, include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens, logit_bias=_logit_bias(req), structured_outputs=structured,
            sparse=req.sparse.model_dump(exclude_none=True) if req.sparse is not None else None)
    except ValueError as e:
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0].rstrip(":")) from None


def _checked_params(model: ServedModel, params: SamplingParams, constraints: dict[str, object]) -> SamplingParams:
    """`params` if the model can honour them, else a 400 naming the request's parameter (for a
    constraint, the field that asked for it)."""
    try:
        model.validate_params(params)
    except ValueError as e:
        message, param = str(e), str(e).split(" ", 1)[0].rstrip(":")
        if param == "structured_outputs":   # the request's name for its constraint
            param = next(iter(constraints), param)
            message = param + message.removeprefix("structured_outputs")
        raise APIError(400, message, param=param) from None
    return params


def _check_prompt(model: ServedModel, prompt: _Prompt, max_tokens: int | None, param: str) -> int:
    """Validate one prompt (the request's `param`); returns the max_tokens to use (default: the
    rest of the context)."""
    try:
        model.validate_prompt(prompt.ids)
    except PromptTooLongError as e:
        raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
    except ValueError as e:
        raise APIError(400, str(e), param=param) from None
    room = model.max_model_len - len(prompt.ids)
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise APIError(400, f"this model's maximum context length is {model.max_model_len} tokens; the request "
                            f"asks for {len(prompt.ids) + max_tokens} ({len(prompt.ids)} in the prompt, "
                            f"{max_tokens} to generate)", param="max_tokens", code="context_length_exceeded")
    return max_tokens


def _tokenizer(model: ServedModel, name: str):
    if model.tokenizer is None:
        raise APIError(400, f"model {name!r} has no tokenizer; send the prompt as token ids", param="prompt")
    return model.tokenizer


def _completion_prompts(model: ServedModel, name: str, prompt) -> list[_Prompt]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt[0], int):
        prompt = [prompt]
    if isinstance(prompt[0], str):
        tok = _tokenizer(model, name)
        return [_Prompt(tok.encode(p), p) for p in prompt]
    return [_Prompt(list(ids), None) for ids in prompt]


def _plain_message(m: api.ChatMessage) -> dict:
    plain = {"role": m.role if m.role != "developer" else "system",
             "content": m.content if isinstance(m.content, str | None) else "".join(p.text for p in m.content)}
    if m.tool_calls:
        plain["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        plain["tool_call_id"] = m.tool_call_id
    return plain


def _chat_text(model: ServedModel, name: str, messages: list[api.ChatMessage], tools: ToolRequest,
               add_generation_prompt: bool = True) -> str:
    """The messages (and the tools offered) through the model's chat template."""
    tok = _tokenizer(model, name)
    plain, variables = tools.messages([_plain_message(m) for m in messages], tok.chat_template_renders_tools)
    try:
        return tok.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, **variables)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None


def _chat_prompt(model: ServedModel, name: str, messages: list[api.ChatMessage], tools: ToolRequest) -> _Prompt:
    return _Prompt(model.tokenizer.encode(_chat_text(model, name, messages, tools), add_special_tokens=False), None)


# ---------------------------------------------------------------------------------------------------
# One request in flight


class _Job:
    """A request's streams (one per prompt), the log line and metrics when it ends."""

    def __init__(self, server: "_Server", name: str, kind: str):
        self.server, self.name, self.kind = server, name, kind
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = server.models[name]
        self.streams: list[RequestStream] = []
        self.prompts: list[_Prompt] = []
        self.status = "ok"
        self.start = time.time()
        self.closed = False

    def submit(self, prompts: list[_Prompt], params: SamplingParams) -> None:
        self.prompts = prompts
        runtime = self.model.runtime
        asked, bound = len(prompts) * params.n, runtime.limits[self.name].max_pending
        if asked > bound:  # no retry could ever fit it: a 400 (like other invalid input, before any log line)
            raise APIError(400, f"this request asks for {asked} sequences ({len(prompts)} prompts x n={params.n}); "
                                f"model {self.name!r} holds at most {bound} queued or running",
                           param="n" if params.n > 1 else "prompt")
        try:
            for i, p in enumerate(prompts):
                self.streams.append(runtime.submit(self.name, p.ids, params, prompt=p.text,
                                                   request_id=f"{self.id}-{i}"))
        except Overloaded as e:
            self.close("overloaded")
            raise APIError(429, str(e), "rate_limit_error", code="overloaded", retry_after=e.retry_after) from None
        except ShuttingDown as e:
            self.close("shutting_down")
            raise APIError(503, str(e), "service_unavailable", code="shutting_down", retry_after=5) from None

    async def events(self):
        """(choice index, output) for every output of every prompt's samples, merged as they come."""
        n = len(self.streams[0].sample_ids)
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(p, stream):
            try:
                async for j, out in stream:
                    await queue.put((p * n + j, out))
                await queue.put(None)
            except (ModelFailed, ShuttingDown) as e:
                await queue.put(e)

        tasks = [asyncio.create_task(pump(p, s)) for p, s in enumerate(self.streams)]
        try:
            done = 0
            while done < len(tasks):
                item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, Exception):
                    raise self._error(item)
                else:
                    if item[1].finished and item[1].finish_reason == "dropped":
                        self.status = "dropped"
                        raise APIError(503, "the request was dropped: it could not meet the model's latency SLO "
                                            "under the current load", "service_unavailable", code="dropped",
                                       retry_after=self.model.runtime.retry_after(self.name))
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    def _error(self, e: Exception) -> APIError:
        if isinstance(e, ShuttingDown):
            self.status = "shutting_down"
            return APIError(503, str(e), "service_unavailable", code="shutting_down", retry_after=5)
        self.status = "model_error"
        return APIError(500, str(e), "server_error", code="model_error")

    def close(self, status: str | None = None) -> None:
        """Abort what is unfinished, give the slots back, record metrics and the log line (once)."""
        if self.closed:
            return
        self.closed = True
        if status is not None and self.status == "ok":
            self.status = status
        for s in self.streams:
            self.model.runtime.abort(s)
            self.model.runtime.release(s)
        outs = [o for s in self.streams for o in s.finished.values()]
        prompt_tokens = sum(len(p.ids) for p in self.prompts)
        output_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        metrics = [o.metrics for o in outs if o.metrics is not None]
        # From the HTTP request's arrival (tokenizing and queueing included), as a client sees it.
        firsts = [m.first_token_time - self.start for m in metrics if m.first_token_time is not None]
        ttft = min(firsts) if firsts else None
        e2e = time.time() - self.start if outs else None
        self.server.metrics.observe(self.name, self.status, prompt_tokens, output_tokens, ttft, e2e)
        request_log.info(json.dumps({
            "event": "request", "id": self.id, "model": self.name, "endpoint": self.kind, "status": self.status,
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "ttft_s": None if ttft is None else round(ttft, 4), "e2e_s": round(time.time() - self.start, 4),
            "finish_reasons": sorted({o.outputs[0].finish_reason for o in outs if o.outputs[0].finish_reason})}))


def _usage(job: _Job, outputs: dict[int, RequestOutput]) -> api.Usage:
    """Usage of the request's choices, final or so far."""
    prompt = sum(len(p.ids) for p in job.prompts)
    completion = sum(len(o.outputs[0].token_ids) for o in outputs.values())
    return api.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _token_text(tok, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False) if tok is not None else str(token_id)


def _completion_logprobs(tok, entries, offset: int) -> api.CompletionLogprobs:
    tokens, values, tops, offsets = [], [], [], []
    for e in entries:
        text = _token_text(tok, e.token_id)
        tokens.append(text)
        values.append(e.logprob)
        tops.append({_token_text(tok, t): v for t, v in e.top.items()})
        offsets.append(offset)
        offset += len(text)
    return api.CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def _chat_logprobs(tok, entries) -> api.ChoiceLogprobs:
    def one(token_id, logprob):
        text = _token_text(tok, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return api.ChoiceLogprobs(content=[api.TokenLogprob(**one(e.token_id, e.logprob),
                                                        top_logprobs=[api.TopLogprob(**one(t, v)) for t, v in e.top.items()])
                                       for e in entries])


def _finish(reason: str | None) -> str | None:
    return reason if reason in ("stop", "length", None) else "abort"


class _Delta:
    """What a stream has already sent of one choice, to send only what is new."""

    def __init__(self):
        self.text = 0
        self.logprobs = 0

    def step(self, out: RequestOutput) -> tuple[str, list]:
        c = out.outputs[0]
        text = c.text[self.text:] if len(c.text) > self.text else ""
        self.text = max(self.text, len(c.text))
        new_lp = (c.logprobs or [])[self.logprobs:]
        self.logprobs += len(new_lp)
        return text, new_lp


# ---------------------------------------------------------------------------------------------------
# The app


class _Server:
    def __init__(self, models: dict[str, ServedModel], drain_timeout_s: float):
        self.models = models
        self.runtimes = list({id(m.runtime): m.runtime for m in models.values()}.values())
        self.metrics = ServerMetrics(self.runtimes, {n: m.slo_ttft_s for n, m in models.items()})
        self.drain_timeout_s = drain_timeout_s
        self.draining = False
        self._drain_task: asyncio.Task | None = None

    def model(self, name: str) -> ServedModel:
        if name not in self.models:
            raise APIError(404, f"the model {name!r} does not exist; served: {sorted(self.models)}",
                           param="model", code="model_not_found")
        return self.models[name]

    def start_drain(self) -> asyncio.Task:
        """Stop accepting; in-flight requests get `drain_timeout_s`, then are failed explicitly."""
        if self._drain_task is None:
            self.draining = True
            self._drain_task = asyncio.ensure_future(
                asyncio.gather(*(rt.drain(self.drain_timeout_s) for rt in self.runtimes)))
        return self._drain_task


async def _watch_disconnect(request: Request, job: _Job, work: asyncio.Task) -> None:
    while not work.done():
        if await request.is_disconnected():
            job.close("cancelled")
            work.cancel()
            return
        await asyncio.sleep(0.1)


class _Disconnected(Exception):
    pass


async def _run_to_end(request: Request, job: _Job) -> dict[int, RequestOutput]:
    """Every final output of a non-streaming request; a client disconnect aborts it."""
    finals: dict[int, RequestOutput] = {}

    async def collect():
        async for index, out in job.events():
            if out.finished:
                finals[index] = out

    work = asyncio.create_task(collect())
    watcher = asyncio.create_task(_watch_disconnect(request, job, work))
    try:
        await work
    except asyncio.CancelledError:
        job.close("cancelled")
        raise _Disconnected() from None
    except APIError:
        job.close()
        raise
    finally:
        watcher.cancel()
    job.close()
    return finals


def _sse(payload) -> str:
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=False)
    return f"data: {data}\n\n"


def build_app(models: dict[str, ServedModel], *, drain_timeout_s: float = 30.0) -> FastAPI:
    if not models:
        raise ValueError("the server needs at least one model")
    server = _Server(models, drain_timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        for rt in server.runtimes:
            rt.start()
        yield
        await server.start_drain()

    app = FastAPI(title="fineserve-jax", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible serving of mixed-precision models sharing a KV Slab pool")
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(_Disconnected)
    async def disconnected(request: Request, e: _Disconnected):
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: {err.get('msg')}"
                        for err in errors[:5])
        return APIError(400, msg or "invalid request", param=loc[0] if loc else None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), kind).response()

    @app.get("/v1/models", response_model=api.ModelList)
    async def list_models():
        return api.ModelList(data=[api.ModelCard(id=n, created=m.created, max_model_len=m.max_model_len,
                                                 precision=m.precision, kv_dtype=m.kv_dtype)
                                   for n, m in models.items()])

    @app.get("/health", response_model=api.Health, responses={503: {"model": api.Health}})
    async def health():
        body = api.Health(status="draining" if server.draining else "ok",
                          models={n: {"pending": m.runtime.pending(n)} for n, m in models.items()})
        return JSONResponse(body.model_dump(), status_code=503 if server.draining else 200)

    @app.get("/metrics", response_class=Response)
    @app.head("/metrics", response_class=Response, include_in_schema=False)   # scrapers probe with HEAD
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/tokenize", response_model=api.TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(req: api.TokenizeRequest, response: Response):
        model = server.model(req.model)
        response.headers.update(_ignored_fields(req, "tokenize"))
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt" if req.prompt is None else "messages")
        if req.messages is not None:   # the chat template writes the special tokens; more only if asked
            tools = _tool_request(model, req.tools, generating=False)
            text, special = _chat_text(model, req.model, req.messages, tools, req.add_generation_prompt), False
        else:
            text, special = req.prompt, True
        add = special if req.add_special_tokens is None else req.add_special_tokens
        ids = _tokenizer(model, req.model).encode(text, add_special_tokens=add)
        return api.TokenizeResponse(count=len(ids), max_model_len=model.max_model_len, tokens=ids)

    @app.post("/detokenize", response_model=api.DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize(req: api.DetokenizeRequest, response: Response):
        model = server.model(req.model)
        response.headers.update(_ignored_fields(req, "detokenize"))
        tok = _tokenizer(model, req.model)
        if bad := [t for t in req.tokens if t >= tok.vocab_size]:
            raise APIError(400, f"token ids outside the vocabulary [0, {tok.vocab_size}): {bad[:5]}", param="tokens")
        return api.DetokenizeResponse(prompt=tok.decode(req.tokens, skip_special_tokens=False))

    @app.post("/v1/completions", response_model=api.CompletionResponse, responses=ERROR_RESPONSES)
    async def completions(req: api.CompletionRequest, request: Request, response: Response):
        model = server.model(req.model)
        ignored = _ignored_fields(req, "completions")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        prompts = _completion_prompts(model, req.model, req.prompt)
        max_tokens = min(_check_prompt(model, p, req.max_tokens, "prompt") for p in prompts)
        constraints = _constraints(req)
        params = _checked_params(model, _sampling_params(req, max_tokens, req.logprobs, constraints), constraints)
        job = _Job(server, req.model, "completion")
        job.submit(prompts, params)
        tok = model.tokenizer

        def echo(i: int) -> str:
            p = prompts[i // req.n]
            return (p.text if p.text is not None else tok.decode(p.ids) if tok else "") if req.echo else ""

        if req.stream:
            return _stream(job, request, req,
                           lambda index, out, d: _completion_chunk(job, req, tok, index, out, d, echo), ignored)
        response.headers.update(ignored)
        finals = await _run_to_end(request, job)
        choices = []
        for i in sorted(finals):
            c = finals[i].outputs[0]
            lp = (_completion_logprobs(tok, c.logprobs, len(echo(i))) if req.logprobs is not None else None)
            choices.append(api.CompletionChoice(index=i, text=echo(i) + c.text, logprobs=lp,
                                                finish_reason=_finish(c.finish_reason)))
        return api.CompletionResponse(id=job.id, created=job.created, model=req.model, choices=choices,
                                      usage=_usage(job, finals))

    @app.post("/v1/chat/completions", response_model=api.ChatCompletionResponse, responses=ERROR_RESPONSES)
    async def chat_completions(req: api.ChatCompletionRequest, request: Request, response: Response):
        model = server.model(req.model)
        ignored = _ignored_fields(req, "chat/completions")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise APIError(400, "pass max_completion_tokens or max_tokens, not both", param="max_tokens")
        tools = _tool_request(model, req.tools, req.tool_choice, req.parallel_tool_calls)
        prompt = _chat_prompt(model, req.model, req.messages, tools)
        max_tokens = _check_prompt(model, prompt, req.max_completion_tokens or req.max_tokens, "messages")
        constraints = _constraints(req, tools)
        params = _checked_params(model, _sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs
                                                         else None, constraints), constraints)
        job = _Job(server, req.model, "chat")
        job.submit([prompt], params)
        tok = model.tokenizer
        if req.stream:
            parsers = {}

            def chunk(index, out, d):
                parser = parsers.setdefault(index, tools.parser()) if tools.active else None
                return _chat_chunk(job, req, tok, index, out, d, parser)

            return _stream(job, request, req, chunk, ignored)
        response.headers.update(ignored)
        finals = await _run_to_end(request, job)
        choices = [api.ChatChoice(index=i, message=message, finish_reason=finish,
                                  logprobs=_chat_logprobs(tok, finals[i].outputs[0].logprobs) if req.logprobs else None)
                   for i in sorted(finals) for message, finish in [_chat_answer(finals[i].outputs[0], tools)]]
        return api.ChatCompletionResponse(id=job.id, created=job.created, model=req.model, choices=choices,
                                          usage=_usage(job, finals))

    return app


def _completion_chunk(job, req, tok, index, out, delta: _Delta, echo) -> api.CompletionResponse | None:
    first = delta.text == 0 and delta.logprobs == 0
    text, lp = delta.step(out)
    c = out.outputs[0]
    prefix = echo(index) if first else ""
    if not text and not lp and not c.finished and not prefix:
        return None
    logprobs = _completion_logprobs(tok, lp, len(prefix)) if req.logprobs is not None else None
    return api.CompletionResponse(id=job.id, created=job.created, model=req.model, choices=[
        api.CompletionChoice(index=index, text=prefix + text, logprobs=logprobs,
                             finish_reason=_finish(c.finish_reason) if c.finished else None)])


def _chat_answer(c, tools: ToolRequest) -> tuple[api.AssistantMessage, str | None]:
    """A whole choice's message (its tool calls parsed out when tools are active) and finish reason."""
    if not tools.active:
        return api.AssistantMessage(content=c.text), _finish(c.finish_reason)
    content, deltas = tools.parser().step(c.text, final=True)
    calls = [api.ToolCall(id=call.id, function=api.FunctionCall(name=call.name, arguments=call.arguments))
             for call in merge_calls(deltas)]
    content = content.strip() if calls else content
    return (api.AssistantMessage(content=content or None, tool_calls=calls or None),
            _tool_finish(c.finish_reason, bool(calls)))


def _tool_finish(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and reason == "stop" else _finish(reason)


def _chat_chunk(job, req, tok, index, out, delta: _Delta, parser=None) -> api.ChatCompletionChunk | None:
    text, lp = delta.step(out)
    c = out.outputs[0]
    calls = []
    if parser is not None:
        text, calls = parser.step(text, c.finished)
    if not text and not calls and not lp and not c.finished:
        return None
    tool_calls = [api.DeltaToolCall(index=d.index, id=d.id, type="function" if d.id else None,
                                    function=api.DeltaFunctionCall(name=d.name, arguments=d.arguments))
                  for d in calls] or None
    finish = None
    if c.finished:
        finish = _tool_finish(c.finish_reason, parser.count > 0) if parser is not None else _finish(c.finish_reason)
    return api.ChatCompletionChunk(id=job.id, created=job.created, model=req.model, choices=[
        api.ChatChunkChoice(index=index, delta=api.Delta(content=text if text or not tool_calls else None,
                                                         tool_calls=tool_calls),
                            logprobs=_chat_logprobs(tok, lp) if req.logprobs else None, finish_reason=finish)])


def _stream(job: _Job, request: Request, req, chunk, headers: dict[str, str]) -> StreamingResponse:
    """Server-sent events, as OpenAI sends them: chunks, an optional usage chunk, `data: [DONE]`
    (with vLLM's continuous_usage_stats, every chunk also carries the usage so far). An error after
    the stream started is sent as one `data: {"error": ...}` event. If the client goes away,
    Starlette cancels this generator and `finally` aborts the request."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    chat = job.kind == "chat"

    async def events():
        deltas: dict[int, _Delta] = {}
        finals: dict[int, RequestOutput] = {}
        latest: dict[int, RequestOutput] = {}
        try:
            if chat:  # OpenAI opens each choice with the assistant role
                for i in range(len(job.prompts) * req.n):
                    yield _sse(api.ChatCompletionChunk(
                        id=job.id, created=job.created, model=req.model,
                        choices=[api.ChatChunkChoice(index=i, delta=api.Delta(role="assistant", content=""))],
                        usage=_usage(job, latest) if continuous else None))
            async for index, out in job.events():
                piece = chunk(index, out, deltas.setdefault(index, _Delta()))
                latest[index] = out
                if out.finished:
                    finals[index] = out
                if piece is not None:
                    if continuous:
                        piece.usage = _usage(job, latest)
                    yield _sse(piece)
            if include_usage:
                cls = api.ChatCompletionChunk if chat else api.CompletionResponse
                yield _sse(cls(id=job.id, created=job.created, model=req.model, choices=[], usage=_usage(job, finals)))
            job.close()
            yield _sse("[DONE]")
        except APIError as e:
            job.close()
            yield _sse(json.dumps(e.body()))
            yield _sse("[DONE]")
        finally:
            job.close("cancelled")  # no-op if already closed

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Request-Id": job.id} | headers)


# ---------------------------------------------------------------------------------------------------
# Running it


class GracefulServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains before it stops: new requests get 503, in-flight
    ones get the drain timeout to finish and are then failed explicitly; a second SIGINT forces."""

    def __init__(self, config: uvicorn.Config, fineserve: _Server):
        super().__init__(config)
        self.fineserve = fineserve
        self.loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.loop is None or self.fineserve.draining:
            return super().handle_exit(sig, frame)

        def begin():
            task = self.fineserve.start_drain()
            task.add_done_callback(lambda _: setattr(self, "should_exit", True))

        self.loop.call_soon_threadsafe(begin)  # signal handlers and tests call this off the loop

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> GracefulServer:
    return GracefulServer(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"),
                          app.state.server)
