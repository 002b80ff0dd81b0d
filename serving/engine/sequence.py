"""One request's state inside the engine, and the outputs handed back to callers."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from serving.engine.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"    # queued, or preempted and waiting to be recomputed
    RUNNING = "running"    # holds pages; being prefilled or decoded
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished_time: float | None = None
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: dict[int, float]  # the requested number of most likely tokens -> logprob


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None       # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None

    # vLLM callers read outputs[0]; these save them the indexing for n == 1.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


class Sequence:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, seed: int, detokenizer=None, arrival_time: float | None = None,
                 constraint=None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.seed = seed
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self.pages: list[int] = []
        self.num_computed = 0  # tokens whose KV is in the pool (or being written by a dispatched step)
        self.num_prefilled = 0  # of those, the first ones a prompt chunk computed (or the prefix cache held)
        self.num_pending = 0   # tokens sampled by dispatched steps whose ids are not on the host yet
        self.page_keys: list[bytes] = []   # prefix-cache keys of its first full pages (tokens never change)
        self.num_offered_pages = 0         # its first pages the prefix cache has seen
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = ""
        self.detokenizer = detokenizer  # object with step(token_id) -> str, or None
        self.constraint = constraint  # structured outputs: an OutputConstraint fed every output token, or None
        self.metrics = RequestMetrics(arrival_time if arrival_time is not None else time.time())

    @property
    def num_tokens(self) -> int:
        """Its length: prompt, outputs, and the sampled tokens still on their way to the host."""
        return self.num_known + self.num_pending

    @property
    def num_known(self) -> int:
        """Tokens whose ids the host has: prompt and outputs."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def tokens(self, start: int, stop: int) -> list[int]:
        """The ids of tokens start..stop that the host has (shorter where some are pending)."""
        return (self.prompt_token_ids + self.output_token_ids)[start:stop]

    def length_reached(self, max_model_len: int, *, pending: bool = False) -> bool:
        """Whether its outputs reach `max_tokens` or the model's context; with `pending`, counting the
        tokens on their way too (then a step ahead need not compute past them)."""
        ahead = self.num_pending if pending else 0
        p = self.params
        return ((p.max_tokens is not None and len(self.output_token_ids) + ahead >= p.max_tokens)
                or self.num_known + ahead >= max_model_len)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def output(self, visible_text: str | None = None, index: int = 0) -> CompletionOutput:
        return CompletionOutput(index=index, text=self.text if visible_text is None else visible_text,
                                token_ids=list(self.output_token_ids), finish_reason=self.finish_reason,
                                stop_reason=self.stop_reason,
                                logprobs=list(self.output_logprobs) if self.output_logprobs is not None else None)
