"""Quantization quality of every precision preset on held-out text, against the bf16 model.

    python scripts/eval_quality.py [--model smollm2-135m] [--presets bf16,w8a8,...] [--json OUT]

The text (benchmarks/data/eval_text.txt, public domain, see SOURCES.md) is cut into windows of
`--window` tokens; each window is scored in one paged prefill through the serving model code, so
quantized KV pages are written and read back exactly as in serving. For every predicted token:
NLL of the true next token, KL(bf16 || preset) over the vocabulary, and whether the preset's top-1
token equals bf16's. Bytes: all weights as stored on the device, and KV bytes per token (all layers,
K and V, scales included) from the page layout.

Baselines `w4a16-rtn-channel` (naive int4 round-to-nearest, one scale per output channel) and
`w4a16-rtn` (group-wise RTN, no AWQ) show what AWQ's scale search buys. Context rows on request:
`float32` (the bf16 checkpoint computed in float32: how far bf16 arithmetic alone moves the
metrics) and `native` (a pre-quantized checkpoint served in its own format, e.g. GGUF Q4_1 blocks).
Ablations on request (`--presets fireq-ablations` names them all): FireQ's formats with its pieces
removed (`fireq-no-smoothing`: plain RTN; `fireq-channelwise`: no key scaling; `fireq-pre-rope`,
`fireq-post-rope`: one key scaling alone; `fireq` has both; `fireq-kv-int4`: QServe's asymmetric
int4 KV attended in float instead of FireQ's symmetric int4 KV with FP8 queries and P), and int4 KV
alone on bf16 weights under each key scaling (`kv4`, `kv4-pre-rope`, `kv4-post-rope`,
`kv4-rope-aware`; `kv4-fp8-attention`: FireQ's int4_fp8 KV, RoPE-aware); the first layer's KV kept
bf16 (`fireq-first-layer-bf16-kv`, `kv4-rope-aware-first-layer-bf16`); fireq without GPTQ
(`fireq-no-gptq`: AWQ alone); and fireq's error taken apart: its weights alone with and without GPTQ
(`fireq-weights-only[-no-gptq]`: bf16 activations and KV), its weights and FP8 activations over bf16
KV (`fireq-bf16-kv`), its weights and KV with bf16 activations (`fireq-bf16-activations`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from models.loader import load_model
from models.precision import PRESETS, RTN_INT4_GROUPED, RTN_INT4_PER_CHANNEL, layer_kv_dtypes, resolve_precision
from models.quantize import model_weight_bytes
from serving.engine.paged_forward import PagedForward

ROOT = Path(__file__).resolve().parent.parent
_KV4 = resolve_precision("bf16", kv_dtype="int4")
ABLATIONS = {p.name: p for p in (
    dataclasses.replace(PRESETS["fireq"], name="fireq-no-smoothing", calibration=None, kv_scaling="none", gptq=False),
    dataclasses.replace(PRESETS["fireq"], name="fireq-channelwise", kv_scaling="none"),
    dataclasses.replace(PRESETS["fireq"], name="fireq-pre-rope", kv_scaling="pre_rope"),
    dataclasses.replace(PRESETS["fireq"], name="fireq-post-rope", kv_scaling="post_rope"),
    *(dataclasses.replace(_KV4, name=f"kv4{suffix}", kv_scaling=scaling) for suffix, scaling in (
        ("", "none"), ("-pre-rope", "pre_rope"), ("-post-rope", "post_rope"), ("-rope-aware", "rope_aware"))),
    dataclasses.replace(PRESETS["fireq"], name="fireq-kv-int4", kv_format="int4"),
    dataclasses.replace(_KV4, name="kv4-fp8-attention", kv_format="int4_fp8", kv_scaling="rope_aware"),
    dataclasses.replace(PRESETS["fireq"], name="fireq-first-layer-bf16-kv", kv_skip_layers=(0,)),
    dataclasses.replace(PRESETS["fireq"], name="fireq-no-gptq", gptq=False),
    dataclasses.replace(PRESETS["fireq"], name="fireq-weights-only", activation_format=None, kv_format="bf16",
                        kv_scaling="none"),
    dataclasses.replace(PRESETS["fireq"], name="fireq-weights-only-no-gptq", activation_format=None,
                        kv_format="bf16", kv_scaling="none", gptq=False),
    dataclasses.replace(PRESETS["fireq"], name="fireq-bf16-kv", kv_format="bf16", kv_scaling="none"),
    dataclasses.replace(PRESETS["fireq"], name="fireq-bf16-activations", activation_format=None),
    dataclasses.replace(_KV4, name="kv4-rope-aware-first-layer-bf16", kv_scaling="rope_aware", kv_skip_layers=(0,)),
)}
ALL_PRESETS = {**PRESETS, RTN_INT4_PER_CHANNEL.name: RTN_INT4_PER_CHANNEL, RTN_INT4_GROUPED.name: RTN_INT4_GROUPED,
               **ABLATIONS}
ROW_GROUPS = {"fireq-ablations": ["w4a8kv4", "fireq", *ABLATIONS]}
CONTEXT_ROWS = {"float32": {"precision": "bf16", "dtype": "float32"}, "native": {"precision": "native"}}
DEFAULT_PRESETS = ["bf16", "w8a8", "fp8", "w4a16", "w4a8kv4", "fireq", "w4a16-rtn", "w4a16-rtn-channel"]
TARGETS = {  # preset: (max NLL increase over bf16 as a fraction or None, min top-1 agreement)
    "w8a8": (0.01, 0.95), "fp8": (None, 0.95), "w4a16": (None, 0.85), "w4a8kv4": (None, 0.85),
    "fireq": (0.05, 0.75), "kv4-rope-aware": (0.01, 0.85)}


@jax.jit
def _window_metrics(logits, ref_logits, targets):
    """Per-position sums over one batch of windows: NLL, KL(ref || q), top-1 agreement."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    ref_logp = jax.nn.log_softmax(ref_logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
    agree = jnp.argmax(logits, -1) == jnp.argmax(ref_logits, -1)
    return nll.sum(), kl.sum(), agree.sum()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    ap.add_argument("--text", default=str(ROOT / "benchmarks" / "data" / "eval_text.txt"))
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = ap.parse_args(argv)

    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    names = list(dict.fromkeys(m for n in names for m in ROW_GROUPS.get(n, [n])))
    unknown = [n for n in names if n not in ALL_PRESETS and n not in CONTEXT_ROWS]
    if unknown:
        ap.error(f"unknown presets {unknown}; choose from {', '.join([*ALL_PRESETS, *CONTEXT_ROWS, *ROW_GROUPS])}")
    if "bf16" not in names:
        names.insert(0, "bf16")

    models = {}
    for name in tqdm(names, desc="loading and quantizing", unit="preset"):
        spec = CONTEXT_ROWS.get(name, {"precision": ALL_PRESETS.get(name)})
        models[name] = load_model(args.model, spec.get("dtype", args.dtype), spec["precision"],
                                  calib_samples=args.calib_samples)
    tok = models["bf16"].tokenizer
    if tok is None:
        ap.error(f"model {args.model} has no tokenizer")
    ids = tok.encode(Path(args.text).read_text(encoding="utf-8"), add_special_tokens=False)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    n_windows = len(ids) // args.window
    if n_windows < 1:
        ap.error(f"text has {len(ids)} tokens, fewer than one window of {args.window}")
    batch = min(args.batch, n_windows)
    n_windows -= n_windows % batch
    windows = np.asarray(ids[: n_windows * args.window], np.int32).reshape(n_windows, args.window)

    runners = {n: PagedForward(m.model, args.window, batch=batch, tokens_per_page=16, kv_dtype=m.kv_dtype,
                               layer_kv_dtypes=layer_kv_dtypes(m.precision.kv_skip_layers, m.dtype),
                               shuffle_pages=False)
               for n, m in models.items()}
    sums = {n: np.zeros(3) for n in names}
    t0 = time.time()
    for i in tqdm(range(0, n_windows, batch), desc="scoring", unit="batch"):
        chunk = windows[i:i + batch]
        targets = jnp.asarray(chunk[:, 1:])
        runners["bf16"].reset()
        ref = jnp.asarray(runners["bf16"].step(chunk)[:, :-1])
        for n in names:
            if n == "bf16":
                logits = ref
            else:
                runners[n].reset()
                logits = jnp.asarray(runners[n].step(chunk)[:, :-1])
            sums[n] += np.asarray(jax.device_get(_window_metrics(logits, ref, targets)), np.float64)
    count = n_windows * (args.window - 1)

    results = {}
    for n in names:
        nll, kl, agree = sums[n] / count
        m = models[n]
        results[n] = {"nll": nll, "ppl": math.exp(nll), "kl": kl, "top1_agreement": agree,
                      "weight_bytes": model_weight_bytes(m.model),
                      "kv_bytes_per_token": runners[n].layout.bytes_per_token,
                      "weights": m.precision.weight_format, "activations": m.precision.activation_format or "model",
                      "kv": m.kv_dtype + "".join(f", layer {i} {f}" for i, f in runners[n].layout.layer_kv_dtypes)}
    base = results["bf16"]["nll"]
    for n, r in results.items():
        r["nll_increase"] = r["nll"] / base - 1
    checks = {}
    for n, (max_inc, min_top1) in TARGETS.items():
        if n in results:
            r = results[n]
            checks[f"{n} top-1 >= {min_top1:.0%}"] = bool(r["top1_agreement"] >= min_top1)
            if max_inc is not None:
                checks[f"{n} NLL within +{max_inc:.0%}"] = bool(r["nll_increase"] <= max_inc)
    if "w4a16" in results and "w4a16-rtn-channel" in results:
        gap = results["w4a16-rtn-channel"]["nll"] - base
        closed = (results["w4a16-rtn-channel"]["nll"] - results["w4a16"]["nll"]) / gap if gap > 0 else float("nan")
        results["w4a16"]["gap_closed_vs_rtn_channel"] = closed
        checks["w4a16 closes >= 50% of the per-channel RTN gap"] = bool(closed >= 0.5)

    print(f"\n{args.model}: {count} predicted tokens in {n_windows} windows of {args.window} "
          f"({time.time() - t0:.0f} s)\n")
    print("| preset | weights | act | KV | NLL | PPL | dNLL | KL | top-1 | weight MiB | KV B/token |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, r in results.items():
        print(f"| {n} | {r['weights']} | {r['activations']} | {r['kv']} | {r['nll']:.4f} | {r['ppl']:.2f} | "
              f"{r['nll_increase']:+.2%} | {r['kl']:.4f} | {r['top1_agreement']:.2%} | "
              f"{r['weight_bytes'] / 2**20:.1f} | {r['kv_bytes_per_token']} |")
    print()
    for c, ok in checks.items():
        print(f"{'PASS' if ok else 'MISS'}  {c}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "text": str(args.text), "window": args.window, "tokens_scored": count,
            "calib_samples": args.calib_samples, "results": results, "checks": checks}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
