"""The cluster controller against a fake cluster: it starts the plan, re-places the fleet when the
observed rates drift and when a device is lost, never routes to a replica that is stopped or gone,
drains a replica before stopping it, and answers 503 (with the reason) for a model that fits
nowhere. The same controller drives Ray Serve in tests/test_ray_serve.py."""

from __future__ import annotations

import dataclasses

import pytest

from fineserve_jax.cluster_controller import ClusterController
from fineserve_jax.cluster_plan import ClusterPlan, PlanDevice, plan_cluster
from fineserve_jax.serve_config import DeviceGroup
from serving.scheduling.replan import RateObservation
from tests.helpers import HF_MODELS as MODELS, hf_fleet_config as fixture_config

MIB = 1 << 20


@dataclasses.dataclass
class FakeCluster:
    """Records what the controller does and checks its invariants as it goes."""
    devices_up: list[PlanDevice]
    observed: dict = dataclasses.field(default_factory=dict)
    live: dict = dataclasses.field(default_factory=dict)       # replica -> its DeviceGroup
    stopped: list = dataclasses.field(default_factory=list)
    routes: dict = dataclasses.field(default_factory=dict)
    unplaced: dict = dataclasses.field(default_factory=dict)
    held: set = dataclasses.field(default_factory=set)         # models that once had no replica to go to
    inflight_calls: int = 0
    failing: set = dataclasses.field(default_factory=set)    # devices whose next start fails
    lost: list = dataclasses.field(default_factory=list)
    closed: bool = False

    def devices(self):
        return list(self.devices_up)

    def start_replicas(self, replicas):
        if failed := {d for g in replicas.values() for d in g.devices} & self.failing:
            self.failing -= failed
            raise RuntimeError(f"Deploying on {sorted(failed)} failed: the node went away\nmore")
        for name, group in replicas.items():
            assert set(group.devices) <= {d.name for d in self.devices_up}
            busy = {d for g in self.live.values() for d in g.devices} & set(group.devices)
            assert not busy, f"two replicas on {busy}"
            self.live[name] = group
        return {name: f"handle-{name}" for name in replicas}

    def on(self, device):
        """The live replica on `device` (name, group)."""
        return next((n, g) for n, g in self.live.items() if device in g.devices)

    def stop_replica(self, name):
        assert all(name not in hosts for hosts in self.routes.values()), f"{name} stopped while routed"
        self.live.pop(name, None)
        self.stopped.append(name)

    def route(self, routes, unplaced, handles, lost):
        self.lost += lost
        for model, hosts in routes.items():
            assert set(hosts) <= set(self.live) and set(hosts) <= set(handles), (model, hosts)
            if not hosts:
                self.held.add(model)
        self.routes, self.unplaced = routes, unplaced

    def inflight(self):   # every replica is answering one request at the first look, none after
        self.inflight_calls += 1
        return {name: 1 for name in self.live} if self.inflight_calls % 2 else {}

    def rates(self):
        return self.observed

    def close(self):
        self.closed = True


def two_devices(memory=48 * MIB):
    return [PlanDevice("a", "cpu", memory), PlanDevice("b", "cpu", memory)]


def test_start_routes_every_model_to_its_replica():
    cluster = FakeCluster(two_devices())
    controller = ClusterController(fixture_config(), cluster)
    plan = controller.start()
    assert len(cluster.live) == 2 and sorted(m for g in cluster.live.values() for m in g.models) == sorted(MODELS)
    assert {m: len(h) for m, h in cluster.routes.items()} == {m: 1 for m in MODELS} and not cluster.held
    assert sorted(plan.groups, key=str) == sorted(cluster.live.values(), key=str)
    assert controller.step() is False and cluster.stopped == []   # nothing changed


def test_drifted_rates_move_models_and_never_route_to_a_stopped_replica():
    cluster = FakeCluster(two_devices())
    controller = ClusterController(fixture_config(), cluster, drain_timeout_s=5)
    controller.start()
    before = dict(cluster.live)
    # llama ten thousand times busier than planned: it needs both devices
    cluster.observed = {"llama": RateObservation(1e4, 10_000, 1.0), "mistral": RateObservation(0.01, 0, 1.0),
                        "qwen2": RateObservation(0.01, 0, 1.0)}
    assert controller.step() is True
    assert any("rates drifted" in e for e in controller.events)
    assert sorted(cluster.stopped) == sorted(before)                 # both devices got new replicas
    assert len(cluster.routes["llama"]) == 2 and sum(cluster.routes["llama"].values()) == pytest.approx(1.0)
    assert all(len(cluster.routes[m]) == 1 for m in ("mistral", "qwen2"))
    assert controller.planned_rates["llama"] == 1e4
    assert controller.step() is False                                 # planned for what it sees now


def test_a_lost_device_s_models_come_back_on_the_survivor():
    cluster = FakeCluster(two_devices())
    controller = ClusterController(fixture_config(), cluster)
    controller.start()
    lost, _ = cluster.on("b")
    cluster.devices_up = cluster.devices_up[:1]
    cluster.live.pop(lost)   # gone with its node
    assert controller.step() is True
    assert lost in cluster.stopped and cluster.lost == [lost]
    assert any("device b is lost" in e for e in controller.events)
    [group] = cluster.live.values()
    assert group.devices == ("a",) and sorted(group.models) == sorted(MODELS) and not cluster.unplaced
    assert all(len(cluster.routes[m]) == 1 for m in MODELS)


def test_a_model_that_fits_nowhere_is_unplaced_and_the_rest_keep_serving():
    cluster = FakeCluster(two_devices())
    controller = ClusterController(fixture_config(), cluster)
    controller.start()
    # the survivor is too small for all three: the lost device's model is the one left out
    cluster.devices_up = [PlanDevice("a", "cpu", 20 * MIB)]
    cluster.live.pop(cluster.on("b")[0])
    before_on_a = cluster.on("a")[1].models
    controller.step()
    assert set(cluster.unplaced) and set(cluster.unplaced).isdisjoint(before_on_a)
    assert all("does not fit" in why for why in cluster.unplaced.values())
    assert set(cluster.routes) == set(MODELS) - set(cluster.unplaced)


def test_a_cluster_without_the_memory_for_the_fleet_fails_at_start_naming_what_does_not_fit():
    cluster = FakeCluster([PlanDevice("a", "cpu", 20 * MIB)])
    with pytest.raises(ValueError, match=r"1 device\(s\) do not have the memory for llama \(beside mistral, qwen2\)"):
        ClusterController(fixture_config(), cluster).start()
    assert not cluster.live


def test_plan_cluster_refuses_an_empty_cluster():
    with pytest.raises(ValueError, match="no devices"):
        plan_cluster(fixture_config(), [])


def three_devices_two_nodes(memory=48 * MIB):
    return [PlanDevice("a", "cpu", memory, "n0"), PlanDevice("b", "cpu", memory, "n0"),
            PlanDevice("c", "cpu", memory, "n1")]


def test_a_tensor_parallel_model_gets_a_group_of_devices_in_one_node():
    config = fixture_config()
    config.models[0].spec.tensor_parallel_size = 2          # llama over two devices of one node
    cluster = FakeCluster(three_devices_two_nodes())
    controller = ClusterController(config, cluster)
    plan = controller.start()
    [group] = [g for g in plan.groups if "llama" in g.models]
    assert group.devices == ("a", "b") and dict(group.members)["llama"] == (0, 1)
    assert all(len(dict(g.members)[m]) == 1 for g in plan.groups for m in g.models if m != "llama")
    assert sorted(cluster.live.values(), key=str) == sorted(plan.groups, key=str)
    assert sorted(m for g in plan.groups for m in g.models) == sorted(MODELS)
    # b is lost: llama's group with it; a and c are on two nodes, so llama fits nowhere now
    lost, _ = cluster.on("b")
    cluster.devices_up = [d for d in cluster.devices_up if d.name != "b"]
    cluster.live.pop(lost)
    assert controller.step() is True
    assert "no node has 2 devices" in cluster.unplaced["llama"] and "llama" not in cluster.routes
    assert {m for g in cluster.live.values() for m in g.models} == {"mistral", "qwen2"}
    assert all(len(cluster.routes[m]) == 1 for m in ("mistral", "qwen2"))


def test_a_group_over_busy_devices_starts_after_their_replicas_drained():
    """Moving to a plan whose TP group spans two devices with a replica each: both are unrouted and
    drained before the group starts (the fake refuses two replicas on a device)."""
    cluster = FakeCluster(two_devices())
    controller = ClusterController(fixture_config(), cluster)
    controller.start()
    old = set(cluster.live)
    joined = DeviceGroup(("a", "b"), (("llama", (0, 1)), ("mistral", (0,)), ("qwen2", (1,))))
    controller.apply(ClusterPlan((joined,), {m: {("a", "b"): 1.0} for m in MODELS}))
    assert set(cluster.stopped) == old and list(cluster.live.values()) == [joined]
    assert cluster.held == set(MODELS)                      # their requests waited at the ingress meanwhile
    assert all(list(hosts) == [next(iter(cluster.live))] for hosts in cluster.routes.values())
    assert controller.step() is False


def test_a_replica_that_fails_to_start_is_placed_again_at_the_next_check():
    cluster = FakeCluster(two_devices())
    controller = ClusterController(fixture_config(), cluster)
    controller.start()
    cluster.observed = {"llama": RateObservation(1e4, 10_000, 1.0), "mistral": RateObservation(0.01, 0, 1.0),
                        "qwen2": RateObservation(0.01, 0, 1.0)}
    cluster.failing = {"b"}
    assert controller.step() is True
    assert any("failed to start: Deploying on ['b'] failed" in e for e in controller.events)
    assert "b" not in {d for g in cluster.live.values() for d in g.devices}
    assert any(not hosts for hosts in cluster.routes.values())      # b's models wait at the ingress
    assert controller.step() is True and any("short of its plan" in e for e in controller.events)
    assert {d for g in cluster.live.values() for d in g.devices} == {"a", "b"} and all(cluster.routes.values())
    assert controller.step() is False


def test_shutdown_refuses_new_requests_and_waits_for_those_in_flight():
    cluster = FakeCluster(two_devices())
    controller = ClusterController(fixture_config(), cluster)
    controller.start()
    calls = cluster.inflight_calls
    controller.shutdown(drain_timeout_s=5)
    assert cluster.closed and cluster.inflight_calls >= calls + 2 and controller.events[-1] == "shut down, drained"
