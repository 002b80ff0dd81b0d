"""Admission policies: which waiting requests a model admits each iteration (`Scheduler(admission=)`).

FCFS (`serving.engine.scheduler.FCFSAdmission`) admits in arrival order up to the caps, as vLLM does.
`SAABAdmission` is FineServe's SLO-Aware Adaptive Batching (arXiv 2509.06261), with the step-time
cost model in place of a profiled constant (docs/scheduling.md):
  1. predict TTFT of waiting request r as `now + tau (B + len_r)`, tau the model's prefill seconds
     per token, B the prompt tokens still to prefill in the running batch plus one per decoding row;
  2. a request that cannot make its deadline (`arrival + SLO.ttft_s`) even alone is hopeless: dropped
     at once (finish reason "dropped"), or, with `drop_hopeless=False`, moved behind the others;
  3. of the rest, taken FCFS up to the caps, the longest prompts are removed until every remaining
     deadline holds; removed requests stay queued;
  4. TPOT-aware variant: also remove the longest prompts while the predicted decode step of the
     grown batch exceeds the TPOT bound.
Requests that already ran (preempted ones) are re-admitted first and never dropped.
"""

from __future__ import annotations

from serving.engine.scheduler import Admission, AdmissionPolicy, FCFSAdmission
from serving.engine.sequence import Sequence, SequenceStatus
from serving.scheduling.slo import SLO

# fcfs: arrival order; saab: SAAB dropping hopeless requests; saab-keep: SAAB running them last;
# saab-tpot: SAAB that also keeps the decode step within the TPOT bound.
ADMISSIONS = ("fcfs", "saab", "saab-tpot", "saab-keep")


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


def admission_policy(kind: str, cost=None, slo: SLO | None = None) -> AdmissionPolicy:
    """The admission policy named `kind` (one of ADMISSIONS); SAAB needs the model's step `cost`
    (a `cost_model.StepCost`) and `slo`."""
    if kind == "fcfs":
        return FCFSAdmission()
    if kind not in ADMISSIONS:
        raise ValueError(f"unknown admission {kind!r}; choose from {ADMISSIONS}")
    if cost is None or slo is None:
        raise ValueError(f"admission {kind!r} needs the model's step cost and SLO")
    return SAABAdmission(cost, slo, tpot_aware=kind == "saab-tpot", drop_hopeless=kind != "saab-keep")
