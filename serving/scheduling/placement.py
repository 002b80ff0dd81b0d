"""A placement: which devices serve which model replicas with what tensor parallelism, and how each
device's KV memory is split among its co-located models. The KV arithmetic uses the real slab
geometry (`serving.kv.slab_geometry.choose_slab_geometry` over the co-located models' page sizes),
so the tokens a placement promises are the tokens the device's pool will hold. `kv_budget` and
`pool_specs` hand a device's partition to the simulator or a runtime.

Memory model: a device offers `memory_fraction x memory_bytes` for weights and KV (the rest is XLA
workspace and activations); weights are split evenly across a TP group; KV heads too. KV sharing per
strategy: one shared pool (FineServe, Prism) or fixed quotas (MuxServe, static); docs/scheduling.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

from serving.kv.slab_geometry import DEFAULT_SLAB_BYTES, choose_slab_geometry
from serving.kv.pool_plan import ModelPages
from serving.scheduling.demand import Device, ModelDemand, SchedulerConfig

# How each strategy shares a device's KV memory.
SHARED, MUXSERVE_QUOTAS, STATIC_QUOTAS = "shared", "muxserve", "static"
STRATEGY_KV_SHARING = {"fineserve": SHARED, "prism": SHARED, "muxserve": MUXSERVE_QUOTAS,
                       "static": STATIC_QUOTAS}


@dataclass(frozen=True)
class ReplicaPlan:
    """One model's TP/replica choice and the batch sizes behind it."""

    model: str
    tp: int
    dp: int
    replica_rate: float
    rate_min_bs: int
    slo_max_bs: int
    cache_max_bs: int
    max_throughput: float   # requests / s one replica serves at min(slo_max_bs, cache_max_bs)

    @property
    def num_devices(self) -> int:
        return self.tp * self.dp

    @property
    def utilization(self) -> float:
        """Share of its devices' time a replica needs at its rate."""
        return self.replica_rate / self.max_throughput if self.max_throughput > 0 else math.inf


@dataclass(frozen=True)
class Replica:
    model: str
    devices: tuple[str, ...]
    tp: int
    rate: float
    max_num_seqs: int   # admission cap: slo_max_bs (FineServe)
    min_num_seqs: int   # rate_min_bs: the batch it must reach to keep up


@dataclass(frozen=True)
class DeviceFootprint:
    """What one replica puts on each device of its TP group."""

    model: str
    tp: int
    weight_bytes: int
    min_tokens: int                            # KV it must be able to hold: rate_min_bs x seq_len
    page_options: tuple[tuple[int, int], ...]  # (page bytes, tokens per page), preferred first
    head_dim: int
    rate: float                                # the replica's rate
    slo_s: float
    utilization: float
    kv_blocks_per_token: int                   # MuxServe head-wise blocks: layers x KV heads here


@dataclass(frozen=True)
class DeviceKV:
    """One device's KV pool under a placement (bytes; slabs of `slab_bytes`)."""

    feasible: bool
    reason: str
    usable_bytes: int
    weight_bytes: int
    pool_bytes: int                         # usable - weights
    slab_bytes: int
    num_slabs: int
    pages: dict[str, tuple[int, int]]       # (page bytes, tokens per page) each model uses here
    tokens_per_slab: dict[str, int]
    min_slabs: dict[str, int]               # slabs each model needs for its rate_min_bs batch
    quota_slabs: dict[str, int] | None      # fixed partitions (muxserve, static); None: shared
    cacheable_tokens: float                 # shared: pool split equally; partitioned: sum of quotas (/ tp)

    @property
    def reserved_kv_bytes(self) -> int:
        """KV held back for the models: their minimums (shared) or their whole quotas."""
        slabs = self.quota_slabs if self.quota_slabs is not None else self.min_slabs
        return sum(slabs.values()) * self.slab_bytes


@dataclass(frozen=True)
class DevicePoolSpec:
    """Arguments for `pool_plan.plan_pool(models, pool_bytes, mode)` on one device."""

    pool_bytes: int
    models: dict[str, ModelPages]
    mode: str = "slab"
    target_slab_bytes: int = DEFAULT_SLAB_BYTES


@dataclass
class Placement:
    replicas: list[Replica]
    strategy: str
    score: float                 # cacheable KV tokens over all devices (same metric for every strategy)
    notes: list[str]
    devices: tuple[Device, ...] = ()
    demands: dict[str, ModelDemand] = field(default_factory=dict)
    plans: dict[str, ReplicaPlan] = field(default_factory=dict)
    config: SchedulerConfig = field(default_factory=SchedulerConfig)
    footprints: dict[str, list[DeviceFootprint]] = field(default_factory=dict, repr=False)

    @property
    def kv_sharing(self) -> str:
        return STRATEGY_KV_SHARING[self.strategy]

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(f"no device {name!r} in this placement")

    def models_on(self, device: str) -> list[str]:
        return [f.model for f in self.footprints[device]]

    def replicas_of(self, model: str) -> list[Replica]:
        return [r for r in self.replicas if r.model == model]

    def planned_rate(self, model: str) -> float:
        return sum(r.rate for r in self.replicas_of(model))

    def device_kv(self, device: str) -> DeviceKV:
        return _device_kv(self.footprints[device], self.device(device), self.config, self.kv_sharing)

    def kv_capacity_tokens(self, device: str) -> dict[str, int]:
        """Tokens each model on `device` can cache: the whole pool (shared) or its quota, in whole pages
        of the page geometry the co-located models' page sizes lead to."""
        kv = self.device_kv(device)
        slabs = kv.quota_slabs if kv.quota_slabs is not None else {m: kv.num_slabs for m in kv.min_slabs}
        return {m: slabs[m] * kv.tokens_per_slab[m] for m in slabs}

    def to_dict(self) -> dict:
        devices = {}
        for d in self.devices:
            kv = self.device_kv(d.name)
            devices[d.name] = {
                "kind": d.kind, "node": d.node, "memory_bytes": d.memory_bytes, "models": self.models_on(d.name),
                "weight_bytes": kv.weight_bytes, "pool_bytes": kv.pool_bytes, "slab_bytes": kv.slab_bytes,
                "num_slabs": kv.num_slabs, "reserved_kv_bytes": kv.reserved_kv_bytes,
                "kv_capacity_tokens": self.kv_capacity_tokens(d.name),
                "tokens_per_page": {m: t for m, (_, t) in kv.pages.items()},
            }
        return {
            "strategy": self.strategy, "kv_sharing": self.kv_sharing, "score": self.score,
            "notes": list(self.notes),
            "replicas": [{**dataclasses.asdict(r), "devices": list(r.devices)} for r in self.replicas],
            "plans": {m: dataclasses.asdict(p) for m, p in self.plans.items()},
            "devices": devices,
        }


def kv_budget(placement: Placement) -> dict[tuple[str, str], int]:
    """KV bytes each model may use on each of its devices: the device's whole shared pool (fineserve,
    prism: one SlabAllocator, no reservations) or its fixed quota (muxserve, static: register with
    min_slabs = max_slabs = quota / slab_bytes)."""
    budget = {}
    for d in placement.devices:
        kv = placement.device_kv(d.name)
        for m in kv.min_slabs:
            slabs = kv.num_slabs if kv.quota_slabs is None else kv.quota_slabs[m]
            budget[(d.name, m)] = slabs * kv.slab_bytes
    return budget


def pool_specs(placement: Placement) -> dict[str, DevicePoolSpec]:
    """Per device, what `plan_pool` needs to build the pool this placement assumes (devices hosting
    nothing are left out). Quotas are whole slabs, so reserve = cap gives exactly the partition."""
    specs = {}
    for d in placement.devices:
        if not placement.footprints[d.name]:
            continue
        kv = placement.device_kv(d.name)
        models = {}
        for f in placement.footprints[d.name]:
            layout = placement.demands[f.model].page_layout(f.tp, _kv_dtype_for(placement.strategy,
                                                                                placement.demands[f.model]))
            if kv.quota_slabs is None:
                models[f.model] = ModelPages(layout)
            else:
                quota = kv.quota_slabs[f.model] * kv.slab_bytes
                models[f.model] = ModelPages(layout, reserve_bytes=quota, max_bytes=quota)
        specs[d.name] = DevicePoolSpec(kv.pool_bytes, models, "slab", placement.config.target_slab_bytes)
    return specs


@lru_cache(maxsize=4096)
def _slab_geometry(page_options: tuple[tuple[int, ...], ...], target: int) -> tuple[int, tuple[int, ...]]:
    slab, chosen = choose_slab_geometry([list(o) for o in page_options], target)
    return slab, tuple(chosen)


def _device_kv(footprints: Sequence[DeviceFootprint], device: Device, config: SchedulerConfig,
               sharing: str) -> DeviceKV:
    usable = config.usable_bytes(device)
    weights = sum(f.weight_bytes for f in footprints)
    pool = usable - weights
    empty = DeviceKV(True, "", usable, weights, max(pool, 0), 0, 0, {}, {}, {}, None if sharing == SHARED else {}, 0.0)
    if not footprints:
        return empty

    def infeasible(reason: str) -> DeviceKV:
        return dataclasses.replace(empty, feasible=False, reason=f"{device.name}: {reason}")

    if pool <= 0:
        return infeasible(f"weights {_gb(weights)} exceed the usable {_gb(usable)}")
    if sharing == MUXSERVE_QUOTAS and len({f.head_dim for f in footprints}) > 1:
        return infeasible("MuxServe's head-wise pool holds one head_dim only")
    slab, chosen = _slab_geometry(tuple(tuple(p for p, _ in f.page_options) for f in footprints),
                                  config.target_slab_bytes)
    num_slabs = pool // slab
    pages = {f.model: f.page_options[i] for f, i in zip(footprints, chosen)}
    tokens_per_slab = {m: (slab // p) * t for m, (p, t) in pages.items()}
    min_slabs = {f.model: max(1, -(-f.min_tokens // tokens_per_slab[f.model])) for f in footprints}
    quota: dict[str, int] | None = None
    if sum(min_slabs.values()) > num_slabs:
        return infeasible(f"minimum KV of {sum(min_slabs.values())} slabs exceeds the pool's {num_slabs}")
    if sharing == STATIC_QUOTAS:
        # Equal memory partitions (vLLM's gpu_memory_utilization = fraction / n per instance): each
        # model gets usable / n for its weights and its own KV. Where a model's weights and minimum KV
        # do not fit its share, the fractions an operator would set instead: every model's minimum KV,
        # then the rest of the pool in equal parts.
        share = usable // len(footprints)
        quota = {f.model: max(0, share - f.weight_bytes) // slab for f in footprints}
        if any(quota[m] < min_slabs[m] for m in quota):
            spare = (num_slabs - sum(min_slabs.values())) // len(footprints)
            quota = {m: min_slabs[m] + spare for m in min_slabs}
    elif sharing == MUXSERVE_QUOTAS:
        # Each model's minimum, then the rest in proportion to rate x head-wise blocks per token.
        spare = num_slabs - sum(min_slabs.values())
        weight = {f.model: f.rate * f.kv_blocks_per_token for f in footprints}
        total = sum(weight.values())
        quota = {m: min_slabs[m] + int(spare * (weight[m] / total if total else 1 / len(weight)))
                 for m in min_slabs}
    # A TP group's devices each hold a slice of the same tokens: count a token once per group.
    tp = {f.model: f.tp for f in footprints}
    if quota is None:
        cacheable = num_slabs / len(footprints) * sum(tokens_per_slab[m] / tp[m] for m in tp)
    else:
        cacheable = sum(quota[m] * tokens_per_slab[m] / tp[m] for m in tp)
    return DeviceKV(True, "", usable, weights, pool, slab, num_slabs, pages, tokens_per_slab, min_slabs, quota,
                    cacheable)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _kv_dtype_for(strategy: str, demand: ModelDemand) -> str:
    """MuxServe keeps every KV cache in FP16 (bf16 here), whatever the model's KV precision."""
    return "bf16" if strategy == "muxserve" else demand.kv_dtype
