"""Replica planning: for each model, the tensor parallelism and number of data-parallel replicas
that meet its SLO and rate (FineServe, arXiv 2509.06261). For each TP size with a cost profile, from
the cost model's step times at batch b = 1..max_num_seqs:
    slo_max_bs   = largest b whose batched prefill of b mean prompts meets the TTFT SLO,
    rate_min_bs  = smallest b with b / (prefill(b) + mean_output x decode(b)) >= rate / dp,
    cache_max_bs = tokens the device's KV pool holds with the model alone (slab geometry) / seq_len,
adding replicas (dp) until rate_min_bs <= min(slo_max_bs, cache_max_bs). Strategies rank the
feasible plans differently (`TP_RULES`; docs/scheduling.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from serving.scheduling.cost_model import TTFT_CHUNK_TOKENS, DeviceProfile, StepCost
from serving.kv.pool_plan import page_size_options
from serving.scheduling.demand import Device, ModelDemand, SchedulerConfig
from serving.scheduling.placement import SHARED, DeviceFootprint, ReplicaPlan, _device_kv, _gb, _kv_dtype_for

RATE_TOLERANCE = 1e-9               # throughput >= rate, up to float rounding


@dataclass(frozen=True)
class _Infeasible:
    reason: str
    more_replicas_help: bool = False   # only the rate is unmet: a lower rate per replica may fit


@dataclass(frozen=True)
class _BatchCurve:
    prefill_s: np.ndarray      # batched prefill of b mean prompts, b = 1..max
    throughput: np.ndarray     # requests / s at batch b
    slo_max_bs: int


_PLAN_ORDER: dict[str, Callable[[ReplicaPlan], tuple]] = {
    # FineServe: the feasible TP with the smallest rate_min_bs; ties to fewer devices, smaller TP.
    "min_rate_bs": lambda p: (p.rate_min_bs, p.num_devices, p.tp),
    "min_devices": lambda p: (p.num_devices, p.rate_min_bs, p.tp),
    # Prism and MuxServe start from the model's base TP (the smallest that works).
    "smallest_tp": lambda p: (p.tp, p.dp),
}
_STRATEGY_TP_RULE = {"prism": "smallest_tp", "muxserve": "smallest_tp", "static": "min_devices"}


class _Planner:
    """Replica plans for one strategy; memoizes the cost model's batch curves per (model, TP)."""

    def __init__(self, profile: DeviceProfile, devices: Sequence[Device], config: SchedulerConfig, strategy: str):
        self.profile, self.config, self.strategy = profile, config, strategy
        self.num_devices = len(devices)
        self.max_node_devices = max(sum(1 for d in devices if d.node == n) for n in {d.node for d in devices})
        self.best_device = max(devices, key=lambda d: d.memory_bytes)
        self._curves: dict[tuple[str, int], _BatchCurve | _Infeasible] = {}
        self._cache_max_bs: dict[tuple[str, int], int] = {}

    def curve(self, demand: ModelDemand, tp: int) -> _BatchCurve | _Infeasible:
        key = (demand.name, tp)
        if key not in self._curves:
            try:
                cost = self.profile.get(demand.profile_key, demand.precision, tp)
            except KeyError:
                self._curves[key] = _Infeasible(
                    f"tp={tp}: no cost profile for ({demand.profile_key}, {demand.precision}, tp={tp})")
                return self._curves[key]
            p, o = demand.mean_prompt, demand.mean_output
            batches = range(1, self.config.max_num_seqs + 1)
            prefill = np.array([_batch_ttft(cost, p, b) for b in batches])
            decode = np.array([cost.decode_seconds([p + o // 2] * b) for b in batches])
            throughput = np.arange(1, len(prefill) + 1) / (prefill + o * decode)
            over = np.flatnonzero(prefill > demand.slo_ttft_s)
            slo_max_bs = int(over[0]) if over.size else len(prefill)  # the batches before the first miss
            self._curves[key] = _BatchCurve(prefill, throughput, slo_max_bs)
        return self._curves[key]

    def footprint(self, demand: ModelDemand, plan: ReplicaPlan) -> DeviceFootprint:
        layout = demand.page_layout(plan.tp, _kv_dtype_for(self.strategy, demand))
        options = tuple((l.page_bytes, l.tokens_per_page) for l in page_size_options(layout))
        return DeviceFootprint(demand.name, plan.tp, demand.weight_bytes_per_device(plan.tp),
                          plan.rate_min_bs * demand.seq_len, options, demand.config.head_dim, plan.replica_rate,
                          demand.slo_ttft_s, plan.utilization,
                          demand.config.num_layers * demand.kv_heads_per_device(plan.tp))

    def cache_max_bs(self, demand: ModelDemand, tp: int) -> int:
        """Sequences of seq_len the model alone can cache on the largest device."""
        key = (demand.name, tp)
        if key not in self._cache_max_bs:
            probe = ReplicaPlan(demand.name, tp, 1, 0.0, 0, 0, 0, 0.0)
            kv = _device_kv([self.footprint(demand, probe)], self.best_device, self.config, SHARED)
            tokens = kv.num_slabs * kv.tokens_per_slab[demand.name] if kv.feasible else 0
            self._cache_max_bs[key] = tokens // demand.seq_len
        return self._cache_max_bs[key]

    def plan(self, demand: ModelDemand, tp: int, dp: int) -> ReplicaPlan | _Infeasible:
        """The plan with exactly `dp` replicas of `tp` devices, or why it is infeasible."""
        curve = self.curve(demand, tp)
        if isinstance(curve, _Infeasible):
            return curve
        if curve.slo_max_bs == 0:
            return _Infeasible(f"tp={tp}: a batch-1 prefill of {demand.mean_prompt} tokens takes "
                               f"{curve.prefill_s[0]:.4g} s > SLO {demand.slo_ttft_s:.4g} s")
        cache_max_bs = self.cache_max_bs(demand, tp)
        if cache_max_bs == 0:
            return _Infeasible(f"tp={tp}: weights of {_gb(demand.weight_bytes_per_device(tp))} per device leave "
                               f"no room for one {demand.seq_len}-token sequence on {self.best_device.name}")
        limit = min(curve.slo_max_bs, cache_max_bs)
        rate = demand.rate / dp
        meets = np.flatnonzero(curve.throughput[:limit] >= rate * (1 - RATE_TOLERANCE))
        if not meets.size:
            return _Infeasible(f"tp={tp} x {dp}: {rate:.4g} req/s per replica needs a batch above "
                               f"min(slo_max_bs={curve.slo_max_bs}, cache_max_bs={cache_max_bs})",
                               more_replicas_help=True)
        return ReplicaPlan(demand.name, tp, dp, rate, int(meets[0]) + 1, curve.slo_max_bs, cache_max_bs,
                           float(curve.throughput[limit - 1]))

    def candidates(self, demand: ModelDemand, rule: str) -> tuple[list[ReplicaPlan], list[str]]:
        """Per TP size, the fewest replicas that are feasible (FineServe adds replicas until the rate
        fits); ranked by `rule`. Also the reasons for the TP sizes without a feasible plan."""
        plans, reasons = [], []
        for tp in demand.tp_sizes or self.config.tp_sizes:
            if tp > self.max_node_devices:
                reasons.append(f"tp={tp}: no node has {tp} devices")
                continue
            outcome: ReplicaPlan | _Infeasible = _Infeasible(f"tp={tp}: fewer than {tp} devices")
            for dp in range(1, self.num_devices // tp + 1):
                outcome = self.plan(demand, tp, dp)
                if not (isinstance(outcome, _Infeasible) and outcome.more_replicas_help):
                    break
            if isinstance(outcome, ReplicaPlan):
                plans.append(outcome)
            else:
                reasons.append(outcome.reason + (f" (even with {self.num_devices // tp} replicas)"
                                                 if outcome.more_replicas_help else ""))
        return sorted(plans, key=_PLAN_ORDER[rule]), reasons


def _batch_ttft(cost: StepCost, prompt_len: int, batch: int) -> float:
    """TTFT of `batch` prompts prefilled together, in the engine's chunks (StepCost.ttft_seconds at
    batch 1): FineServe's profiled TTFT at batch b."""
    total, done = 0.0, 0
    while done < prompt_len:
        n = min(TTFT_CHUNK_TOKENS, prompt_len - done)
        done += n
        total += cost.prefill_seconds([n] * batch, [done] * batch)
    return total


def plan_replicas(demand: ModelDemand, profile: DeviceProfile, devices: Sequence[Device],
                  config: SchedulerConfig | None = None,
                  strategy: str = "fineserve") -> tuple[list[ReplicaPlan], list[str]]:
    """The feasible (TP, replicas) plans of one model, best first for `strategy`, and why the other TP
    sizes are infeasible."""
    config = config or SchedulerConfig()
    planner = _Planner(profile, devices, config, strategy)
    return planner.candidates(demand, _STRATEGY_TP_RULE.get(strategy, config.tp_rule))
