"""Long-context quality of query-aware page selection on SmolLM2-135M (8K context).

    python scripts/eval_sparse.py [--kv bf16,int4] [--contexts 2048,4096,8192] [--budgets 256,512,1024,2048]
                                  [--policies bbox,sink_window,bbox_span] [--tokens-per-page 16]
                                  [--layer-weights 16:0.5:1.5 --policies bbox,bbox+layers]
                                  [--depths 0.1,0.3,0.5,0.7,0.9] [--keys-per-depth 1]
                                  [--json OUT] [--plot OUT.png]

For each KV format, through the serving model code (`PagedForward`, pages with key bounds):
- passkey retrieval: a 5-digit key hidden at depths 10-90% of filler text of 2K, 4K and 8K tokens, asked
  for at the end in a plain completion prompt; greedy answer of 8 tokens; a hit when it holds the key
  (`--keys-per-depth` random keys at each depth: a larger sample resolves smaller differences);
- NLL of held-out text (benchmarks/data/eval_text.txt) over the last `--nll-tokens` tokens of
  8K-token windows (by default every whole window of the text, 3, and 512 tokens each: 1536
  predictions, as fewer swing by more than the 1% the target allows);
for `full` (dense) and each policy (`bbox`, `sink_window`, `bbox_span`; `<policy>+layers` shares the
budget out over the layers by `--layer-weights`, `SparseSpec.layer_weights`) at every budget. The
prompt's last token and every answer token are decode steps, so every predicted token comes from
attention over the selected pages (dense in the first two layers, the engine's default). Each prompt is prefilled once; the variants
continue from that point. Also per variant: the share of KV pages decode attention read (pages
attended over layers and kv heads, as the model counts them) and the selection's recall (selected
pages among that many pages of most dense-attention mass, `page_selection.selection_recall`).
Prints the tables, writes JSON and a plot (passkey accuracy against budget per context length).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from models.loader import load_model
from pallas_kernels.page_selection import SparseSpec
from serving.engine.paged_forward import PagedForward

ROOT = Path(__file__).resolve().parent.parent
PREFILL_CHUNK = 512
ANSWER_TOKENS = 8
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
INTRO = "There is an important pass key hidden inside a lot of irrelevant text. Find it and remember it.\n"
QUESTION = "\nWhat is the pass key? The pass key is"


LAYERS_SUFFIX = "+layers"   # a policy named so shares its budget out by --layer-weights


def variants(budgets: list[int], policies: list[str], layer_weights: tuple[float, ...] | None
             ) -> list[tuple[str, int | None, SparseSpec | None]]:
    """(label, budget, selection) of every variant: full, then each policy at each budget."""
    def spec(label, budget):
        policy = label.removesuffix(LAYERS_SUFFIX)
        return SparseSpec(policy, budget_tokens=budget,
                          layer_weights=layer_weights if label.endswith(LAYERS_SUFFIX) else None)
    return [("full", None, None)] + [(p, b, spec(p, b)) for p in policies for b in budgets]


def parse_layer_weights(text: str, num_layers: int) -> tuple[float, ...]:
    """One weight per layer ("w0,w1,..."), or "K:A:B": A for the layers below K, B from K on."""
    if text.count(":") == 2:
        k, a, b = text.split(":")
        return (float(a),) * int(k) + (float(b),) * (num_layers - int(k))
    return tuple(float(x) for x in text.split(","))


def passkey_prompt(tok, context: int, depth: float, key: str) -> list[int]:
    """Token ids of a prompt of about `context` tokens with the key at `depth` of the filler."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tok.encode(INTRO + needle + QUESTION, add_special_tokens=False))
    filler = tok.encode(FILLER, add_special_tokens=False)
    n = max(0, context - fixed - ANSWER_TOKENS - 4) // len(filler)
    before = int(round(n * depth))
    text = INTRO + FILLER * before + needle + FILLER * (n - before) + QUESTION
    return tok.encode(text, add_special_tokens=False)


def prefill(pf: PagedForward, ids: list[int]) -> None:
    pf.reset()
    for i in range(0, len(ids), PREFILL_CHUNK):
        pf.step(ids[i:i + PREFILL_CHUNK])


class Tally:
    """Pages read and recall over the decode steps of one variant."""

    def __init__(self):
        self.read = self.dense = self.hits = self.selected = 0

    def add(self, pf: PagedForward, dense_pages: int) -> None:
        stats = pf.last_stats
        self.read += int(stats.pages_read.sum())
        self.dense += dense_pages
        self.hits += int(stats.recall_hits.sum())
        self.selected += int(stats.recall_pages.sum())

    def figures(self) -> dict:
        return {"read_share": self.read / self.dense if self.dense else None,
                "recall": self.hits / self.selected if self.selected else None}


def dense_pages(pf: PagedForward) -> int:
    """Pages dense attention reads for one decode step at the current length (all layers, kv heads)."""
    layout = pf.layout
    return layout.pages_for(pf.length) * layout.num_layers * layout.num_kv_heads


def decode(pf: PagedForward, token: int, spec, tally: Tally) -> np.ndarray:
    logits = pf.step([token], sparse=spec)[-1]
    tally.add(pf, dense_pages(pf))
    return logits


def run_passkey(pf, tok, contexts, depths, keys_per_depth, plan, rng, bar) -> list[dict]:
    rows = []
    for context in contexts:
        for depth in [d for d in depths for _ in range(keys_per_depth)]:
            key = str(rng.integers(10000, 100000))
            ids = passkey_prompt(tok, context, depth, key)
            prefill(pf, ids[:-1])
            point = pf.checkpoint()
            for policy, budget, spec in plan:
                pf.restore(point)
                tally, out = Tally(), []
                token = ids[-1]
                for _ in range(ANSWER_TOKENS):
                    token = int(np.argmax(decode(pf, token, spec, tally)))
                    out.append(token)
                answer = tok.decode(out)
                rows.append({"context": context, "prompt_tokens": len(ids), "depth": depth, "policy": policy,
                             "budget": budget, "key": key, "answer": answer, "hit": key in answer,
                             **tally.figures()})
                bar.update(1)
    return rows


def run_nll(pf, ids, windows, context, n, plan, bar) -> list[dict]:
    rows = []
    for w in range(windows):
        window = ids[w * context:(w + 1) * context]
        m = context - n
        prefill(pf, window[:m - 1])
        point = pf.checkpoint()
        for policy, budget, spec in plan:
            pf.restore(point)
            tally, nll = Tally(), []
            for j in range(n):
                logits = decode(pf, window[m - 1 + j], spec, tally).astype(np.float64)
                top = logits.max()
                nll.append(top + np.log(np.exp(logits - top).sum()) - logits[window[m + j]])
            rows.append({"window": w, "policy": policy, "budget": budget, "nll": float(np.mean(nll)),
                         "tokens": n, **tally.figures()})
            bar.update(1)
    return rows


def summarize(kv: str, passkey: list[dict], nll: list[dict], contexts, plan) -> list[dict]:
    out = []
    dense_nll = np.mean([r["nll"] for r in nll if r["policy"] == "full"]) if nll else None
    for policy, budget, _ in plan:
        row = {"kv": kv, "policy": policy, "budget": budget}
        for c in contexts:
            hits = [r["hit"] for r in passkey if r["context"] == c and r["policy"] == policy and r["budget"] == budget]
            row[f"passkey_{c}"] = float(np.mean(hits)) if hits else None
            row[f"prompts_{c}"] = len(hits)
        mine = [r for r in nll if r["policy"] == policy and r["budget"] == budget]
        if mine:
            row["nll"] = float(np.mean([r["nll"] for r in mine]))
            row["delta_nll"] = row["nll"] / dense_nll - 1.0
            row["nll_read_share"] = float(np.mean([r["read_share"] for r in mine]))
            recalls = [r["recall"] for r in mine if r["recall"] is not None]
            row["recall"] = float(np.mean(recalls)) if recalls else None
        out.append(row)
    return out


def table(summary: list[dict], contexts) -> str:
    head = ("| KV | policy | budget | " + " | ".join(f"passkey {c // 1024}K ({summary[0][f'prompts_{c}']})"
                                                      for c in contexts)
            + " | NLL | ΔNLL | pages read (NLL) | recall |")
    lines = [head, "|" + "---|" * (7 + len(contexts))]
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for r in summary:
        lines.append(f"| {r['kv']} | {r['policy']} | {r['budget'] or '-'} | "
                     + " | ".join(fmt(r[f"passkey_{c}"], ".0%") for c in contexts)
                     + f" | {fmt(r.get('nll'), '.4f')} | {fmt(r.get('delta_nll'), '+.2%')} | "
                     f"{fmt(r.get('nll_read_share'), '.1%')} | {fmt(r.get('recall'), '.1%')} |")
    return "\n".join(lines)


def plot(summary: list[dict], contexts, budgets, policies, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kvs = sorted({r["kv"] for r in summary})
    fig, axes = plt.subplots(1, len(kvs), figsize=(6 * len(kvs), 4), squeeze=False)
    for ax, kv in zip(axes[0], kvs):
        for c, color in zip(contexts, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
            for policy, style in zip(policies, ("-o", "--x", "-.s", ":^")):
                ys = [next((r[f"passkey_{c}"] for r in summary if r["kv"] == kv and r["policy"] == policy
                            and r["budget"] == b), None) for b in budgets]
                if None not in ys:   # a policy not run for this KV format has no line
                    ax.plot(budgets, ys, style, color=color, label=f"{policy} {c // 1024}K")
            full = next(r[f"passkey_{c}"] for r in summary if r["kv"] == kv and r["policy"] == "full")
            ax.axhline(full, color=color, linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("budget (tokens)")
        ax.set_ylabel("passkey accuracy")
        ax.set_title(f"SmolLM2-135M, {kv} KV (dotted: full attention)")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--kv", default="bf16,int4", help="KV formats (the bf16 model with that KV cache)")
    ap.add_argument("--contexts", default="2048,4096,8192", help="passkey context lengths ('': none)")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--keys-per-depth", type=int, default=1, help="passkey prompts (random keys) per depth")
    ap.add_argument("--budgets", default="256,512,1024,2048")
    ap.add_argument("--policies", default="bbox,sink_window,bbox_span",
                    help=f"selection policies beside full; one named <policy>{LAYERS_SUFFIX} shares its budget out "
                         f"over the layers by --layer-weights")
    ap.add_argument("--layer-weights", default=None,
                    help='one weight per layer ("w0,w1,...") or "K:A:B" (A below layer K, B from K on)')
    ap.add_argument("--nll-windows", type=int, default=3, help="windows of the held-out text")
    ap.add_argument("--nll-context", type=int, default=8192, help="tokens per window")
    ap.add_argument("--nll-tokens", type=int, default=512, help="tokens scored at the end of each window")
    ap.add_argument("--tokens-per-page", type=int, default=16, help="KV page size (the selection's unit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    contexts = [int(x) for x in args.contexts.split(",") if x]   # none: NLL only
    depths = [float(x) for x in args.depths.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")]
    kvs = args.kv.split(",")
    policies = args.policies.split(",")
    if args.keys_per_depth < 1:
        ap.error("--keys-per-depth must be at least 1")
    if any(p.endswith(LAYERS_SUFFIX) for p in policies) != (args.layer_weights is not None):
        ap.error(f"--layer-weights goes with a policy named <policy>{LAYERS_SUFFIX}, and one needs it")
    try:
        variants(budgets, policies, None)   # names checked before any loading
    except ValueError as e:
        ap.error(str(e))
    prompts = len(contexts) * len(depths) * args.keys_per_depth + args.nll_windows
    runs = len(kvs) * (1 + len(policies) * len(budgets)) * prompts
    bar = tqdm(total=runs, desc="prompts x variants", unit="run")
    t0, results, summary = time.time(), {}, []
    text = (ROOT / "benchmarks" / "data" / "eval_text.txt").read_text()
    for kv in kvs:
        loaded = load_model(args.model, "bfloat16", "bf16", kv_dtype=None if kv == "bf16" else kv)
        tok = loaded.tokenizer
        max_len = loaded.config.max_position_embeddings
        weights = None
        if args.layer_weights is not None:
            try:
                weights = parse_layer_weights(args.layer_weights, loaded.config.num_layers)
                SparseSpec(layer_weights=weights).check_layers(loaded.config.num_layers)
            except ValueError as e:
                raise SystemExit(f"--layer-weights: {e}") from None
        plan = variants(budgets, policies, weights)
        pf = PagedForward(loaded.model, max_len, tokens_per_page=args.tokens_per_page, kv_dtype=kv, key_bounds=True,
                          measure_recall=True, shuffle_pages=False)
        rng = np.random.default_rng(args.seed)
        ids = tok.encode(text, add_special_tokens=False)
        nll_context = min(args.nll_context, max_len)
        if len(ids) < args.nll_windows * nll_context:   # before the passkey runs' minutes
            raise SystemExit(f"the held-out text has {len(ids)} tokens: fewer than {args.nll_windows} windows of "
                             f"{nll_context}")
        passkey = run_passkey(pf, tok, contexts, depths, args.keys_per_depth, plan, rng, bar)
        nll = run_nll(pf, ids, args.nll_windows, nll_context, args.nll_tokens, plan, bar)
        results[kv] = {"preset": loaded.precision.name, "passkey": passkey, "nll": nll}
        summary += summarize(kv, passkey, nll, contexts, plan)
        if args.json:   # after each format, so a long run keeps what it has measured
            Path(args.json).write_text(json.dumps({"model": args.model, "tokens_per_page": args.tokens_per_page,
                                                   "seconds": time.time() - t0, "summary": summary,
                                                   "runs": results}, indent=1))
    bar.close()
    print(table(summary, contexts))
    print(f"\n{time.time() - t0:.0f} s")
    if args.plot:
        plot(summary, contexts, budgets, policies, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
