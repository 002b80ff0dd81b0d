"""`fineserve serve --ray [ADDRESS]`: a fleet served over a Ray cluster with Ray Serve.

    ray start --head --resources='{"fineserve_device": 1}'              # machine 1 (GPUs count by themselves)
    ray start --address=HEAD:6379 --resources='{"fineserve_device": 1}' # machine 2
    fineserve serve --ray HEAD:6379 --config fleet.toml

It joins the cluster, reads the devices every node offers (`cluster_devices`: its GPUs, or on
nodes without any the custom resource `fineserve_device`), places the fleet over all of them
(`cluster_plan`, every replica the placement plans) and runs one Ray Serve application per device
group that hosts models (`FleetReplica`: that group's Fleet and the same OpenAI app a
single-process server runs, scheduled as [server] says, pinned to the group's node; a group is one
device, or the devices of one node that a tensor-parallel model joins) behind one ingress
(`serving.cluster.proxy`) that routes each request by model name and placement weight and streams
the replica's response back. `ClusterController` (through `RayBackend`) then keeps it on plan: a
lost node's models are placed again on the survivors, drifted rates re-place the fleet. Ray is
imported only here, so a server without `--ray` never loads it. Design notes: docs/serving.md
("Serving on a Ray cluster").
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass

from fineserve_jax.caches import Caches
from fineserve_jax.cluster_controller import ClusterController
from fineserve_jax.cluster_plan import PlanDevice
from fineserve_jax.config_files import DeviceConfig
from fineserve_jax.serve_app import app_for
from fineserve_jax.serve_config import DeviceGroup, ServeConfig, build_fleets
from serving.cluster.asgi_call import call_asgi
from serving.cluster.proxy import HOLD_S, Routes, build_proxy_app
from serving.scheduling.replan import RateObservation, RatesMonitor
from serving.scheduling.cost_model import DEVICES

log = logging.getLogger("fineserve.ray")

DEVICE_RESOURCE = "fineserve_device"   # what a node without GPUs offers (ray start --resources)
APP_NAME = "fineserve"
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
CONNECT_TIMEOUT_S = 5.0
CHECK_EVERY_S = 5.0                   # how often the controller looks for lost devices and drifted rates
NODE_LABEL = "ray.io/node-id"         # every Ray node's own label: pins a replica to its device's node


@dataclass(frozen=True)
class ClusterDevice:
    """One device of the cluster, as placement and Ray's scheduler see it."""
    name: str
    node_id: str
    resource: str          # the Ray resource one replica on it takes: "GPU" or DEVICE_RESOURCE
    kind: str
    memory_bytes: int


def cluster_devices(nodes: list[dict], *, memory_bytes: int | None = None) -> list[ClusterDevice]:
    """The devices of the alive nodes of `ray.nodes()`: a node's GPUs (kind from its
    `accelerator_type:*` resource, memory from the kind's profile), else its `fineserve_device`
    count (kind "cpu", memory: the node's memory over its devices, or `memory_bytes`)."""
    devices = []
    for node in sorted((n for n in nodes if n.get("Alive")), key=lambda n: n["NodeID"]):
        res = node.get("Resources", {})
        if res.get("GPU"):
            resource, count = "GPU", int(res["GPU"])
            accel = next((k.split(":", 1)[1].lower() for k in res if k.startswith("accelerator_type:")), "gpu")
            kind = next((k for k in DEVICES if k in accel), accel)
            memory = memory_bytes or (int(DEVICES[kind].memory_bytes) if kind in DEVICES else None)
        else:
            resource, count, kind = DEVICE_RESOURCE, int(res.get(DEVICE_RESOURCE, 0)), "cpu"
            memory = memory_bytes or (int(res.get("memory", 0)) // max(count, 1))
        for i in range(count):
            devices.append(ClusterDevice(f"{node['NodeManagerAddress']}/{node['NodeID'][:8]}/{i}", node["NodeID"],
                                         resource, kind, memory))
    return devices


def plan_devices(devices: list[ClusterDevice]) -> list[PlanDevice]:
    return [PlanDevice(d.name, d.kind, d.memory_bytes, d.node_id) for d in devices]


def replica_config(config: ServeConfig, group: DeviceGroup, devices: list[ClusterDevice]) -> ServeConfig:
    """What one replica serves: its group's models on its devices, which are jax devices 0, 1, ...
    of its process (Ray gives a GPU replica exactly its GPUs; a CPU replica gets as many host
    devices, `replica_env`)."""
    return dataclasses.replace(config, models=[config.model(n) for n in group.models],
                               devices=[DeviceConfig(name=d.name, jax_device=i, kind=d.kind)
                                        for i, d in enumerate(devices)])


def replica_env(devices: list[ClusterDevice]) -> dict[str, str]:
    """The replica process's environment: a CPU group of k > 1 devices asks XLA for k host devices."""
    if len(devices) > 1 and devices[0].resource == DEVICE_RESOURCE:
        return RAY_ENV | {"XLA_FLAGS": f"--xla_force_host_platform_device_count={len(devices)}"}
    return dict(RAY_ENV)


class FleetReplica:
    """One device group's fleet and its OpenAI app, answering forwarded requests (a Ray Serve
    deployment)."""

    def __init__(self, config: ServeConfig, group: DeviceGroup, warmup: bool = True, caches: Caches = Caches(None)):
        caches.enable_compilation_cache()   # this machine's cache folders, as the CLI's
        self.fleets = build_fleets(config, quantized_cache=caches.quantized, groups=[group])
        self.app = app_for(self.fleets, config.server, warmup=warmup)
        self._lifespan = self.app.router.lifespan_context(self.app)
        self._started: asyncio.Future | None = None

    async def ready(self) -> bool:
        """The app's startup (engine threads, warm-up) has run: once, in the replica's loop."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._lifespan.__aenter__())
        await self._started
        return True

    async def forward(self, method: str, path: str, body: bytes, headers: list):
        await self.ready()
        async for item in call_asgi(self.app, method, path, body, headers):
            yield item


class ClusterIngress:
    """The front door (a Ray Serve ingress deployment): `serving.cluster.proxy` over the replicas'
    handles, routed as the controller says (`update`); it reports what the controller watches:
    each replica's requests in flight and each model's observed arrival rate."""

    def __init__(self, hold_s: float, rates_window_s: float):
        self.routes = Routes({})
        self.monitor = RatesMonitor(rates_window_s)
        self.hold_s = hold_s
        self.replicas: dict = {}

    def __serve_build_asgi_app__(self):
        return build_proxy_app(self.routes, self._forward, hold_s=self.hold_s, monitor=self.monitor)

    # async: they run in the loop that serves the app, which owns `routes`
    async def update(self, routes: dict, unplaced: dict, handles: dict, lost: list[str]) -> None:
        self.replicas = {name: handle.options(stream=True) for name, handle in handles.items()}
        self.routes.update(routes, unplaced, lost)

    async def inflight(self) -> dict[str, int]:
        return {name: n for name, n in self.routes.inflight.items() if n}

    async def close(self) -> None:
        self.routes.closing = True

    async def rates(self) -> dict[str, RateObservation]:
        return self.monitor.observe(time.monotonic(), list(self.routes.replicas))

    def _forward(self, replica: str, method: str, path: str, body: bytes, headers: list):
        return self.replicas[replica].forward.remote(method, path, body, headers)


class RayBackend:
    """The cluster as `ClusterController` drives it: Ray's nodes offer the devices, each replica is a
    Ray Serve application pinned to its group's node, the ingress is one more (at host:port)."""

    def __init__(self, config: ServeConfig, *, host: str, port: int, warmup: bool = True,
                 caches: Caches = Caches(None), memory_bytes: int | None = None, hold_s: float = HOLD_S,
                 rates_window_s: float = 60.0, ready_timeout_s: float = 600.0):
        self.config, self.warmup, self.caches, self.memory_bytes = config, warmup, caches, memory_bytes
        self.hold_s, self.rates_window_s, self.ready_timeout_s = hold_s, rates_window_s, ready_timeout_s
        self.http = {"host": host, "port": port}
        self._known: dict[str, ClusterDevice] = {}
        self._ingress = None
        self._serving = False

    def devices(self) -> list[PlanDevice]:
        import ray

        found = cluster_devices(ray.nodes(), memory_bytes=self.memory_bytes)
        self._known.update({d.name: d for d in found})
        return plan_devices(found)

    def _serve(self):
        """Ray Serve, started once with the ingress's HTTP address (before any application runs)."""
        from ray import serve

        if not self._serving:
            # one HTTP entry point, on the head node: the ingress's address stays up when a worker node goes
            serve.start(proxy_location="HeadOnly", http_options=self.http)
            self._serving = True
        return serve

    def start_replicas(self, replicas: dict[str, DeviceGroup]) -> dict:
        from ray.serve.api import RunTarget

        serve = self._serve()
        deployment = serve.deployment(FleetReplica)
        targets = []
        for name, group in replicas.items():
            devices = [self._known[d] for d in group.devices]   # one node's (placement keeps a group in one)
            first, k = devices[0], len(devices)
            options = {"num_cpus": 0, "num_gpus": k} if first.resource == "GPU" else {
                "num_cpus": 0, "resources": {first.resource: k}}
            options |= {"label_selector": {NODE_LABEL: first.node_id},
                        "runtime_env": {"env_vars": replica_env(devices)}}
            app = deployment.options(name="replica", ray_actor_options=options, max_ongoing_requests=1024,
                                     graceful_shutdown_timeout_s=5, max_constructor_retry_count=3).bind(
                replica_config(self.config, group, devices), group, self.warmup, self.caches)
            targets.append(RunTarget(app, name=name, route_prefix=None))
        handles = dict(zip(replicas, serve.run_many(targets)))
        for handle in handles.values():
            handle.ready.remote().result(timeout_s=self.ready_timeout_s)
        return handles

    def stop_replica(self, name: str) -> None:
        from ray import serve

        serve.delete(name)

    def route(self, routes: dict, unplaced: dict, handles: dict, lost: list[str]) -> None:
        if self._ingress is None:
            import ray

            serve = self._serve()
            here = {"label_selector": {NODE_LABEL: ray.get_runtime_context().get_node_id()}}  # the driver's node
            ingress = serve.deployment(serve.ingress()(ClusterIngress)).options(
                name="ingress", ray_actor_options={"num_cpus": 0} | here, max_ongoing_requests=4096)
            self._ingress = serve.run(ingress.bind(self.hold_s, self.rates_window_s), name=APP_NAME, route_prefix="/")
        self._ingress.update.remote(routes, unplaced, handles, lost).result()

    def inflight(self) -> dict[str, int]:
        return self._ingress.inflight.remote().result() if self._ingress is not None else {}

    def rates(self) -> dict[str, RateObservation]:
        return self._ingress.rates.remote().result() if self._ingress is not None else {}

    def close(self) -> None:
        if self._ingress is not None:
            self._ingress.close.remote().result()

    def shutdown(self) -> None:
        from ray import serve

        serve.shutdown()


def connect(address: str | None):
    """Join the Ray cluster at `address` ("auto": the one this machine belongs to); ValueError in
    one line when it cannot be reached."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    if address not in (None, "auto"):   # Ray waits minutes for an unreachable head; ask first
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot reach the Ray cluster at {address}: {e}") from None
    import ray

    try:
        ray.init(address=address or "auto", include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ValueError(f"cannot join the Ray cluster at {address or 'auto'}: {str(e).splitlines()[0]}") from None
    return ray


def serve_on_ray(config: ServeConfig, address: str, *, host: str, port: int, warmup: bool = True,
                 caches: Caches = Caches(None)) -> int:
    """`fineserve serve --ray`: deploy, keep the deployment on plan (`ClusterController`: lost
    devices, drifted rates) until SIGINT/SIGTERM (Ray Serve's proxy listens on host:port), then
    drain it as one process does (new requests refused, those in flight given [server]
    drain_timeout_s) and take it down."""
    ray = connect(address)
    try:
        backend = RayBackend(config, host=host, port=port, warmup=warmup, caches=caches)
        controller = ClusterController(config, backend)
        plan = controller.start()
        log.info("serving %s on http://%s:%d/v1 from %d replica(s) on a Ray cluster", ", ".join(plan.weights),
                 host, port, len(controller.replicas))
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        controller.run(stop, poll_s=CHECK_EVERY_S)
        controller.shutdown(config.server.drain_timeout_s)
        backend.shutdown()
        return 0
    finally:
        ray.shutdown()
