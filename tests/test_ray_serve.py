"""Serving over a Ray cluster: a two-node cluster in this machine (loopback only), the fleet placed
over both nodes' devices, the official client through the one ingress (streaming and not) getting
what a single-process fleet answers, the cluster-wide /v1/models, /health and /metrics, and the
one-line errors at start."""

from __future__ import annotations

import os

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from fineserve_jax.fleet import Fleet
from fineserve_jax.ray_serve import DEVICE_RESOURCE, cluster_devices, deploy, place_on_cluster
from fineserve_jax.serve import main as serve_main
from fineserve_jax.serve_config import ServeConfig
from serving.cluster.proxy import Routes, build_proxy_app, merge_metrics
from serving.scheduling.cost_model import DEVICES
from serving.engine.sampling import SamplingParams
from tests.helpers import FIXTURES

MODELS = ("llama", "mistral", "qwen2")
PORT_RANGE = (18100, 18900)
TIMEOUT_S = 120


def fixture_config() -> ServeConfig:
    return ServeConfig.from_dict({"pool_bytes": "8MiB", "models": [
        {"model": str(FIXTURES / m), "precision": "bf16", "name": m, "dtype": "float32", "max_model_len": 128,
         "max_num_seqs": 4, "max_num_batched_tokens": 64, "tokens_per_page": 8} for m in MODELS]})


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of one device each; the fleet deployed over them (device memory set so that the
    three models cannot share one device)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"   # everything on 127.0.0.1
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {DEVICE_RESOURCE: 1}})
    nodes.add_node(num_cpus=1, resources={DEVICE_RESOURCE: 1})
    ray.init(address=nodes.address, include_dashboard=False, log_to_driver=False)
    try:
        devices = cluster_devices(ray.nodes(), memory_bytes=48 << 20)
        port = int(np.random.default_rng().integers(*PORT_RANGE))
        _, placed = deploy(fixture_config(), devices, host="127.0.0.1", port=port, warmup=False)
        yield {"url": f"http://127.0.0.1:{port}", "placed": placed, "devices": devices}
    finally:
        serve.shutdown()
        ray.shutdown()
        nodes.shutdown()


def test_fleet_spreads_over_both_nodes_and_answers_as_one_process(cluster):
    assert len(cluster["devices"]) == 2 and len({d.node_id for d in cluster["devices"]}) == 2
    hosted = [models for models in cluster["placed"].values() if models]
    assert len(hosted) == 2 and sorted(m for ms in hosted for m in ms) == sorted(MODELS)
    single = Fleet([m.spec for m in fixture_config().models], "8MiB")
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
    httpx.post(url + "/v1/completions", json={"model": "llama", "prompt": "x", "max_tokens": 2}, timeout=TIMEOUT_S)
    metrics = httpx.get(url + "/metrics", timeout=TIMEOUT_S).text
    assert metrics.count("# TYPE fineserve_time_to_first_token_seconds histogram") == 1
    assert 'model="llama",replica="' in metrics
    assert "fineserve_proxy_routing_seconds_count" in metrics
    missing = httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=TIMEOUT_S)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    bad = httpx.post(url + "/v1/completions", json={"model": "llama", "prompt": "x", "max_tokens": -1},
                     timeout=TIMEOUT_S)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"   # the replica's own validation


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
    with pytest.raises(ValueError, match="offers no devices"):
        place_on_cluster(fixture_config(), [])
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
    """dead: gone before answering; flaky: dies after one token; anything else answers whole."""
    if replica == "dead":
        raise ConnectionError("the actor died")
    yield 200, [("content-type", "text/event-stream; charset=utf-8")]
    yield b'data: {"choices": [{"text": "a"}]}\n\n'
    if replica == "flaky":
        raise RuntimeError("node lost")
    yield b"data: [DONE]\n\n"


def test_proxy_retries_a_dead_replica_and_ends_broken_streams_explicitly():
    routes = Routes({"m": {"dead": 1.0, "ok": 1.0}, "lost": {"dead": 1.0}, "cut": {"flaky": 1.0}},
                    unplaced={"big": "no device has the memory for it"})
    client = TestClient(build_proxy_app(routes, _fake_replica))
    for _ in range(4):   # whichever replica is picked first, the live one answers
        r = client.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True})
        assert r.status_code == 200 and r.headers["x-fineserve-replica"] == "ok" and r.text.endswith("[DONE]\n\n")
    r = client.post("/v1/completions", json={"model": "lost", "prompt": "x"})
    assert r.status_code == 503 and "the actor died" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"model": "cut", "prompt": "x", "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert events[0].startswith('data: {"choices"') and '"code": "replica_failed"' in events[1]
    assert events[-1] == "data: [DONE]"
    r = client.post("/v1/completions", json={"model": "big", "prompt": "x"})
    assert r.status_code == 503 and "no device has the memory" in r.json()["error"]["message"]
    assert client.post("/v1/completions", content=b"not json").status_code == 400

