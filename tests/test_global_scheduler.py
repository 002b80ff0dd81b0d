"""Tests for serving/scheduling/placement.py: TP/replica choice, slab-aware FineServe placement, the
Prism / MuxServe / static baselines, memory safety, KV budgets, rate drift and re-placement.

The cost model is a fake with hand-computable step times (mean prompt 100, mean output 10):
    prefill(b) = 0.01 + 1e-4 x 100 b = 0.01 + 0.01 b      decode(b) = 0.01
    throughput(b) = b / (prefill(b) + 10 decode(b)) = b / (0.11 + 0.01 b)
    b:          1      2      3      4      5      ...  17
    thr(b):   8.33  15.38  21.43  26.67  31.25        63.0
so with SLO 0.055 s, slo_max_bs = 4 (prefill(4) = 0.05, prefill(5) = 0.06), and rate 20 needs b = 3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.kv_pages import KVPageLayout
from models.config import ModelConfig
from models.precision import resolve_precision
from serving.scheduling.cost_model import LLAMA3_8B, LLAMA3_70B, H100, DeviceProfile, roofline_step_cost, variant_key
from serving.scheduling.demand import STRATEGIES, TP_RULES, Device, ModelDemand, PlacementError, SchedulerConfig
from serving.scheduling.placement import kv_budget, pool_specs
from serving.scheduling.replan import RateObservation, RatesMonitor, rate_drift, replan, should_replan
from serving.scheduling.replica_planner import plan_replicas
from serving.scheduling.slo import fineserve_slo_of
from serving.scheduling.strategies import place
from serving.kv.slab_allocator import SlabAllocator
from serving.kv.pool_plan import plan_pool

GiB = 1 << 30
MiB = 1 << 20
SLAB = 2 * MiB


# One layer, one KV head of 256: bf16 KV = 1 KiB/token (16 KiB pages), int4 = 264 B/token.
def shape(layers, hidden, intermediate, heads, kv_heads, head_dim, vocab) -> ModelConfig:
    return ModelConfig("llama", vocab, hidden, intermediate, layers, heads, kv_heads, head_dim)


TINY = shape(1, 512, 1024, 2, 1, 256, 1000)
WIDE = shape(32, 512, 1024, 2, 1, 256, 1000)      # 32 KiB/token bf16, 8448 B/token int4
HD128 = shape(1, 512, 1024, 4, 2, 128, 1000)     # 1 KiB/token bf16, another head_dim


@dataclass(frozen=True)
class FakeCost:
    """StepCost's interface with linear step times."""

    prefill_base: float = 0.01
    prefill_per_token: float = 1e-4
    decode_base: float = 0.01

    def prefill_seconds(self, num_tokens, context_lens) -> float:
        return self.prefill_base + self.prefill_per_token * sum(num_tokens)

    def decode_seconds(self, context_lens) -> float:
        return self.decode_base

    def step_seconds(self, kind, num_tokens, context_lens) -> float:
        return self.decode_seconds(context_lens) if kind == "decode" else self.prefill_seconds(num_tokens, context_lens)

    def ttft_seconds(self, prompt_len: int) -> float:
        return self.prefill_seconds([prompt_len], [prompt_len])

    def prefill_seconds_per_token(self, prompt_len: int = 903) -> float:
        return self.ttft_seconds(prompt_len) / prompt_len


class FakeProfile:
    """DeviceProfile's `get`: one cost per TP size, KeyError for TP sizes not profiled."""

    def __init__(self, costs: dict[int, FakeCost] | None = None):
        self.costs = costs or {1: FakeCost()}

    def get(self, model: str, precision: str, tp: int = 1) -> FakeCost:
        return self.costs[tp]


ONE_TP = FakeProfile()
CONFIG = SchedulerConfig(memory_fraction=1.0)


def demand(name, rate, *, kv="bf16", weight_gib=10.0, slo=1.0, shape=TINY, prompt=100, output=10) -> ModelDemand:
    layout = KVPageLayout(shape.num_layers, shape.num_kv_heads, shape.head_dim, 16, kv)
    return ModelDemand(name, shape, "bf16" if kv == "bf16" else "w4a8kv4", kv, int(weight_gib * GiB),
                       layout.bytes_per_token, rate, slo, prompt, output)


def devices(n, gib=32.0, nodes=1) -> list[Device]:
    return [Device(f"d{i}", "fake", int(gib * GiB), node=i % nodes) for i in range(n)]


def where(placement) -> dict[str, list[tuple[str, ...]]]:
    return {m: [r.devices for r in placement.replicas_of(m)] for m in placement.demands}


# --------------------------------------------------------------------------------------------------
# TP / replica choice


def test_fineserve_slo_rule():
    # 40 x batch-1 TTFT of a 903-token prompt (0.01 + 0.0903 s) + 4 ms.
    assert fineserve_slo_of(FakeCost()) == pytest.approx(40 * 0.1003 + 0.004)


def test_plan_batch_sizes_are_the_hand_computed_ones():
    plans, _ = plan_replicas(demand("a", 20, slo=0.055), ONE_TP, devices(1, 12), CONFIG)
    p = plans[0]
    assert (p.tp, p.dp, p.rate_min_bs, p.slo_max_bs) == (1, 1, 3, 4)
    # 2 GiB of KV = 1024 slabs of 2 MiB x 128 pages x 16 tokens; sequences of 110 tokens.
    assert p.cache_max_bs == 1024 * 2048 // 110
    assert p.max_throughput == pytest.approx(4 / 0.15)


def test_high_rate_model_gets_replicas_on_distinct_devices():
    pl = place("fineserve", [demand("a", 40, slo=0.055)], devices(2), ONE_TP, CONFIG)
    # thr(slo_max_bs=4) = 26.7 < 40: two replicas at 20 req/s, each needing b = 3.
    assert [(r.tp, r.rate, r.min_num_seqs, r.max_num_seqs) for r in pl.replicas] == [(1, 20, 3, 4)] * 2
    assert sorted(r.devices for r in pl.replicas) == [("d0",), ("d1",)]
    # 60 req/s would need 3 replicas; there are 2 devices.
    with pytest.raises(PlacementError, match="even with 2 replicas"):
        place("fineserve", [demand("a", 60, slo=0.055)], devices(2), ONE_TP, CONFIG)


def test_llama70b_bf16_needs_tp2_on_80gb():
    d = ModelDemand.from_config("70b", LLAMA3_70B, "bf16", rate=0.1, slo_ttft_s=1.0)
    assert d.weight_bytes == resolve_precision("bf16").weight_bytes(LLAMA3_70B)
    assert 140e9 < d.weight_bytes < 142e9
    profile = FakeProfile({tp: FakeCost() for tp in (1, 2, 4, 8)})
    h100s = [Device(f"g{i}", "h100", 80 * 10**9) for i in range(4)]
    plans, reasons = plan_replicas(d, profile, h100s)
    assert [p.tp for p in plans] == [2, 4]          # tp=1: weights do not fit; tp=8: only 4 devices
    assert any(r.startswith("tp=1: weights") for r in reasons)
    pl = place("fineserve", [d], h100s, profile)
    assert [(r.tp, len(r.devices)) for r in pl.replicas] == [(2, 2)]
    # A TP group stays inside a node: one device per node cannot hold it.
    split = [Device(f"g{i}", "h100", 80 * 10**9, node=i) for i in range(4)]
    with pytest.raises(PlacementError, match="70b"):
        place("fineserve", [d], split, profile)


def test_real_roofline_profile_and_shapes():
    """The real cost model and shapes: Llama-3-70B bf16 takes TP 2 when devices are what counts and the
    TP with the smallest rate_min_bs by FineServe's rule; every strategy places a mixed set safely."""
    variants = [(("llama3-8b", LLAMA3_8B), "bf16"), (("llama3-8b", LLAMA3_8B), "w4a8kv4"),
                (("llama3-70b", LLAMA3_70B), "bf16")]
    profile = DeviceProfile("h100", "roofline (test)", {
        variant_key(name, prec, tp): roofline_step_cost(config, prec, H100, tp)
        for (name, config), prec in variants for tp in (1, 2, 4)})
    demands = [ModelDemand.from_config(f"{name}-{prec}", config, prec, rate=rate, slo_ttft_s=2.0, profile_model=name)
               for ((name, config), prec), rate in zip(variants, (4.0, 8.0, 0.2))]
    assert demands[1].kv_bytes_per_token == resolve_precision("w4a8kv4").kv_bytes_per_token(LLAMA3_8B) == 32 * 2 * (512 + 32)
    h100s = [Device(f"g{i}", "h100", 80 * 10**9) for i in range(4)]
    seventy = demands[2]
    plans, _ = plan_replicas(seventy, profile, h100s, SchedulerConfig(tp_rule="min_devices"))
    assert (plans[0].tp, plans[0].dp) == (2, 1)
    plans, _ = plan_replicas(seventy, profile, h100s)
    assert plans[0].rate_min_bs == min(p.rate_min_bs for p in plans) < 4
    for strategy in STRATEGIES:
        pl = place(strategy, demands, h100s, profile)
        assert all(r.tp >= 2 for r in pl.replicas_of(seventy.name))
        for d in h100s:
            kv = pl.device_kv(d.name)
            assert kv.weight_bytes + kv.reserved_kv_bytes <= 0.9 * d.memory_bytes
        json.dumps(pl.to_dict())


def test_tp_rule_fineserve_smallest_rate_min_bs_vs_fewest_devices():
    # TP 2 halves every step time: thr2(b) = b / (0.055 + 0.005 b) reaches 20 req/s at b = 2 (TP 1: b = 3).
    profile = FakeProfile({1: FakeCost(), 2: FakeCost(0.005, 5e-5, 0.005)})
    d = demand("a", 20, slo=0.055)
    fineserve = place("fineserve", [d], devices(2), profile, CONFIG)
    assert [(r.tp, r.min_num_seqs) for r in fineserve.replicas] == [(2, 2)]
    fewest = place("fineserve", [d], devices(2), profile, SchedulerConfig(memory_fraction=1.0, tp_rule="min_devices"))
    assert [(r.tp, r.min_num_seqs) for r in fewest.replicas] == [(1, 3)]
    assert [r.tp for r in place("prism", [d], devices(2), profile, CONFIG).replicas] == [1]  # base TP


# --------------------------------------------------------------------------------------------------
# Slab-aware FineServe placement vs the baselines


def three_models():
    """X: bf16 KV, 20 GiB; Y: int4 KV, busy; Z: int4 KV, small. Two 32 GiB devices."""
    return [demand("X", 1, weight_gib=10), demand("Y", 20, kv="int4", weight_gib=10),
            demand("Z", 10, kv="int4", weight_gib=5)]


def test_fineserve_places_where_the_cluster_caches_most_tokens():
    pl = place("fineserve", three_models(), devices(2), ONE_TP, CONFIG)
    # X first (largest) -> d0; Y -> the empty d1. Z (int4) beside bf16 X leaves the cluster
    # 8.5 GiB/1 KiB + 8.5 GiB/264 B (d0) + 22 GiB/264 B (d1) tokens; beside int4 Y only
    # 22 GiB/1 KiB + 17 GiB/264 B: int4 KV gets half of X's pool at 4x the tokens per byte.
    assert pl.models_on("d0") == ["X", "Z"] and pl.models_on("d1") == ["Y"]
    assert pl.score == pytest.approx(GiB * (8.5 / 1024 + 8.5 / 264 + 22 / 264), rel=1e-3)
    assert pl.score > 1.4 * GiB * (22 / 1024 + 17 / 264)
    # The quantized models' tokens in the real slab geometry: bf16 + int4 pages (16384, 4224 B) share
    # slabs of 4 x lcm = 2162688 B; int4 alone uses slabs of 497 pages of 4224 B.
    assert pl.kv_capacity_tokens("d0")["Z"] == (17 * GiB // 2162688) * 8192
    assert pl.kv_capacity_tokens("d1")["Y"] == (22 * GiB // (497 * 4224)) * 497 * 16
    # MuxServe on the same inputs keeps int4 KV as bf16: far fewer cacheable tokens.
    assert pl.score > 2 * place("muxserve", three_models(), devices(2), ONE_TP, CONFIG).score


def test_minimum_kv_is_counted_in_whole_slabs():
    # A needs b = 23 (thr(22) = 66.7 < 67 <= thr(23) = 67.6): 2530 tokens = 1.24 slabs of 2048 -> 2 slabs.
    # B needs 110 tokens -> 1 slab. A 5 MiB pool (2 slabs) holds their 2640 KiB by bytes, not in slabs.
    a, b = demand("A", 67, weight_gib=10), demand("B", 1, weight_gib=1 / 1024)
    dev = [Device("d0", "fake", a.weight_bytes + b.weight_bytes + 5 * MiB)]
    assert [p.rate_min_bs for p in plan_replicas(a, ONE_TP, dev, CONFIG)[0]] == [23]
    with pytest.raises(PlacementError, match="cannot place B.*3 slabs exceeds the pool's 2"):
        place("fineserve", [a, b], dev, ONE_TP, CONFIG)
    dev = [Device("d0", "fake", dev[0].memory_bytes + SLAB)]
    assert place("fineserve", [a, b], dev, ONE_TP, CONFIG).models_on("d0") == ["A", "B"]


def test_prism_places_by_kv_pressure():
    pl = place("prism", three_models(), devices(2), ONE_TP, CONFIG)
    # Order by rate / SLO: Y (20), Z (10), X (1). Y -> d0 (tie). Z: d0 (20+10)/(22-5) vs d1 10/(32-5)
    # -> d1. X: d0 (20+1)/(22-10) = 1.75 vs d1 (10+1)/(27-10) = 0.65 -> d1, beside Z.
    assert pl.models_on("d0") == ["Y"] and pl.models_on("d1") == ["Z", "X"]


def test_muxserve_marginal_throughput_vs_fineserve_free_memory():
    # slo_max_bs = 4, thr(4) = 26.7: utilizations Y 0.75, X 0.0375, Z 0.3.
    models = [demand("X", 1, weight_gib=20, slo=0.055), demand("Y", 20, weight_gib=5, slo=0.055),
              demand("Z", 8, weight_gib=2, slo=0.055)]
    mux = place("muxserve", models, devices(2), ONE_TP, CONFIG)
    # Order by rate x weights: Y, X, Z. Z beside Y would overload d0 (1.05): gain 28/1.05 - 20 = 6.7 < 8.
    assert mux.models_on("d0") == ["Y"] and mux.models_on("d1") == ["X", "Z"]
    fine = place("fineserve", models, devices(2), ONE_TP, CONFIG)
    # FineServe: X (largest) -> d0, Y -> d1; Z (all bf16) costs 2 GiB of tokens either way, and the
    # tie goes to the device with the larger pool: beside Y (25 GiB vs 10).
    assert fine.models_on("d0") == ["X"] and fine.models_on("d1") == ["Y", "Z"]


def test_muxserve_bf16_kv_gains_nothing_from_quantized_kv():
    # 32 layers: bf16 KV 32 KiB/token; int4 8448 B/token. 0.25 GiB of KV per device:
    # bf16 128 slabs x 64 tokens = 8192 tokens (74 sequences); int4 124 slabs x 256 = 31744 (288).
    d = demand("q", 88, kv="int4", weight_gib=10, slo=2.0, shape=WIDE)
    devs = devices(2, 10.25)
    fine = place("fineserve", [d], devs, ONE_TP, CONFIG)
    # thr(81) = 81 / 0.92 = 88.04: b = 81 fits int4's 288 sequences, not bf16's 74.
    assert [(r.min_num_seqs, fine.plans["q"].cache_max_bs) for r in fine.replicas] == [(81, 288)]
    mux = place("muxserve", [d], devs, ONE_TP, CONFIG)
    assert [r.min_num_seqs for r in mux.replicas] == [9, 9] and mux.plans["q"].cache_max_bs == 74


def test_muxserve_pool_holds_one_head_dim():
    models = [demand("a", 1), demand("b", 1, shape=HD128)]
    assert place("fineserve", models, devices(1), ONE_TP, CONFIG).models_on("d0") == ["a", "b"]
    with pytest.raises(PlacementError, match="head_dim"):
        place("muxserve", models, devices(1), ONE_TP, CONFIG)


def test_kv_budget_muxserve_quotas_follow_rate_times_blocks_fineserve_shares():
    models = [demand("a", 3), demand("b", 1)]
    mux = place("muxserve", models, devices(1), ONE_TP, CONFIG)
    # 12 GiB pool = 6144 slabs; each model's minimum is 1 slab (110 tokens); the other 6142 go 3:1.
    budget = kv_budget(mux)
    assert budget[("d0", "a")] == (1 + int(6142 * 0.75)) * SLAB
    assert budget[("d0", "b")] == (1 + int(6142 * 0.25)) * SLAB
    shared = kv_budget(place("fineserve", models, devices(1), ONE_TP, CONFIG))
    assert shared == {("d0", "a"): 6144 * SLAB, ("d0", "b"): 6144 * SLAB}


def test_static_dedicated_devices_spares_and_equal_partitions():
    models = [demand("A", 20, slo=0.055), demand("B", 5, slo=0.055)]
    two = place("static", models, devices(2), ONE_TP, CONFIG)
    assert where(two) == {"A": [("d0",)], "B": [("d1",)]}
    assert kv_budget(two) == {("d0", "A"): 22 * GiB, ("d1", "B"): 22 * GiB}
    # A spare device becomes a second replica of the busier model (A: utilization 0.75 vs 0.19).
    three = place("static", models, devices(3), ONE_TP, CONFIG)
    assert where(three) == {"A": [("d0",), ("d2",)], "B": [("d1",)]}
    assert [r.rate for r in three.replicas_of("A")] == [10, 10]
    idle = place("static", models, devices(3), ONE_TP, SchedulerConfig(memory_fraction=1.0, use_spare_devices=False))
    assert idle.models_on("d2") == []
    # One device: equal memory partitions (16 GiB each: 10 of weights, 6 of KV), nothing shared.
    one = place("static", models, devices(1), ONE_TP, CONFIG)
    assert kv_budget(one) == {("d0", "A"): 6 * GiB, ("d0", "B"): 6 * GiB}
    assert one.kv_capacity_tokens("d0") == {"A": 3072 * 2048, "B": 3072 * 2048}
    # 20 + 4 GiB of weights: A's 16 GiB share cannot hold it. Each gets its minimum (1 slab) plus half
    # of the other 4094 slabs of the 8 GiB pool: 4 GiB each, still no sharing.
    uneven = place("static", [demand("A", 20, slo=0.055, weight_gib=20), demand("B", 5, slo=0.055, weight_gib=4)],
                          devices(1), ONE_TP, CONFIG)
    assert kv_budget(uneven) == {("d0", "A"): 4 * GiB, ("d0", "B"): 4 * GiB}


def test_placement_errors_name_the_model_and_reason():
    with pytest.raises(PlacementError, match="big.*weights"):
        place("fineserve", [demand("big", 1, weight_gib=20)], devices(1, 12), FakeProfile({1: FakeCost(), 2: FakeCost()}),
                        CONFIG)
    with pytest.raises(PlacementError, match="slow.*SLO"):
        place("fineserve", [demand("slow", 1, slo=0.015)], devices(2), ONE_TP, CONFIG)  # prefill(1) = 0.02 s
    with pytest.raises(PlacementError, match="cannot place b"):
        place("fineserve", [demand("a", 1, weight_gib=8), demand("b", 1, weight_gib=8)], devices(1, 12), ONE_TP, CONFIG)


def test_kv_capacity_is_slab_aware_and_matches_the_allocator():
    pl = place("fineserve", [demand("bf", 1), demand("i4", 1, kv="int4")], devices(1), ONE_TP, CONFIG)
    # Pages of 16384 and 4224 bytes: slabs of 4 x lcm = 2162688 bytes, 132 bf16 pages or 512 int4 pages.
    slabs = (32 - 20) * GiB // 2162688
    assert pl.kv_capacity_tokens("d0") == {"bf": slabs * 132 * 16, "i4": slabs * 512 * 16}
    assert_specs_match_allocator(pl)
    json.dumps(pl.to_dict())


def assert_specs_match_allocator(pl):
    """pool_specs builds through plan_pool into a SlabAllocator with the capacities the placement reports."""
    for name, spec in pool_specs(pl).items():
        plan = plan_pool(spec.models, spec.pool_bytes, spec.mode, spec.target_slab_bytes)
        alloc = SlabAllocator(plan.num_slabs, plan.slab_bytes)
        for m, layout in plan.layouts.items():
            lo, hi = plan.limits[m]
            alloc.register(m, layout.page_slot_bytes, min_slabs=lo, max_slabs=hi)
        assert plan.slab_bytes == pl.device_kv(name).slab_bytes
        assert {m: alloc.capacity_pages(m) * plan.layouts[m].tokens_per_page
                for m in plan.layouts} == pl.kv_capacity_tokens(name)


# --------------------------------------------------------------------------------------------------
# Memory is never oversubscribed


SHAPES = (TINY, WIDE, HD128)


@st.composite
def cluster_cases(draw):
    n_models = draw(st.integers(1, 4))
    models = [demand(f"m{i}", draw(st.floats(0, 100)), kv=draw(st.sampled_from(["bf16", "fp8", "int8", "int4"])),
                     weight_gib=draw(st.floats(0.5, 30)), slo=draw(st.floats(0.03, 1.0)),
                     shape=draw(st.sampled_from(SHAPES))) for i in range(n_models)]
    devs = devices(draw(st.integers(1, 6)), draw(st.floats(8, 48)), nodes=draw(st.integers(1, 2)))
    devs = [Device(d.name, d.kind, int(d.memory_bytes * draw(st.floats(0.5, 1.0))), d.node) for d in devs]
    return models, devs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cluster_cases(), fraction=st.sampled_from([0.9, 1.0]), rule=st.sampled_from(TP_RULES))
def test_memory_is_never_oversubscribed(case, fraction, rule):
    models, devs = case
    profile = FakeProfile({1: FakeCost(), 2: FakeCost(0.006, 6e-5, 0.006), 4: FakeCost(0.004, 4e-5, 0.004)})
    config = SchedulerConfig(memory_fraction=fraction, tp_sizes=(1, 2, 4), tp_rule=rule, max_num_seqs=64)
    for strategy in STRATEGIES:
        try:
            pl = place(strategy, models, devs, profile, config)
        except PlacementError:
            continue
        for d in devs:
            kv = pl.device_kv(d.name)
            assert kv.feasible
            assert kv.weight_bytes + kv.reserved_kv_bytes <= config.usable_bytes(d) <= d.memory_bytes
            assert len(pl.models_on(d.name)) == len(set(pl.models_on(d.name)))  # one replica of a model per device
            for m, tokens in pl.kv_capacity_tokens(d.name).items():
                fp_min = next(f.min_tokens for f in pl.footprints[d.name] if f.model == m)
                assert tokens >= fp_min   # its rate_min_bs batch always fits
        for m in models:
            reps = pl.replicas_of(m.name)
            assert sum(r.rate for r in reps) == pytest.approx(m.rate)
            for r in reps:
                assert len(r.devices) == r.tp and len({pl.device(x).node for x in r.devices}) == 1
                assert r.min_num_seqs <= min(r.max_num_seqs, pl.plans[m.name].cache_max_bs)
        assert_specs_match_allocator(pl)


# --------------------------------------------------------------------------------------------------
# Rate drift and re-placement


def test_drift_thresholds_and_evidence():
    pl = place("fineserve", [demand("a", 10)], devices(1), ONE_TP, CONFIG)
    assert not should_replan(pl, {"a": 14.9}) and not should_replan(pl, {"a": 5.1})
    assert should_replan(pl, {"a": 15.1}) and should_replan(pl, {"a": 4.9})
    assert rate_drift(pl, {"a": 15.1}) == {"a": pytest.approx(0.51)}
    assert not should_replan(pl, {"a": 15.1}, threshold=0.6)
    assert not should_replan(pl, {"b": 100.0})                       # not a placed model
    # Too little evidence: 5 arrivals seen, 3 expected at plan over 0.3 s.
    assert not should_replan(pl, {"a": RateObservation(16.7, 5, 0.3)})
    assert should_replan(pl, {"a": RateObservation(16.7, 50, 3.0)})
    # Silence counts once the plan expected enough arrivals (10 req/s x 10 s = 100 >= 20).
    assert should_replan(pl, {"a": RateObservation(0.0, 0, 10.0)})
    assert not should_replan(pl, {"a": RateObservation(0.0, 0, 1.0)})


def test_rates_monitor_sliding_window():
    mon = RatesMonitor(window_s=10.0)
    for i in range(100):             # 5 req/s for 20 s
        mon.record("a", i * 0.2)
    obs = mon.observe(20.0, models=["b"])
    assert obs["a"].count == 49 and obs["a"].window_s == 10.0 and obs["a"].rate == pytest.approx(4.9)
    assert obs["b"] == RateObservation(0.0, 0, 10.0)
    assert mon.observe(2.0)["a"].window_s == 2.0


def test_replace_keeps_unchanged_models_in_place():
    # X is 1 MiB heavier than Y, so X is placed first (d0). When Y's rate goes to 60 req/s its KV
    # for b = 17 puts it first: a fresh placement swaps the two devices; replan keeps X on d0.
    old = place("fineserve", [demand("X", 1), demand("Y", 1, weight_gib=10 - 1 / 1024)], devices(2), ONE_TP, CONFIG)
    assert where(old) == {"X": [("d0",)], "Y": [("d1",)]}
    assert should_replan(old, {"X": 1.0, "Y": 60.0})
    new_demands = [demand("X", 1), demand("Y", 60, weight_gib=10 - 1 / 1024)]
    fresh = place("fineserve", new_demands, devices(2), ONE_TP, CONFIG)
    assert where(fresh) == {"X": [("d1",)], "Y": [("d0",)]}
    result = replan(old, new_demands, ONE_TP)
    assert where(result.placement) == {"X": [("d0",)], "Y": [("d1",)]}
    assert (result.kept, result.moved, result.full_replan) == (("X", "Y"), (), False)
    assert [(r.rate, r.min_num_seqs) for r in result.placement.replicas_of("Y")] == [(60, 17)]


def test_replace_falls_back_to_a_full_replan_and_reports_moves():
    old = place("fineserve", [demand("X", 1, weight_gib=6), demand("Y", 1, weight_gib=6)], devices(2, 16), ONE_TP, CONFIG)
    assert where(old) == {"X": [("d0",)], "Y": [("d1",)]}
    # A new 12 GiB model needs an empty device: keeping X and Y apart leaves none.
    new = [demand("X", 1, weight_gib=6), demand("Y", 1, weight_gib=6), demand("Z", 1, weight_gib=12)]
    result = replan(old, new, ONE_TP)
    assert result.full_replan and result.added == ("Z",)
    assert where(result.placement) == {"X": [("d1",)], "Y": [("d1",)], "Z": [("d0",)]}
    assert result.moved == ("X",) and result.kept == ("Y",)
