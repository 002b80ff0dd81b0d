"""Global scheduler: which devices serve which model replicas, with what tensor parallelism, and how
each device's KV pool is split among its co-located models (FineServe's offline placement, §4 of
../shared/reference/fineserve.md, and the baselines of §7 on the same inputs).

Every strategy runs the same three steps:

  1. Replica plan per model (`plan_replicas`): for each TP size with a cost profile, from the cost
     model's step times at batch b = 1..max_num_seqs,
        slo_max_bs   = largest b whose batched prefill of b mean prompts meets the TTFT SLO,
        rate_min_bs  = smallest b with b / (prefill(b) + mean_output x decode(b)) >= rate / dp,
        cache_max_bs = tokens the device's KV pool holds with the model alone (slab geometry) / seq_len,
     adding data-parallel replicas (dp) until rate_min_bs <= min(slo_max_bs, cache_max_bs).
  2. Order the replicas and place each on a TP-sized device set inside one node, never two replicas of
     one model on a device, only where the device's weights and minimum KV (rate_min_bs x seq_len
     tokens per model, counted in whole slabs of the real geometry) fit its memory.
  3. Partition each device's KV memory: one shared slab pool (fineserve, prism) or fixed per-model
     quotas (muxserve, static); `kv_budget` and `pool_specs` hand that to a simulator or runtime.

Strategies (what differs):
  fineserve  TP rule `config.tp_rule` (FineServe: the feasible TP with the smallest rate_min_bs);
             replicas largest first by 1.3 x weights + KV(rate_min_bs x seq_len); the device set that
             leaves the cluster the most cacheable KV tokens. A device's cacheable tokens come from the
             geometry its pool will really use (`choose_slab_geometry` over the co-located models' page
             sizes: page lengths, slab tails, whole slabs) with the pool split equally among its
             models, which FineServe approximates by a harmonic-mean block size; minimum KV is
             checked in whole slabs too.
  prism      smallest feasible TP; replicas by rate / (SLO x TP), highest first; the device set with the
             lowest KV-pressure (sum w + rate/SLO x TP) / (free - weights), as FineServe's
             reimplementation does (it adds rate / (SLO x TP) per device after placing).
  muxserve   smallest feasible TP; models by rate x weight bytes (compute need), highest first; the
             device set with the largest marginal served rate (co-located replicas share compute:
             a device whose summed utilization exceeds 1 serves each model proportionally less). One
             FP16 head-wise KV pool: every model's KV is kept bf16 (quantized KV gains nothing) and a
             device hosts one head_dim only; quotas are each model's minimum plus the rest of the pool
             in proportion to rate x KV blocks per token (layers x KV heads), fixed.
  static     fewest devices; every model on its own device(s) while there are empty ones (spare
             devices become extra replicas of the busiest models); otherwise equal memory partitions
             per device (each model gets memory / n for weights + its own KV, nothing shared; where
             that cannot hold a model's minimum KV, each gets its minimum plus an equal part of the
             rest).

Memory model: a device offers `memory_fraction x memory_bytes` for weights and KV (the rest is XLA
workspace and activations); weights are split evenly across a TP group; KV heads too.

Re-placement: `RatesMonitor` counts arrivals in a sliding window; `should_replace` flags a model whose
observed rate differs from its planned rate by more than `threshold` (relative), once there is enough
evidence (`min_count` arrivals observed or expected); `replace` re-runs the placement's strategy with
the new demands, keeping the device sets of models whose rate stayed within the threshold.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from models.config import ModelConfig
from models.precision import resolve_precision
from pallas_kernels.kv_pages import KVPageLayout
from serving.scheduling.cost_model import TTFT_CHUNK_TOKENS, DeviceProfile, ModelShape, StepCost
from serving.kv.kv_pool import DEFAULT_SLAB_BYTES, choose_slab_geometry
from serving.kv.pool_plan import ModelPages, page_size_options

STRATEGIES = ("fineserve", "prism", "muxserve", "static")
TP_SIZES = (1, 2, 4, 8)
TP_RULES = ("min_rate_bs", "min_devices", "smallest_tp")
MAX_NUM_SEQS = 256                  # FineServe caps max_num_seqs at 256
SORT_WEIGHT_FACTOR = 1.3            # FineServe's replica order: 1.3 x weights + KV
PLAN_PROMPT_TOKENS = 722            # FineServe's planning lengths: 0.8 x the LMSYS p95 (903, 631)
PLAN_OUTPUT_TOKENS = 505
SLO_PROMPT_TOKENS = 903
SLO_SCALE = 40.0
SLO_BUFFER_S = 0.004
DEFAULT_TOKENS_PER_PAGE = 16
DEFAULT_MEMORY_FRACTION = 0.9
DEFAULT_DRIFT_THRESHOLD = 0.5
MIN_DRIFT_OBSERVATIONS = 20
RATE_TOLERANCE = 1e-9               # throughput >= rate, up to float rounding

# How each strategy shares a device's KV memory.
SHARED, MUXSERVE_QUOTAS, STATIC_QUOTAS = "shared", "muxserve", "static"
STRATEGY_KV_SHARING = {"fineserve": SHARED, "prism": SHARED, "muxserve": MUXSERVE_QUOTAS,
                       "static": STATIC_QUOTAS}


class PlacementError(RuntimeError):
    """A model cannot be placed at all (no TP/replica choice meets its SLO and rate within memory,
    or no device set has room); the message says why for each option tried."""


# --------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Device:
    name: str
    kind: str
    memory_bytes: int
    node: int = 0


@dataclass(frozen=True)
class ModelDemand:
    """One served model (a model in one precision) and its traffic."""

    name: str                     # unique served name, e.g. "llama3-8b/w4a8kv4"
    shape: ModelShape             # needs num_layers, num_kv_heads, head_dim (+ the rest for from_shape)
    precision: str                # preset name: cost-profile key and weight format
    kv_dtype: str                 # "bf16" | "fp8" | "int8" | "int4"
    weight_bytes: int             # all weights, unsharded
    kv_bytes_per_token: int       # all layers, K and V, scales included, unsharded
    rate: float                   # requests / s
    slo_ttft_s: float
    mean_prompt: int = PLAN_PROMPT_TOKENS
    mean_output: int = PLAN_OUTPUT_TOKENS
    tokens_per_page: int = DEFAULT_TOKENS_PER_PAGE
    profile_model: str | None = None  # model key in the DeviceProfile; default shape.name

    def __post_init__(self):
        if self.rate < 0 or self.slo_ttft_s <= 0:
            raise ValueError(f"{self.name}: need rate >= 0 and slo_ttft_s > 0, got {self.rate}, {self.slo_ttft_s}")
        if self.weight_bytes <= 0 or self.mean_prompt <= 0 or self.mean_output < 0:
            raise ValueError(f"{self.name}: weight_bytes and mean_prompt must be positive")

    @classmethod
    def from_shape(cls, name: str, shape: ModelShape, precision: str, rate: float, slo_ttft_s: float, *,
                   kv_dtype: str | None = None, mean_prompt: int = PLAN_PROMPT_TOKENS,
                   mean_output: int = PLAN_OUTPUT_TOKENS, tokens_per_page: int = DEFAULT_TOKENS_PER_PAGE,
                   profile_model: str | None = None) -> "ModelDemand":
        """Weight and KV bytes from the repo's precision presets (exact packed sizes)."""
        preset = resolve_precision(precision, kv_dtype)
        cfg = ModelConfig(architecture="llama", vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                          intermediate_size=shape.intermediate_size, num_layers=shape.num_layers,
                          num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                          tie_word_embeddings=getattr(shape, "tie_word_embeddings", False))
        return cls(name, shape, precision, preset.kv_format, preset.weight_bytes(cfg),
                   preset.kv_bytes_per_token(cfg), rate, slo_ttft_s, mean_prompt, mean_output,
                   tokens_per_page, profile_model)

    @property
    def profile_key(self) -> str:
        return self.profile_model or self.shape.name

    @property
    def seq_len(self) -> int:
        return self.mean_prompt + self.mean_output

    def with_rate(self, rate: float) -> "ModelDemand":
        return dataclasses.replace(self, rate=rate)

    def kv_heads_per_device(self, tp: int) -> int:
        return max(1, -(-self.shape.num_kv_heads // tp))  # replicated when tp > KV heads

    def weight_bytes_per_device(self, tp: int) -> int:
        return -(-self.weight_bytes // tp)

    def page_layout(self, tp: int = 1, kv_dtype: str | None = None) -> KVPageLayout:
        """The model's KV page on one device of a TP group (its KV heads split across the group)."""
        return KVPageLayout(self.shape.num_layers, self.kv_heads_per_device(tp), self.shape.head_dim,
                            self.tokens_per_page, kv_dtype or self.kv_dtype)


def fineserve_slo(cost: StepCost, slo_scale: float = SLO_SCALE, prompt_len: int = SLO_PROMPT_TOKENS) -> float:
    """FineServe's default SLO: batch-1 TTFT of a p95 prompt x slo_scale, plus a 4 ms buffer."""
    return cost.ttft_seconds(prompt_len) * slo_scale + SLO_BUFFER_S


@dataclass(frozen=True)
class SchedulerConfig:
    memory_fraction: float = DEFAULT_MEMORY_FRACTION  # of device memory for weights + KV
    tp_sizes: tuple[int, ...] = TP_SIZES
    tp_rule: str = "min_rate_bs"      # fineserve's TP choice; see _PLAN_ORDER
    max_num_seqs: int = MAX_NUM_SEQS
    target_slab_bytes: int = DEFAULT_SLAB_BYTES
    use_spare_devices: bool = True    # static: devices left empty become extra replicas

    def __post_init__(self):
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.tp_rule not in TP_RULES:
            raise ValueError(f"unknown tp_rule {self.tp_rule!r}; choose one of {TP_RULES}")

    def usable_bytes(self, device: Device) -> int:
        return int(self.memory_fraction * device.memory_bytes)


# --------------------------------------------------------------------------------------------------
# Outputs


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


# --------------------------------------------------------------------------------------------------
# Per-device KV arithmetic (the real slab geometry)


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


# --------------------------------------------------------------------------------------------------
# Replica planning (TP and data parallelism per model)


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
                          plan.rate_min_bs * demand.seq_len, options, demand.shape.head_dim, plan.replica_rate,
                          demand.slo_ttft_s, plan.utilization,
                          demand.shape.num_layers * demand.kv_heads_per_device(plan.tp))

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
        for tp in self.config.tp_sizes:
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


# --------------------------------------------------------------------------------------------------
# Placement


class _Cluster:
    """Mutable per-device footprints while a placement is built."""

    def __init__(self, devices: Sequence[Device], config: SchedulerConfig, sharing: str):
        self.devices = {d.name: d for d in devices}
        self.config, self.sharing = config, sharing
        self.footprints: dict[str, list[DeviceFootprint]] = {d.name: [] for d in devices}
        self.nodes: dict[int, list[str]] = {}
        for d in devices:
            self.nodes.setdefault(d.node, []).append(d.name)

    def kv(self, device: str, extra: DeviceFootprint | None = None) -> DeviceKV:
        fps = self.footprints[device] + ([extra] if extra is not None else [])
        return _device_kv(fps, self.devices[device], self.config, self.sharing)

    def hosts(self, device: str, model: str) -> bool:
        return any(f.model == model for f in self.footprints[device])

    def add(self, devices: Iterable[str], fp: DeviceFootprint) -> None:
        for d in devices:
            self.footprints[d].append(fp)

    def remove(self, model: str) -> None:
        for d in self.footprints:
            self.footprints[d] = [f for f in self.footprints[d] if f.model != model]

    def choose(self, fp: DeviceFootprint,
               device_key: Callable[[str, DeviceFootprint, DeviceKV], tuple]) -> tuple[str, ...] | str:
        """The best TP-sized device set inside one node. Scores add up over a set's devices, so the best
        set of a node is its tp best devices (the same answer as enumerating every set)."""
        best: tuple[tuple, tuple[str, ...]] | None = None
        example = ""
        for node, names in self.nodes.items():
            scored = []
            for name in names:
                if self.hosts(name, fp.model):
                    continue
                after = self.kv(name, fp)
                if not after.feasible:
                    example = example or after.reason
                    continue
                scored.append((device_key(name, fp, after), name))
            if len(scored) < fp.tp:
                continue
            scored.sort(key=lambda s: s[0], reverse=True)  # stable: ties keep device order
            top = scored[:fp.tp]
            total = tuple(sum(parts) for parts in zip(*(key for key, _ in top)))
            if best is None or total > best[0]:
                order = {n: i for i, n in enumerate(names)}
                best = (total, tuple(sorted((n for _, n in top), key=order.get)))
        if best is None:
            return (f"no node has {fp.tp} device(s) with room for {_gb(fp.weight_bytes)} of weights and "
                    f"{fp.min_tokens} KV tokens per device" + (f" (e.g. {example})" if example else ""))
        return best[1]


def _fineserve_key(cluster: _Cluster, name: str, fp: DeviceFootprint, after: DeviceKV) -> tuple:
    # The change in this device's cacheable tokens: summed over a device set it is the change in the
    # cluster's total, the quantity maximized. (FineServe's code scores the set's devices after
    # placement, absolute, which mostly picks the emptiest devices whatever the page sizes.)
    return (after.cacheable_tokens - cluster.kv(name).cacheable_tokens, after.pool_bytes)


def _prism_key(cluster: _Cluster, name: str, fp: DeviceFootprint, after: DeviceKV) -> tuple:
    free = cluster.config.usable_bytes(cluster.devices[name]) - sum(f.weight_bytes for f in cluster.footprints[name])
    pressure = sum(f.rate / (f.slo_s * f.tp) for f in cluster.footprints[name])
    kvpr = (pressure + fp.rate / fp.slo_s * fp.tp) / (free - fp.weight_bytes)
    return (-kvpr,)


def _served_rate(fps: Sequence[DeviceFootprint]) -> float:
    """Requests / s a device's replicas serve when they share its compute (each replica's rate counted
    once per TP group: rate / tp on each of its devices)."""
    load = sum(f.utilization for f in fps)
    return sum(f.rate / f.tp for f in fps) * min(1.0, 1.0 / load if load > 0 else 1.0)


def _muxserve_key(cluster: _Cluster, name: str, fp: DeviceFootprint, after: DeviceKV) -> tuple:
    before = cluster.footprints[name]
    gain = _served_rate(before + [fp]) - _served_rate(before)
    return (gain, -sum(f.utilization for f in before))


def _static_key(cluster: _Cluster, name: str, fp: DeviceFootprint, after: DeviceKV) -> tuple:
    # Dedicated devices first (fewest co-located models), then the most memory left.
    return (-len(cluster.footprints[name]), after.pool_bytes)


_DEVICE_KEYS = {"fineserve": _fineserve_key, "prism": _prism_key, "muxserve": _muxserve_key, "static": _static_key}


def _order_key(strategy: str, demand: ModelDemand, plan: ReplicaPlan) -> float:
    """Higher goes first."""
    if strategy == "prism":
        return plan.replica_rate / (demand.slo_ttft_s * plan.tp)
    if strategy == "muxserve":
        return demand.rate * demand.weight_bytes
    # fineserve, static: largest memory need first.
    return SORT_WEIGHT_FACTOR * demand.weight_bytes + plan.rate_min_bs * demand.seq_len * demand.kv_bytes_per_token


def place(strategy: str, demands: Sequence[ModelDemand], devices: Sequence[Device], profile: DeviceProfile,
          config: SchedulerConfig | None = None) -> Placement:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    return _place(strategy, demands, devices, profile, config or SchedulerConfig(), pinned={})


def place_fineserve(demands, devices, profile, config: SchedulerConfig | None = None) -> Placement:
    return place("fineserve", demands, devices, profile, config)


def place_prism(demands, devices, profile, config: SchedulerConfig | None = None) -> Placement:
    return place("prism", demands, devices, profile, config)


def place_muxserve(demands, devices, profile, config: SchedulerConfig | None = None) -> Placement:
    return place("muxserve", demands, devices, profile, config)


def place_static(demands, devices, profile, config: SchedulerConfig | None = None) -> Placement:
    return place("static", demands, devices, profile, config)


def _validate(demands: Sequence[ModelDemand], devices: Sequence[Device]) -> None:
    if not devices:
        raise PlacementError("no devices to place on")
    for what, names in (("model", [d.name for d in demands]), ("device", [d.name for d in devices])):
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate {what} names: {sorted(dup)}")


def _place(strategy: str, demands: Sequence[ModelDemand], devices: Sequence[Device], profile: DeviceProfile,
           config: SchedulerConfig, pinned: Mapping[str, list[Replica]]) -> Placement:
    _validate(demands, devices)
    sharing = STRATEGY_KV_SHARING[strategy]
    planner = _Planner(profile, devices, config, strategy)
    rule = _STRATEGY_TP_RULE.get(strategy, config.tp_rule)
    cluster = _Cluster(devices, config, sharing)
    device_key = _DEVICE_KEYS[strategy]
    choose_key = lambda name, fp, after: device_key(cluster, name, fp, after)  # noqa: E731
    replicas: dict[str, list[Replica]] = {}
    plans: dict[str, ReplicaPlan] = {}
    notes = [f"{strategy}: KV {sharing}" + ("" if sharing == SHARED else " quotas")]

    by_name = {d.name: d for d in demands}
    for name, old in pinned.items():  # kept models first, on their old devices
        if any(d not in cluster.devices for r in old for d in r.devices):
            continue
        plan = planner.plan(by_name[name], old[0].tp, len(old))
        if isinstance(plan, _Infeasible):
            continue
        fp = planner.footprint(by_name[name], plan)
        cluster.add((d for r in old for d in r.devices), fp)
        if all(cluster.kv(d).feasible for r in old for d in r.devices):
            plans[name] = plan
            replicas[name] = [_replica(plan, r.devices) for r in old]
        else:
            cluster.remove(name)

    ranked: dict[str, list[ReplicaPlan]] = {}
    for demand in demands:
        if demand.name in plans:
            continue
        ranked[demand.name], reasons = planner.candidates(demand, rule)
        if not ranked[demand.name]:
            raise PlacementError(f"cannot place {demand.name}: no TP size meets its SLO and rate: "
                                 + "; ".join(reasons))
    order = sorted(ranked, key=lambda m: -_order_key(strategy, by_name[m], ranked[m][0]))  # stable on ties

    for name in order:
        tried = []
        for plan in ranked[name]:
            fp = planner.footprint(by_name[name], plan)
            placed = []
            for _ in range(plan.dp):
                chosen = cluster.choose(fp, choose_key)
                if isinstance(chosen, str):
                    tried.append(f"tp={plan.tp} x {plan.dp}: {chosen}")
                    break
                cluster.add(chosen, fp)
                placed.append(_replica(plan, chosen))
            if len(placed) == plan.dp:
                plans[name], replicas[name] = plan, placed
                break
            cluster.remove(name)
        else:
            raise PlacementError(f"cannot place {name}: " + "; ".join(tried))

    if strategy == "static" and config.use_spare_devices:
        _add_spare_replicas(cluster, planner, by_name, plans, replicas, notes)

    for name, plan in plans.items():
        notes.append(f"{name}: tp={plan.tp} x {plan.dp} replica(s), rate_min_bs={plan.rate_min_bs}, "
                     f"slo_max_bs={plan.slo_max_bs}, cache_max_bs={plan.cache_max_bs}")
    score = sum(cluster.kv(d).cacheable_tokens for d in cluster.footprints)
    ordered = [r for d in demands for r in replicas[d.name]]
    return Placement(ordered, strategy, score, notes, tuple(devices), dict(by_name), plans, config,
                     {d: list(fps) for d, fps in cluster.footprints.items()})


def _replica(plan: ReplicaPlan, devices: tuple[str, ...]) -> Replica:
    return Replica(plan.model, tuple(devices), plan.tp, plan.replica_rate, plan.slo_max_bs, plan.rate_min_bs)


def _add_spare_replicas(cluster: _Cluster, planner: _Planner, demands: Mapping[str, ModelDemand],
                        plans: dict[str, ReplicaPlan], replicas: dict[str, list[Replica]], notes: list[str]) -> None:
    """Static partitioning leaves no device idle: while some devices host nothing, the busiest model
    (highest per-replica utilization) whose TP group fits them gets one more replica."""
    while True:
        empty = {node: [n for n in names if not cluster.footprints[n]] for node, names in cluster.nodes.items()}
        for name in sorted(plans, key=lambda m: -plans[m].utilization):
            old = plans[name]
            plan = planner.plan(demands[name], old.tp, old.dp + 1)
            if isinstance(plan, _Infeasible):
                continue
            fp = planner.footprint(demands[name], plan)
            group = next((tuple(room[:old.tp]) for room in
                          ([n for n in names if cluster.kv(n, fp).feasible] for names in empty.values())
                          if len(room) >= old.tp), None)
            if group is None:
                continue
            cluster.remove(name)
            groups = [r.devices for r in replicas[name]] + [group]
            for devs in groups:
                cluster.add(devs, fp)
            plans[name], replicas[name] = plan, [_replica(plan, devs) for devs in groups]
            notes.append(f"static: spare device(s) {list(group)} -> extra replica of {name}")
            break
        else:
            return


# --------------------------------------------------------------------------------------------------
# Rate drift and re-placement


@dataclass(frozen=True)
class RateObservation:
    rate: float       # requests / s over the window
    count: int        # arrivals seen in the window
    window_s: float


@dataclass
class RatesMonitor:
    """Arrivals per model in a sliding window."""

    window_s: float = 60.0
    start_s: float | None = None      # when observation began (default: the first arrival)
    _arrivals: dict[str, deque] = field(default_factory=dict, init=False, repr=False)

    def record(self, model: str, t: float) -> None:
        if self.start_s is None:
            self.start_s = t
        q = self._arrivals.setdefault(model, deque())
        q.append(t)
        while q and q[0] <= t - self.window_s:
            q.popleft()

    def observe(self, now: float, models: Iterable[str] = ()) -> dict[str, RateObservation]:
        """Rates over the last window (shorter while observation has run for less than a window);
        `models` adds zero-arrival entries for models not seen."""
        start = now if self.start_s is None else self.start_s
        window = min(self.window_s, max(now - start, 0.0))
        out = {}
        for m in dict.fromkeys([*self._arrivals, *models]):
            count = sum(1 for t in self._arrivals.get(m, ()) if now - self.window_s < t <= now)
            out[m] = RateObservation(count / window if window > 0 else 0.0, count, window)
        return out


def rate_drift(placement: Placement, observed: Mapping[str, float | RateObservation],
               threshold: float = DEFAULT_DRIFT_THRESHOLD, min_count: int = MIN_DRIFT_OBSERVATIONS) -> dict[str, float]:
    """Models whose observed rate is off their planned rate by more than `threshold` (relative; +0.6 is
    60% above plan), with enough evidence: a RateObservation counts once `min_count` arrivals were seen
    or were expected at the planned rate over its window (so a model that went silent is caught too).
    Plain floats are taken as trusted rates. Models not in `observed` are skipped."""
    drifted = {}
    for model in placement.demands:
        if model not in observed:
            continue
        planned = placement.planned_rate(model)
        obs = observed[model]
        if isinstance(obs, RateObservation):
            if max(obs.count, planned * obs.window_s) < min_count:
                continue
            rate = obs.rate
        else:
            rate = float(obs)
        if planned > 0:
            drift = (rate - planned) / planned
        else:
            drift = math.inf if rate > 0 else 0.0
        if abs(drift) > threshold:
            drifted[model] = drift
    return drifted


def should_replace(placement: Placement, observed: Mapping[str, float | RateObservation],
                   threshold: float = DEFAULT_DRIFT_THRESHOLD, min_count: int = MIN_DRIFT_OBSERVATIONS) -> bool:
    return bool(rate_drift(placement, observed, threshold, min_count))


@dataclass(frozen=True)
class Replacement:
    placement: Placement
    kept: tuple[str, ...]       # on the same device sets as before
    moved: tuple[str, ...]      # served before and now, on different device sets
    added: tuple[str, ...]
    removed: tuple[str, ...]
    full_replan: bool           # keeping models in place made the rest infeasible


def replace(placement: Placement, demands: Sequence[ModelDemand], profile: DeviceProfile, *,
            threshold: float = DEFAULT_DRIFT_THRESHOLD, devices: Sequence[Device] | None = None,
            config: SchedulerConfig | None = None) -> Replacement:
    """Re-run `placement`'s strategy for new demands (e.g. rates updated from a RatesMonitor). Models
    whose demand is unchanged but for a rate within `threshold` of plan keep their device sets when
    the same TP and replica count still meets their SLO and rate; the others are placed around them.
    If that is infeasible, everything is placed afresh."""
    devices = tuple(devices or placement.devices)
    config = config or placement.config
    old = placement.demands
    pinned = {}
    for d in demands:
        prev = old.get(d.name)
        if prev is None or dataclasses.replace(prev, rate=d.rate) != d:
            continue
        planned = placement.planned_rate(d.name)
        if abs(d.rate - planned) <= threshold * planned and placement.replicas_of(d.name):
            pinned[d.name] = placement.replicas_of(d.name)
    full = False
    try:
        new = _place(placement.strategy, demands, devices, profile, config, pinned)
    except PlacementError:
        if not pinned:
            raise
        new, full = _place(placement.strategy, demands, devices, profile, config, {}), True
    before = {m: sorted(r.devices for r in placement.replicas_of(m)) for m in old}
    after = {m: sorted(r.devices for r in new.replicas_of(m)) for m in new.demands}
    both = [m for m in after if m in before]
    kept = tuple(m for m in both if before[m] == after[m])
    moved = tuple(m for m in both if before[m] != after[m])
    new.notes.append(f"re-placement: kept {list(kept)}, moved {list(moved)}" + (" (full re-plan)" if full else ""))
    return Replacement(new, kept, moved, tuple(m for m in after if m not in before),
                       tuple(m for m in before if m not in after), full)
