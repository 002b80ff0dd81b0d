"""The simulator runs the serving code (engines, schedulers, allocator, runtime) with a cost model for
the device: its decisions on hand cases, the cluster plumbing, and its validation against the real
engine: the same schedule exactly on a cost-model clock (step times on the wall clock:
tests/test_simulator_wall_clock.py)."""

from __future__ import annotations

import dataclasses

import pytest

from pallas_kernels.kv_pages import KVPageLayout
from serving.scheduling.cost_model import StepCost
from serving.runtime.device_runtime import DeviceRuntime
from serving.engine.llm_engine import EngineConfig
from serving.scheduling.slo import SLO
from serving.sim.metrics import summarize
from serving.sim.simulator import SimModel, SystemPolicy, TimedStep, build_device, device_groups, route, simulate_device
from serving.sim.workload import FixedLengths, Request, Workload, synthetic_workload

CONFIG = EngineConfig(max_num_seqs=8, max_model_len=512, max_num_batched_tokens=128, prefill_chunk=128)


def exact_cost(prefill_per_token=1e-3, decode_step=1e-2) -> StepCost:
    """No padding, no fixed cost: a prefill of n tokens takes n ms, every decode step 10 ms."""
    return StepCost(prefill=(0.0, prefill_per_token, 0.0), decode=(decode_step, 0.0, 0.0), pad_to_buckets=False)


def sim_model(name="m", kv="bf16", cost=None, slo=SLO(10.0), config=CONFIG):
    return SimModel(name, KVPageLayout(2, 2, 16, 16, kv), cost or exact_cost(), slo, config)


def test_single_request_timeline_is_the_cost_model():
    """Prompt 100 tokens (one 100 ms prefill step: the first token), then 4 decode steps of 10 ms."""
    dev = build_device([sim_model()], 16 << 20)
    rec, = simulate_device(dev, [Request("a", "m", 1.0, 100, 5)])
    assert rec.status == "finished" and rec.output_len == 5
    assert rec.first_token_s == pytest.approx(1.1)
    assert rec.token_times == pytest.approx([1.1, 1.11, 1.12, 1.13, 1.14])
    assert rec.finish_s == pytest.approx(1.14)


def test_idle_device_jumps_to_the_next_arrival_and_models_take_turns():
    dev = build_device([sim_model("a"), sim_model("b", kv="int4")], 16 << 20, policy="round_robin")
    recs = simulate_device(dev, [Request("1", "a", 0.0, 10, 3), Request("2", "b", 0.0, 10, 3),
                                 Request("3", "a", 50.0, 10, 1)])
    by_id = {r.request_id: r for r in recs}
    assert by_id["3"].first_token_s == pytest.approx(50.01)   # no time passes while idle
    # a's prefill (10 ms), then b's prefill (10 ms): b's first token waits for a's step.
    assert by_id["1"].first_token_s == pytest.approx(0.01)
    assert by_id["2"].first_token_s == pytest.approx(0.02)


def test_runtime_tracks_each_models_step_time_in_clock_seconds():
    """The runtime's moving average of step times (what latency-aware EDF sizes its horizon with) is
    measured on the engines' clock: simulated seconds here, one weighted update per step that ran."""
    from serving.scheduling.step_policy import STEP_TIME_WEIGHT

    dev = build_device([sim_model("a"), sim_model("b", cost=exact_cost(decode_step=0.03))], 16 << 20,
                       policy="edf")
    simulate_device(dev, [Request("1", "a", 0.0, 100, 3), Request("2", "b", 0.0, 50, 2)])
    for name, runner in dev.runners.items():
        expected = None
        for _, _, seconds in runner.steps:
            expected = seconds if expected is None else expected + STEP_TIME_WEIGHT * (seconds - expected)
        assert dev.runtime.step_seconds[name] == pytest.approx(expected)
    # a: 100 ms prefill then two 10 ms decodes; b: 50 ms prefill then one 30 ms decode
    assert dev.runtime.step_seconds["a"] == pytest.approx(0.1 + 0.2 * (0.01 - 0.1) + 0.2 * (0.01 - 0.082))
    assert dev.runtime.step_seconds["b"] == pytest.approx(0.05 + 0.2 * (0.03 - 0.05))
    with pytest.raises(ValueError, match="unknown step policy 'fifo'"):
        build_device([sim_model("a")], 16 << 20, policy="fifo")


def test_saab_drops_in_simulation_and_every_request_has_an_outcome():
    # SLO 150 ms; 100-token prompts take 100 ms each: the second of two simultaneous ones is hopeless.
    dev = build_device([sim_model(slo=SLO(0.15))], 16 << 20, admission="saab")
    recs = simulate_device(dev, [Request("a", "m", 0.0, 100, 2), Request("b", "m", 0.0, 100, 2),
                                 Request("c", "m", 0.0, 600, 2)])           # longer than max_model_len
    status = {r.request_id: r.status for r in recs}
    assert status == {"a": "finished", "b": "dropped", "c": "failed"}
    fcfs = build_device([sim_model(slo=SLO(0.15))], 16 << 20, admission="fcfs")
    assert [r.status for r in simulate_device(fcfs, [Request("a", "m", 0.0, 100, 2),
                                                     Request("b", "m", 0.0, 100, 2)])] == ["finished"] * 2


def test_static_pool_limits_a_model_to_its_share():
    """With a static split one model cannot use the other's memory, so it preempts (recomputes) where
    the shared slab pool serves it without."""
    layout = KVPageLayout(2, 2, 16, 16, "bf16")
    cfg = dataclasses.replace(CONFIG, max_num_seqs=8)
    reqs = [Request(str(i), "a", 0.0, 200, 50) for i in range(8)]
    pool_bytes = layout.page_bytes * 16 * 8  # 8 slabs of 16 pages
    outcomes = {}
    for mode in ("slab", "static"):
        models = [SimModel("a", layout, exact_cost(), SLO(100.0), cfg, kv_share=1.0),
                  SimModel("b", layout, exact_cost(), SLO(100.0), cfg, kv_share=1.0)]
        dev = build_device(models, pool_bytes, pool_mode=mode, admission="fcfs",
                           target_slab_bytes=layout.page_bytes * 16)
        recs = simulate_device(dev, reqs)
        assert all(r.status == "finished" for r in recs)
        outcomes[mode] = (dev.runtime.engines["a"].scheduler.num_preemptions, max(r.finish_s for r in recs))
    assert outcomes["slab"][0] == 0 and outcomes["static"][0] > 0
    assert outcomes["static"][1] > outcomes["slab"][1]


def test_route_weights_replicas_by_planned_rate():
    @dataclasses.dataclass
    class R:
        model: str
        rate: float

    class P:
        replicas = [R("m", 3.0), R("m", 1.0)]

        def replicas_of(self, model):
            return [r for r in self.replicas if r.model == model]

    reqs = [Request(str(i), "m", float(i), 1, 1) for i in range(400)]
    routed = route(reqs, P())
    assert len(routed["m#0"]) == 300 and len(routed["m#1"]) == 100
    with pytest.raises(ValueError, match="does not serve"):
        route([Request("x", "other", 0.0, 1, 1)], P())


def test_device_groups_join_devices_that_share_a_replica():
    @dataclasses.dataclass
    class D:
        name: str

    @dataclasses.dataclass
    class R:
        devices: tuple

    class P:
        devices = [D(f"g{i}") for i in range(5)]
        replicas = [R(("g0", "g1")), R(("g1",)), R(("g3",)), R(("g2", "g3"))]

    assert sorted(device_groups(P())) == [("g0", "g1"), ("g2", "g3")]  # g4 hosts nothing


def test_simulate_placement_on_a_small_cluster():
    from serving.scheduling.cost_model import LLAMA3_8B, H100, roofline_step_cost, DeviceProfile, variant_key
    from serving.scheduling.demand import Device, ModelDemand
    from serving.scheduling.strategies import place
    from serving.sim.simulator import simulate_placement

    entries = {variant_key("llama3-8b", p, 1): roofline_step_cost(LLAMA3_8B, p, H100, 1) for p in ("bf16", "w4a16")}
    profile = DeviceProfile("h100", "roofline, test", entries, {})
    demands = [ModelDemand.from_config("a", LLAMA3_8B, "bf16", 2.0, 2.0, profile_model="llama3-8b"),
               ModelDemand.from_config("b", LLAMA3_8B, "w4a16", 1.0, 2.0, profile_model="llama3-8b")]
    devices = [Device("d0", "h100", 80_000_000_000), Device("d1", "h100", 80_000_000_000)]
    work = synthetic_workload(["a", "b"], 3.0, 1.0, duration_s=20.0, lengths=FixedLengths(300, 50), seed=1)
    slos = {"a": SLO(2.0), "b": SLO(2.0)}
    for strategy in ("fineserve", "static"):
        placement = place(strategy, demands, devices, profile)
        recs = simulate_placement(placement, profile, work.requests, slos, SystemPolicy("saab", "edf"))
        assert [r.request_id for r in recs] == [r.request_id for r in work.requests]
        assert {r.model for r in recs} == {"a", "b"}
        assert summarize(recs, slos).overall.slo_attainment == 1.0  # light load on two H100s


def test_replanning_follows_a_popularity_flip():
    """Two Llama-3-8B-shaped models on three H100s, planned for `a` at ~35 req/s and `b` at ~4; then the
    popularity flips at 30 s. Planned once, `b`'s single replica drowns; re-planning moves replicas
    to `b` within a window and a check of the flip and keeps the late requests on time. With steady
    rates nothing is re-placed and the result is simulate_placement's."""
    from serving.scheduling.cost_model import H100, LLAMA3_8B, DeviceProfile, roofline_step_cost, variant_key
    from serving.scheduling.demand import Device, ModelDemand
    from serving.scheduling.strategies import place
    from serving.sim.simulator import simulate_placement, simulate_replanning
    from serving.sim.workload import popularity_flip

    profile = DeviceProfile("h100", "roofline, test", {variant_key("llama3-8b", "bf16", 1):
                                                        roofline_step_cost(LLAMA3_8B, "bf16", H100, 1)}, {})
    slos, policy = {"a": SLO(1.0), "b": SLO(1.0)}, SystemPolicy("saab", "edf")
    devices = [Device(f"d{i}", "h100", 80_000_000_000) for i in range(3)]

    def demands_for(rates):
        return [ModelDemand.from_config(m, LLAMA3_8B, "bf16", max(rates.get(m, 0.0), 1e-3), 1.0,
                                        mean_prompt=500, mean_output=400, profile_model="llama3-8b")
                for m in ("a", "b")]

    work = popularity_flip(["a", "b"], 40.0, 3.0, duration_s=60.0, lengths=FixedLengths(500, 400), seed=1)
    before = Workload([r for r in work.requests if r.arrival_s < 30], 30.0).rates_by_model()
    placement = place("fineserve", demands_for(before), devices, profile)
    assert len(placement.replicas_of("a")) > len(placement.replicas_of("b"))
    once = simulate_placement(placement, profile, work.requests, slos, policy)
    recs, events = simulate_replanning(placement, profile, work.requests, slos, demands_for, policy,
                                       check_every_s=5.0, window_s=10.0)
    assert [r.request_id for r in recs] == [r.request_id for r in work.requests]
    assert events and 30 < events[0].time_s <= 30 + 10 + 5 and "b" in events[0].drift
    final = events[-1].placement
    assert len(final.replicas_of("b")) > len(final.replicas_of("a"))
    late = lambda records: summarize([r for r in records if r.arrival_s >= 45], slos).overall.slo_attainment
    assert late(once) < 0.6 and late(recs) > late(once) + 0.3  # measured: 0.34 -> 0.90

    steady = synthetic_workload(["a", "b"], 20.0, 3.0, duration_s=30.0, lengths=FixedLengths(500, 400), seed=2)
    placement = place("fineserve", demands_for(steady.rates_by_model()), devices, profile)
    recs, events = simulate_replanning(placement, profile, steady.requests, slos, demands_for, policy,
                                       check_every_s=5.0, window_s=10.0)
    assert events == [] and recs == simulate_placement(placement, profile, steady.requests, slos, policy)


# ---------------------------------------------------------------------------------------------------
# Validation against the real engine


class CostClockRunner:
    """Wraps a ModelRunner: runs the real model, its step ending on `clock`'s device timeline when
    `cost` predicts for the batch the engine really formed (what a SimulatedRunner does, minus the
    model)."""

    def __init__(self, runner, cost: StepCost, clock):
        self.runner, self.cost, self.clock = runner, cost, clock

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def dispatch(self, pool, kind, seqs, num_tokens):
        context = [s.num_computed + n for s, n in zip(seqs, num_tokens)]
        pool, step = self.runner.dispatch(pool, kind, seqs, num_tokens)
        return pool, TimedStep(self.clock, self.clock.launch(self.cost.step_seconds(kind, num_tokens, context)),
                               step)


def test_simulator_replays_the_real_engines_schedule_exactly():
    """The real engine (model, pool, scheduler, runtime) on a clock that each step advances by the cost
    model, against the simulator with the same cost model on the same trace: every request's token
    times are the same. The only difference left is the device, so any scheduling, admission, paging
    or bucketing the simulator gets wrong shows up here, free of this machine's noise. The trace
    queues (some requests miss their SLO), so attainment is not trivially 1."""
    from models.config import ModelConfig
    from models.loader import random_model
    from serving.sim.simulator import SimClock
    from serving.sim.replay import replay
    from tests.helpers import build_engine

    cfg = ModelConfig("llama", 128, 64, 128, 2, 4, 2, 16, max_position_embeddings=1024)
    loaded = random_model(cfg, "bf16", "float32")
    config = EngineConfig(max_num_seqs=8, max_model_len=1024, max_num_batched_tokens=256, prefill_chunk=256,
                          async_scheduling=False)   # as the simulator's engines run
    # a CPU-like fit: ~10 ms fixed per step, prefill ~0.1 ms per token, decode ~1 ms per row
    cost = StepCost(prefill=(1e-2, 1e-4, 1e-8), decode=(1e-2, 1e-3, 2e-6, 2e-3), attention_block=128)
    per_request = cost.ttft_seconds(200) + 23 * cost.decode_seconds([224] * 4) / 4
    work = synthetic_workload(["m"], 0.9 / per_request, 1.0, duration_s=10.0, lengths=FixedLengths(200, 24), seed=7)
    slo = SLO(2 * cost.ttft_seconds(200))

    engine = build_engine(loaded, num_pages=8 * 64, tokens_per_page=16, pages_per_slab=8, **dataclasses.asdict(config))
    clock = SimClock()
    engine.runner = CostClockRunner(engine.runner, cost, clock)
    real = replay(DeviceRuntime(engine.pool, {"m": engine}), work.requests, clock, clock.wait_until)

    layout = KVPageLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, loaded.kv_dtype)
    sim = build_device([SimModel("m", layout, cost, slo, config)], engine.pool.allocator.stats()["pool_bytes"],
                       admission="fcfs", policy="round_robin")
    simulated = simulate_device(sim, work.requests)
    assert len(real) == len(work.requests) > 40
    for r, s in zip(real, simulated):
        assert (r.request_id, r.status, r.output_len) == (s.request_id, "finished", 24)
        assert r.token_times == pytest.approx(s.token_times, abs=1e-9), r.request_id
    attainment = summarize(real, {"m": slo}).overall.slo_attainment
    assert 0.3 < attainment < 0.95, attainment
