"""Continuous batching for one model: which sequences run in the next step, and with how many tokens.

Each step is a prefill step (chunks of prompts, new requests admitted FCFS), a decode step (one
token for every running sequence: its next output token, or, for a sequence whose prefill chunk
could not be scheduled, its next prompt token) or, with `mixed_steps`, a mixed step: every
sequence ready to decode gets its token and one prompt chunk rides along (within the token budget,
less the decode rows), so a long prompt never stalls the decodes (as Sarathi-Serve, vLLM V1).
Without running decodes, prefill goes first so new requests join the decode batch as soon as
possible. A mixed step admits at most one new request, so several short prompts that fit in one
step together get a prefill step of their own (one stall instead of one admission per step).
Which waiting requests are admitted, in what order, and which are dropped as hopeless is the
admission policy's choice (FCFS by default as here, as vLLM; or `serving.scheduling.admission`'s
SLO-aware SAAB); dropped requests finish at once with reason "dropped" and wait in `dropped` until
the engine reports them.
When the pool runs out of pages during decode, the most recently admitted sequence is preempted: its
pages are freed and it is recomputed later from its prompt plus the tokens it has generated (its
outputs are kept). A sequence admitted with the prefix cache on starts after the cached pages of its
longest cached prefix (PageManager.reuse_prefix); a preempted one often finds its own pages there.
Scheduled one step ahead, a sequence may have a sampled token still on its way to the host
(`num_pending`): it decodes it all the same (the device has it), unless that token ends it by
length; preempted, it waits for its pending tokens before it is admitted again.
Design notes: docs/serving.md.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Protocol

from serving.engine.page_manager import PageManager
from serving.engine.sequence import Sequence, SequenceStatus


@dataclass
class Admission:
    admit: list[Sequence]   # in the order to admit (the scheduler stops at its caps)
    drop: list[Sequence]    # finished at once as "dropped"


class AdmissionPolicy(Protocol):
    def select(self, waiting: list[Sequence], running: list[Sequence], now: float, *,
               seq_slots: int, token_budget: int) -> Admission:
        """Which of `waiting` (in queue order) to admit now, given `seq_slots` free sequence slots and
        `token_budget` prefill tokens for this step."""


class FCFSAdmission:
    def select(self, waiting, running, now, *, seq_slots, token_budget) -> Admission:
        return Admission(list(waiting), [])


class StepKind(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"     # one token for each of seqs[:-1], a prompt chunk for seqs[-1]


@dataclass
class ScheduledBatch:
    kind: StepKind
    seqs: list[Sequence]
    num_tokens: list[int]  # tokens each sequence computes this step

    @property
    def is_prefill(self) -> bool:
        return self.kind is StepKind.PREFILL


class Scheduler:
    def __init__(self, pages: PageManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 prefill_chunk: int, prefill_fits: Callable[[list[int]], bool] = lambda counts: True,
                 admission: AdmissionPolicy | None = None, clock: Callable[[], float] = time.time,
                 max_model_len: int | None = None, mixed_steps: bool = False):
        self.pages = pages
        self.admission = admission or FCFSAdmission()
        self.clock = clock  # wall time in serving; the simulator's clock in simulation
        self.prefill_fits = prefill_fits  # whether a prefill batch pads to a compiled shape
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk = prefill_chunk
        self.max_model_len = max_model_len if max_model_len is not None else float("inf")
        self.mixed_steps = mixed_steps
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.dropped: list[Sequence] = []  # finished by admission, not yet reported
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        if self.mixed_steps and any(seq.num_uncomputed == 1 for seq in self.running) and not self._short_burst():
            batch = self._schedule_mixed()
        else:
            batch = self._schedule_prefill()
            if batch is None:
                batch = self._schedule_decode()
        if batch is None and self.running and not any(seq.num_pending for seq in self.running):
            # Every running sequence is mid-prefill and none can get a page: free the newest.
            self.preempt(self.running[-1])
            return self.schedule()
        return batch

    def _short_burst(self) -> bool:
        """Whether several prompts wait (mid-prefill or queued, as many as may run) and all of them
        fit in one prefill step: one step then admits them together, stalling the decodes once,
        rather than one per mixed step."""
        queued = list(self.waiting)[:max(self.max_num_seqs - len(self.running), 0)]
        prompts = [seq for seq in self.running if seq.num_uncomputed > 1] + queued
        return len(prompts) > 1 and sum(seq.num_uncomputed for seq in prompts) <= self.max_num_batched_tokens

    def _schedule_mixed(self) -> ScheduledBatch | None:
        """The decode rows of every sequence ready to decode, and one prompt chunk beside them."""
        decode = self._schedule_decode(ready_only=True)
        if decode is None:
            return self._schedule_prefill()
        chunk = self._schedule_prefill(min(self.prefill_chunk, self.max_num_batched_tokens - len(decode.seqs)),
                                       max_rows=1)
        if chunk is None:
            return decode
        return ScheduledBatch(StepKind.MIXED, decode.seqs + chunk.seqs, decode.num_tokens + chunk.num_tokens)

    def _schedule_prefill(self, budget: int | None = None, max_rows: int | None = None) -> ScheduledBatch | None:
        """Prompt chunks within `budget` tokens (default: the step's) and `max_rows` rows."""
        budget = self.max_num_batched_tokens if budget is None else budget
        max_rows = max_rows or self.max_num_seqs
        seqs, counts = [], []

        def take(seq: Sequence) -> bool:
            nonlocal budget
            if seq.num_pending:   # preempted while a step sampled for it: its tokens are not here yet
                return False
            fresh = not seq.pages and seq.num_computed == 0
            reused = self.pages.reuse_prefix(seq) if fresh else 0
            n = min(seq.num_uncomputed, self.prefill_chunk, budget)
            if n <= 0 or not self.prefill_fits(counts + [n]) or not self.pages.can_grow(seq, n):
                if fresh:   # back to how it was: the cached pages it took are idle again
                    self.pages.release(seq)
                    seq.num_computed = 0
                return False
            if fresh and self.pages.cache is not None:
                self.pages.cache.record(seq.num_tokens, reused)
            self.pages.grow(seq, n)
            seqs.append(seq)
            counts.append(n)
            budget -= n
            return True

        for seq in self.running:
            if seq.num_uncomputed > 1 and len(seqs) < max_rows:  # mid-prefill
                take(seq)
        now = self.clock()
        if self.waiting and len(self.running) < self.max_num_seqs and budget > 0 and len(seqs) < max_rows:
            choice = self.admission.select(list(self.waiting), self.running, now,
                                           seq_slots=self.max_num_seqs - len(self.running), token_budget=budget)
            for seq in choice.drop:
                self.finish(seq, "dropped")
                self.dropped.append(seq)
            for seq in choice.admit:
                if (len(self.running) >= self.max_num_seqs or budget <= 0 or len(seqs) >= max_rows
                        or not take(seq)):
                    break
                self.admit(seq, now)
        return ScheduledBatch(StepKind.PREFILL, seqs, counts) if seqs else None

    def admit(self, seq: Sequence, now: float) -> None:
        """Move `seq` (given its first pages by `take`) from waiting to running."""
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        if seq.metrics.first_scheduled_time is None:
            seq.metrics.first_scheduled_time = now
        self.running.append(seq)

    def _schedule_decode(self, ready_only: bool = False) -> ScheduledBatch | None:
        """One token for every running sequence (`ready_only`: for those whose prompt is computed)."""
        seqs = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or (
                    seq.num_pending and seq.length_reached(self.max_model_len, pending=True)):
                continue  # preempted below while making room, or finished by the token on its way
            if ready_only and seq.num_uncomputed != 1:
                continue
            while not self.pages.can_grow(seq, 1):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self.pages.grow(seq, 1)
                seqs.append(seq)
        return ScheduledBatch(StepKind.DECODE, seqs, [1] * len(seqs)) if seqs else None

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pages.release(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and return its pages; works for waiting and running sequences."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.pages.release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.metrics.finished_time = self.clock()
