"""Structured outputs benchmark: do constrained answers validate, and what does the constraint cost?

For each demo model (SmolLM2-135M in bf16, w8a8 and w4a16): --objects JSON answers, a fifth for each
of five schemas (flat, nested objects, enums, arrays, all of them), sampled at temperature 0.8 in
batches of --batch chats; each is parsed and validated against its schema with jsonschema. Then the
cost: --batch requests decoding --tokens tokens each, free or held to a JSON schema that cannot end
early (an array of at least 500 integers), alternated --repeats times; decode throughput of each
(generated tokens per second of wall time, every shape compiled first), and the ratio.

    .venv/bin/python scripts/bench_structured.py [--objects 200] [--batch 16] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jsonschema

from fineserve_jax import LLM, SamplingParams
from fineserve_jax.demo import DEMO_MODEL, DEMO_PRECISIONS

NAME = {"type": "string", "minLength": 1, "maxLength": 20}
SCHEMAS = {
    "flat": {"type": "object", "additionalProperties": False, "required": ["name", "age", "member"],
             "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                            "member": {"type": "boolean"}}},
    "nested": {"type": "object", "additionalProperties": False, "required": ["city", "location"],
               "properties": {"city": NAME, "location": {
                   "type": "object", "additionalProperties": False, "required": ["country", "coordinates"],
                   "properties": {"country": NAME, "coordinates": {
                       "type": "object", "additionalProperties": False, "required": ["lat", "lon"],
                       "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                      "lon": {"type": "number", "minimum": -180, "maximum": 180}}}}}}},
    "enums": {"type": "object", "additionalProperties": False, "required": ["colour", "size", "mood"],
              "properties": {"colour": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L"]},
                             "mood": {"enum": ["happy", "sad", "calm"]}}},
    "arrays": {"type": "object", "additionalProperties": False, "required": ["tags", "scores"],
               "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 4},
                              "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "maxItems": 5}}},
    "mixed": {"type": "object", "additionalProperties": False, "required": ["id", "kind", "items"],
              "properties": {"id": {"type": "integer"}, "kind": {"enum": ["order", "refund"]},
                             "items": {"type": "array", "maxItems": 3, "items": {
                                 "type": "object", "additionalProperties": False, "required": ["sku", "qty"],
                                 "properties": {"sku": NAME, "qty": {"type": "integer", "minimum": 1}}}}}},
}
ASK = {"flat": "Describe a club member.", "nested": "Describe a city and where it is.",
       "enums": "Pick a T-shirt.", "arrays": "Tag and score a film.", "mixed": "Write a shop order."}
LONG = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 500}


def validity(llm: LLM, objects: int, batch: int, max_tokens: int) -> dict:
    per_schema = {}
    for name, schema in SCHEMAS.items():
        n = objects // len(SCHEMAS)
        ok, failures = 0, []
        for start in range(0, n, batch):
            size = min(batch, n - start)
            params = [SamplingParams(temperature=0.8, seed=start + i, max_tokens=max_tokens,
                                     structured_outputs={"json": schema}) for i in range(size)]
            outs = llm.chat([[{"role": "user", "content": ASK[name] + " Answer in JSON."}]] * size, params)
            for out in outs:
                try:
                    jsonschema.validate(json.loads(out.text), schema)
                    ok += 1
                except (ValueError, jsonschema.ValidationError) as e:
                    failures.append({"text": out.text, "finish_reason": out.finish_reason, "error": str(e)[:200]})
        per_schema[name] = {"objects": n, "valid": ok, "failures": failures[:3]}
    return per_schema


def throughput(llm: LLM, batch: int, tokens: int, repeats: int) -> dict:
    prompts = [[{"role": "user", "content": f"List numbers, please ({i})."}] for i in range(batch)]
    free = SamplingParams(temperature=0.8, max_tokens=tokens, ignore_eos=True)
    held = SamplingParams(temperature=0.8, max_tokens=tokens, structured_outputs={"json": LONG})
    llm.chat(prompts[:2], [held] * 2)   # the constrained sampler's variant compiles here, not in the timing
    rates = {"free": [], "constrained": []}
    for _ in range(repeats):
        for label, params in (("free", free), ("constrained", held)):
            t0 = time.perf_counter()
            outs = llm.chat(prompts, [params] * batch)
            wall = time.perf_counter() - t0
            generated = sum(len(o.token_ids) for o in outs)
            assert all(o.finish_reason == "length" for o in outs), [o.finish_reason for o in outs]
            rates[label].append(generated / wall)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"tokens_per_s": rates, "median_tokens_per_s": med, "ratio": med["constrained"] / med["free"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=200, help="per model, spread over the five schemas")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--tokens", type=int, default=64, help="decoded per request in the throughput runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--presets", default=",".join(DEMO_PRECISIONS))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    results = {}
    for preset in args.presets.split(","):
        llm = LLM(DEMO_MODEL, preset, max_model_len=1024, max_num_seqs=args.batch, kv_cache_bytes=64 << 20)
        llm.engine.warmup()
        t0 = time.perf_counter()
        valid = validity(llm, args.objects, args.batch, args.max_tokens)
        cost = throughput(llm, args.batch, args.tokens, args.repeats)
        results[preset] = {"validity": valid, "throughput": cost, "seconds": time.perf_counter() - t0}
        total = sum(v["valid"] for v in valid.values())
        print(f"{preset:>6}: {total}/{sum(v['objects'] for v in valid.values())} valid "
              f"({', '.join(f'{k} {v['valid']}/{v['objects']}' for k, v in valid.items())}); "
              f"batch {args.batch}: free {cost['median_tokens_per_s']['free']:.0f} tok/s, constrained "
              f"{cost['median_tokens_per_s']['constrained']:.0f} tok/s ({cost['ratio']:.0%})", flush=True)
        del llm
    if args.json:
        args.json.write_text(json.dumps({
            "model": DEMO_MODEL, "objects_per_model": args.objects, "batch": args.batch, "tokens": args.tokens,
            "device": str(jax.devices()[0]), "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d"), "results": results}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
