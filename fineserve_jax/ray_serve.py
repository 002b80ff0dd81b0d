"""`fineserve serve --ray [ADDRESS]`: a fleet served over a Ray cluster with Ray Serve.

    ray start --head --resources='{"fineserve_device": 1}'              # machine 1 (GPUs count by themselves)
    ray start --address=HEAD:6379 --resources='{"fineserve_device": 1}' # machine 2
    fineserve serve --ray HEAD:6379 --config fleet.toml

It joins the cluster, reads the devices every node offers (`cluster_devices`: its GPUs, or on
nodes without any the custom resource `fineserve_device`), runs the global placement over all of
them (`serve_config.place_models`), and deploys one Ray Serve replica per device that hosts models
(`FleetReplica`: that device's Fleet and the same OpenAI app a single-process server runs, scheduled
as [server] says) behind one ingress (`serving.cluster.proxy`) that routes each request by model
name and streams the replica's response back. Ray is imported only here, so a server without
`--ray` never loads it. Design notes: docs/serving.md ("Serving on a Ray cluster").
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass

from fineserve_jax.caches import Caches
from fineserve_jax.config_files import DeviceConfig
from fineserve_jax.serve_app import app_for
from fineserve_jax.serve_config import ServeConfig, build_fleets, place_models
from serving.cluster.asgi_call import call_asgi
from serving.cluster.proxy import Routes, build_proxy_app
from serving.scheduling.cost_model import DEVICES

log = logging.getLogger("fineserve.ray")

DEVICE_RESOURCE = "fineserve_device"   # what a node without GPUs offers (ray start --resources)
APP_NAME = "fineserve"
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
CONNECT_TIMEOUT_S = 5.0


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


def place_on_cluster(config: ServeConfig, devices: list[ClusterDevice]) -> dict[str, list[str]]:
    """Device name -> its models: the global placement over the cluster's devices."""
    if not devices:
        raise ValueError(f"the Ray cluster offers no devices: start its nodes with GPUs, or with "
                         f"--resources='{{\"{DEVICE_RESOURCE}\": 1}}'")
    if any(m.spec.tensor_parallel_size > 1 for m in config.models):
        raise ValueError("tensor_parallel_size > 1 is not placed over a Ray cluster yet; serve those models "
                         "without --ray")
    entries = [DeviceConfig(name=d.name, jax_device=i, memory_bytes=d.memory_bytes, kind=d.kind)
               for i, d in enumerate(devices)]
    return place_models(dataclasses.replace(config, devices=entries))


def replica_config(config: ServeConfig, device: ClusterDevice, models: list[str]) -> ServeConfig:
    """What one replica serves: its models on its one device (jax device 0 of its process: Ray
    gives a GPU replica exactly its GPU)."""
    return dataclasses.replace(config, models=[config.model(n) for n in models],
                               devices=[DeviceConfig(name=device.name, jax_device=0, kind=device.kind)])


class FleetReplica:
    """One device's fleet and its OpenAI app, answering forwarded requests (a Ray Serve deployment)."""

    def __init__(self, config: ServeConfig, warmup: bool = True, caches: Caches = Caches(None)):
        caches.enable_compilation_cache()   # this machine's cache folders, as the CLI's
        self.fleets = build_fleets(config, quantized_cache=caches.quantized)
        self.app = app_for(self.fleets, config.server, warmup=warmup)
        self._lifespan = self.app.router.lifespan_context(self.app)
        self._started: asyncio.Future | None = None

    async def forward(self, method: str, path: str, body: bytes, headers: list):
        if self._started is None:   # the app's startup (its engine threads) runs once, in the replica's loop
            self._started = asyncio.ensure_future(self._lifespan.__aenter__())
        await self._started
        async for item in call_asgi(self.app, method, path, body, headers):
            yield item


class ClusterIngress:
    """The front door (a Ray Serve ingress deployment): `serving.cluster.proxy` over the replicas'
    handles."""

    def __init__(self, routes: Routes, replicas: dict):
        self.routes = routes
        self.replicas = {name: handle.options(stream=True) for name, handle in replicas.items()}

    def __serve_build_asgi_app__(self):
        return build_proxy_app(self.routes, self._forward)

    def _forward(self, replica: str, method: str, path: str, body: bytes, headers: list):
        return self.replicas[replica].forward.remote(method, path, body, headers)


def deploy(config: ServeConfig, devices: list[ClusterDevice], *, host: str, port: int, warmup: bool = True,
           caches: Caches = Caches(None)):
    """Place the fleet on the cluster and run it on Ray Serve (ray must be initialised); returns the
    ingress handle and the placement. `caches`: the folders each replica caches compiled programs and
    calibrated weights in (on its own machine)."""
    from ray import serve

    placed = place_on_cluster(config, devices)
    by_name = {d.name: d for d in devices}
    serve.start(http_options={"host": host, "port": port})
    replica_deployment = serve.deployment(FleetReplica)
    replicas, routes = {}, {}
    for i, (name, models) in enumerate(placed.items()):
        if not models:
            continue
        device = by_name[name]
        options = {"num_cpus": 0, "resources": {device.resource: 1}} if device.resource != "GPU" else {
            "num_cpus": 0, "num_gpus": 1}
        replica = f"fleet{i}"
        replicas[replica] = replica_deployment.options(
            name=replica, ray_actor_options=options | {"runtime_env": {"env_vars": RAY_ENV}},
            max_ongoing_requests=1024).bind(replica_config(config, device, models), warmup, caches)
        for m in models:
            routes.setdefault(m, {})[replica] = 1.0
        log.info("replica %s on %s: %s", replica, name, ", ".join(models))
    ingress = serve.deployment(serve.ingress()(ClusterIngress)).options(
        name="ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
    handle = serve.run(ingress.bind(Routes(routes), replicas), name=APP_NAME, route_prefix="/")
    return handle, placed


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
    """`fineserve serve --ray`: deploy, then serve until SIGINT/SIGTERM (Ray Serve's proxy listens
    on host:port), and take the deployment down."""
    ray = connect(address)
    try:
        from ray import serve

        devices = cluster_devices(ray.nodes())
        _, placed = deploy(config, devices, host=host, port=port, warmup=warmup, caches=caches)
        log.info("serving %s on http://%s:%d/v1 from %d replica(s) on a Ray cluster of %d device(s)",
                 ", ".join(m.name for m in config.models), host, port, sum(1 for m in placed.values() if m),
                 len(devices))
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        serve.delete(APP_NAME)
        return 0
    finally:
        ray.shutdown()

