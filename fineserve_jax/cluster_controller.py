"""Keeps a cluster deployment equal to its plan: starts it, re-places models when the observed rates
drift from plan, and when a device is lost places its models again on the survivors.

The controller owns the plan (`cluster_plan.ClusterPlan`) and which replica runs on which device
group; a `ClusterBackend` does the work (Ray Serve in production, `fineserve_jax.ray_serve.RayBackend`;
a fake in tests). A replica hosts one device group's fleet (one device, or the devices a
tensor-parallel model joins), whose KV pools are sized at start, so a group whose models change
gets a new replica, one group at a time:

  1. the ingress stops routing new requests to the old replicas on the group's devices (their
     models go to their other replicas; a model with none left waits at the ingress, up to its
     hold time);
  2. the old replicas drain: the requests they are answering finish (bounded by `drain_timeout_s`);
  3. they are deleted, which frees the devices, and the new replica starts there and warms up;
  4. the ingress routes to it.

A device holds one replica's pool at a time (a GPU cannot hold a second process's pool beside the
first), hence drain before start; no request is dropped, a moved model's requests wait instead.
Groups on devices no replica holds start first, together. A lost device's replica is dropped from
the routes at once (its requests that had sent nothing are retried by the ingress elsewhere, the
others end with an explicit error), and its models are placed again around the survivors, which
keep their devices. A model that fits nowhere is answered 503 with the reason.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from fineserve_jax.cluster_plan import ClusterPlan, PlanDevice, plan_cluster
from fineserve_jax.serve_config import DeviceGroup, ServeConfig
from serving.scheduling.replan import DEFAULT_DRIFT_THRESHOLD, MIN_DRIFT_OBSERVATIONS, RateObservation, rate_drift

log = logging.getLogger("fineserve.cluster")

DRAIN_POLL_S = 0.1


class ClusterBackend(Protocol):
    """What the controller needs from the cluster (Ray Serve in production)."""

    def devices(self) -> list[PlanDevice]: ...                      # the alive devices
    def start_replicas(self, replicas: dict[str, DeviceGroup]) -> dict: ...
    # (name -> its device group and models), started together; returns name -> handle once each is warm
    def stop_replica(self, name: str) -> None: ...
    def route(self, routes: dict[str, dict[str, float]], unplaced: dict[str, str], handles: dict,
              lost: list[str]) -> None: ...   # lost: replicas whose node is gone (what waits on them fails)
    def inflight(self) -> dict[str, int]: ...                        # replica -> requests it is answering
    def rates(self) -> dict[str, RateObservation]: ...               # observed arrivals per model
    def close(self) -> None: ...                                     # the ingress refuses new requests


@dataclass(frozen=True)
class Replica:
    name: str
    group: DeviceGroup
    handle: object

    @property
    def devices(self) -> tuple[str, ...]:
        return self.group.devices

    @property
    def models(self) -> tuple[str, ...]:
        return self.group.models

    def describe(self) -> str:
        return f"{self.name} on {'+'.join(self.devices)} ({', '.join(self.models)})"


class ClusterController:
    """The plan and which replica runs where; `start`, then `step` (or `run`) keeps it on plan."""

    def __init__(self, config: ServeConfig, backend: ClusterBackend, *,
                 drift_threshold: float = DEFAULT_DRIFT_THRESHOLD, min_observations: int = MIN_DRIFT_OBSERVATIONS,
                 drain_timeout_s: float = 60.0):
        self.config, self.backend = config, backend
        self.drift_threshold, self.min_observations = drift_threshold, min_observations
        self.drain_timeout_s = drain_timeout_s
        self.plan: ClusterPlan | None = None
        self.planned_rates = {m.name: m.rate for m in config.models}   # what the plan was made for
        self.replicas: dict[tuple[str, ...], Replica] = {}    # a group's devices -> its replica
        self.events: list[str] = []               # what the controller did, in order (logged too)
        self._count = 0

    # -- the loop -------------------------------------------------------------------------------

    def start(self) -> ClusterPlan:
        """Place the fleet on the cluster's devices and start a replica on each device that hosts
        models; ValueError in one line when the cluster has no devices or not the memory for all."""
        devices = self.backend.devices()
        if not devices:
            raise ValueError("the Ray cluster offers no devices: start its nodes with GPUs, or with "
                             "--resources='{\"fineserve_device\": 1}'")
        plan = plan_cluster(self.config, devices)
        if plan.unplaced:
            raise ValueError(f"the cluster's {len(devices)} device(s) do not have the memory for "
                             f"{', '.join(plan.unplaced)} (beside {', '.join(plan.weights) or 'nothing'})")
        self.apply(plan)
        return self.plan

    def step(self) -> bool:
        """One check: a lost device or drifted rates re-place the fleet. True when it changed."""
        devices = self.backend.devices()
        alive = {d.name for d in devices}
        lost = [g for g in self.replicas if not set(g) <= alive]
        gone = [self.replicas.pop(group) for group in lost]
        for replica in gone:
            missing = "+".join(d for d in replica.devices if d not in alive)
            self._note(f"device {missing} is lost with replica {replica.describe()}")
        self._route(lost=[r.name for r in gone])   # at every check, so that a restarted ingress relearns
        for replica in gone:   # Ray Serve would otherwise keep trying to start it again
            self.backend.stop_replica(replica.name)
        observed = self.backend.rates()
        drifted = rate_drift(self.planned_rates, observed, self.drift_threshold, self.min_observations)
        if drifted:
            self._note("rates drifted from plan: " + ", ".join(f"{m} {d:+.0%}" for m, d in drifted.items()))
            self.planned_rates = {m: observed[m].rate if m in observed else r for m, r in self.planned_rates.items()}
        elif not lost:
            if self._on_plan():
                return False
            self._note("the deployment is short of its plan (a replica failed to start); placing again")
        if not devices:
            self.plan = ClusterPlan({}, {}, {m.name: "every device of the cluster is lost" for m in self.config.models})
            self._route()
            return True
        self.apply(plan_cluster(self.config, devices, rates=self.planned_rates, previous=self.plan))
        return True

    def run(self, stop: threading.Event, poll_s: float = 5.0) -> None:
        """Check every `poll_s` until `stop` is set; a failed check is logged and tried again."""
        while not stop.wait(poll_s):
            try:
                self.step()
            except Exception:
                log.exception("cluster check failed; trying again in %.0f s", poll_s)

    def shutdown(self, drain_timeout_s: float) -> None:
        """Refuse new requests (503), and give those in flight up to `drain_timeout_s` to finish."""
        self.backend.close()
        deadline = time.monotonic() + drain_timeout_s
        while (left := sum(self.backend.inflight().values())) > 0 and time.monotonic() < deadline:
            time.sleep(DRAIN_POLL_S)
        self._note(f"shut down with {left} request(s) still answering" if left else "shut down, drained")

    # -- carrying out a plan ----------------------------------------------------------------------

    def apply(self, plan: ClusterPlan) -> None:
        """Make the deployment equal to `plan`, one device group at a time (module docstring)."""
        self.plan = plan
        for model, why in plan.unplaced.items():
            self._note(f"{model} is not served: {why}")
        wanted = plan.hosts
        changed = [g for g in wanted if g not in self.replicas or self.replicas[g].group != wanted[g]]
        # groups on free devices start together first; their models' other replicas serve meanwhile
        fresh = [g for g in changed if not self._overlapping(g)]
        self._start(fresh)
        self._route()
        for group in changed:
            if group in fresh:
                continue
            self._retire(self._overlapping(group))
            self._start([group])
            self._route()
        self._retire([g for g in self.replicas if g not in wanted])   # on devices that host nothing now

    def _overlapping(self, group: tuple[str, ...]) -> list[tuple[str, ...]]:
        """The running replicas on any of `group`'s devices."""
        return [g for g in self.replicas if set(g) & set(group)]

    def _retire(self, groups: list[tuple[str, ...]]) -> None:
        """Unroute these replicas, let them drain, stop them."""
        old = [self.replicas.pop(g) for g in groups]
        if not old:
            return
        self._route()
        for replica in old:
            self._drain(replica)
            self.backend.stop_replica(replica.name)
            self._note(f"replica {replica.describe()} stopped")

    def _on_plan(self) -> bool:
        return self.plan is not None and all(g in self.replicas and self.replicas[g].group == group
                                             for g, group in self.plan.hosts.items())

    def _start(self, groups: list[tuple[str, ...]]) -> None:
        """Start these groups' replicas of the plan together. One that fails to start (its node went
        away meanwhile, say) leaves the deployment short of plan, which the next check places again."""
        wanted = {}
        for group in groups:
            self._count += 1
            wanted[f"fleet{self._count}"] = self.plan.hosts[group]
        if not wanted:
            return
        try:
            handles = self.backend.start_replicas(wanted)
        except Exception as e:
            self._note(f"replicas {', '.join(wanted)} failed to start: {str(e).splitlines()[0]}")
            for name in wanted:
                self.backend.stop_replica(name)
            return
        for name, group in wanted.items():
            replica = self.replicas[group.devices] = Replica(name, group, handles[name])
            self._note(f"replica {replica.describe()} serves")

    def _route(self, lost: list[str] = ()) -> None:
        """Route every model to the replicas that host it now, by the plan's weights; a placed model
        with none up yet waits at the ingress; an unplaced one is a 503."""
        routes: dict[str, dict[str, float]] = {}
        for model in self.config.models:
            if self.plan is not None and model.name in self.plan.unplaced:
                continue
            weights = self.plan.weights.get(model.name, {}) if self.plan is not None else {}
            routes[model.name] = {r.name: weights.get(g, 1.0) for g, r in self.replicas.items()
                                  if model.name in r.models}
        unplaced = dict(self.plan.unplaced) if self.plan is not None else {}
        self.backend.route(routes, unplaced, {r.name: r.handle for r in self.replicas.values()}, list(lost))

    def _drain(self, replica: Replica) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while (left := self.backend.inflight().get(replica.name, 0)) > 0:
            if time.monotonic() > deadline:
                self._note(f"replica {replica.name}: {left} request(s) still answering after "
                           f"{self.drain_timeout_s:.0f} s; stopping it (they end with an error)")
                return
            time.sleep(DRAIN_POLL_S)

    def _note(self, event: str) -> None:
        self.events.append(event)
        log.info("%s", event)
