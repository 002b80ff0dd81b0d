"""Serving over a Ray cluster vs one process, at the same load: SLO attainment, throughput and the
routing overhead per request.

    python scripts/bench_cluster.py [--config fleet.toml] [--rate 2] [--duration 30] [--slo-ttft 2]
                                    [--json OUT]

Runs the same fleet (default: the demo fleet) twice on this machine: `fineserve serve` as one
process, then `fineserve serve --ray` over a two-node Ray cluster started here (`ray start`, one
`fineserve_device` per node, loopback). Both are warmed up before the load. Each gets the same
Poisson workload (streaming completions, models uniform, fixed prompts and max_tokens) from an
asyncio client, and the table shows requests, completed, failed, TTFT p50/p99, attainment of the
TTFT SLO, output tokens/s; then the ingress's own routing time per request (its
`fineserve_proxy_routing_seconds`) and the extra latency of the Ray path per request (median
latency of one-token requests sent one at a time, Ray minus one process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
RAY_PORT = 6390


def start(cmd: list[str], log: Path, env=None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env or os.environ.copy())


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 900) -> list[str]:
    """The served model names once every model answers /v1/models and /health is ok."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return [m["id"] for m in httpx.get(url + "/v1/models", timeout=5).json()["data"]]
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"{url} was not ready in {timeout} s")


async def one(client: httpx.AsyncClient, url: str, model: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "status": r.status_code}
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        return {"ok": False, "status": "stream error"}
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    tokens += 1
    except httpx.HTTPError as e:
        return {"ok": False, "status": type(e).__name__}
    return {"ok": True, "ttft": ttft, "latency": time.perf_counter() - t0, "tokens": tokens}


async def load(url: str, models: list[str], rate: float, duration: float, max_tokens: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, int(rate * duration * 2) + 1))
    arrivals = arrivals[arrivals < duration]
    picks = rng.integers(0, len(models), len(arrivals))
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=1000)) as client:
        t0 = time.perf_counter()

        async def at(t, model):
            await asyncio.sleep(max(0.0, t - (time.perf_counter() - t0)))
            return await one(client, url, model, max_tokens)

        results = await asyncio.gather(*(at(t, models[i]) for t, i in zip(arrivals, picks)))
        wall = time.perf_counter() - t0
    return {"results": results, "wall_s": wall}


async def probe(url: str, models: list[str], n: int) -> float:
    """Median latency (ms) of one-token requests sent one at a time."""
    async with httpx.AsyncClient(timeout=120) as client:
        lat = [(await one(client, url, models[i % len(models)], 1)).get("latency", np.nan) for i in range(n)]
    return float(np.nanmedian(lat) * 1e3)


def summarize(name: str, run: dict, slo: float) -> dict:
    ok = [r for r in run["results"] if r["ok"]]
    ttft = np.array([r["ttft"] for r in ok]) if ok else np.array([np.nan])
    return {"system": name, "requests": len(run["results"]), "completed": len(ok),
            "failed": len(run["results"]) - len(ok), "ttft_p50_s": float(np.nanpercentile(ttft, 50)),
            "ttft_p99_s": float(np.nanpercentile(ttft, 99)),
            "attainment": float(np.mean([r["ok"] and r["ttft"] <= slo for r in run["results"]])),
            "output_tok_s": sum(r["tokens"] for r in ok) / run["wall_s"]}


def routing_ms(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    count = float(re.search(r"^fineserve_proxy_routing_seconds_count (\S+)", text, re.M).group(1))
    total = float(re.search(r"^fineserve_proxy_routing_seconds_sum (\S+)", text, re.M).group(1))
    return total / count * 1e3 if count else float("nan")


def measure(url: str, proc, args) -> tuple[dict, float]:
    models = wait_ready(url, proc)
    asyncio.run(probe(url, models, 3))      # first requests of each model out of the way
    run = asyncio.run(load(url, models, args.rate, args.duration, args.max_tokens, args.seed))
    return run, asyncio.run(probe(url, models, args.probes))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="fleet TOML (default: the demo fleet)")
    ap.add_argument("--rate", type=float, default=2.0, help="requests/s over all models")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT SLO (s) for attainment")
    ap.add_argument("--probes", type=int, default=20, help="one-token requests for the per-request overhead")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--logs", default="/tmp/fineserve-bench-cluster", help="server logs")
    args = ap.parse_args(argv)
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    config = ["--config", args.config] if args.config else []
    summaries, probes = [], {}

    url = "http://127.0.0.1:8301"
    proc = start([str(BIN / "fineserve"), "serve", "--port", "8301", *config], logs / "single.log")
    try:
        run, probes["one process"] = measure(url, proc, args)
        summaries.append(summarize("one process", run, args.slo_ttft))
    finally:
        proc.terminate()
        proc.wait(60)

    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    ray = str(BIN / "ray")
    node = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--resources", '{"fineserve_device": 1}']
    subprocess.run([ray, "start", "--head", "--port", str(RAY_PORT), *node], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = "http://127.0.0.1:8302"
    proc = None
    try:
        subprocess.run([ray, "start", f"--address=127.0.0.1:{RAY_PORT}", *node], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = start([str(BIN / "fineserve"), "serve", "--ray", f"127.0.0.1:{RAY_PORT}", "--port", "8302", *config],
                     logs / "ray.log", env)
        run, probes["Ray Serve (2 nodes)"] = measure(url, proc, args)
        summaries.append(summarize("Ray Serve (2 nodes)", run, args.slo_ttft))
        route = routing_ms(url)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(120)
        subprocess.run([ray, "stop"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    print(f"\n{args.rate} req/s for {args.duration:.0f} s, {args.max_tokens} tokens each, TTFT SLO {args.slo_ttft} s")
    print("| system | requests | completed | failed | TTFT p50 (s) | TTFT p99 (s) | attainment | output tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for s in summaries:
        print(f"| {s['system']} | {s['requests']} | {s['completed']} | {s['failed']} | {s['ttft_p50_s']:.3f} | "
              f"{s['ttft_p99_s']:.3f} | {s['attainment']:.1%} | {s['output_tok_s']:.1f} |")
    extra = probes["Ray Serve (2 nodes)"] - probes["one process"]
    print(f"\nrouting in the ingress: {route:.2f} ms per request; one-token request latency (median): "
          f"{probes['one process']:.1f} ms one process, {probes['Ray Serve (2 nodes)']:.1f} ms Ray "
          f"(+{extra:.1f} ms per request)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summaries": summaries, "probe_ms": probes,
                                               "routing_ms": route, "extra_ms": extra}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
