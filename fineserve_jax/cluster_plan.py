"""Where a fleet runs on a cluster: the global placement over the devices that are alive now, with
every replica it plans, as device groups (one device, or the devices of one node a tensor-parallel
model joins: one replica each), and the models that fit nowhere (after a loss, served as 503s).

`plan_cluster` is what the Ray deployment starts from and what its controller re-runs when a
device is lost (the lost models go where memory is left; the survivors keep their devices) or when
the observed rates drift from plan (`serving.scheduling.replan`). No Ray here: plans are plain data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fineserve_jax.config_files import DeviceConfig
from fineserve_jax.serve_config import (DeviceGroup, DoesNotFit, ServeConfig, device_groups, plan_placement,
                                        planned_weights)
from serving.scheduling.placement import Placement


@dataclass(frozen=True)
class PlanDevice:
    """A device placement may use: its name, kind, memory and node (a TP group stays in one node)."""
    name: str
    kind: str
    memory_bytes: int
    node: str = ""


@dataclass(frozen=True)
class ClusterPlan:
    groups: tuple[DeviceGroup, ...]                            # the device groups hosting models
    weights: dict[str, dict[tuple[str, ...], float]]           # model -> {group's devices: share of its traffic}
    unplaced: dict[str, str] = field(default_factory=dict)     # model -> why it is not served
    placement: Placement | None = None

    @property
    def hosts(self) -> dict[tuple[str, ...], DeviceGroup]:
        """Each group by its devices."""
        return {g.devices: g for g in self.groups}


def plan_cluster(config: ServeConfig, devices: list[PlanDevice], *, rates: dict[str, float] | None = None,
                 previous: ClusterPlan | None = None) -> ClusterPlan:
    """Place the config's models over `devices` (at `rates` where given); with `previous`, models that
    kept their devices and rates stay where they are. Models that do not fit are left out, newest
    losses first, then the largest: each is unplaced with the reason, and the rest are served."""
    if not devices:
        raise ValueError("the cluster has no devices left")
    entries = [DeviceConfig(name=d.name, jax_device=i, memory_bytes=d.memory_bytes, kind=d.kind)
               for i, d in enumerate(devices)]
    node_ids = sorted({d.node for d in devices})
    nodes = {d.name: node_ids.index(d.node) for d in devices}
    alive = {d.name for d in devices}
    was_served = {m for m, hosts in (previous.weights if previous else {}).items()
                  if any(set(group) <= alive for group in hosts)}
    models = list(config.models)
    unplaced: dict[str, str] = {}
    while True:
        trial = dataclasses.replace(config, models=models, devices=entries)
        try:
            placement = plan_placement(trial, rates=rates, previous=previous.placement if previous else None,
                                       nodes=nodes)
            break
        except DoesNotFit as e:
            if len(models) == 1:
                unplaced[models[0].name] = f"it does not fit on the cluster's {len(devices)} device(s): {e}"
                return ClusterPlan((), {}, unplaced, None)
            # drop a model that was not serving before (lost with its device), else the largest
            drop = max(models, key=lambda m: (m.name not in was_served, planned_weights(m)[0]))
            unplaced[drop.name] = (f"it cannot be placed on the cluster's {len(devices)} device(s): {e}"
                                   if f"cannot place {drop.name}:" in str(e) else
                                   f"it does not fit in the memory left on the cluster's {len(devices)} device(s) "
                                   f"next to the other models")
            models = [m for m in models if m is not drop]
    replicas = [(m.name, r) for m in models for r in placement.replicas_of(m.name)]
    groups = device_groups([(m, r.devices) for m, r in replicas], [d.name for d in devices])
    group_of = {d: g.devices for g in groups for d in g.devices}
    weights: dict[str, dict[tuple[str, ...], float]] = {}
    for m in models:
        mine = [r for name, r in replicas if name == m.name]
        total = sum(r.rate for r in mine)
        for r in mine:
            share = weights.setdefault(m.name, {})
            group = group_of[r.devices[0]]
            share[group] = share.get(group, 0.0) + (r.rate / total if total > 0 else 1.0 / len(mine))
    return ClusterPlan(tuple(groups), weights, unplaced, placement)
