"""Serve one prompt through every precision preset in one process, via the offline `LLM` API.

    python scripts/serve_presets.py [--model smollm2-135m] [--prompt "..."] [--calibrate fireq] [--json OUT]

Prints, per preset: the greedy chat answer, load (+ quantization) time, weight MiB and KV bytes per
token (the page layout's, scales included).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from fineserve_jax import LLM, SamplingParams
from models.precision import PRESETS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--calib-samples", type=int, default=8, help="calibration windows (0: round-to-nearest)")
    ap.add_argument("--calibrate", default=None,
                    help="comma-separated presets that get the calibration; the others round to nearest "
                         "(default: every preset)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    calibrated = None if args.calibrate is None else {p.strip() for p in args.calibrate.split(",")}
    rows = []
    for name in [p.strip() for p in args.presets.split(",") if p.strip()]:
        t0 = time.perf_counter()
        samples = args.calib_samples if calibrated is None or name in calibrated else 0
        llm = LLM(args.model, precision=name, max_model_len=512, kv_cache_bytes=32 << 20, max_num_seqs=4,
                  calib_samples=samples)
        load_s = time.perf_counter() - t0
        out = llm.chat([{"role": "user", "content": args.prompt}],
                       SamplingParams(temperature=0, max_tokens=args.max_tokens))[0]
        layout = llm.engine.layout
        rows.append({"preset": name, "answer": out.outputs[0].text, "finish_reason": out.outputs[0].finish_reason,
                     "load_s": round(load_s, 1), "weight_bytes": llm.weight_bytes,
                     "kv_bytes_per_token": layout.bytes_per_token, "kv_dtype": layout.kv_dtype})
        print(f"{name:>8}  {rows[-1]['weight_bytes'] / 2**20:6.1f} MiB  KV {rows[-1]['kv_bytes_per_token']:>5} B/token"
              f"  load {load_s:5.1f} s  {out.outputs[0].text!r}", flush=True)
        del llm
        gc.collect()
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "prompt": args.prompt, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
