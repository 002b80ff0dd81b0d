"""Prefix caching benchmark: multi-turn chats that share a long system prompt, with the cache off and on.

Each of --conversations chats opens with the same system prompt (--system-tokens of held-out text)
and goes --turns turns: a question, the model's greedy answer, the next question over the whole
history, as chat clients send it. Every request's TTFT is its prefill time (one request at a time,
every shape compiled first). With the cache on, a turn prefills only what is new since the last
turn (and the first turn of later chats skips the system prompt). The cache-on run puts the
cache-off run's answers in its history, so both runs see the same prompts and their answers can be
compared turn by turn. Prints a table and writes JSON.

    .venv/bin/python scripts/bench_prefix_cache.py [--conversations 3] [--turns 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
from tqdm.auto import tqdm

from fineserve_jax import LLM, SamplingParams

TEXT = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "eval_text.txt"
QUESTIONS = ["Summarise the text above in one sentence.", "Who is the main subject?", "Name one date it mentions.",
             "What happens next, do you think?", "Give the text a title.", "List three nouns from it.",
             "Is the tone formal?", "Write one question about it."]


def system_prompt(llm: LLM, tokens: int) -> str:
    tok = llm.get_tokenizer()
    ids = tok.encode(TEXT.read_text(), add_special_tokens=False)[:tokens]
    return "Answer questions about this text.\n\n" + tok.decode(ids)


def run(llm: LLM, system: str, conversations: int, turns: int, max_tokens: int, label: str,
        history: list[str] | None = None) -> dict:
    """The chats; `history`: the assistant turns to put in the history (another run's answers, so
    both runs see the same prompts), else this run's own."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    ttfts, prompt_lens, answers, texts = [], [], [], []
    with tqdm(total=conversations * turns, desc=label, unit="turn") as bar:
        for c in range(conversations):
            messages = [{"role": "system", "content": system}]
            for t in range(turns):
                messages.append({"role": "user", "content": QUESTIONS[(c + t) % len(QUESTIONS)]})
                out = llm.chat(messages, params)[0]
                ttfts.append(out.metrics.ttft)
                prompt_lens.append(len(out.prompt_token_ids))
                answers.append(out.token_ids)
                texts.append(out.text)
                messages.append({"role": "assistant", "content": history[len(texts) - 1] if history else out.text})
                bar.update()
    cache = llm.engine.pages.cache
    return {"ttft_s": ttfts, "ttft_p50_s": statistics.median(ttfts), "ttft_mean_s": statistics.fmean(ttfts),
            "prompt_tokens": prompt_lens, "answers": answers, "texts": texts,
            "hit_tokens": cache.hit_tokens if cache else 0, "queried_tokens": cache.queried_tokens if cache else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype (float32: a tighter exactness check)")
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--system-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    results = {}
    for caching in (False, True):
        label = "cache on" if caching else "cache off"
        llm = LLM(args.model, args.precision, args.dtype, max_model_len=4096, max_num_seqs=4,
                  kv_cache_bytes=256 << 20, enable_prefix_caching=caching)
        t0 = time.perf_counter()
        llm.engine.warmup()
        print(f"{label}: compiled {llm.engine.runner.num_buckets} shapes in {time.perf_counter() - t0:.0f} s")
        results[label] = run(llm, system_prompt(llm, args.system_tokens), args.conversations, args.turns,
                             args.max_tokens, label, results["cache off"]["texts"] if caching else None)
        del llm
    off, on = results["cache off"], results["cache on"]
    same = sum(a == b for a, b in zip(on["answers"], off["answers"]))
    tokens = sum(len(a) for a in off["answers"])
    agree = sum(x == y for a, b in zip(on["answers"], off["answers"]) for x, y in zip(a, b)) / tokens
    print(f"\n{'':10} {'TTFT p50 (ms)':>14} {'TTFT mean (ms)':>15} {'prompt tokens':>14} {'reused':>8}")
    for label, r in results.items():
        reused = r["hit_tokens"] / r["queried_tokens"] if r["queried_tokens"] else 0.0
        print(f"{label:10} {1e3 * r['ttft_p50_s']:14.1f} {1e3 * r['ttft_mean_s']:15.1f} "
              f"{sum(r['prompt_tokens']):14d} {reused:8.1%}")
    speedup = off["ttft_p50_s"] / on["ttft_p50_s"]
    print(f"\nTTFT p50 {speedup:.1f}x lower with the cache; greedy answers identical: {same} of {len(off['answers'])} "
          f"(same prompts; {agree:.1%} of answer tokens agree position by position)")
    if args.json:
        args.json.write_text(json.dumps({
            "model": args.model, "precision": args.precision, "conversations": args.conversations,
            "turns": args.turns, "system_tokens": args.system_tokens, "max_tokens": args.max_tokens,
            "device": str(jax.devices()[0]), "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d"), "dtype": args.dtype, "ttft_p50_speedup": speedup,
            "answers_identical": same, "answers": len(off["answers"]), "answer_tokens_agreeing": agree,
            "runs": {k: {key: v for key, v in r.items() if key not in ("answers", "texts")}
                     for k, r in results.items()}},
            indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
