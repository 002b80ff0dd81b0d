"""Step policies: which of the models sharing a device steps next (`DeviceRuntime(policy=)`).

`RoundRobin` lets models take turns. `EarliestDeadlineFirst` (built by `deadline_first`) steps the
model whose most urgent request is due first (`earliest_deadline`): a first token by `arrival + ttft`,
a next token by `last token + tpot`, or `+ ttft` without a TPOT bound (otherwise a model that is only
decoding is never due and starves). A first token already late counts as due now, so a backlog of
late prompts cannot hold the device: a next token waits at most about one TTFT SLO.

FineServe's policy (arXiv 2509.06261) is the latency-aware form (`step_seconds` given): only requests
due within a few rounds of the ready models' recent steps compete by deadline, and the models take
turns otherwise. Plain EDF serves the next deadline rather than the oldest work, so with loose SLOs
it runs everything late; the latency-aware form keeps round-robin's latencies until a deadline is at
risk. Design notes: docs/scheduling.md.
"""


from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

from serving.engine.llm_engine import LLMEngine
from serving.engine.sequence import Sequence, SequenceStatus
from serving.scheduling.slo import SLO

# Latency-aware EDF: a request is at risk when it falls due within this many rounds of the ready
# models' steps (a few of round-robin's turns: a chunked prompt needs more than one). Chosen from a
# sweep of horizons in simulation (docs/scheduling.md; figures in benchmarks/RESULTS.md).
AT_RISK_ROUNDS = 4.0
STEP_TIME_WEIGHT = 0.2  # of the newest step in `StepTimes`: prefill and decode steps mix
STEP_POLICIES = ("edf", "edf_strict", "round_robin")  # edf: latency-aware; edf_strict: plain EDF


class StepTimes(dict):
    """Each model's recent step time, a moving average on the engines' clock: the device runtime
    observes every step, latency-aware EDF reads how long a round of the ready models takes."""

    def observe(self, name: str, seconds: float) -> None:
        last = self.get(name)
        self[name] = seconds if last is None else last + STEP_TIME_WEIGHT * (seconds - last)


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


def deadline_first(engines: Mapping[str, LLMEngine], slos: Mapping[str, SLO], *,
                   step_seconds: Mapping[str, float] | None = None,
                   horizon_rounds: float = AT_RISK_ROUNDS) -> EarliestDeadlineFirst:
    """EDF over one device's engines, each model's key read from its scheduler's queues. With
    `step_seconds` (each model's recent step time, kept current by the `DeviceRuntime`) it is
    latency-aware: a request is at risk when it falls due within `horizon_rounds` rounds of the ready
    models' steps, the time round-robin could take to come back to it."""

    def deadline_of(name: str) -> tuple[float, float] | None:
        engine = engines[name]
        waiting, running = engine.queues()
        return earliest_deadline(waiting, running, slos[name], engine.clock())

    if step_seconds is None:
        return EarliestDeadlineFirst(list(engines), deadline_of)

    def horizon(ready: list[str]) -> float:
        return horizon_rounds * sum(step_seconds.get(n, 0.0) for n in ready)

    # read the clock through the engine: a replay swaps engines' clocks (`use_clock`)
    first = next(iter(engines))
    return EarliestDeadlineFirst(list(engines), deadline_of, horizon=horizon, clock=lambda: engines[first].clock())


def step_policy(kind: str, engines: Mapping[str, LLMEngine], slos: Mapping[str, SLO],
                step_seconds: Mapping[str, float] | None = None):
    """The `DeviceRuntime` policy named `kind` (one of STEP_POLICIES) over one device's `engines`;
    "edf" reads each model's step time from `step_seconds` (the runtime's `StepTimes`)."""
    if kind not in STEP_POLICIES:
        raise ValueError(f"unknown step policy {kind!r}; choose from {STEP_POLICIES}")
    if kind == "round_robin":
        return RoundRobin(list(engines))
    missing = sorted(set(engines) - set(slos))
    if missing:
        raise ValueError(f"step policy {kind!r} needs an SLO for every model; missing {missing}")
    if kind == "edf_strict":
        return deadline_first(engines, slos)
    if step_seconds is None:
        raise ValueError("latency-aware EDF needs the models' step times")
    return deadline_first(engines, slos, step_seconds=step_seconds)
