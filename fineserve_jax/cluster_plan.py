"""Where a fleet runs on a cluster: the global placement over the devices that are alive now, with
every replica it plans, and the models that fit nowhere (after a loss, served as 503s).

`plan_cluster` is what the Ray deployment starts from and what its controller re-runs when a
device is lost (the lost models go where memory is left; the survivors keep their devices) or when
the observed rates drift from plan (`serving.scheduling.replan`). No Ray here: plans are plain data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fineserve_jax.config_files import DeviceConfig
from fineserve_jax.serve_config import DoesNotFit, ServeConfig, plan_placement, planned_weights
from serving.scheduling.placement import Placement


@dataclass(frozen=True)
class PlanDevice:
    """A device placement may use: its name, kind and memory."""
    name: str
    kind: str
    memory_bytes: int


@dataclass(frozen=True)
class ClusterPlan:
    hosts: dict[str, tuple[str, ...]]                # device -> its models (devices hosting none left out)
    weights: dict[str, dict[str, float]]             # model -> {device: share of its traffic}
    unplaced: dict[str, str] = field(default_factory=dict)   # model -> why it is not served
    placement: Placement | None = None


def plan_cluster(config: ServeConfig, devices: list[PlanDevice], *, rates: dict[str, float] | None = None,
                 previous: ClusterPlan | None = None) -> ClusterPlan:
    """Place the config's models over `devices` (at `rates` where given); with `previous`, models that
    kept their devices and rates stay where they are. Models that do not fit are left out, newest
    losses first, then the largest: each is unplaced with the reason, and the rest are served."""
    if not devices:
        raise ValueError("the cluster has no devices left")
    wide = [m.name for m in config.models if m.spec.tensor_parallel_size > 1]
    if wide:
        raise ValueError(f"{', '.join(wide)}: tensor_parallel_size > 1 is not placed over a Ray cluster yet; serve "
                         f"those models without --ray")
    entries = [DeviceConfig(name=d.name, jax_device=i, memory_bytes=d.memory_bytes, kind=d.kind)
               for i, d in enumerate(devices)]
    alive = {d.name for d in devices}
    was_served = {m for m, hosts in (previous.weights if previous else {}).items() if set(hosts) & alive}
    models = list(config.models)
    unplaced: dict[str, str] = {}
    while True:
        trial = dataclasses.replace(config, models=models, devices=entries)
        try:
            placement = plan_placement(trial, rates=rates, previous=previous.placement if previous else None)
            break
        except DoesNotFit as e:
            if len(models) == 1:
                unplaced[models[0].name] = f"it does not fit on the cluster's {len(devices)} device(s): {e}"
                return ClusterPlan({}, {}, unplaced, None)
            # drop a model that was not serving before (lost with its device), else the largest
            drop = max(models, key=lambda m: (m.name not in was_served, planned_weights(m)[0]))
            unplaced[drop.name] = (f"it does not fit in the memory left on the cluster's {len(devices)} device(s) "
                                   f"next to the other models")
            models = [m for m in models if m is not drop]
    hosts: dict[str, list[str]] = {}
    weights: dict[str, dict[str, float]] = {}
    for m in models:
        replicas = placement.replicas_of(m.name)
        total = sum(r.rate for r in replicas)
        for r in replicas:
            device = r.devices[0]
            hosts.setdefault(device, []).append(m.name)
            weights.setdefault(m.name, {})[device] = r.rate / total if total > 0 else 1.0 / len(replicas)
    return ClusterPlan({d: tuple(ms) for d, ms in hosts.items()}, weights, unplaced, placement)

