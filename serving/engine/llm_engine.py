"""Single-model engine: request queue, continuous batching, streaming outputs, per-request timing.

`add_request` queues a prompt; each `step` runs one batch (chosen by the Scheduler) through the
ModelRunner and returns a RequestOutput for every request that produced a token or finished
(including requests the admission policy dropped, with finish reason "dropped").
Requests that arrive while others are decoding join the running batch at the next step, as in
vLLM's continuous batching (arXiv 2309.06180). `add_samples` queues a request's `n` samples as n
one-sample requests, all or nothing.

With `async_scheduling` (the default) a step launches the next batch before it reads the tokens of
the one launched before (one step ahead), so the host's scheduling, batching and detokenising run
while the device computes: a token reaches its request one step after its batch is launched, and a
sequence that finished in the step before computes one more token, thrown away. A step whose
batch needs the previous tokens on the host (penalties over the history, structured outputs)
waits for them first. `async_scheduling=False` waits for every step's tokens before the next.

The simulator builds the same engine with a runner that stands in for the device (`runner=`), an
allocator-only pool and its own clock (`clock=`), so scheduling runs the code that serves.
Design notes: docs/serving.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from models.tensor_parallel import check_tensor_parallel, local_layout, tp_mesh
from pallas_kernels.implementation import KERNEL_CHOICES, resolve_kernels
from pallas_kernels.kv_pages import KVPageLayout
from pallas_kernels.page_selection import SparseSpec
from serving.kv.group_pool import GroupKVPool
from serving.kv.kv_pool import KVPool
from serving.kv.pool_sizing import check_reports_memory, device_memory_stats, pool_bytes_for_utilization
from serving.kv.slab_geometry import slab_bytes_for
from serving.engine.model_runner import ModelRunner
from serving.engine.page_manager import PageManager
from serving.engine.prefix_cache import PrefixCache
from serving.engine.sampling import (SPARSE_MODEL_FIELDS, SamplingParams, find_stop, longest_partial_stop_suffix,
                                     sparse_spec)
from serving.engine.scheduler import ScheduledBatch, Scheduler, StepKind
from serving.engine.structured_output import GrammarCache
from serving.engine.sequence import RequestOutput, Sequence, SequenceStatus, TokenLogprobs


class PromptTooLongError(ValueError):
    pass


@dataclass
class EngineConfig:
    max_num_seqs: int = 32
    max_model_len: int = 2048
    max_num_batched_tokens: int = 512
    prefill_chunk: int = 512
    seed: int = 0
    kernels: str = "auto"  # see pallas_kernels.implementation: auto, xla, pallas, interpret
    # Query-aware page selection for decode: the requests' default (a SparseSpec or a dict of its
    # fields); None: off, and the model's pages keep no key bounds (requests cannot turn it on).
    sparse: SparseSpec | dict | None = None
    sparse_dense_layers: int = 2  # the first layers always attend every page (Quest keeps two)
    sparse_recall_every: int = 0  # measure selection recall every that many decode steps (0: never)
    enable_prefix_caching: bool = True  # reuse the KV pages of earlier requests' equal prefixes
    async_scheduling: bool = True       # launch each step before the last one's tokens reach the host
    mixed_steps: bool = True            # decode rows and a prompt chunk in one step (no prefill stalls)

    def __post_init__(self):
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {self.kernels!r}")
        self.sparse = sparse_spec(self.sparse, SPARSE_MODEL_FIELDS)
        for name in ("enable_prefix_caching", "async_scheduling", "mixed_steps"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("sparse_dense_layers", "sparse_recall_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("max_num_seqs", "max_model_len", "max_num_batched_tokens", "prefill_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        self.prefill_chunk = min(self.prefill_chunk, self.max_num_batched_tokens)


@dataclass
class StepStats:
    """Where the time of the last steps went: host (scheduling, batching, sampling bookkeeping,
    detokenising) versus waiting for the device program."""

    steps: int = 0
    tokens: int = 0
    total_seconds: float = 0.0
    device_seconds: float = 0.0
    decode_kv_bytes_read: int = 0      # KV bytes decode attention read (page selection reads fewer)
    decode_kv_bytes_dense: int = 0     # what dense attention would have read in those steps
    recall_hits: int = 0               # sampled steps: selected pages among the top by attention mass
    recall_pages: int = 0              # ... of this many selected
    ahead: int = 0                     # steps launched before the previous step's tokens were read
    # (StepKind, rows, total seconds, device seconds) of the most recent steps: total is the host's
    # time in `step`, device the part of it spent waiting for a step's tokens
    per_step: deque = field(default_factory=lambda: deque(maxlen=100_000))

    @property
    def host_share(self) -> float:
        return 1.0 - self.device_seconds / self.total_seconds if self.total_seconds else 0.0


@dataclass
class LaunchedStep:
    """A batch launched on the device whose sampled tokens the engine has not read yet."""

    batch: ScheduledBatch
    sample_rows: list[bool]   # rows that sample a token (the others are mid-prefill)
    pending: object           # the runner's handle: `result()` waits for the tokens


class LLMEngine:
    def __init__(self, model, layout: KVPageLayout, pool: KVPool, model_key: str, config: EngineConfig,
                 tokenizer=None, eos_token_ids: tuple[int, ...] = (), *, admission=None, runner=None,
                 clock: Callable[[], float] = time.time, reclaim: Callable[[], bool] | None = None):
        """admission: an `AdmissionPolicy` (default FCFS). runner: anything with ModelRunner's
        `execute` and `prefill_fits` (default: a ModelRunner of `model`). reclaim: asked for memory
        when the shared pool is short of pages (the device runtime compacts other models)."""
        self.clock = clock
        self.config = config
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.pool = pool
        self.layout = layout
        self.pages = PageManager(pool.allocator, model_key, layout, reclaim=reclaim,
                                 cache=PrefixCache() if config.enable_prefix_caching else None)
        if config.sparse is not None and not layout.key_bounds:
            raise ValueError("page selection (sparse) needs a page layout with key bounds (key_bounds=True)")
        pool_pages = pool.allocator.capacity_pages(model_key)
        if pool_pages < layout.pages_for(config.max_model_len):
            raise ValueError(
                f"the KV pool holds {pool_pages * layout.tokens_per_page} tokens for this model, fewer than "
                f"max_model_len={config.max_model_len}; give it more KV cache memory or lower max_model_len")
        self.runner = runner or ModelRunner(model, layout, max_num_seqs=config.max_num_seqs,
                                            max_model_len=config.max_model_len,
                                            max_num_batched_tokens=config.max_num_batched_tokens,
                                            prefill_chunk=config.prefill_chunk,
                                            kernels=resolve_kernels(config.kernels), sparse=config.sparse,
                                            sparse_dense_layers=config.sparse_dense_layers,
                                            recall_every=config.sparse_recall_every, mesh=pool.mesh,
                                            mixed_steps=config.mixed_steps)
        self.scheduler = Scheduler(self.pages, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   prefill_chunk=config.prefill_chunk,
                                   prefill_fits=self.runner.prefill_fits, admission=admission, clock=clock,
                                   max_model_len=config.max_model_len,
                                   mixed_steps=config.mixed_steps and self.runner.mixed_steps)
        self.vocab_size = self.runner.vocab_size
        self._grammars: GrammarCache | None = None   # built on the first structured-output request
        self._seeds = np.random.default_rng(config.seed)
        self._ids = itertools.count()
        self.requests: dict[str, Sequence] = {}
        self.stats = StepStats()
        self.blocked = False  # the last step found requests but no pages for any of them
        self.in_flight: LaunchedStep | None = None   # launched, tokens not read yet (async scheduling)

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, *, prompt: str | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        ids = [int(t) for t in prompt_token_ids]
        self.validate_prompt(ids)
        self.validate_params(params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else int(self._seeds.integers(0, 2**31))
        detok = self.tokenizer.decode_stream(skip_special_tokens=params.skip_special_tokens) if self.tokenizer else None
        constraint = self.grammars.constraint(params.structured_outputs) if params.structured_outputs else None
        seq = Sequence(request_id, prompt, ids, params, seed, detok,
                       arrival_time if arrival_time is not None else self.clock(), constraint)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def add_samples(self, prompt_token_ids: list[int], params: SamplingParams, *, prompt: str | None = None,
                    request_ids: list[str] | None = None) -> list[str]:
        """Queue the `params.n` samples of one prompt as n requests of one sample each, seeds `seed`,
        `seed + 1`, ... (independent draws when unseeded); their request ids. All or nothing: if one
        cannot be queued, those already queued are aborted."""
        if request_ids is not None and len(request_ids) != params.n:
            raise ValueError(f"{params.n} samples need {params.n} request ids, got {len(request_ids)}")
        added: list[str] = []
        try:
            for i in range(params.n):
                sample = params if params.n == 1 else dataclasses.replace(
                    params, n=1, seed=None if params.seed is None else params.seed + i)
                added.append(self.add_request(prompt_token_ids, sample, prompt=prompt,
                                              request_id=None if request_ids is None else request_ids[i]))
        except BaseException:
            for rid in added:
                self.abort_request(rid)
            raise
        return added

    def use_clock(self, clock: Callable[[], float]) -> None:
        """Stamp request times with `clock` from now on (a replay's clock, relative to its start)."""
        self.clock = self.scheduler.clock = clock

    def validate_prompt(self, ids) -> None:
        """Raise ValueError (PromptTooLongError for length) if `ids` cannot be served."""
        if len(ids) == 0:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids outside [0, {self.vocab_size}): {bad[:5]}")
        limit = self.config.max_model_len
        if len(ids) >= limit:
            raise PromptTooLongError(
                f"the prompt is {len(ids)} tokens long; this model's maximum context is {limit} tokens "
                f"(prompt plus at least one generated token)")

    def validate_params(self, params: SamplingParams) -> None:
        """Raise ValueError for settings this model cannot honour: page selection on a model
        started without it, logit_bias on tokens outside the vocabulary, a structured-output
        constraint that does not compile (compiled here once, then cached)."""
        if params.logit_bias and (bad := [t for t in params.logit_bias if t >= self.vocab_size]):
            raise ValueError(f"logit_bias: token ids outside [0, {self.vocab_size}): {bad[:5]}")
        if params.structured_outputs is not None:
            self.grammars.compiled(params.structured_outputs)
        if params.sparse is not None and params.sparse.policy != "full" and self.config.sparse is None:
            raise ValueError(f"sparse: policy {params.sparse.policy!r} needs a model started with page "
                             "selection (its sparse setting); this one keeps no key bounds")
        if params.sparse is not None:
            try:
                params.sparse.check_layers(self.layout.num_layers)
            except ValueError as e:
                raise ValueError(f"sparse: {e}") from None

    @property
    def grammars(self) -> GrammarCache:
        """The model's structured-output engine (ValueError without a tokenizer)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs: the model has no tokenizer to build a grammar against")
            self._grammars = GrammarCache(self.tokenizer, self.vocab_size, tuple(self.eos_token_ids))
        return self._grammars

    def abort_request(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")

    def abort_all(self, reason: str = "abort") -> list[RequestOutput]:
        """Finish every request with `reason`, freeing its pages; their final outputs. The step in
        flight, if any, is forgotten (its tokens would belong to finished requests)."""
        self.in_flight = None
        outputs = []
        for seq in list(self.requests.values()):
            if not seq.is_finished:
                self.scheduler.finish(seq, reason)
            outputs.append(self._output(seq))
        self.requests.clear()
        self.scheduler.dropped.clear()
        return outputs

    def has_unfinished_requests(self) -> bool:
        """Requests queued or running, or a launched step whose tokens are still to be read."""
        return self.scheduler.has_unfinished() or self.in_flight is not None

    def queues(self) -> tuple[Iterable[Sequence], list[Sequence]]:
        """(waiting, running): the queued sequences in queue order, the admitted ones in admission order."""
        return self.scheduler.waiting, self.scheduler.running

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def live_sequences(self) -> list[Sequence]:
        """The admitted sequences that hold KV in the pool."""
        return [s for s in self.scheduler.running if s.status is SequenceStatus.RUNNING]

    def preempt_all(self) -> None:
        """Send every admitted sequence back to the queue, to be recomputed (its KV is lost)."""
        for seq in list(self.scheduler.running):
            self.scheduler.preempt(seq)

    def rename_pages(self, moves: dict[int, int]) -> None:
        """The pool moved these pages (old -> new page id): update the page tables."""
        for seq in self.scheduler.running:
            seq.pages = [moves.get(p, p) for p in seq.pages]
        self.pages.rename(moves)

    @property
    def num_compilations(self) -> int:
        return self.runner.num_compilations

    def warmup(self, sampling_variants: list[SamplingParams] | None = None,
               progress: Callable[[int], object] | None = None) -> None:
        """Compile every step shape (`runner.num_buckets` of them; `progress(1)` after each)."""
        self.pool.words = self.runner.warmup(self.pool.words, sampling_variants, progress)

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch the next batch, then read the tokens of the batch launched before it
        (async scheduling) or of this one; the outputs of requests that got a token or finished."""
        t0 = time.perf_counter()
        waited = 0.0
        outputs: list[RequestOutput] = []

        def read(launched: LaunchedStep) -> None:
            nonlocal waited
            t = time.perf_counter()
            outputs.extend(self._read_tokens(launched))
            waited += time.perf_counter() - t

        previous, self.in_flight = self.in_flight, None
        if previous is not None and any(seq.num_pending and (seq.constraint is not None or seq.params.uses_penalties)
                                        for seq in self.scheduler.running):
            read(previous)   # the next batch is built from these tokens
            previous = None
        batch = self.scheduler.schedule()
        outputs += self._report_dropped()
        launched = self._launch(batch) if batch is not None else None
        if previous is not None:
            self.stats.ahead += launched is not None
            read(previous)
        self.blocked = batch is None and previous is None and self.scheduler.has_unfinished()
        if launched is None:
            if self.blocked and not self.pool.allocator.used_pages_of_others(self.pages.model_key):
                raise RuntimeError("scheduler made no progress with requests pending")
            return outputs  # idle, or waiting for pages other models of a shared pool hold
        if self.config.async_scheduling:
            self.in_flight = launched
        else:
            read(launched)
        total = time.perf_counter() - t0
        s = self.stats
        s.steps += 1
        s.total_seconds += total
        s.device_seconds += waited
        s.per_step.append((batch.kind, len(batch.seqs), total, waited))
        return outputs

    def _launch(self, batch: ScheduledBatch) -> LaunchedStep:
        """Launch `batch` on the device; its sequences count the tokens it computes as computed,
        and those it samples as pending."""
        sample_rows = [seq.num_computed + n == seq.num_tokens for seq, n in zip(batch.seqs, batch.num_tokens)]
        self.pool.words, pending = self.runner.dispatch(self.pool.words, batch.kind, batch.seqs, batch.num_tokens)
        chunks = {StepKind.PREFILL: len(batch.seqs), StepKind.MIXED: 1, StepKind.DECODE: 0}[batch.kind]
        for i, (seq, n, samples) in enumerate(zip(batch.seqs, batch.num_tokens, sample_rows)):
            seq.num_computed += n
            if i >= len(batch.seqs) - chunks:   # a prompt chunk's row (a mixed step's is its last)
                seq.num_prefilled = seq.num_computed
            seq.num_pending += samples
            self.pages.offer_full_pages(seq)
        return LaunchedStep(batch, sample_rows, pending)

    def _read_tokens(self, launched: LaunchedStep) -> list[RequestOutput]:
        """Wait for a launched batch's tokens and append them to their requests (a request that
        finished meanwhile drops its token); the outputs of those that got one."""
        result = launched.pending.result()
        now = self.clock()
        outputs = []
        for i, seq in enumerate(launched.batch.seqs):
            if not launched.sample_rows[i]:
                continue
            seq.num_pending -= 1
            if seq.is_finished:
                continue
            self._append_token(seq, int(result.sampled[i]), result, i, now)
            outputs.append(self._output(seq))
            if seq.is_finished:
                self.requests.pop(seq.request_id, None)
            else:   # a page the next step computed may be full of known tokens now
                self.pages.offer_full_pages(seq)
        s = self.stats
        s.tokens += len(outputs)
        if not launched.batch.is_prefill:
            s.decode_kv_bytes_read += result.kv_bytes_read
            s.decode_kv_bytes_dense += result.kv_bytes_dense
            s.recall_hits += result.recall_hits
            s.recall_pages += result.recall_pages
        return outputs

    def _report_dropped(self) -> list[RequestOutput]:
        outputs = [self._output(seq) for seq in self.scheduler.dropped]
        for seq in self.scheduler.dropped:
            self.requests.pop(seq.request_id, None)
        self.scheduler.dropped.clear()
        return outputs

    def _append_token(self, seq: Sequence, token: int, result, row: int, now: float) -> None:
        p = seq.params
        seq.output_token_ids.append(token)
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        seq.metrics.token_times.append(now)
        if seq.output_logprobs is not None:
            k = p.logprobs or 0
            top = {int(t): float(v) for t, v in zip(result.top_ids[row][:k], result.top_logprobs[row][:k])}
            seq.output_logprobs.append(TokenLogprobs(token, float(result.logprobs[row]), top))
        checked_from = len(seq.text)
        if seq.constraint is not None:
            seq.constraint.consume_token(token)
        if seq.detokenizer is not None:
            seq.text += seq.detokenizer.step(token) or ""
        num_out = len(seq.output_token_ids)
        may_stop = num_out >= p.min_tokens
        reason, stop_reason = None, None
        if may_stop and not p.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif seq.constraint is not None and seq.constraint.is_stopped():   # the constraint is complete
            reason = "stop"
        elif may_stop and token in p.stop_token_ids:
            reason, stop_reason = "stop", token
        elif may_stop and p.stop and (hit := find_stop(seq.text, p.stop, checked_from)) is not None:
            index, stop = hit
            seq.text = seq.text[:index + (len(stop) if p.include_stop_str_in_output else 0)]
            reason, stop_reason = "stop", stop
        elif seq.length_reached(self.config.max_model_len):
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            seq.stop_reason = stop_reason

    def _output(self, seq: Sequence) -> RequestOutput:
        visible = seq.text
        if not seq.is_finished and seq.params.stop:
            # Hold back text that may turn out to be the start of a stop string.
            held = longest_partial_stop_suffix(seq.text, seq.params.stop)
            visible = seq.text[:len(seq.text) - held]
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [seq.output(visible)],
                             seq.is_finished, seq.metrics)

    def run_until_done(self):
        """Step until every queued request is finished; yields outputs as they are produced."""
        while self.has_unfinished_requests():
            yield from self.step()


def step_scratch_bytes(model, layout: KVPageLayout, config: EngineConfig) -> int:
    """Scratch memory (activations) of the largest step an engine of `config` takes: XLA's analysis
    of that program, compiled but not run (the pool's size does not change it)."""
    runner = ModelRunner(model, layout, max_num_seqs=config.max_num_seqs, max_model_len=config.max_model_len,
                         max_num_batched_tokens=config.max_num_batched_tokens, prefill_chunk=config.prefill_chunk,
                         kernels=resolve_kernels(config.kernels), mixed_steps=config.mixed_steps)
    return runner.largest_step_temp_bytes(jax.ShapeDtypeStruct((1, layout.page_words), jnp.uint32))


def pool_bytes_for_device(device, utilization: float,
                          models: Iterable[tuple[object, KVPageLayout, EngineConfig]]) -> int:
    """A pool of `utilization` of `device`'s memory less what is in use (the loaded weights) and less
    the largest step's scratch memory among `models` ((model, page layout, engine config) each);
    ValueError where the device cannot say (a CPU) or nothing is left."""
    stats = device_memory_stats(device)
    check_reports_memory(stats)
    activations = max((step_scratch_bytes(model, layout, config) for model, layout, config in models), default=0)
    return pool_bytes_for_utilization(utilization, stats, activations)


def engine_with_own_pool(model, config: EngineConfig, *, layout: KVPageLayout, kv_cache_bytes: int,
                         slab_bytes: int | None = None, tokenizer=None,
                         eos_token_ids: tuple[int, ...] = (), model_key: str = "model",
                         devices: list | None = None) -> LLMEngine:
    """One model alone on a pool of `kv_cache_bytes` with pages of `layout` (not yet placed; slabs
    sized for its pages unless given). `devices`: more than one makes the model tensor parallel
    over them, each with a pool of `kv_cache_bytes` holding its own kv heads; None: the default
    device."""
    devices = list(devices) if devices else [None]
    tp = len(devices)
    if tp > 1:
        check_tensor_parallel(model.config, tp)
        layout = local_layout(layout, tp)
    slab_bytes = slab_bytes or slab_bytes_for([layout.page_bytes])
    if kv_cache_bytes < slab_bytes:
        raise ValueError(f"kv_cache_bytes={kv_cache_bytes} is smaller than one slab ({slab_bytes} bytes)")
    pools = [KVPool(kv_cache_bytes // slab_bytes, slab_bytes, device) for device in devices]
    pool = pools[0] if tp == 1 else GroupKVPool(pools, tp_mesh(devices))
    layout = dataclasses.replace(layout, pages_per_slab=pool.allocator.register(model_key, layout.page_bytes))
    return LLMEngine(model, layout, pool, model_key, config, tokenizer=tokenizer, eos_token_ids=eos_token_ids)
