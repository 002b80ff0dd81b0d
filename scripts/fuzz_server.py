"""Fuzz campaign against the OpenAI-compatible server: schemathesis over its OpenAPI schema, then a
concurrent burst with client disconnects; counts of 2xx/4xx/5xx, schema-invalid responses and
KV pages leaked.

Three tiny random models (bf16, w8a8, w4a16, with SmolLM2's tokenizer) share one pool, served as
`fineserve serve` serves them. Every operation gets --examples schema-valid bodies (the `model`
field drawn from the served names, or nearly every valid request would only reach the 404 path)
and --examples schema-invalid ones; every response is checked against the schema's status codes
and bodies. Then --burst concurrent chat requests (streamed and not, some with tools or structured
outputs), a third of them dropped by the client mid-flight. At the end no page may be held.

    .venv/bin/python scripts/fuzz_server.py [--examples 800] [--burst 400] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import random
import threading
import time
from pathlib import Path

import gguf
import httpx
import hypothesis
import hypothesis.strategies as st
import schemathesis
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from fineserve_jax.fleet import Fleet, ModelSpec
from fineserve_jax.serve_app import served_models
from models.config import ModelConfig
from models.loader import random_model, resolve_model_path

from models.tokenizer import Tokenizer
from serving.http.api_server import build_app, make_server

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}}


def start_server(max_model_len: int):
    tok = Tokenizer.from_gguf(gguf.GGUFReader(str(resolve_model_path("smollm2-135m"))))
    models = []
    for i, p in enumerate(("bf16", "w8a8", "w4a16")):
        cfg = ModelConfig("llama", tok.vocab_size, 64, 128, 2 + i, 4, 2, 16, max_position_embeddings=1024)
        m = random_model(cfg, p, "float32", name=f"tiny-{p}", seed=i)
        m.tokenizer = tok
        models.append(m)
    fleet = Fleet([ModelSpec(m, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=max_model_len,
                             tokens_per_page=8) for m in models], "16MiB")
    names = fleet.model_names
    app = build_app(served_models(fleet, slo_ttft_s={n: 30.0 for n in names}, max_queue={n: 64 for n in names}),
                    drain_timeout_s=10)
    server = make_server(app, "127.0.0.1", 0, log_level="error")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return fleet, server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def fuzz(url: str, names: list[str], examples: int) -> dict:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    counts = collections.Counter()
    invalid = []
    for mode in schemathesis.GenerationMode:
        for result in schema.get_all_operations():
            op = result.ok()
            if mode is schemathesis.GenerationMode.NEGATIVE and op.method.upper() == "GET":
                continue   # no parameters to get wrong
            label = f"{op.method.upper()} {op.path} ({mode.value})"

            @hypothesis.settings(max_examples=examples, deadline=None, database=None,
                                 suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.generate])
            @hypothesis.given(case=op.as_strategy(generation_mode=mode), model=st.sampled_from(names))
            def run(case, model):
                if mode is schemathesis.GenerationMode.POSITIVE and isinstance(case.body, dict):
                    case.body["model"] = model
                response = case.call(base_url=url, timeout=120)
                counts[f"{response.status_code // 100}xx"] += 1
                counts["requests"] += 1
                try:
                    case.validate_response(response, checks=CHECKS)
                except Exception as e:  # noqa: BLE001 - recorded, the campaign goes on
                    invalid.append({"operation": label, "status": response.status_code, "error": str(e)[:300]})

            t0 = time.perf_counter()
            run()
            print(f"{label:55} {time.perf_counter() - t0:7.1f} s  total {counts['requests']}", flush=True)
    return {"counts": dict(counts), "schema_invalid": invalid}


async def burst(url: str, names: list[str], n: int, seed: int) -> dict:
    rng = random.Random(seed)
    counts = collections.Counter()

    async def one(client: httpx.AsyncClient, i: int):
        body = {"model": rng.choice(names), "messages": [{"role": "user", "content": f"Say {i}."}],
                "max_tokens": rng.randint(1, 40), "temperature": rng.choice([0.0, 1.0]), "stream": rng.random() < 0.5}
        if rng.random() < 0.2:
            body["response_format"] = {"type": "json_object"}
        disconnect = rng.random() < 1 / 3
        try:
            async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
                async for _ in r.aiter_bytes():
                    if disconnect:
                        break   # the client goes away mid-response
                counts["disconnected" if disconnect else f"{r.status_code // 100}xx"] += 1
        except httpx.HTTPError as e:
            counts[f"client error {type(e).__name__}"] += 1

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=n)) as client:
        await asyncio.gather(*(one(client, i) for i in range(n)))
    return dict(counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=800, help="examples per operation and generation mode")
    ap.add_argument("--burst", type=int, default=400)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    logging.getLogger("fineserve.server").setLevel(logging.ERROR)   # every fuzzed unknown field is logged
    fleet, server, thread, url = start_server(args.max_model_len)
    names = fleet.model_names
    t0 = time.perf_counter()
    campaign = fuzz(url, names, args.examples)
    bursts = asyncio.run(burst(url, names, args.burst, args.seed))
    deadline = time.monotonic() + 60
    runtime = server.fineserve.runtimes[0]
    while time.monotonic() < deadline and any(m["used_pages"] or m["running"] or m["waiting"]
                                              for m in runtime.snapshot["models"].values()):
        time.sleep(0.2)
    leaked = {n: m["used_pages"] for n, m in runtime.snapshot["models"].items()}
    healthy = httpx.get(url + "/health").status_code == 200
    server.handle_exit(15, None)
    thread.join(60)

    c = campaign["counts"]
    print(f"\nschema fuzzing: {c.get('requests', 0)} requests: 2xx {c.get('2xx', 0)}, 4xx {c.get('4xx', 0)}, "
          f"5xx {c.get('5xx', 0)}; schema-invalid responses {len(campaign['schema_invalid'])}")
    print(f"burst of {args.burst}: {bursts}")
    print(f"pages held when idle: {leaked}; healthy after: {healthy}; {time.perf_counter() - t0:.0f} s")
    for bad in campaign["schema_invalid"][:10]:
        print("  invalid:", bad)
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "examples_per_operation": args.examples,
                                         "campaign": campaign, "burst": bursts, "pages_leaked": leaked,
                                         "healthy_after": healthy}, indent=1))
        print(f"wrote {args.json}")
    ok = not c.get("5xx") and not campaign["schema_invalid"] and not any(leaked.values()) and healthy
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
