"""Serving over a Ray cluster: a two-node cluster in this machine (loopback only), the fleet placed
over both nodes' three devices (llama tensor-parallel over the head node's two), the official client
through the one ingress (streaming and not) getting what a single-process fleet answers, the
cluster-wide /v1/models, /health and /metrics, the one-line errors at start; then, under load,
models moved to new replicas with no request lost, and a node killed: every request answered or
failed explicitly, its models back on the survivor."""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from fineserve_jax.cluster_controller import ClusterController
from fineserve_jax.cluster_plan import plan_cluster
from fineserve_jax.fleet import Fleet
from fineserve_jax.ray_serve import DEVICE_RESOURCE, RayBackend, cluster_devices
from fineserve_jax.serve import main as serve_main
from serving.cluster.proxy import Routes, build_proxy_app, merge_metrics
from serving.scheduling.cost_model import DEVICES
from serving.engine.sampling import SamplingParams
from tests.helpers import FIXTURES, HF_MODELS as MODELS, hf_fleet_config as fixture_config

PORT_RANGE = (18100, 18900)
TIMEOUT_S = 120
DEVICE_MEMORY = 48 << 20
LOST_AFTER_S = 60      # Ray marks a killed node dead within this (health checks every 0.5 s)


def ray_fleet_config():
    """The fixture fleet with llama split over two devices (which must be one node's)."""
    config = fixture_config()
    config.model("llama").spec.tensor_parallel_size = 2
    return config


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes, of two devices and one; the fleet deployed over them by the controller."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"   # everything on 127.0.0.1
    import ray
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {DEVICE_RESOURCE: 2},
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
    worker = nodes.add_node(num_cpus=1, resources={DEVICE_RESOURCE: 1})
    ray.init(address=nodes.address, include_dashboard=False, log_to_driver=False)
    port = int(np.random.default_rng().integers(*PORT_RANGE))
    backend = RayBackend(ray_fleet_config(), host="127.0.0.1", port=port, warmup=False, memory_bytes=DEVICE_MEMORY)
    try:
        # re-placement for drifted rates is the fake cluster's test: here the load would trigger it
        controller = ClusterController(ray_fleet_config(), backend, drain_timeout_s=30, drift_threshold=math.inf)
        controller.start()
        yield {"url": f"http://127.0.0.1:{port}", "controller": controller, "nodes": nodes, "worker": worker,
               "devices": cluster_devices(ray.nodes(), memory_bytes=DEVICE_MEMORY)}
    finally:
        backend.shutdown()
        ray.shutdown()
        nodes.shutdown()


def test_fleet_spreads_over_both_nodes_and_answers_as_one_process(cluster):
    devices = cluster["devices"]
    assert len(devices) == 3 and len({d.node_id for d in devices}) == 2
    groups = cluster["controller"].plan.groups
    assert len(groups) == 2 and sorted(m for g in groups for m in g.models) == sorted(MODELS)
    [tp] = [g for g in groups if "llama" in g.models]   # the head node's two devices, one replica
    assert len(tp.devices) == 2 and dict(tp.members)["llama"] == (0, 1)
    assert len({d.node_id for d in devices if d.name in tp.devices}) == 1
    single = Fleet([m.spec for m in fixture_config().models], "8MiB")   # every model on one device
    client = openai.OpenAI(base_url=cluster["url"] + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    for model in MODELS:
        want = single.generate("Hello there, how", SamplingParams(temperature=0.0, max_tokens=8), model=model)[0]
        got = client.completions.create(model=model, prompt="Hello there, how", max_tokens=8, temperature=0)
        assert got.choices[0].text == want.outputs[0].text and got.usage.completion_tokens == 8
        stream = client.completions.create(model=model, prompt="Hello there, how", max_tokens=8, temperature=0,
                                           stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == want.outputs[0].text
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert chat.usage.completion_tokens <= 4 and chat.choices[0].message.role == "assistant"


def test_cluster_wide_models_health_metrics_and_errors(cluster):
    url = cluster["url"]
    cards = httpx.get(url + "/v1/models", timeout=TIMEOUT_S).json()["data"]
    assert sorted(c["id"] for c in cards) == sorted(MODELS) and len({c["replica"] for c in cards}) == 2
    health = httpx.get(url + "/health", timeout=TIMEOUT_S)
    assert health.status_code == 200 and set(health.json()["models"]) == set(MODELS)
    r = httpx.post(url + "/v1/completions", json={"model": "llama", "prompt": "x", "max_tokens": 2, "vendor": 1},
                   timeout=TIMEOUT_S)
    assert r.status_code == 200 and r.headers["x-fineserve-ignored-fields"] == "vendor"   # the replica's header
    tokens = httpx.post(url + "/tokenize", json={"model": "qwen2", "prompt": "Hello"}, timeout=TIMEOUT_S).json()
    text = httpx.post(url + "/detokenize", json={"model": "qwen2", "tokens": tokens["tokens"]}, timeout=TIMEOUT_S)
    assert tokens["count"] == len(tokens["tokens"]) > 0 and text.json()["prompt"].endswith("Hello")
    metrics = httpx.get(url + "/metrics", timeout=TIMEOUT_S).text
    assert metrics.count("# TYPE fineserve_time_to_first_token_seconds histogram") == 1
    assert 'model="llama",replica="' in metrics
    assert "fineserve_proxy_routing_seconds_count" in metrics
    missing = httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=TIMEOUT_S)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    bad = httpx.post(url + "/v1/completions", json={"model": "llama", "prompt": "x", "max_tokens": -1},
                     timeout=TIMEOUT_S)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"   # the replica's own validation


class Load:
    """A client per model sending requests in a loop (streamed and not, over one connection each)
    until stopped; each request's outcome is recorded: "ok" (whole answer), "error" (an explicit
    error: an HTTP error with its JSON body, or a stream ending in an error event) or "lost"
    (anything else: a hang, a cut connection, an answer silently short)."""

    MAX_TOKENS = 6

    def __init__(self, url: str):
        self.url, self.outcomes, self.replicas = url, [], {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(m,), daemon=True) for m in MODELS]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(TIMEOUT_S)

    def _client(self, model: str):
        with httpx.Client(base_url=self.url, timeout=TIMEOUT_S) as http:
            stream = False
            while not self._stop.is_set():
                stream = not stream
                body = {"model": model, "prompt": "Hello there", "max_tokens": self.MAX_TOKENS, "temperature": 0,
                        "stream": stream}
                t0 = time.monotonic()
                try:
                    r = http.post("/v1/completions", json=body)
                    self.outcomes.append((model, self._outcome(r, stream)))
                    self.replicas.setdefault(model, set()).add(r.headers.get("x-fineserve-replica"))
                except httpx.HTTPError as e:
                    self.outcomes.append((model, f"lost: {type(e).__name__} after {time.monotonic() - t0:.1f} s"))

    def _outcome(self, r: httpx.Response, stream: bool) -> str:
        if r.status_code != 200:
            return "error" if r.json().get("error", {}).get("message") else f"lost: {r.status_code}"
        if not stream:
            return "ok" if r.json()["usage"]["completion_tokens"] == self.MAX_TOKENS else "lost: short"
        events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
        if events[-1] != "[DONE]":
            return "lost: no [DONE]"
        if any('"error"' in e for e in events):
            return "error"
        return "ok" if sum(1 for e in events[:-1] if '"text"' in e) >= 1 else "lost: empty stream"

    def count(self, outcome: str, model: str | None = None) -> int:
        return sum(1 for m, o in self.outcomes if o.startswith(outcome) and model in (None, m))


def _answers(url: str) -> dict[str, str]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    return {m: client.completions.create(model=m, prompt="Hello there, how", max_tokens=6, temperature=0)
            .choices[0].text for m in MODELS}


def test_models_move_to_new_replicas_under_load_without_losing_a_request(cluster):
    """A popularity flip (mistral ten thousand times its planned rate) moves mistral: the groups
    whose models change get new replicas, the others keep theirs; no request fails meanwhile."""
    controller = cluster["controller"]
    before, answers = dict(controller.replicas), _answers(cluster["url"])
    devices = controller.backend.devices()
    flipped = plan_cluster(controller.config, devices, rates={"llama": 0.01, "mistral": 1e4, "qwen2": 0.01},
                           previous=controller.plan)
    assert flipped.weights["mistral"] != controller.plan.weights["mistral"] and flipped.hosts != controller.plan.hosts
    old_hosts = {r.name for r in before.values() if "mistral" in r.models}
    with Load(cluster["url"]) as load:
        time.sleep(1.0)
        controller.apply(flipped)
        moved = {r.name for r in controller.replicas.values() if "mistral" in r.models} != old_hosts
        deadline = time.monotonic() + 30   # a loaded CI machine: wait for an answer from a new replica
        time.sleep(1.0)
        while moved and not load.replicas["mistral"] - old_hosts and time.monotonic() < deadline:
            time.sleep(0.2)
    assert load.count("ok") == len(load.outcomes) and all(load.count("ok", m) >= 2 for m in MODELS), load.outcomes
    old_names = {r.name for r in before.values()}
    for devices, replica in controller.replicas.items():
        kept = devices in before and before[devices].group == replica.group
        assert (replica.name == before[devices].name) if kept else (replica.name not in old_names)
    assert {d: r.group for d, r in controller.replicas.items()} == flipped.hosts
    assert _answers(cluster["url"]) == answers   # the same tokens from the new replicas
    if moved:   # node ids are random, so the new plan may leave mistral's replica as it was
        assert len(load.replicas["mistral"]) >= 2    # mistral's requests went to old and new replicas


def test_a_killed_node_s_models_come_back_and_no_request_is_lost_silently(cluster):
    """Runs last in this module: it kills the worker node. Requests in flight there end explicitly
    (or are retried elsewhere); its models are placed again on the surviving device."""
    controller, nodes = cluster["controller"], cluster["nodes"]
    answers = _answers(cluster["url"])
    worker_id = cluster["worker"].node_id
    lost = [m for r in controller.replicas.values() if r.devices[0].split("/")[1] == worker_id[:8] for m in r.models]
    assert lost
    with Load(cluster["url"]) as load:
        time.sleep(1.0)
        nodes.remove_node(cluster["worker"], allow_graceful=False)
        deadline = time.monotonic() + LOST_AFTER_S
        while not (any("is lost" in e for e in controller.events) and controller.step() is False):
            assert time.monotonic() < deadline, f"the lost node's models are not back: {controller.events}"
            controller.step()   # what the server's controller does every few seconds
            time.sleep(0.5)
        time.sleep(1.0)
    assert load.count("lost") == 0, ([o for o in load.outcomes if o[1].startswith("lost")], controller.events)
    assert all(load.count("ok", m) >= 1 for m in MODELS)
    assert any("is lost" in e for e in controller.events)
    [survivor] = controller.replicas.values()
    assert sorted(survivor.models) == sorted(MODELS) and not controller.plan.unplaced
    assert _answers(cluster["url"]) == answers


def test_cluster_devices_from_node_resources():
    nodes = [{"NodeID": "b" * 40, "NodeManagerAddress": "10.0.0.2", "Alive": True,
              "Resources": {"GPU": 2.0, "accelerator_type:H100": 1.0, "memory": 1e12}},
             {"NodeID": "a" * 40, "NodeManagerAddress": "10.0.0.1", "Alive": True,
              "Resources": {DEVICE_RESOURCE: 2.0, "memory": 8e9}},
             {"NodeID": "c" * 40, "NodeManagerAddress": "10.0.0.3", "Alive": False, "Resources": {"GPU": 8.0}},
             {"NodeID": "d" * 40, "NodeManagerAddress": "10.0.0.4", "Alive": True, "Resources": {"CPU": 8.0}}]
    devices = cluster_devices(nodes)
    assert [(d.resource, d.kind) for d in devices] == [(DEVICE_RESOURCE, "cpu")] * 2 + [("GPU", "h100")] * 2
    assert devices[0].memory_bytes == 4e9 and devices[2].memory_bytes == int(DEVICES["h100"].memory_bytes)
    assert len({d.name for d in devices}) == 4


def test_a_cluster_without_devices_or_unreachable_fails_at_start_in_one_line(tmp_path, capsys):
    class NoDevices:
        def devices(self):
            return []

    with pytest.raises(ValueError, match="offers no devices"):
        ClusterController(fixture_config(), NoDevices()).start()
    config = tmp_path / "fleet.toml"
    config.write_text(f'[[models]]\nmodel = "{FIXTURES / "llama"}"\n')
    assert serve_main(["--ray", "127.0.0.1:1", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fineserve: error: cannot reach the Ray cluster at 127.0.0.1:1")


def test_merge_metrics_keeps_each_family_once():
    texts = {"r0": "# HELP a_total A\n# TYPE a_total counter\na_total{model=\"x\"} 1.0\n",
             "r1": "# HELP a_total A\n# TYPE a_total counter\na_total{model=\"y\"} 2.0\nb 3\n"}
    merged = merge_metrics(texts).splitlines()
    assert merged == ["# HELP a_total A", "# TYPE a_total counter", 'a_total{model="x",replica="r0"} 1.0',
                      'a_total{model="y",replica="r1"} 2.0', 'b{replica="r1"} 3']


async def _fake_replica(replica, method, path, body, headers):
    """dead: gone before answering; stuck: never answers; flaky: dies after one token; cut: dies
    before its first token; anything else answers whole."""
    if replica == "dead":
        raise ConnectionError("the actor died")
    while replica == "stuck":   # queued for a replica that will never come
        await asyncio.sleep(0.05)
    stream = json.loads(body).get("stream", False)
    yield 200, [("content-type", "text/event-stream; charset=utf-8" if stream else "application/json")]
    if replica == "cut":
        raise RuntimeError("node lost")
    yield b'data: {"choices": [{"text": "a"}]}\n\n' if stream else b'{"choices": '
    if replica == "flaky":
        raise RuntimeError("node lost")
    yield b"data: [DONE]\n\n" if stream else b'[{"text": "a"}]}'


def test_proxy_retries_a_replica_that_failed_before_its_first_token_and_ends_broken_streams_explicitly():
    routes = Routes({"m": {"dead": 1.0, "ok": 1.0}, "n": {"cut": 1.0, "ok": 1.0}, "lost": {"dead": 1.0},
                     "moving": {}, "gone": {"flaky": 1.0}, "hang": {"stuck": 1.0}},
                    unplaced={"big": "no device has the memory for it"})
    client = TestClient(build_proxy_app(routes, _fake_replica, hold_s=1.0))
    for model in ("m", "n"):
        for _ in range(4):   # whichever replica is picked first, the live one answers
            r = client.post("/v1/completions", json={"model": model, "prompt": "x", "stream": True})
            assert r.status_code == 200 and r.headers["x-fineserve-replica"] == "ok" and r.text.endswith("[DONE]\n\n")
            r = client.post("/v1/completions", json={"model": model, "prompt": "x"})
            assert r.status_code == 200 and r.json() == {"choices": [{"text": "a"}]}
    t0 = time.monotonic()
    r = client.post("/v1/completions", json={"model": "lost", "prompt": "x"})   # waits for a new replica, then 503
    assert r.status_code == 503 and "the actor died" in r.json()["error"]["message"] and time.monotonic() - t0 >= 1.0
    threading.Timer(0.3, routes.update, ({**routes.replicas, "moving": {"ok": 1.0}}, routes.unplaced)).start()
    r = client.post("/v1/completions", json={"model": "moving", "prompt": "x"})   # held until its replica is up
    assert r.status_code == 200 and r.headers["x-fineserve-replica"] == "ok"
    lose = ({**routes.replicas, "hang": {"ok": 1.0}}, routes.unplaced, ["stuck"])
    threading.Timer(0.3, routes.update, lose).start()
    r = client.post("/v1/completions", json={"model": "hang", "prompt": "x"})   # its replica's node is lost
    assert r.status_code == 200 and r.headers["x-fineserve-replica"] == "ok"
    r = client.post("/v1/completions", json={"model": "gone", "prompt": "x", "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert events[0].startswith('data: {"choices"') and '"code": "replica_failed"' in events[1]
    assert events[-1] == "data: [DONE]"
    r = client.post("/v1/completions", json={"model": "big", "prompt": "x"})
    assert r.status_code == 503 and "no device has the memory" in r.json()["error"]["message"]
    assert client.post("/v1/completions", content=b"not json").status_code == 400
    r = client.post("/tokenize", json={"model": "m", "prompt": "x"})   # routed as completions are
    assert r.status_code == 200 and r.headers["x-fineserve-replica"] == "ok"
    assert client.get("/health").json()["moving"] == [] and not +routes.inflight
    assert TestClient(build_proxy_app(Routes({}), _fake_replica)).get("/health").json()["status"] == "starting"
    routes.closing = True
    assert client.get("/health").status_code == 503
    r = client.post("/v1/completions", json={"model": "m", "prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
