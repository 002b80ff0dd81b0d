"""Engine benchmark: SmolLM2-135M decode throughput at several batch sizes, and where a step's time goes.

For each batch size B, B requests (prompts of --prompt-len tokens) decode --gen-len tokens each.
Per decode step we split wall time into the jitted program (dispatch until the sampled tokens are on
the host) and the host (scheduling, batch building, detokenising, stop checks, Python). Every bucket
is compiled before timing.

    .venv/bin/python scripts/bench_engine.py [--batch-sizes 1 8 32] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np

from fineserve_jax import LLM, SamplingParams


def run(llm: LLM, batch: int, prompt_len: int, gen_len: int, rng) -> dict:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(rng.integers(100, 40000, prompt_len).tolist(), params)
    engine.stats.per_step.clear()
    t0 = time.perf_counter()
    n = sum(1 for _ in engine.run_until_done())
    wall = time.perf_counter() - t0
    decode = [s for s in engine.stats.per_step if not s[0] and s[1] == batch]
    total = sum(s[2] for s in decode)
    device = sum(s[3] for s in decode)
    return {
        "batch": batch,
        "decode_steps": len(decode),
        "step_ms_median": 1e3 * statistics.median(s[2] for s in decode),
        "device_ms_median": 1e3 * statistics.median(s[3] for s in decode),
        "host_ms_median": 1e3 * statistics.median(s[2] - s[3] for s in decode),
        "host_share": (total - device) / total,
        "decode_tokens_per_s": batch * len(decode) / total,
        "end_to_end_tokens_per_s": n / wall,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=max(args.batch_sizes), max_model_len=args.prompt_len + args.gen_len + 16,
              kv_cache_bytes=256 << 20)
    t = time.perf_counter()
    llm.engine.warmup([SamplingParams(temperature=0)])
    print(f"warm-up: {llm.engine.num_compilations} programs in {time.perf_counter() - t:.1f} s")
    rng = np.random.default_rng(0)
    rows = []
    for b in args.batch_sizes:
        compiled = llm.engine.num_compilations
        rows.append(run(llm, b, args.prompt_len, args.gen_len, rng))
        assert llm.engine.num_compilations == compiled, "benchmark compiled during timing"

    print(f"\n{args.model} ({args.dtype}) on {jax.devices()[0].platform} "
          f"({platform.processor() or platform.machine()}), prompt {args.prompt_len}, generate {args.gen_len}\n")
    print("| batch | decode tok/s | step ms | in jitted program ms | host ms | host share | end-to-end tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['decode_tokens_per_s']:.1f} | {r['step_ms_median']:.1f} | "
              f"{r['device_ms_median']:.1f} | {r['host_ms_median']:.2f} | {100 * r['host_share']:.1f}% | "
              f"{r['end_to_end_tokens_per_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "dtype": args.dtype, "device": str(jax.devices()[0]), "prompt_len": args.prompt_len,
                       "gen_len": args.gen_len, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
