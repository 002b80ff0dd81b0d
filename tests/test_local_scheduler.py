"""Local scheduling decisions on hand-built cases: SAAB admission (predict, drop, shrink, TPOT),
its use inside the real Scheduler, and earliest-deadline-first model stepping."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest

from pallas_kernels.kv_pages import KVPageLayout
from serving.kv.slab_allocator import SlabAllocator
from serving.engine.scheduler import FCFSAdmission
from serving.scheduling.admission import SAABAdmission, prefill_backlog
from serving.scheduling.step_policy import EarliestDeadlineFirst, deadline_first, earliest_deadline
from serving.scheduling.slo import SLO
from serving.engine.page_manager import PageManager
from serving.engine.sampling import SamplingParams
from serving.engine.scheduler import Scheduler
from serving.engine.sequence import Sequence, SequenceStatus

TAU = 0.01  # seconds per prefill token in every case below


@dataclass
class FakeCost:
    """tau seconds per prefill token; a decode step costs `per_row` per row."""
    tau: float = TAU
    per_row: float = 0.001

    def prefill_seconds_per_token(self, prompt_len: int = 903) -> float:
        return self.tau

    def decode_seconds(self, context_lens) -> float:
        return self.per_row * len(context_lens)


def seq(rid: str, prompt_len: int, arrival: float) -> Sequence:
    return Sequence(rid, None, [1] * prompt_len, SamplingParams(max_tokens=4), 0, None, arrival)


def running(rid: str, prompt_len: int, computed: int, outputs: int = 0) -> Sequence:
    s = seq(rid, prompt_len, 0.0)
    s.status = SequenceStatus.RUNNING
    s.output_token_ids = [1] * outputs
    s.num_computed = computed
    return s


def select(policy, waiting, run=(), now=0.0, slots=16):
    return policy.select(waiting, list(run), now, seq_slots=slots, token_budget=10_000)


def test_backlog_counts_prefill_tokens_and_one_per_decoder():
    # 100-token prompt with 40 computed: 60 left; a decoding row counts 1.
    assert prefill_backlog([running("a", 100, 40), running("b", 10, 12, outputs=3)]) == 61


def test_saab_admits_all_when_every_deadline_holds():
    # deadline 1.0 s; 3 x 20 tokens = 60 tokens x 10 ms = 0.6 s <= 1.0
    w = [seq(str(i), 20, 0.0) for i in range(3)]
    out = select(SAABAdmission(FakeCost(), SLO(1.0)), w)
    assert out.admit == w and out.drop == []


def test_saab_drops_hopeless_request_alone_over_its_deadline():
    # 150 tokens alone take 1.5 s > 1.0 s SLO: hopeless; the 20-token one is fine.
    hopeless, ok = seq("long", 150, 0.0), seq("short", 20, 0.0)
    out = select(SAABAdmission(FakeCost(), SLO(1.0)), [hopeless, ok])
    assert out.drop == [hopeless] and out.admit == [ok]


def test_saab_backlog_makes_a_request_hopeless():
    # 20 tokens alone = 0.2 s, but 90 backlog tokens ahead make it 1.1 s > 1.0 s.
    w = seq("a", 20, 0.0)
    out = select(SAABAdmission(FakeCost(), SLO(1.0)), [w], run=[running("r", 100, 10)])
    assert out.drop == [w]


def test_saab_shrinks_longest_first_until_deadlines_hold():
    # Each alone fits (<= 1.0 s) but together 30+40+80 = 150 tokens = 1.5 s: remove the 80 (longest):
    # 70 tokens = 0.7 s holds. The removed one stays queued (neither admitted nor dropped).
    a, b, c = seq("a", 30, 0.0), seq("b", 40, 0.0), seq("c", 80, 0.0)
    out = select(SAABAdmission(FakeCost(), SLO(1.0)), [a, b, c])
    assert out.admit == [a, b] and out.drop == []


def test_saab_shrink_uses_the_tightest_deadline():
    # a arrived at t=-0.5 (deadline 0.5 s), b at 0 (deadline 1.0): together 60 tokens = 0.6 s misses a's
    # deadline; removing the longest (b) leaves a alone at 0.2 s.
    a, b = seq("a", 20, -0.5), seq("b", 40, 0.0)
    out = select(SAABAdmission(FakeCost(), SLO(1.0)), [a, b])
    assert out.admit == [a]


def test_saab_deprioritises_instead_of_dropping_when_configured():
    hopeless, ok = seq("long", 150, 0.0), seq("short", 20, 0.0)
    policy = SAABAdmission(FakeCost(), SLO(1.0), drop_hopeless=False)
    out = select(policy, [hopeless, ok])
    assert out.drop == [] and out.admit == [ok, hopeless]  # behind every hopeful request


def test_saab_never_drops_a_preempted_request_and_puts_it_first():
    resumed = seq("r", 500, -100.0)
    resumed.metrics.num_preemptions = 1
    fresh = seq("f", 10, 0.0)
    out = select(SAABAdmission(FakeCost(), SLO(1.0)), [fresh, resumed])
    assert out.admit == [resumed, fresh] and out.drop == []


def test_saab_tpot_aware_limits_the_decode_batch():
    # 4 decoders running; each row costs 10 ms per decode step; TPOT bound 55 ms: at most 5 rows.
    run = [running(f"r{i}", 10, 10, outputs=1) for i in range(4)]
    w = [seq(f"w{i}", 5, 0.0) for i in range(3)]
    policy = SAABAdmission(FakeCost(per_row=0.01), SLO(10.0, tpot_s=0.055), tpot_aware=True)
    assert len(select(policy, w, run).admit) == 1
    plain = SAABAdmission(FakeCost(per_row=0.01), SLO(10.0, tpot_s=0.055))
    assert len(select(plain, w, run).admit) == 3


def test_saab_respects_free_sequence_slots():
    w = [seq(str(i), 5, 0.0) for i in range(5)]
    assert len(select(SAABAdmission(FakeCost(), SLO(10.0)), w, slots=2).admit) == 2


def _scheduler(admission, clock, pages=64):
    layout = KVPageLayout(1, 1, 8, 4, "float32")
    alloc = SlabAllocator(pages // 4, layout.page_bytes * 4)
    alloc.register("m", layout.page_bytes)
    return Scheduler(PageManager(alloc, "m", layout), max_num_seqs=8, max_num_batched_tokens=256,
                     prefill_chunk=256, admission=admission, clock=clock)


def test_scheduler_drops_through_saab_and_reports_them():
    now = [0.0]
    sched = _scheduler(SAABAdmission(FakeCost(), SLO(1.0)), lambda: now[0])
    hopeless, ok = seq("long", 150, 0.0), seq("short", 20, 0.0)
    sched.add(hopeless)
    sched.add(ok)
    batch = sched.schedule()
    assert batch.is_prefill and batch.seqs == [ok]
    assert sched.dropped == [hopeless] and hopeless.finish_reason == "dropped"
    assert hopeless.is_finished and not hopeless.pages and hopeless.metrics.finished_time == 0.0
    assert list(sched.waiting) == []


def test_scheduler_with_fcfs_admits_in_order():
    sched = _scheduler(FCFSAdmission(), lambda: 0.0)
    seqs = [seq(str(i), 10, 0.0) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert sched.schedule().seqs == seqs


def test_engine_reports_dropped_requests():
    """A dropped request comes back from engine.step as a finished output (nothing is lost)."""
    from models.config import ModelConfig
    from models.loader import random_model
    from tests.helpers import build_engine

    cfg = ModelConfig("llama", 64, 32, 64, 1, 2, 1, 16, max_position_embeddings=256)
    loaded = random_model(cfg, "bf16", "float32")
    engine = build_engine(loaded, num_pages=64, max_num_seqs=4, max_model_len=256,
                          max_num_batched_tokens=64, prefill_chunk=64)
    engine.scheduler.admission = SAABAdmission(FakeCost(), SLO(1.0))
    now = engine.clock()
    engine.add_request([1] * 150, SamplingParams(max_tokens=2), request_id="hopeless", arrival_time=now)
    engine.add_request([1] * 5, SamplingParams(max_tokens=2), request_id="ok", arrival_time=now)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["hopeless"].finish_reason == "dropped" and finals["hopeless"].outputs[0].token_ids == []
    assert finals["ok"].finish_reason == "length"
    assert not engine.requests


def test_edf_picks_the_model_due_first_else_round_robin():
    deadlines = {"a": 5.0, "b": 2.0, "c": None}
    edf = EarliestDeadlineFirst(["a", "b", "c"], deadlines.get)
    assert edf.pick(["a", "b", "c"]) == "b"
    assert edf.pick(["a", "c"]) == "a"
    deadlines.update(a=None, b=None)
    assert [edf.pick(["a", "b", "c"]) for _ in range(3)] == ["a", "b", "c"]
    with pytest.raises(ValueError):
        edf.pick(["zzz"])


def test_earliest_deadline_covers_first_and_next_tokens():
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    w = seq("w", 5, 3.0)                                  # first token due 4.0
    dec = running("d", 5, 6, outputs=2)
    dec.metrics.token_times = [2.0, 2.5]                  # next token due 2.6
    mid = running("m", 50, 10)                            # mid-prefill, arrived 0: due 1.0
    assert earliest_deadline([w], [dec], slo) == pytest.approx((2.6, 2.6))
    assert earliest_deadline([w], [dec, mid], slo) == pytest.approx((1.0, 1.0))
    assert earliest_deadline([], [], slo) is None
    # At 3.5 the mid-prefill prompt is late: due now (3.5), behind the next token due at 2.6.
    assert earliest_deadline([w], [dec, mid], slo, now=3.5) == pytest.approx((2.6, 2.6))
    assert earliest_deadline([w], [mid], slo, now=3.5) == pytest.approx((3.5, 1.0))


def test_a_decoding_model_without_a_tpot_bound_is_due_one_ttft_after_its_last_token():
    dec = running("d", 5, 6, outputs=2)
    dec.metrics.token_times = [2.0, 2.5]
    assert earliest_deadline([], [dec], SLO(ttft_s=2.0)) == pytest.approx((4.5, 4.5))


def fake_engines(clock, **queues):
    engines = {}
    for name, (waiting, run) in queues.items():
        scheduler = SimpleNamespace(waiting=deque(waiting), running=run)
        engines[name] = SimpleNamespace(scheduler=scheduler, clock=lambda: clock["now"],
                                        queues=lambda s=scheduler: (s.waiting, s.running))
    return engines


def test_deadline_first_serves_first_and_next_tokens_in_the_order_they_fell_due():
    clock = {"now": 1.2}
    a_dec = running("a", 5, 6, outputs=1)
    a_dec.metrics.token_times = [1.0]                                          # next token due 2.0
    engines = fake_engines(clock, a=([], [a_dec]), b=([seq("b", 5, 0.5)], []))  # first token due 1.5
    edf = deadline_first(engines, {"a": SLO(1.0), "b": SLO(1.0)})
    assert edf.pick(["a", "b"]) == "b"
    engines["b"].scheduler.waiting[0].metrics.arrival_time = 1.1               # now due 2.1
    assert edf.pick(["a", "b"]) == "a"
    clock["now"] = 2.05                                                         # both late or nearly
    engines["b"].scheduler.waiting[0].metrics.arrival_time = 0.0               # was due 1.0: counts as 2.05
    assert edf.pick(["a", "b"]) == "a"


def test_edf_does_not_starve_a_decoding_model_next_to_a_backlogged_one():
    """`busy` decodes a full batch and its FCFS queue only grows (a prompt every step, none dropped);
    `dec` only decodes. Counted by their deadlines, busy's ever-older prompts would hold the device
    for good; counted as due now once late, they let dec's next token in about once per TTFT SLO."""
    slo, step, clock = SLO(ttft_s=1.0), 0.01, {"now": 0.0}
    decoding = {"busy": [running(f"b{i}", 5, 6, outputs=1) for i in range(4)], "dec": [running("d", 5, 6, outputs=1)]}
    for seqs in decoding.values():
        for s in seqs:
            s.metrics.token_times = [0.0]
    engines = fake_engines(clock, busy=([], decoding["busy"]), dec=([], decoding["dec"]))
    edf, picks = deadline_first(engines, {"busy": slo, "dec": slo}), []
    for i in range(400):
        clock["now"] += step
        engines["busy"].scheduler.waiting.append(seq(f"w{i}", 5, clock["now"]))
        picks.append(edf.pick(["busy", "dec"]))
        for s in decoding[picks[-1]]:
            s.metrics.token_times.append(clock["now"])
    gaps = np.diff(decoding["dec"][0].metrics.token_times)
    assert len(gaps) >= 3 and gaps.max() <= slo.ttft_s + 2 * step + 1e-9, gaps
    assert picks.count("busy") > 0.9 * len(picks)


def test_latency_aware_edf_takes_turns_until_a_request_is_at_risk():
    """Deadlines 10 s out are not at risk when a round of steps takes ~0.2 s: models take turns
    (plain EDF would serve `b`, due first, every time). Within the horizon, the earliest goes first."""
    clock = {"now": 0.0}
    a_dec, b_dec = running("a", 5, 6, outputs=1), running("b", 5, 6, outputs=1)
    a_dec.metrics.token_times, b_dec.metrics.token_times = [0.0], [-0.5]   # due 10.0 and 9.5
    engines = fake_engines(clock, a=([], [a_dec]), b=([], [b_dec]))
    slos = {"a": SLO(10.0), "b": SLO(10.0)}
    assert [deadline_first(engines, slos).pick(["a", "b"]) for _ in range(2)] == ["b", "b"]
    step_seconds = {"a": 0.1, "b": 0.1}
    edf = deadline_first(engines, slos, step_seconds=step_seconds, horizon_rounds=2.0)
    assert [edf.pick(["a", "b"]) for _ in range(4)] == ["a", "b", "a", "b"]
    clock["now"] = 9.2                      # b is due in 0.3 s, inside 2 rounds of 0.2 s; a is not
    assert [edf.pick(["a", "b"]) for _ in range(2)] == ["b", "b"]
    clock["now"] = 9.7                      # both at risk: b, due first
    assert edf.pick(["a", "b"]) == "b"
    # the horizon follows the measured steps: at 1 s a step, 10 s out is already at risk
    clock["now"], step_seconds["a"], step_seconds["b"] = 4.0, 1.0, 2.0
    assert [edf.pick(["a", "b"]) for _ in range(2)] == ["b", "b"]
    with pytest.raises(ValueError, match="horizon needs a clock"):
        EarliestDeadlineFirst(["a"], {"a": 1.0}.get, horizon=lambda ready: 1.0)


def test_latency_aware_edf_treats_late_first_tokens_as_at_risk():
    clock = {"now": 5.0}
    a_dec = running("a", 5, 6, outputs=1)
    a_dec.metrics.token_times = [4.9]                                       # due 14.9
    engines = fake_engines(clock, a=([], [a_dec]), b=([seq("late", 5, 0.0)], []))  # due 3.0: late
    edf = deadline_first(engines, {"a": SLO(10.0), "b": SLO(3.0)}, step_seconds={"a": 0.01, "b": 0.01})
    assert [edf.pick(["a", "b"]) for _ in range(3)] == ["b", "b", "b"]


def _decoding(sched: Scheduler, n: int) -> list[Sequence]:
    """n sequences admitted, prefilled and given their first token: each decodes next."""
    seqs = [seq(f"d{i}", 10, 0.0) for i in range(n)]
    for s in seqs:
        sched.add(s)
    _ran(sched.schedule())
    assert all(s.num_uncomputed == 1 for s in seqs)
    return seqs


def _ran(batch) -> None:
    """As the engine does once a batch has run: its tokens are computed, and each sequence whose
    prompt is done has sampled a token."""
    for s, count in zip(batch.seqs, batch.num_tokens):
        s.num_computed += count
        if s.num_computed == s.num_tokens:
            s.output_token_ids.append(1)


@pytest.mark.parametrize("mixed", [False, True])
def test_a_long_prompt_rides_along_the_decodes_in_chunks(mixed):
    sched = _scheduler(FCFSAdmission(), lambda: 0.0)
    sched.mixed_steps, sched.max_num_batched_tokens = mixed, 64
    decoders = _decoding(sched, 2)
    long = seq("long", 300, 0.0)
    sched.add(long)
    batch = sched.schedule()
    if mixed:   # every decode row, then one chunk of what the budget leaves
        assert (batch.kind, batch.seqs, batch.num_tokens) == ("mixed", decoders + [long], [1, 1, 62])
    else:       # the prompt first: the decodes wait a step
        assert (batch.kind, batch.seqs, batch.num_tokens) == ("prefill", [long], [64])


def test_short_prompts_that_fit_one_step_get_a_prefill_step_together():
    sched = _scheduler(FCFSAdmission(), lambda: 0.0)
    sched.mixed_steps = True
    decoders = _decoding(sched, 2)
    short = [seq(f"s{i}", 20, 0.0) for i in range(3)]
    for s in short:
        sched.add(s)
    batch = sched.schedule()
    assert (batch.kind, batch.seqs, batch.num_tokens) == ("prefill", short, [20] * 3)
    _ran(batch)
    batch = sched.schedule()   # the prompts are computed: every sequence decodes
    assert batch.kind == "decode" and batch.seqs == decoders + short
    _ran(batch)
    one = seq("one", 20, 0.0)
    sched.add(one)
    batch = sched.schedule()   # a single prompt rides along
    assert (batch.kind, batch.seqs[-1], batch.num_tokens[-1]) == ("mixed", one, 20)
