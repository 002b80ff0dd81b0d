"""Discrete-event simulation of serving, running the serving code itself with a cost model for devices.

What is real: the engines, their schedulers and admission policies, the page managers, the slab
allocator (one per device, planned by `serving.kv.pool_plan` exactly as a real pool), the device
runtime and its step policy (`serving.scheduling.local_scheduling.LocalScheduling`), and the global
scheduler's placement. What is simulated: the device. A `SimulatedRunner` stands in for each model's
`ModelRunner`: same padded shape buckets, a token per row, and each step taking the time
`serving.scheduling.cost_model.StepCost` predicts on its device's timeline, after the steps launched
before it. The pool has no device buffer.

`simulate_device` replays requests on one device (`serving.sim.replay`); `simulate_placement` runs a
`serving.scheduling.placement.Placement` as independent device groups, routing each model's
requests to its replicas; `simulate_replanning` re-places on rate drift
(`serving.scheduling.replan.replan`). Design and validation: docs/scheduling.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import numpy as np

from pallas_kernels.kv_pages import KVPageLayout
from serving.scheduling.cost_model import StepCost
from serving.runtime.device_runtime import DeviceRuntime, assemble_device
from serving.engine.llm_engine import EngineConfig, LLMEngine
from serving.scheduling.demand import ModelDemand, PlacementError
from serving.scheduling.placement import pool_specs
from serving.scheduling.replan import (DEFAULT_DRIFT_THRESHOLD, MIN_DRIFT_OBSERVATIONS, RatesMonitor, rate_drift, replan)
from serving.kv.slab_allocator import SlabAllocator
from serving.kv.slab_geometry import DEFAULT_SLAB_BYTES
from serving.scheduling.local_scheduling import LocalScheduling
from serving.scheduling.slo import SLO
from serving.sim.metrics import RequestRecord
from serving.engine.model_runner import CompletedStep, ShapeBuckets, StepResult
from serving.engine.scheduler import StepKind
from serving.kv.pool_plan import ModelPages, PoolPlan, plan_pool
from serving.sim.replay import replay
from serving.sim.workload import Request

class SimClock:
    """A device's simulated time: the host's `now`, which waits for steps to end and for arrivals,
    and when the device ends the steps launched so far (one after another, as a device queue runs
    them). Host work itself takes no simulated time."""

    def __init__(self, start: float = 0.0):
        self.now = start
        self.device_free_at = start

    def __call__(self) -> float:
        return self.now

    def wait_until(self, t: float) -> None:
        self.now = max(self.now, t)

    def launch(self, seconds: float) -> float:
        """A step of `seconds` launched now; when it ends."""
        self.device_free_at = max(self.now, self.device_free_at) + seconds
        return self.device_free_at


class TimedStep:
    """A step on a simulated timeline: its result is there once the clock reaches `done_at`."""

    def __init__(self, clock, done_at: float, step):
        self.clock, self.done_at, self.step = clock, done_at, step

    def result(self) -> StepResult:
        self.clock.wait_until(self.done_at)
        return self.step.result()

    def wait(self) -> None:
        """Wait for the underlying step (the timeline's end is `done_at`)."""
        self.step.wait()


class SimulatedPool:
    """The allocator of a planned pool, without a device buffer (`words` is None)."""

    def __init__(self, plan: PoolPlan):
        self.plan = plan
        self.allocator = plan.register(SlabAllocator(plan.num_slabs, plan.slab_bytes))
        self.words = None


class SimulatedRunner(ShapeBuckets):
    """Stands in for a model's `ModelRunner`: same buckets, cost-model time, token 0 for every row."""

    def __init__(self, cost: StepCost, clock: SimClock, config: EngineConfig, vocab_size: int = 2):
        super().__init__(config.max_num_seqs, config.max_num_batched_tokens, config.prefill_chunk,
                         config.mixed_steps)
        self.cost = cost
        self.clock = clock
        self.vocab_size = vocab_size
        self.steps: list[tuple[StepKind, int, float]] = []  # (kind, rows, seconds)

    def dispatch(self, pool, kind: StepKind, seqs, num_tokens: list[int]):
        context = [s.num_computed + n for s, n in zip(seqs, num_tokens)]
        seconds = self.cost.step_seconds(kind, num_tokens, context)
        self.steps.append((StepKind(kind), len(seqs), seconds))
        result = StepResult(np.zeros(len(seqs), np.int32), None, None, None, seconds)
        return pool, TimedStep(self.clock, self.clock.launch(seconds), CompletedStep(result))

    def execute(self, pool, kind: StepKind, seqs, num_tokens: list[int]):
        pool, step = self.dispatch(pool, kind, seqs, num_tokens)
        return pool, step.result()


@dataclass
class SimModel:
    """One model (replica) on a simulated device."""

    name: str
    layout: KVPageLayout     # its page geometry before planning (tokens per page, KV format, depth)
    cost: StepCost
    slo: SLO
    config: EngineConfig
    kv_share: float | None = None   # "static" pools: its fraction of the pool


@dataclass
class SimulatedDevice:
    runtime: DeviceRuntime
    clock: SimClock
    runners: dict[str, SimulatedRunner] = field(default_factory=dict)


def build_device(models: list[SimModel], pool_bytes: int, *, pool_mode: str = "slab",
                 admission: str = "saab", policy: str = "edf",
                 target_slab_bytes: int = DEFAULT_SLAB_BYTES) -> SimulatedDevice:
    """Engines of `models` over one simulated pool of `pool_bytes`, stepped by `policy`."""
    clock = SimClock()
    plan = plan_pool({m.name: ModelPages(m.layout, share=m.kv_share) for m in models}, pool_bytes, pool_mode,
                     target_slab_bytes)
    pool = SimulatedPool(plan)
    engines, runners = {}, {}
    for m in models:
        # A model whose share of the pool holds less than max_model_len serves what fits and fails
        # longer requests explicitly (a static partition's limit).
        layout = plan.layouts[m.name]
        fits = pool.allocator.capacity_pages(m.name) * layout.tokens_per_page
        # Host work takes no simulated time, so launching a step ahead would only delay when the host
        # sees tokens: the engines run synchronously, as the cost model's validation does.
        config = dataclasses.replace(m.config, max_model_len=min(m.config.max_model_len, fits),
                                     async_scheduling=False)
        runners[m.name] = SimulatedRunner(m.cost, clock, config)
        engines[m.name] = partial(LLMEngine, None, layout, pool, m.name, config, runner=runners[m.name], clock=clock)
    scheduling = LocalScheduling(admission, policy, {m.name: m.slo for m in models}, {m.name: m.cost for m in models})
    runtime = assemble_device(pool, engines, scheduling)
    return SimulatedDevice(runtime, clock, runners)


def simulate_device(device: SimulatedDevice, requests: list[Request], progress=None) -> list[RequestRecord]:
    """Replay `requests` on one simulated device (its clock starts at 0)."""
    return replay(device.runtime, requests, device.clock, device.clock.wait_until, progress=progress)


# ---------------------------------------------------------------------------------------------------
# A cluster under a global placement


@dataclass(frozen=True)
class SystemPolicy:
    """How a serving system runs its devices: admission per model and the step policy per device."""

    admission: str = "saab"
    step_policy: str = "edf"


def device_groups(placement) -> list[tuple[str, ...]]:
    """Devices linked by a replica (TP groups and whatever shares their devices), each sorted."""
    parent = {d.name: d.name for d in placement.devices}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for r in placement.replicas:
        for d in r.devices[1:]:
            parent[root(d)] = root(r.devices[0])
    groups: dict[str, list[str]] = {}
    for r in placement.replicas:
        for d in r.devices:
            groups.setdefault(root(d), [])
    for d in parent:
        if root(d) in groups:
            groups[root(d)].append(d)
    return [tuple(sorted(g)) for g in groups.values()]


def route(requests: list[Request], placement) -> dict[str, list[Request]]:
    """Requests per replica engine ("<model>#<k>"): each model's requests go to its replicas by smooth
    weighted round-robin on the replicas' planned rates, in arrival order."""
    credit: dict[str, list[float]] = {}
    out: dict[str, list[Request]] = {}
    for req in requests:
        replicas = placement.replicas_of(req.model)
        if not replicas:
            raise ValueError(f"request {req.request_id!r} names model {req.model!r}, which the placement "
                             f"does not serve")
        weights = [max(r.rate, 1e-9) for r in replicas]
        c = credit.setdefault(req.model, [0.0] * len(replicas))
        for i, w in enumerate(weights):
            c[i] += w
        k = int(np.argmax(c))
        c[k] -= sum(weights)
        name = f"{req.model}#{k}"
        out.setdefault(name, []).append(Request(req.request_id, name, req.arrival_s, req.prompt_len, req.output_len))
    return out


def build_group(placement, specs: dict, group: tuple[str, ...], profile, slos: dict[str, SLO],
                policy: SystemPolicy, *, max_model_len: int, max_num_batched_tokens: int = 2048,
                prefill_chunk: int = 512) -> SimulatedDevice:
    """One simulated device for a device group: the placement's pools of those devices (`specs`, from
    `placement.pool_specs`) merged (bytes and quotas add; a replica's page holds all its KV
    heads), its replicas as engines in the placement's order."""
    models = []
    pool_bytes = sum(specs[d].pool_bytes for d in group if d in specs)
    for model in dict.fromkeys(r.model for r in placement.replicas):
        for k, r in enumerate(placement.replicas_of(model)):
            if not set(r.devices) <= set(group):
                continue
            demand = placement.demands[model]
            pages = specs[r.devices[0]].models[model]
            layout = dataclasses.replace(pages.layout, num_kv_heads=demand.config.num_kv_heads)
            quota = sum(specs[d].models[model].max_bytes or 0 for d in r.devices)
            config = EngineConfig(max_num_seqs=r.max_num_seqs, max_model_len=max_model_len,
                                  max_num_batched_tokens=max_num_batched_tokens, prefill_chunk=prefill_chunk)
            models.append(SimModel(f"{model}#{k}", layout, profile.get(demand.profile_key, demand.precision, r.tp),
                                   slos[model], config, kv_share=quota or None))
    # Partitioned pools (quotas): each engine keeps exactly its quota's share of the group's pool.
    mode = "static" if any(m.kv_share for m in models) else "slab"
    return build_device(models, pool_bytes, pool_mode=mode, admission=policy.admission, policy=policy.step_policy)


def simulate_placement(placement, profile, requests: list[Request], slos: dict[str, SLO],
                       policy: SystemPolicy = SystemPolicy(), *, max_model_len: int = 8192,
                       progress=None) -> list[RequestRecord]:
    """Simulate the whole cluster on `requests` (model names as in the placement's demands). Returns
    one record per request (model names restored), in arrival order."""
    routed = route(requests, placement)
    specs = pool_specs(placement)
    records = []
    for group in device_groups(placement):
        device = build_group(placement, specs, group, profile, slos, policy, max_model_len=max_model_len)
        mine = [r for name in device.runtime.engines for r in routed.get(name, [])]
        for rec in simulate_device(device, mine, progress=progress):
            rec.model = rec.model.split("#")[0]
            records.append(rec)
    assert len(records) == len(requests), (len(records), len(requests))
    return sorted(records, key=lambda r: r.arrival_s)


@dataclass(frozen=True)
class Replanning:
    """One re-placement during `simulate_replanning`."""

    time_s: float
    drift: dict[str, float]       # model -> relative drift of its observed rate from plan
    moved: tuple[str, ...]        # models whose device sets changed
    placement: object             # a placement.Placement, serving from time_s on
    planned_share: float = 1.0    # of the observed rates (< 1: they did not fit)


def simulate_replanning(placement, profile, requests: list[Request], slos: dict[str, SLO],
                        demands_for: Callable[[dict[str, float]], Sequence[ModelDemand]],
                        policy: SystemPolicy = SystemPolicy(), *, rate_scale: float = 1.0,
                        plan_factors: Sequence[float] = (1.0,), check_every_s: float = 10.0,
                        window_s: float = 30.0, threshold: float = DEFAULT_DRIFT_THRESHOLD,
                        min_count: int = MIN_DRIFT_OBSERVATIONS, max_model_len: int = 8192,
                        ) -> tuple[list[RequestRecord], list[Replanning]]:
    """`simulate_placement` with re-placement on rate drift (docs/scheduling.md). `demands_for`
    turns rates into demands. A placement may plan for a share of the offered rates (best effort:
    `rate_scale` for the first one); drift is judged on observed rates times that share, and a
    re-placement takes the first of `plan_factors` x the observed rates that `replan` can fit (none:
    the current placement stays). Returns the records (arrival order) and the re-placements made."""
    monitor = RatesMonitor(window_s, start_s=0.0)
    models = list(placement.demands)
    periods: list[tuple[object, list[Request]]] = [(placement, [])]
    events: list[Replanning] = []
    next_check, scale = check_every_s, rate_scale
    for req in sorted(requests, key=lambda r: r.arrival_s):
        while req.arrival_s >= next_check:
            current = periods[-1][0]
            observed = monitor.observe(next_check, models)
            drift = rate_drift(current, {m: dataclasses.replace(o, rate=o.rate * scale) for m, o in observed.items()},
                               threshold, min_count)
            for factor in plan_factors if drift else ():
                try:
                    new = replan(current, demands_for({m: o.rate * factor for m, o in observed.items()}), profile,
                                  threshold=threshold)
                except PlacementError:
                    continue
                events.append(Replanning(next_check, drift, new.moved, new.placement, factor))
                periods.append((new.placement, []))
                scale = factor
                break
            next_check += check_every_s
        monitor.record(req.model, req.arrival_s)
        periods[-1][1].append(req)
    records = []
    for period_placement, period_requests in periods:
        if period_requests:
            records += simulate_placement(period_placement, profile, period_requests, slos, policy,
                                          max_model_len=max_model_len)
    return sorted(records, key=lambda r: r.arrival_s), events
