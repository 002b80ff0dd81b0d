"""Tests for serving/sim/workload.py: arrival processes, power-law popularity, length samplers, the Azure
2023 traces, and Workload helpers.

Statistical checks use large samples and tolerances of about 5-7 standard errors (derived next to each
check), so a correct generator fails less than about once in a million runs; the `rng` fixture prints
its seed so a failure can be replayed.
"""

from __future__ import annotations

import csv
import dataclasses
import math

import numpy as np
import pytest

from serving.sim.workload import (AZURE_DATA_DIR, SHAREGPT_MEAN_OUTPUT, SHAREGPT_MEAN_PROMPT, FixedLengths,
                              LengthSampler, LognormalLengths, Request, TraceLengths, Workload, azure_trace,
                              azure_workload, gamma_arrivals, poisson_arrivals, popularity_flip, power_law_rates,
                              power_law_shares, read_azure_csv, sharegpt_like_lengths, synthetic_workload)


def gap_cv(times: np.ndarray) -> float:
    gaps = np.diff(times)
    return float(gaps.std() / gaps.mean())


# --- arrivals ---------------------------------------------------------------------------------------

def test_poisson_arrivals_rate_and_cv(rng):
    rate, duration = 50.0, 2000.0  # 100k arrivals expected
    times = poisson_arrivals(rate, duration, rng)
    assert np.all(np.diff(times) >= 0) and times[0] >= 0 and times[-1] < duration
    # Count ~ Poisson(rate * T): sd = sqrt(1e5) ~ 316, so 5 sd is 1.6% of the mean.
    expected = rate * duration
    assert abs(len(times) - expected) < 5 * math.sqrt(expected)
    # Exponential gaps: by the delta method the sample CV has standard error 1/sqrt(n) ~ 0.003 here.
    assert abs(gap_cv(times) - 1.0) < 6 / math.sqrt(len(times))


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_arrivals_rate_and_cv(rng, cv):
    rate, duration = 20.0, 5000.0  # 100k arrivals expected
    times = gamma_arrivals(rate, cv, duration, rng)
    n = len(times)
    assert np.all(np.diff(times) >= 0) and times[-1] < duration
    # A renewal process's count has variance ~ rate * T * cv^2.
    expected = rate * duration
    assert abs(n - expected) < 6 * cv * math.sqrt(expected)
    # Gamma with shape k: the sample CV's standard error is sqrt((k + 1) / (2 k^2 n)) (delta method;
    # 0.0022 for cv 0.5, 0.021 for cv 3 at n = 1e5).
    k = 1 / cv**2
    se = math.sqrt((k + 1) / (2 * k**2 * n))
    assert abs(gap_cv(times) - cv) < 7 * se


def test_gamma_cv_one_is_poisson():
    a = gamma_arrivals(5.0, 1.0, 100.0, np.random.default_rng(3))
    b = poisson_arrivals(5.0, 100.0, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


def test_zero_rate_or_duration_gives_no_arrivals(rng):
    assert poisson_arrivals(0.0, 10.0, rng).size == 0
    assert gamma_arrivals(3.0, 2.0, 0.0, rng).size == 0


# --- popularity -------------------------------------------------------------------------------------

def test_power_law_rates_by_hand():
    # alpha 1, three models: weights 1, 1/2, 1/3 (sum 11/6) -> shares 6/11, 3/11, 2/11.
    rates = power_law_rates(11.0, ["a", "b", "c"], 1.0)
    assert list(rates) == ["a", "b", "c"]
    np.testing.assert_allclose(list(rates.values()), [6.0, 3.0, 2.0])
    np.testing.assert_allclose(power_law_shares(4, 0.0), [0.25] * 4)


@pytest.mark.parametrize("alpha, total, top_share", [(0.7, 214, 0.19), (2.1, 61, 0.66)])
def test_power_law_matches_muxserve_totals(alpha, total, top_share):
    # MuxServe's setting: 19 models, top model 40 req/s -> total 214 req/s (alpha 0.7) or 61 (alpha 2.1),
    # top model 19% or 66% of traffic (figures rounded to the shown digits).
    shares = power_law_shares(19, alpha)
    assert shares.sum() == pytest.approx(1.0)
    assert 40 / shares[0] == pytest.approx(total, abs=0.5)
    assert shares[0] == pytest.approx(top_share, abs=0.005)


# --- lengths ----------------------------------------------------------------------------------------

def test_fixed_lengths(rng):
    p, o = FixedLengths(128, 16).sample(5, rng)
    assert p.tolist() == [128] * 5 and o.tolist() == [16] * 5


def test_lognormal_lengths_means(rng):
    sampler = sharegpt_like_lengths()
    assert isinstance(sampler, LengthSampler)
    n = 200_000
    p, o = sampler.sample(n, rng)
    assert p.min() >= 1 and o.min() >= 1 and p.dtype == np.int64
    # sigma 1: sd / mean = sqrt(e - 1) = 1.31, so the sample mean's relative standard error is
    # 1.31 / sqrt(2e5) = 0.3%; rounding to integers shifts the mean by well under 0.5 token. 2% > 6 sd.
    assert p.mean() == pytest.approx(SHAREGPT_MEAN_PROMPT, rel=0.02)
    assert o.mean() == pytest.approx(SHAREGPT_MEAN_OUTPUT, rel=0.02)
    # Median of a lognormal = mean * exp(-sigma^2 / 2).
    assert np.median(o) == pytest.approx(SHAREGPT_MEAN_OUTPUT * math.exp(-0.5), rel=0.03)


def test_trace_lengths_keep_pairs(rng):
    sampler = TraceLengths(np.array([10, 20, 30]), np.array([1, 2, 3]))
    p, o = sampler.sample(1000, rng)
    assert set(zip(p.tolist(), o.tolist())) <= {(10, 1), (20, 2), (30, 3)}
    azure = TraceLengths.from_azure("code")
    assert len(azure.prompt_lens) == 8819


# --- Azure traces -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, count, rate, cv, prompt_mean, output_mean", [
    # serving/sim/traces/azure_llm_2023/README.md.
    ("conv", 19_366, 5.53, 1.09, 1155, 211),
    ("code", 8_819, 2.57, 13.2, 2048, 28),
])
def test_azure_trace_matches_readme(kind, count, rate, cv, prompt_mean, output_mean):
    w = azure_trace(kind)
    assert len(w) == count
    assert w.models == [f"azure-{kind}"]
    assert w.total_rate == pytest.approx(rate, abs=0.01)
    assert w.duration_s == pytest.approx(count / rate, rel=0.002)
    stats = w.stats()
    assert stats["interarrival_cv"] == pytest.approx(cv, abs=0.05)
    assert stats["prompt_mean"] == pytest.approx(prompt_mean, abs=1)
    assert stats["output_mean"] == pytest.approx(output_mean, abs=1)
    assert w.requests[0].arrival_s == 0.0


def test_azure_trace_window_and_scale():
    # Count the window's rows independently of read_azure_csv's timestamp parsing.
    from datetime import datetime
    with open(AZURE_DATA_DIR / "conv.csv", newline="") as f:
        stamps = [datetime.strptime(row["TIMESTAMP"][:26], "%Y-%m-%d %H:%M:%S.%f") for row in csv.DictReader(f)]
    offsets = [(t - stamps[0]).total_seconds() for t in stamps]
    expected = sum(600 <= s < 1200 for s in offsets)

    w = azure_trace("conv", start_s=600, duration_s=600)
    assert len(w) == expected and w.duration_s == 600
    assert all(0 <= r.arrival_s < 600 for r in w.requests)
    fast = azure_trace("conv", start_s=600, duration_s=600, rate_scale=4.0)
    assert len(fast) == len(w) and fast.duration_s == 150
    np.testing.assert_allclose([r.arrival_s for r in fast.requests], [r.arrival_s / 4 for r in w.requests])
    assert fast.total_rate == pytest.approx(4 * w.total_rate)


def test_read_azure_csv_seconds():
    seconds, prompts, outputs = read_azure_csv("conv")
    # First rows: 18:15:46.6805900, 18:15:50.9951690, prompts 374, 396, outputs 44, 109.
    assert seconds[0] == 0.0 and seconds[1] == pytest.approx(4.314579, abs=1e-6)
    assert prompts[:2].tolist() == [374, 396] and outputs[:2].tolist() == [44, 109]


def test_azure_workload_power_law_assignment():
    models = ["m0", "m1", "m2", "m3"]
    w = azure_workload(models, "conv", 1.0, seed=7)
    trace = azure_trace("conv")
    # Same arrivals and lengths as the trace, only the model changes.
    assert [(r.request_id, r.arrival_s, r.prompt_len, r.output_len) for r in w.requests] == \
           [(r.request_id, r.arrival_s, r.prompt_len, r.output_len) for r in trace.requests]
    n = len(w)
    counts = {m: sum(r.model == m for r in w.requests) for m in models}
    # Each count is Binomial(n, p): 5 sd is at most 5 * sqrt(19366 / 4) ~ 348 requests.
    for m, p in zip(models, power_law_shares(4, 1.0)):
        assert abs(counts[m] - n * p) < 5 * math.sqrt(n * p * (1 - p))
    assert azure_workload(models, "conv", 1.0, seed=7) == w
    assert azure_workload(models, "conv", 1.0, seed=8) != w


# --- synthetic workloads ----------------------------------------------------------------------------

def test_synthetic_workload_shares_and_determinism():
    models = ["a", "b", "c"]
    w = synthetic_workload(models, total_rate=100.0, alpha=1.0, cv=1.0, duration_s=500.0,
                           lengths=FixedLengths(64, 8), seed=1)
    assert [r.arrival_s for r in w.requests] == sorted(r.arrival_s for r in w.requests)
    assert len({r.request_id for r in w.requests}) == len(w)
    rates = w.rates_by_model()
    # Independent Poisson processes: model i's count has sd sqrt(rate_i * T); 6 sd in req/s.
    for m, share in zip(models, [6 / 11, 3 / 11, 2 / 11]):
        expected = 100.0 * share * 500.0
        assert abs(rates[m] * 500.0 - expected) < 6 * math.sqrt(expected)
    assert w == synthetic_workload(models, 100.0, 1.0, 1.0, 500.0, FixedLengths(64, 8), 1)
    assert w != synthetic_workload(models, 100.0, 1.0, 1.0, 500.0, FixedLengths(64, 8), 2)


def test_popularity_flip_reverses_the_order_halfway():
    w = popularity_flip(["a", "b", "c"], 60.0, 1.0, duration_s=200.0, lengths=FixedLengths(64, 8), seed=3)
    assert w.duration_s == 200.0 and len({r.request_id for r in w.requests}) == len(w)
    assert [r.arrival_s for r in w.requests] == sorted(r.arrival_s for r in w.requests)
    first = Workload([r for r in w.requests if r.arrival_s < 100], 100.0).rates_by_model()
    second = Workload([dataclasses.replace(r, arrival_s=r.arrival_s - 100) for r in w.requests
                       if r.arrival_s >= 100], 100.0).rates_by_model()
    assert list(first) == ["a", "b", "c"] and list(second) == ["c", "b", "a"]
    for half, order in ((first, "abc"), (second, "cba")):  # 6 sd of a Poisson count, as above
        for m, share in zip(order, [6 / 11, 3 / 11, 2 / 11]):
            expected = 60 * share * 100
            assert abs(half[m] * 100 - expected) < 6 * math.sqrt(expected)


def test_synthetic_workload_per_model_lengths():
    w = synthetic_workload(["x", "y"], 20.0, 0.0, duration_s=50.0,
                           lengths={"x": FixedLengths(10, 1), "y": FixedLengths(20, 2)}, seed=0)
    assert {(r.model, r.prompt_len, r.output_len) for r in w.requests} == {("x", 10, 1), ("y", 20, 2)}


# --- Workload helpers -------------------------------------------------------------------------------

def small_workload() -> Workload:
    return Workload([Request("r2", "b", 3.0, 5000, 900), Request("r0", "a", 0.0, 100, 50),
                     Request("r1", "a", 1.5, 3000, 2000)], duration_s=4.0, description="hand made")


def test_workload_sorted_and_rates():
    w = small_workload()
    assert [r.request_id for r in w.requests] == ["r0", "r1", "r2"]
    assert w.models == ["a", "b"]
    assert w.rates_by_model() == {"a": 0.5, "b": 0.25}
    assert w.total_rate == 0.75


def test_scaled_compresses_time():
    w = small_workload().scaled(2.0)
    assert [r.arrival_s for r in w.requests] == [0.0, 0.75, 1.5]
    assert w.duration_s == 2.0
    assert w.rates_by_model() == {"a": 1.0, "b": 0.5}


def test_for_models():
    w = small_workload().for_models(["b"])
    assert [r.request_id for r in w.requests] == ["r2"] and w.duration_s == 4.0
    assert w.rates_by_model() == {"b": 0.25}


def test_truncated_clips_to_context():
    w = small_workload().truncated(max_prompt=2048, max_total=4096)
    lengths = {r.request_id: (r.prompt_len, r.output_len) for r in w.requests}
    # r0 fits; r1: prompt 3000 -> 2048, output 2000 -> 4096 - 2048; r2: prompt -> 2048, output 900 fits.
    assert lengths == {"r0": (100, 50), "r1": (2048, 2000), "r2": (2048, 900)}
    w = small_workload().truncated(max_prompt={"a": 8192, "b": 8192}, max_total={"a": 3000, "b": 512})
    lengths = {r.request_id: (r.prompt_len, r.output_len) for r in w.requests}
    # A prompt at or over max_total keeps max_total - 1 tokens so one token can be generated.
    assert lengths == {"r0": (100, 50), "r1": (2999, 1), "r2": (511, 1)}


def test_json_round_trip(tmp_path):
    w = synthetic_workload(["a", "b"], 5.0, 1.3, cv=2.0, duration_s=30.0, seed=4)
    assert Workload.from_json(w.to_json()) == w
    w.write_json(tmp_path / "w.json")
    assert Workload.read_json(tmp_path / "w.json") == w
    assert Workload.from_json(small_workload().to_json()) == small_workload()


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda: poisson_arrivals(-1.0, 10.0, np.random.default_rng(0)), "rate"),
    (lambda: gamma_arrivals(1.0, 0.0, 10.0, np.random.default_rng(0)), "cv"),
    (lambda: gamma_arrivals(1.0, -2.0, 10.0, np.random.default_rng(0)), "cv"),
    (lambda: gamma_arrivals(float("nan"), 1.0, 10.0, np.random.default_rng(0)), "rate"),
    (lambda: power_law_rates(-5.0, ["a"], 1.0), "total_rate"),
    (lambda: power_law_rates(5.0, [], 1.0), "empty"),
    (lambda: power_law_rates(5.0, ["a", "a"], 1.0), "unique"),
    (lambda: power_law_rates(5.0, "ab", 1.0), "list of names"),
    (lambda: power_law_shares(3, -1.0), "alpha"),
    (lambda: synthetic_workload([], 1.0, 1.0), "empty"),
    (lambda: synthetic_workload(["a"], 1.0, 1.0, cv=0.0), "cv"),
    (lambda: synthetic_workload(["a"], -1.0, 1.0), "total_rate"),
    (lambda: synthetic_workload(["a", "b"], 1.0, 1.0, lengths={"a": FixedLengths(1, 1)}), "no sampler"),
    (lambda: azure_trace("chat"), "unknown Azure trace kind"),
    (lambda: azure_trace("conv", rate_scale=0.0), "rate_scale"),
    (lambda: azure_trace("conv", duration_s=-1.0), "duration_s"),
    (lambda: azure_workload([], "conv", 1.0), "empty"),
    (lambda: azure_workload(["a"], "chat", 1.0), "unknown Azure trace kind"),
    (lambda: small_workload().scaled(-1.0), "rate_scale"),
    (lambda: small_workload().for_models([]), "empty"),
    (lambda: small_workload().truncated(0, 100), "max_prompt"),
    (lambda: small_workload().truncated(10, {"a": 100}), "no limit for models"),
    (lambda: Request("x", "a", -1.0, 1, 1), "arrival_s"),
    (lambda: Request("x", "a", 0.0, 0, 1), "prompt_len"),
    (lambda: Workload([Request("x", "a", 5.0, 1, 1)], duration_s=1.0), "after"),
    (lambda: Workload([Request("x", "a", 0.0, 1, 1), Request("x", "a", 0.5, 1, 1)], 1.0), "unique"),
    (lambda: FixedLengths(0, 5), ">= 1"),
    (lambda: LognormalLengths(-1.0, 5.0), "prompt_mean"),
    (lambda: Workload.from_json('{"format_version": 99}'), "format_version"),
])
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()
