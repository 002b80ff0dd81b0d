"""Tests for serving/sim/metrics.py with hand-computed cases: per-request TTFT / TPOT / ITL / E2E,
percentiles, SLO and goodput attainment with drops, throughput, JSON output, and the comparison table."""

from __future__ import annotations

import json
import math

import pytest

from serving.scheduling.slo import SLO, fineserve_slo
from serving.sim.metrics import LatencyStats, RequestRecord, Summary, format_table, meets_all, summarize


def finished(rid, model, arrival, times, prompt_len=10):
    """A finished request whose tokens came at `times` (first token = times[0], completion = times[-1])."""
    return RequestRecord(rid, model, arrival, prompt_len, len(times), first_token_s=times[0], finish_s=times[-1],
                         token_times=list(times), status="finished")


def test_request_latencies_by_hand():
    r = finished("r", "a", 1.0, [1.5, 1.6, 1.8, 2.1])
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(1.1)
    assert r.tpot == pytest.approx((1.1 - 0.5) / 3)  # 0.2
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    one = finished("s", "a", 0.0, [0.25])
    assert one.ttft == 0.25 and one.tpot is None and one.itls == []
    dropped = RequestRecord("d", "a", 2.0, 10, 0, status="dropped")
    assert dropped.ttft is None and dropped.e2e is None and dropped.tpot is None and dropped.itls == []


def test_fineserve_slo_rule():
    # TTFT(batch 1, 903 tokens) = 50 ms -> 50 ms x 40 + 4 ms = 2.004 s.
    assert fineserve_slo(0.05).ttft_s == pytest.approx(2.004)
    assert fineserve_slo(0.05, scale=10).ttft_s == pytest.approx(0.504)
    assert fineserve_slo(0.05).tpot_s is None


def test_latency_stats_percentiles():
    # numpy linear interpolation on [1, 2, 3, 4, 10]: p50 = 3, p90 at rank 3.6 -> 4 + 0.6 x 6 = 7.6,
    # p99 at rank 3.96 -> 4 + 0.96 x 6 = 9.76.
    s = LatencyStats.of([4.0, 1.0, 10.0, 3.0, 2.0])
    assert (s.count, s.mean, s.p50) == (5, 4.0, 3.0)
    assert s.p90 == pytest.approx(7.6) and s.p99 == pytest.approx(9.76)
    assert LatencyStats.of([]) == LatencyStats(0, None, None, None, None)


def records_for_summary():
    return [
        # model a, SLO TTFT < 1 s, TPOT <= 0.15 s
        finished("a0", "a", 0.0, [0.5, 0.6, 0.7]),            # ttft 0.5 ok, tpot 0.1 ok, itls 0.1 0.1
        finished("a1", "a", 1.0, [2.5, 2.6]),                 # ttft 1.5 miss, tpot 0.1
        finished("a2", "a", 2.0, [2.9, 3.1, 3.3]),            # ttft 0.9 ok, tpot 0.2 miss (goodput)
        RequestRecord("a3", "a", 3.0, 10, 0, status="dropped"),
        # model b, SLO TTFT < 0.5 s, no TPOT bound
        finished("b0", "b", 0.5, [0.75]),                     # ttft 0.25 ok, one token: no tpot
        finished("b1", "b", 1.0, [1.5, 2.0, 2.5, 4.0]),       # ttft exactly 0.5: a miss (strict <)
        RequestRecord("b2", "b", 2.0, 10, 3, first_token_s=2.1, token_times=[2.1, 2.2, 2.3],
                      status="aborted"),                      # fast first token but aborted: a miss
        RequestRecord("b3", "b", 2.5, 10, 0, status="failed"),
    ]


SLOS = {"a": SLO(ttft_s=1.0, tpot_s=0.15), "b": SLO(ttft_s=0.5)}


def test_summarize_by_hand():
    s = summarize(records_for_summary(), SLOS)
    # Makespan: first arrival 0.0, last completion 4.0.
    assert s.makespan_s == 4.0 and s.duration_s is None

    a = s.per_model["a"]
    assert (a.count, a.finished, a.dropped, a.aborted, a.failed) == (4, 3, 1, 0, 0)
    assert a.slo_attainment == pytest.approx(2 / 4)      # a0, a2 (the drop counts as a miss)
    assert a.goodput_attainment == pytest.approx(1 / 4)  # a0 only: a2's TPOT 0.2 > 0.15
    assert a.goodput_req_s == pytest.approx(1 / 4.0)
    assert a.output_tokens == 3 + 2 + 3
    assert a.throughput_tok_s == pytest.approx(8 / 4.0) and a.throughput_req_s == pytest.approx(3 / 4.0)
    assert a.ttft.mean == pytest.approx((0.5 + 1.5 + 0.9) / 3) and a.ttft.p50 == pytest.approx(0.9)
    assert a.tpot.count == 3 and a.tpot.p50 == pytest.approx(0.1)
    assert a.itl.count == 2 + 1 + 2 and a.itl.mean == pytest.approx((0.1 + 0.1 + 0.1 + 0.2 + 0.2) / 5)
    assert a.e2e.mean == pytest.approx((0.7 + 1.6 + 1.3) / 3)

    b = s.per_model["b"]
    assert (b.count, b.finished, b.dropped, b.aborted, b.failed) == (4, 2, 0, 1, 1)
    assert b.slo_attainment == pytest.approx(1 / 4)      # b0 only
    assert b.goodput_attainment == pytest.approx(1 / 4)  # no TPOT bound: same as TTFT
    assert b.tpot.count == 1 and b.tpot.mean == pytest.approx((3.5 - 1.0) / 3)
    assert b.itl.count == 3 and b.itl.p50 == pytest.approx(0.5)  # aborted b2's gaps are not pooled
    assert b.output_tokens == 1 + 4

    o = s.overall
    assert (o.count, o.finished, o.dropped, o.aborted, o.failed) == (8, 5, 1, 1, 1)
    assert o.slo_attainment == pytest.approx(3 / 8)
    assert o.goodput_attainment == pytest.approx(2 / 8)
    assert o.throughput_tok_s == pytest.approx(13 / 4.0)
    assert o.ttft.count == 5 and o.ttft.p50 == pytest.approx(0.5)  # sorted 0.25 0.5 0.5 0.9 1.5
    # Per-model rates share the run's makespan, so they add up.
    assert a.throughput_tok_s + b.throughput_tok_s == pytest.approx(o.throughput_tok_s)


def test_duration_sets_goodput_rate():
    s = summarize(records_for_summary(), SLOS, duration_s=10.0)
    assert s.overall.goodput_req_s == pytest.approx(2 / 10.0)
    assert s.overall.throughput_tok_s == pytest.approx(13 / 4.0)  # still over the makespan


def test_goodput_tpot_bound():
    r = finished("x", "m", 0.0, [0.1, 0.3, 0.5])  # tpot 0.2
    assert meets_all(r, SLO(1.0, 0.2)) and not meets_all(r, SLO(1.0, 0.19)) and meets_all(r, SLO(1.0))
    assert not meets_all(r, SLO(0.1, 0.2))  # TTFT 0.1 is not < 0.1


def test_all_dropped_and_empty():
    s = summarize([RequestRecord("d", "a", 0.0, 5, 0, status="dropped")], {"a": SLO(1.0)})
    g = s.overall
    assert g.slo_attainment == 0.0 and g.throughput_tok_s is None and s.makespan_s is None
    assert g.ttft.mean is None
    empty = summarize([], {})
    assert empty.overall.count == 0 and empty.overall.slo_attainment is None and empty.per_model == {}
    json.dumps(empty.to_dict(), allow_nan=False)


def test_to_dict_is_json_safe():
    s = summarize(records_for_summary(), SLOS)
    d = json.loads(s.to_json())
    assert d["overall"]["slo_attainment"] == pytest.approx(3 / 8)
    assert d["per_model"]["b"]["tpot"]["p99"] == pytest.approx(2.5 / 3)
    assert d["slos"] == {"a": {"ttft_s": 1.0, "tpot_s": 0.15}, "b": {"ttft_s": 0.5, "tpot_s": None}}
    assert d["duration_s"] is None
    # NaN never leaks into the output: a hand-made NaN becomes None.
    s.overall.throughput_req_s = math.nan
    assert s.to_dict()["overall"]["throughput_req_s"] is None


def test_format_table():
    base = summarize(records_for_summary(), SLOS)
    better = summarize([finished("a0", "a", 0.0, [0.5, 0.6, 0.7])], SLOS)
    table = format_table({"static": base, "fineserve": better})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| system") and "SLO att %" in lines[0]
    assert lines[2].split("|")[1].strip() == "static" and "37.5" in lines[2]  # 3/8 attainment
    assert "100.0" in lines[3]
    assert len({len(line) for line in lines}) == 1  # aligned columns
    per_model = format_table({"static": base}, per_model=True)
    assert len(per_model.splitlines()) == 2 + 3


@pytest.mark.parametrize("call, message", [
    (lambda: RequestRecord("x", "a", 0.0, 1, 1, status="done"), "status"),
    (lambda: RequestRecord("x", "a", 0.0, 1, 1, status="finished"), "first_token_s and finish_s"),
    (lambda: RequestRecord("x", "a", 1.0, 1, 1, first_token_s=0.5, finish_s=2.0), "arrival_s <= first_token_s"),
    (lambda: RequestRecord("x", "a", 0.0, 1, 2, 0.1, 0.2, [0.2, 0.1]), "non-decreasing"),
    (lambda: SLO(ttft_s=0.0), "ttft_s"),
    (lambda: SLO(ttft_s=1.0, tpot_s=-1.0), "tpot_s"),
    (lambda: fineserve_slo(-0.1), "ttft_batch1_903_s"),
    (lambda: summarize(records_for_summary(), {"a": SLO(1.0)}), "no SLO given"),
    (lambda: summarize(records_for_summary(), SLOS, duration_s=0.0), "duration_s"),
    (lambda: summarize([finished("x", "a", 0, [1]), finished("x", "a", 0, [1])], SLOS), "unique"),
])
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_summary_type():
    assert isinstance(summarize(records_for_summary(), SLOS), Summary)
