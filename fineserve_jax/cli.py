"""The `fineserve` command line: `serve` models over HTTP (OpenAI API), `generate` one prompt,
`batch` a JSONL file of prompts, `quantize` a model into a checkpoint directory that `--model DIR`
(and `LLM(model=DIR)`) serves, `profile` the step times of models on this device, `bench` the
schedulers on a workload."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fineserve_jax import bench, serve
from fineserve_jax.caches import Caches
from fineserve_jax.llm import LLM
from models.checkpoint import is_quantized_checkpoint, save_quantized
from models.errors import ModelLoadError
from models.loader import check_precision, load_model
from models.quantize import model_weight_bytes
from serving.engine.sampling import SamplingParams
from serving.sim import profiler


KV_DTYPE_HELP = "KV cache format overriding the preset's: bf16, fp8, int8, int4, int4_fp8"
KV_SKIP_HELP = "comma-separated layers whose KV stays in the model dtype, e.g. 0 (vLLM's kv_cache_dtype_skip_layers)"


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="known name (smollm2-135m), HF directory or .gguf file")
    p.add_argument("--precision", default="auto",
                   help="auto (the checkpoint as it is), native (auto, but GGUF Q4/Q8 blocks stay quantized), "
                        "or a preset: bf16, w8a8, fp8, w4a16, w4a8kv4, fireq")
    p.add_argument("--kv-dtype", default=None, help=KV_DTYPE_HELP)
    p.add_argument("--kv-skip-layers", type=_layer_list, default=None, help=KV_SKIP_HELP)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kernels", default="auto", choices=["auto", "xla", "pallas", "interpret"],
                   help="kernel implementation: auto (Pallas on a GPU, XLA elsewhere), xla, pallas, interpret")
    p.add_argument("--no-cache", action="store_true",
                   help="do not cache compiled programs and calibrated weights (fineserve_jax/caches.py)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fineserve", description="Serve mixed-precision LLMs with JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    _add_model_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of the text")

    batch = sub.add_parser("batch", help="generate for every prompt of a JSONL file")
    _add_model_args(batch)
    _add_sampling_args(batch)
    batch.add_argument("--input", required=True, help='JSONL: {"prompt": ...} or {"messages": [...]} per line')
    batch.add_argument("--output", required=True)

    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=f"{help_text} (see `fineserve {name} --help`)", add_help=False)

    quant = sub.add_parser("quantize", help="quantize a model and save it as a checkpoint directory")
    quant.add_argument("--model", required=True, help="known name (smollm2-135m), HF directory or .gguf file")
    quant.add_argument("--precision", required=True,
                       help="bf16, w8a8, fp8, w4a16, w4a8kv4 or fireq (auto/native: save as loaded)")
    quant.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    quant.add_argument("--calib-samples", type=int, default=8,
                       help="calibration windows of the shipped text (0: plain round-to-nearest)")
    quant.add_argument("--kv-dtype", default=None, help=KV_DTYPE_HELP)
    quant.add_argument("--kv-skip-layers", type=_layer_list, default=None, help=KV_SKIP_HELP)
    quant.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    quant.add_argument("--force", action="store_true", help="replace an existing checkpoint in --out")
    return parser


def _sampling(args):
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, stop=args.stop, seed=args.seed if args.temperature > 0 else None)


def _llm(args):
    caches = Caches.from_flags(args.no_cache)
    caches.enable_compilation_cache()
    kwargs = {"max_model_len": args.max_model_len, "seed": args.seed, "kv_dtype": args.kv_dtype,
              "kv_skip_layers": args.kv_skip_layers,
              "kernels": args.kernels, "quantized_cache": caches.quantized}
    if args.kv_cache_bytes is not None:
        kwargs["kv_cache_bytes"] = args.kv_cache_bytes
    return LLM(args.model, precision=args.precision, dtype=args.dtype, **kwargs)


def _result_dict(out) -> dict:
    c = out.outputs[0]
    m = out.metrics
    return {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
            "prompt_tokens": len(out.prompt_token_ids),
            "ttft_s": m.ttft if m is not None else None}


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)):
                raise ValueError(f'{path}:{n}: each line needs a "prompt" string or a "messages" list')
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


def cmd_generate(args) -> int:
    params = _sampling(args)
    llm = _llm(args)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = llm.generate([args.prompt], params)[0]
    print(json.dumps(_result_dict(out)) if args.json else out.text)
    return 0


def cmd_batch(args) -> int:
    rows = _read_jsonl(args.input)
    params = _sampling(args)
    llm = _llm(args)
    plain = [(i, r["prompt"]) for i, r in enumerate(rows) if "prompt" in r]
    chats = [(i, r["messages"]) for i, r in enumerate(rows) if "prompt" not in r]
    results: dict[int, dict] = {}
    # One engine run per kind, so all prompts of a kind batch together; tqdm shows progress.
    if plain:
        for (i, _), out in zip(plain, llm.generate([p for _, p in plain], params, use_tqdm=True)):
            results[i] = _result_dict(out)
    if chats:
        for (i, _), out in zip(chats, llm.chat([m for _, m in chats], params, use_tqdm=True)):
            results[i] = _result_dict(out)
    with open(args.output, "w", encoding="utf-8") as f:
        for i in range(len(rows)):
            f.write(json.dumps({"index": i, **results[i]}) + "\n")
    print(f"wrote {len(rows)} results to {args.output}", file=sys.stderr)
    return 0


def cmd_quantize(args) -> int:
    if args.calib_samples < 0:
        raise ValueError(f"--calib-samples must be >= 0, got {args.calib_samples}")
    check_precision(args.precision, args.kv_dtype, args.kv_skip_layers)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):  # checked before the (slow) load; save_quantized re-checks
        if not args.force:
            raise ValueError(f"--out {out} is not empty; pass --force to replace it")
        if not is_quantized_checkpoint(out):
            raise ValueError(f"--out {out} is not empty and is not a fineserve checkpoint; "
                             f"refusing to replace it even with --force")
    loaded = load_model(args.model, args.dtype, args.precision, kv_dtype=args.kv_dtype,
                        calib_samples=args.calib_samples, kv_skip_layers=args.kv_skip_layers)
    path = save_quantized(loaded, out, overwrite=args.force)
    print(f"quantized {args.model} to {loaded.precision.name} (kv {loaded.precision.kv_format}): "
          f"{model_weight_bytes(loaded.model)} weight bytes -> {path}")
    return 0


# Subcommands with their own parsers: `fineserve <name> ...` runs that module's `main(rest)`.
DELEGATED = {
    "serve": (serve.main, "serve models over an OpenAI-compatible HTTP API"),
    "profile": (profiler.main, "measure step times of models on this device and fit the cost model"),
    "bench": (bench.main, "replay a workload on FineServe and the baselines (real or --simulate)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return DELEGATED[argv[0]][0](argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "batch": cmd_batch, "quantize": cmd_quantize}[args.command](args)
    except (ModelLoadError, ValueError, TypeError, OSError) as e:
        print(f"fineserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
