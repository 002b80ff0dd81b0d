"""Placement strategies: FineServe's and the baselines', on the same inputs. Every strategy plans
each model's replicas (`replica_planner`), orders the replicas, and puts each on a TP-sized device set
inside one node, never two replicas of one model on a device, only where the device's weights and
minimum KV (rate_min_bs x seq_len tokens, in whole slabs of the real geometry) fit.

  fineserve  replicas largest first by 1.3 x weights + KV(rate_min_bs x seq_len); the device set
             that leaves the cluster the most cacheable KV tokens (FineServe, arXiv 2509.06261).
  prism      smallest feasible TP; replicas by rate / (SLO x TP); the device set with the lowest KV
             pressure (sum w + rate/SLO x TP) / (free - weights) (Prism, arXiv 2505.04021).
  muxserve   smallest feasible TP; models by rate x weight bytes; the device set with the largest
             marginal served rate; one FP16 head-wise KV pool with fixed quotas (MuxServe,
             arXiv 2404.02015).
  static     fewest devices; dedicated devices while there are empty ones (spare devices become
             extra replicas of the busiest models), else equal memory partitions per device.
Design notes: docs/scheduling.md.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

from serving.scheduling.cost_model import DeviceProfile
from serving.scheduling.demand import STRATEGIES, Device, ModelDemand, PlacementError, SchedulerConfig
from serving.scheduling.placement import (DeviceFootprint, DeviceKV, Placement, Replica, ReplicaPlan, SHARED, STRATEGY_KV_SHARING, _device_kv, _gb)
from serving.scheduling.replica_planner import _STRATEGY_TP_RULE, _Infeasible, _Planner

SORT_WEIGHT_FACTOR = 1.3            # FineServe's replica order: 1.3 x weights + KV


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
