"""Local scheduling: which waiting requests a model admits each iteration, and which model on a
device steps next.

Admission (`Scheduler(admission=...)`, asked every prefill iteration):
  FCFSAdmission   admit in arrival order up to the sequence and token caps (vLLM's behaviour).
  SAABAdmission   FineServe's SLO-Aware Adaptive Batching (fineserve.md §5), with the step-time cost
                  model of `serving.scheduling.cost_model` in place of a profiled constant:
                  1. predict TTFT of waiting request r as `now + τ · (B + len_r)`, τ the model's
                     prefill seconds per token, B the prompt tokens still to prefill in the running
                     batch plus one per decoding request (each decode row costs about a token);
                  2. a request that cannot make its deadline (`arrival + SLO.ttft_s`) even alone is
                     hopeless: dropped at once with an explicit answer (finish reason "dropped"), or,
                     with `drop_hopeless=False`, moved behind every request that can still make it;
                  3. of the rest, taken FCFS up to the caps, the longest prompts are removed until
                     `now + τ · (B + Σ len)` meets every remaining deadline; removed requests stay
                     queued for a later iteration;
                  4. TPOT-aware variant (`slo.tpot_s` set): also remove the longest prompts while the
                     predicted decode step of the grown batch exceeds the TPOT bound.
                  Requests that already ran (preempted ones) are re-admitted first and never dropped.

Device (`DeviceRuntime(policy=...)`): `RoundRobin` lets models take turns; `EarliestDeadlineFirst`
(built by `deadline_first`) steps the model whose most urgent request is due first
(`earliest_deadline`): a first token by `arrival + ttft`, a next token by `last token + tpot`, or
`+ ttft` without a TPOT bound (otherwise a model that is only decoding is never due, and it starves
while its neighbours keep receiving prompts). A first token that is already late counts as due now,
so a backlog of late prompts (FCFS never drops them) cannot hold the device either: a next token
waits at most about one TTFT SLO. Models with nothing due go round-robin.
FineServe's policy is the latency-aware form (`deadline_first(..., step_seconds=...)`): only
requests due within a few rounds of the ready models' measured steps compete by deadline, and the
models take turns otherwise. Plain EDF serves the next deadline rather than the oldest work, so with
loose SLOs it runs everything late; the latency-aware form keeps round-robin's latencies until a
deadline is at risk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Protocol

from serving.sim.metrics import SLO
from serving.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from serving.runtime.device_runtime import DeviceRuntime
    from serving.engine.llm_engine import LLMEngine

# Latency-aware EDF: a request is at risk when it falls due within this many rounds of the ready
# models' steps (a few of round-robin's turns: a chunked prompt needs more than one). Simulated
# attainment is flat from 3 to 6 rounds and lower at 1-2 (RESULTS.md, step policy).
AT_RISK_ROUNDS = 4.0


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


def _has_run(seq: Sequence) -> bool:
    return seq.metrics.num_preemptions > 0 or bool(seq.output_token_ids)


def prefill_backlog(running: list[Sequence]) -> int:
    """SAAB's B: prompt tokens still to prefill in the running batch, plus one per decoding row."""
    backlog = 0
    for seq in running:
        if seq.status is not SequenceStatus.RUNNING:
            continue
        backlog += seq.num_uncomputed if seq.num_uncomputed > 1 else 1
    return backlog


class SAABAdmission:
    """SLO-aware adaptive batching for one model. `cost` has `prefill_seconds_per_token()` and
    `decode_seconds(context_lens)` (a `cost_model.StepCost`); `slo` its latency bounds."""

    def __init__(self, cost, slo: SLO, *, drop_hopeless: bool = True, tpot_aware: bool = False,
                 max_prefilling: int | None = None):
        self.cost = cost
        self.slo = slo
        self.tau = cost.prefill_seconds_per_token()
        self.drop_hopeless = drop_hopeless
        self.tpot_aware = tpot_aware and slo.tpot_s is not None
        self.max_prefilling = max_prefilling  # FineServe skips admission above 3 prompts in prefill
        self.num_dropped = 0

    def deadline(self, seq: Sequence) -> float:
        return seq.metrics.arrival_time + self.slo.ttft_s

    def select(self, waiting, running, now, *, seq_slots, token_budget) -> Admission:
        resumed = [s for s in waiting if _has_run(s)]
        fresh = [s for s in waiting if not _has_run(s)]
        backlog = prefill_backlog(running)
        prefilling = sum(1 for s in running if s.status is SequenceStatus.RUNNING and s.num_uncomputed > 1)
        if self.max_prefilling is not None and prefilling >= self.max_prefilling:
            return Admission(resumed, [])

        def on_time(seq: Sequence, tokens: int) -> bool:
            return now + self.tau * (backlog + tokens) <= self.deadline(seq)

        hopeful = [s for s in fresh if on_time(s, s.num_uncomputed)]
        hopeless = [s for s in fresh if not on_time(s, s.num_uncomputed)]
        slots = max(0, seq_slots - len(resumed))
        batch = hopeful[:slots]
        # Shrink: drop the longest prompt (the last in queue order among equals, keeping FCFS) from this
        # iteration's batch until every deadline holds.
        while batch and not self._batch_ok(batch, running, now, backlog):
            batch.remove(max(reversed(batch), key=lambda s: s.num_uncomputed))
        later = [s for s in hopeful if s not in batch]
        if self.drop_hopeless:
            self.num_dropped += len(hopeless)
            return Admission(resumed + batch, hopeless)
        # Deprioritise: hopeless requests are admitted only behind everything that can still make it.
        return Admission(resumed + batch + (hopeless if not later else []), [])

    def _batch_ok(self, batch, running, now, backlog) -> bool:
        total = backlog + sum(s.num_uncomputed for s in batch)
        if now + self.tau * total > min(self.deadline(s) for s in batch):
            return False
        if self.tpot_aware:
            contexts = [s.num_tokens for s in running if s.status is SequenceStatus.RUNNING]
            contexts += [s.num_tokens for s in batch]
            if self.cost.decode_seconds(contexts) > self.slo.tpot_s:
                return False
        return True


class RoundRobin:
    """Models take turns, in registration order, skipping those with nothing to do."""

    def __init__(self, names: list[str]):
        self._order = list(names)
        self._next = 0

    def pick(self, ready: list[str]) -> str:
        n = len(self._order)
        for i in range(n):
            name = self._order[(self._next + i) % n]
            if name in ready:
                self._next = (self._order.index(name) + 1) % n
                return name
        raise ValueError(f"none of {ready} is known to this policy")


class EarliestDeadlineFirst:
    """Step the model whose most urgent request is due first (a `DeviceRuntime` policy).
    `deadline_of(name)` gives each model's earliest deadline, or any sortable key whose first element
    is the due time, such as `earliest_deadline`'s (due, deadline) (None: nothing due).

    Latency-aware with `horizon(ready)` and `clock`: only models with a request due within the horizon
    (seconds from now) compete by deadline; if none is, models take turns. Plain EDF runs work late
    when deadlines are loose (it serves the next deadline, not the oldest work), which raises median
    latencies with no attainment to show for it."""

    def __init__(self, names: list[str], deadline_of: Callable[[str], float | tuple | None], *,
                 horizon: Callable[[list[str]], float] | None = None, clock: Callable[[], float] | None = None):
        if (horizon is None) != (clock is None):
            raise ValueError("a horizon needs a clock, and a clock a horizon")
        self._order = list(names)
        self._deadline_of = deadline_of
        self._horizon = horizon
        self._clock = clock
        self._round_robin = RoundRobin(names)

    def pick(self, ready: list[str]) -> str:
        due = [(d, self._order.index(n), n) for n in ready if (d := self._deadline_of(n)) is not None]
        if self._horizon is not None and due:
            cutoff = self._clock() + self._horizon(ready)
            due = [k for k in due if _due_time(k[0]) <= cutoff]
        if due:
            return min(due)[2]
        return self._round_robin.pick(ready)


def _due_time(key: float | tuple) -> float:
    return key[0] if isinstance(key, tuple) else key


def earliest_deadline(waiting: Iterable[Sequence], running: list[Sequence], slo: SLO,
                      now: float = -math.inf) -> tuple[float, float] | None:
    """EDF's key for one model: (due, deadline) of its most urgent request, None if nothing is due.
    First tokens of waiting (and mid-prefill) requests have deadline `arrival + ttft`, next tokens of
    decoding requests `last token + tpot` (or `+ ttft` without a TPOT bound). A next token is due at
    its deadline; a first token at its deadline but not before `now`: a prompt that is already late
    is no more urgent than one due now, so a backlog of late prompts cannot hold the device while a
    neighbour's next tokens fall due (they wait at most about one TTFT SLO)."""
    decode_wait = slo.tpot_s if slo.tpot_s is not None else slo.ttft_s
    first = [s.metrics.arrival_time + slo.ttft_s for s in waiting if not s.output_token_ids]
    keys = []
    for s in running:
        if s.status is not SequenceStatus.RUNNING:
            continue
        if not s.output_token_ids:
            first.append(s.metrics.arrival_time + slo.ttft_s)
        elif s.metrics.token_times:
            keys.append((s.metrics.token_times[-1] + decode_wait,) * 2)
    keys += [(max(d, now), d) for d in first]
    return min(keys) if keys else None


def deadline_first(engines: Mapping[str, "LLMEngine"], slos: Mapping[str, SLO], *,
                   step_seconds: Mapping[str, float] | None = None,
                   horizon_rounds: float = AT_RISK_ROUNDS) -> EarliestDeadlineFirst:
    """EDF over one device's engines, each model's key read from its scheduler's queues. With
    `step_seconds` (each model's recent step time, kept current by the `DeviceRuntime`) it is
    latency-aware: a request is at risk when it falls due within `horizon_rounds` rounds of the ready
    models' steps, the time round-robin could take to come back to it."""

    def deadline_of(name: str) -> tuple[float, float] | None:
        engine = engines[name]
        return earliest_deadline(engine.scheduler.waiting, engine.scheduler.running, slos[name], engine.clock())

    if step_seconds is None:
        return EarliestDeadlineFirst(list(engines), deadline_of)

    def horizon(ready: list[str]) -> float:
        return horizon_rounds * sum(step_seconds.get(n, 0.0) for n in ready)

    # read the clock through the engine: a replay swaps engines' clocks (`use_clock`)
    first = next(iter(engines))
    return EarliestDeadlineFirst(list(engines), deadline_of, horizon=horizon, clock=lambda: engines[first].clock())


STEP_POLICIES = ("edf", "edf_strict", "round_robin")  # edf: latency-aware; edf_strict: plain EDF


def step_policy(kind: str, runtime: "DeviceRuntime", slos: Mapping[str, SLO]):
    """The `DeviceRuntime` policy named `kind` (one of STEP_POLICIES) over `runtime`'s engines."""
    engines = runtime.engines
    if kind == "edf":
        return deadline_first(engines, slos, step_seconds=runtime.step_seconds)
    if kind == "edf_strict":
        return deadline_first(engines, slos)
    if kind == "round_robin":
        return RoundRobin(list(engines))
    raise ValueError(f"unknown step policy {kind!r}; choose from {STEP_POLICIES}")
