"""The simulator against the real engine on the wall clock: the cost model fitted on the real steps
of one run predicts its other steps within 10% on this CPU. It measures time, so it runs alone
(`timing`), after the file's first test has compiled its engines beside the other tests; conftest
starts this file first, before anything long it would wait for."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest

from pallas_kernels.kv_pages import KVPageLayout
from serving.runtime.device_runtime import DeviceRuntime
from serving.engine.llm_engine import EngineConfig
from serving.engine.model_runner import CompletedStep
from serving.scheduling.slo import SLO
from serving.sim.metrics import summarize
from serving.sim.simulator import SimModel, build_device, simulate_device
from serving.sim.workload import FixedLengths, synthetic_workload


class RecordingRunner:
    """Wraps a ModelRunner; records every step's batch and its wall time, counting the engine's host
    work since the previous step (scheduling, output bookkeeping: a few ms, which the simulator's
    steps must include too) but not the time spent waiting for the next arrival (`idle_until`)."""

    def __init__(self, runner):
        self.runner = runner
        self.steps = []
        self.last_end = None
        self.idle = 0.0

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def idle_until(self, wait_until):
        def wait(t):
            t0 = time.perf_counter()
            wait_until(t)
            self.idle += time.perf_counter() - t0
        return wait

    def dispatch(self, pool, kind, seqs, num_tokens):
        """The step, waited for (the engine schedules synchronously here)."""
        context = [s.num_computed + n for s, n in zip(seqs, num_tokens)]
        t0 = time.perf_counter()
        host = 0.0 if self.last_end is None else max(0.0, t0 - self.last_end - self.idle)
        pool, result = self.runner.execute(pool, kind, seqs, num_tokens)
        self.last_end, self.idle = time.perf_counter(), 0.0
        self.steps.append((kind == "prefill", list(num_tokens), context, self.last_end - t0 + host))
        return pool, CompletedStep(result)


@dataclass
class WarmEngines:
    """The model, its profiling engine and its serving engine, every program already compiled."""
    loaded: object
    cfg: object
    config: EngineConfig
    grid: object
    profiler: object
    engine: object


@pytest.fixture(scope="module")
def warm() -> WarmEngines:
    """Built (and compiled) by the first test of the file, which shares the machine with the other
    tests, so that the timing test's exclusive time only measures."""
    from models.config import ModelConfig
    from models.loader import random_model
    from serving.sim.profiler import ProfileGrid, build_profile_engine, profile_engine

    # Steps of ~5-40 ms: long enough that XLA:CPU's wake-up after an idle gap (~3 ms, which the
    # back-to-back profile does not see) stays small next to them.
    cfg = ModelConfig("llama", 512, 768, 1536, 4, 4, 2, 64, max_position_embeddings=1024)
    loaded = random_model(cfg, "bf16", "float32")
    # Synchronous steps: each recorded step time holds its host work, which the simulator's steps
    # must include too. Prefill and decode steps only: the profile measures those two kinds.
    config = EngineConfig(max_num_seqs=8, max_model_len=1024, max_num_batched_tokens=256, prefill_chunk=256,
                          async_scheduling=False, mixed_steps=False)
    grid = ProfileGrid.for_config(config, quick=True)
    profiler = build_profile_engine(loaded, config, grid)
    profile_engine(profiler, grid, repeats=1, progress=False)   # compiles every step it times
    # The serving engine as the profiling one (pool and all): its programs are the profiler's, so
    # they come from the compilation cache.
    engine = build_profile_engine(loaded, config, grid)
    engine.warmup()
    return WarmEngines(loaded, cfg, config, grid, profiler, engine)


def test_the_engines_are_compiled_before_the_timed_run(warm):
    """A second warm-up compiles nothing: the timed run below measures steps, not compilation."""
    compiled = warm.engine.num_compilations
    warm.engine.warmup()
    assert compiled > 0 and warm.engine.num_compilations == compiled


def _real_vs_simulated_trial(warm: WarmEngines):
    """Profile, serve one trace for real, simulate it; (held-out step ratio, real and simulated
    attainment, the load the run's own steps say it offered, requests)."""
    from serving.scheduling.cost_model import StepSample, fit_step_cost
    from serving.sim.profiler import profile_engine
    from serving.sim.replay import WallClock, replay

    cfg, config, engine = warm.cfg, warm.config, warm.engine
    profiled, _ = fit_step_cost(profile_engine(warm.profiler, warm.grid, repeats=3, progress=False),
                                attention_block=128)

    def per_request(cost):  # service time of one 200 + 24 request in a batch of 4 decoders
        return cost.ttft_seconds(200) + 23 * cost.decode_seconds([224] * 4) / 4

    rate = 0.8 / per_request(profiled)
    work = synthetic_workload(["m"], rate, 1.0, duration_s=12.0, lengths=FixedLengths(200, 24), seed=7)
    slo = SLO(4 * profiled.ttft_seconds(200))

    runner, engine.runner = engine.runner, RecordingRunner(engine.runner)
    recorder = engine.runner
    try:
        clock = WallClock()
        real = replay(DeviceRuntime(engine.pool, {"m": engine}), work.requests, clock,
                      recorder.idle_until(clock.wait_until))
    finally:
        engine.runner = runner

    steps = [StepSample(p, tuple(n), tuple(c), s) for p, n, c, s in recorder.steps]
    fit_half, _ = fit_step_cost(steps[0::2], attention_block=128)
    kinds = {True: "prefill", False: "decode"}
    ratio = float(np.median([fit_half.step_seconds(kinds[s.is_prefill], s.num_tokens, s.context_lens) / s.seconds
                             for s in steps[1::2]]))
    cost, errors = fit_step_cost(steps, attention_block=128)
    layout = KVPageLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, warm.loaded.kv_dtype)
    sim = build_device([SimModel("m", layout, cost, slo, config)], engine.pool.allocator.stats()["pool_bytes"],
                       admission="fcfs", policy="round_robin")
    simulated = simulate_device(sim, work.requests)
    att_real = summarize(real, {"m": slo}).overall.slo_attainment
    att_sim = summarize(simulated, {"m": slo}).overall.slo_attainment
    load = rate * per_request(cost)
    print(f"held-out predicted/measured step time (median) {ratio:.3f}; attainment real {att_real:.3f} "
          f"simulated {att_sim:.3f} over {len(work.requests)} requests, {len(steps)} steps, load {load:.2f} "
          f"by the run's own steps; fit {errors}")
    return ratio, att_real, att_sim, load, len(work.requests)


MAX_TRIALS = 3


@pytest.mark.timing
def test_cost_model_predicts_the_real_engines_steps_on_cpu(warm):
    """One model, one trace, served for real on the wall clock: the cost model fitted on every other
    real step predicts the remaining steps within 10% (median of predicted / measured, because a
    neighbour's burst lands on a few steps), so the form generalises to the batches the scheduler
    really forms. A step's time includes the engine's host work since the previous step
    (RecordingRunner): timing the model call alone left out ~5% of every step.

    The simulated and real SLO attainment of the same run are printed, not asserted: on this shared
    machine a neighbour's load swings the real run by 5-25 points, which no cost model fitted at
    another moment can predict (held-out step ratios stayed within 0.95-1.04 in the noisiest CI run,
    where attainment differed by 11 points). That the simulator schedules exactly as the engine does
    is checked without the clock, above; wall-clock fidelity figures are in benchmarks/RESULTS.md. A
    trial whose ratio misses is repeated with a fresh profile, up to MAX_TRIALS times."""
    ratios = []
    for _ in range(MAX_TRIALS):
        ratios.append(_real_vs_simulated_trial(warm)[0])
        if abs(ratios[-1] - 1) <= 0.10:
            break
    assert abs(ratios[-1] - 1) <= 0.10, ratios
