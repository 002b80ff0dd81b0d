"""Helpers for scripts/client_compat.sh (real benchmark clients against `fineserve serve`).

Subcommands (each run by the interpreter noted; only the standard library is imported at top level):

  export-tokenizer DIR            (.venv)          SmolLM2's tokenizer from the test GGUF as an HF folder
  check-tokenizer DIR             (.venv-clients)  transformers.AutoTokenizer loads it and round-trips text
  openai BASE_URL MODEL ROWS      (.venv)          the official `openai` client: parse() and a strict tool call
  guidellm FILE MODE CONC N ROWS  (any)            one row from a guidellm JSON report
  aiperf DIR MODE CONC N ROWS     (any)            one row from an aiperf artifact folder
  fail CLIENT MODE CONC N WHY ROWS (any)           a row for a run that produced nothing to read
  report ROWS --json OUT          (any)            print the table, write the summary; exit 1 if anything failed

ROWS is a JSON-lines file each step appends its row(s) to."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def append_row(rows: str, **row) -> dict:
    row.setdefault("detail", "")
    row["passed"] = bool(row.get("passed", row.get("requests") is not None
                                 and row.get("ok") == row.get("requests") and not row.get("errors")))
    with open(rows, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    return row


# ---- tokenizer ---------------------------------------------------------------------------------

def export_tokenizer(folder: str) -> None:
    """`Tokenizer.save` writes tokenizer.json, tokenizer_config.json (tokenizer class, bos and eos
    token, add_bos_token, chat template) and generation_config.json: what transformers' AutoTokenizer
    loads. We add `pad_token` (the eos, as SmolLM2's own HF config has it) and `model_max_length` from
    the GGUF's context length (otherwise a 1e30 sentinel)."""
    sys.path.insert(0, str(REPO))
    import gguf

    from models.loader import resolve_model_path
    from models.tokenizer import Tokenizer

    SMOLLM2_GGUF = resolve_model_path("smollm2-135m")   # where setup.sh put it

    if not SMOLLM2_GGUF.exists():
        sys.exit(f"{SMOLLM2_GGUF} is missing: run `bash scripts/setup.sh` first")
    reader = gguf.GGUFReader(str(SMOLLM2_GGUF))
    tok = Tokenizer.from_gguf(reader)
    os.makedirs(folder, exist_ok=True)
    written = tok.save(folder)
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    added = {}
    eos = tok.id_to_token(tok.eos_token_ids[0]) if tok.eos_token_ids else None
    extra = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos}
    ctx = None
    for key in ("llama.context_length",):
        field = reader.get_field(key)
        if field is not None:
            ctx = int(field.parts[field.data[0]][0])
    if ctx:
        extra["model_max_length"] = ctx
    for k, v in extra.items():
        if v is not None and k not in cfg:
            cfg[k] = added[k] = v
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=1)
    print(f"tokenizer: {SMOLLM2_GGUF.name} -> {folder} ({', '.join(written)}; "
          f"added to tokenizer_config.json: {json.dumps(added)})")


def check_tokenizer(folder: str) -> None:
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(folder)
    text = "The quick brown fox jumps over the lazy dog."
    ids = t(text)["input_ids"]
    assert t.decode(ids) == text, (t.decode(ids), text)
    assert t.eos_token_id is not None, "no eos_token_id"
    chat = t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n"), chat
    import transformers

    print(f"AutoTokenizer (transformers {transformers.__version__}): {type(t).__name__}, vocab {len(t)}, "
          f"eos {t.eos_token!r}, {len(ids)} tokens for a {len(text)}-char sentence")


# ---- openai --------------------------------------------------------------------------------------

def openai_checks(base_url: str, model: str, rows: str) -> None:
    from typing import Literal

    import openai
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=24)
        country: str = Field(max_length=24)
        continent: Literal["Africa", "Asia", "Europe", "North America", "Oceania", "South America"]

    class GetWeather(BaseModel):
        """Get the current weather for a city."""
        city: str = Field(max_length=24)
        unit: Literal["celsius", "fahrenheit"]

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)

    def parse():
        r = client.chat.completions.parse(
            model=model, max_tokens=96, temperature=0,
            messages=[{"role": "system", "content": "Answer in JSON."},
                      {"role": "user", "content": "Describe the city of Paris."}],
            response_format=City)
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, City), f"parsed is {type(parsed).__name__}: {r.choices[0].message.content!r}"
        return f"parsed={parsed!r}"

    def tool():
        r = client.chat.completions.parse(
            model=model, max_tokens=96, temperature=0,
            messages=[{"role": "user", "content": "What is the weather like in Berlin right now?"}],
            tools=[openai.pydantic_function_tool(GetWeather)], tool_choice="required")
        calls = r.choices[0].message.tool_calls or []
        assert calls, f"no tool_calls: {r.choices[0].message!r}"
        args = calls[0].function.parsed_arguments
        assert calls[0].function.name == "GetWeather", calls[0].function.name
        assert isinstance(args, GetWeather), f"parsed_arguments is {type(args).__name__}"
        return f"finish={r.choices[0].finish_reason} parsed_arguments={args!r}"

    def parse_stream():  # the SDK's streaming helper for structured outputs
        with client.chat.completions.stream(
                model=model, max_tokens=96, temperature=0,
                messages=[{"role": "user", "content": "Describe the city of Tokyo."}],
                response_format=City) as stream:
            n = sum(1 for _ in stream)
            final = stream.get_final_completion()
        parsed = final.choices[0].message.parsed
        assert isinstance(parsed, City), f"parsed is {type(parsed).__name__}"
        return f"{n} events, parsed={parsed!r}"

    for mode, fn in (("parse(response_format)", parse), ("parse(tools, required)", tool),
                     ("stream(response_format)", parse_stream)):
        t0 = time.monotonic()
        try:
            detail, ok = fn(), True
        except Exception as e:  # noqa: BLE001 - every failure becomes a FAIL row
            body = getattr(e, "body", None)
            detail, ok = f"{type(e).__name__}: {e}" + (f" body={json.dumps(body)}" if body else ""), False
        detail += f" ({time.monotonic() - t0:.1f}s)"
        append_row(rows, client=f"openai {openai.__version__}", mode=mode, concurrency=1, requests=1,
                   ok=int(ok), errors=int(not ok), passed=ok, detail=detail, model=model)
        print(f"openai {mode}: {'ok' if ok else 'FAILED'}: {detail}")


# ---- guidellm / aiperf reports -------------------------------------------------------------------

def guidellm_row(path: str, mode: str, conc: int, n: int, rows: str, version: str) -> None:
    """guidellm's JSON report: benchmarks[].metrics.request_totals (successful/errored/incomplete/total)
    and the per-request lists in benchmarks[].requests.{successful,errored,incomplete}."""
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        (bench,) = report["benchmarks"]
        totals = bench["metrics"]["request_totals"]
        ok, err, inc = int(totals["successful"]), int(totals["errored"]), int(totals["incomplete"])
        detail = ""
        errored = (bench.get("requests") or {}).get("errored") or []
        if errored:
            first = errored[0]
            detail = "first error: " + str((first.get("info") or {}).get("error") or first)[:400]
        out_tok = ((bench["metrics"].get("output_token_count") or {}).get("successful") or {}).get("total_sum")
        if out_tok is not None and not detail:
            detail = f"{int(out_tok)} output tokens in all"
        append_row(rows, client=f"guidellm {version}", mode=mode, concurrency=conc, requests=n, ok=ok,
                   errors=err + inc, passed=(ok == n and err == 0 and inc == 0), detail=detail, report=path)
    except Exception as e:  # noqa: BLE001
        append_row(rows, client=f"guidellm {version}", mode=mode, concurrency=conc, requests=n, ok=0, errors=n,
                   passed=False, detail=f"could not read {path}: {type(e).__name__}: {e}", report=path)


def aiperf_row(folder: str, mode: str, conc: int, n: int, rows: str, version: str) -> None:
    """aiperf's profile_export_aiperf.json: request_count (successful) and error_request_count
    (records with an error), plus error_summary (the distinct errors)."""
    try:
        (path,) = glob.glob(os.path.join(folder, "**", "profile_export_aiperf.json"), recursive=True)
        with open(path, encoding="utf-8") as f:
            report = json.load(f)

        def count(tag):
            v = report.get(tag)
            if isinstance(v, dict):
                v = v.get("avg", v.get("value"))
            return int(v or 0)

        ok, err = count("request_count"), count("error_request_count")
        errs = report.get("error_summary") or []
        if errs:
            detail = "errors: " + json.dumps(errs)[:400]
        else:  # the server's usage (informational: aiperf sends no ignore_eos, so EOS may end one early)
            avg = lambda tag: float((report.get(tag) or {}).get("avg") or 0)  # noqa: E731
            detail = (f"server usage: {avg('usage_prompt_tokens'):.0f} prompt, "
                      f"{avg('usage_completion_tokens'):.1f} completion tokens per request (mean)")
        append_row(rows, client=f"aiperf {version}", mode=mode, concurrency=conc, requests=n, ok=ok,
                   errors=err, passed=(ok == n and err == 0), detail=detail, report=path)
    except Exception as e:  # noqa: BLE001
        append_row(rows, client=f"aiperf {version}", mode=mode, concurrency=conc, requests=n, ok=0, errors=n,
                   passed=False, detail=f"could not read results under {folder}: {type(e).__name__}: {e}",
                   report=folder)


# ---- report --------------------------------------------------------------------------------------

def report(rows_path: str, out: str, meta: list[str]) -> int:
    rows = []
    if os.path.exists(rows_path):
        with open(rows_path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    header = ("client", "mode", "concurrency", "requests", "ok", "errors", "result")
    table = [header] + [(r["client"], r["mode"], str(r["concurrency"]), str(r["requests"]), str(r["ok"]),
                         str(r["errors"]), "PASS" if r["passed"] else "FAIL") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in table[1:]:
        print(line(row))
    failed = [r for r in rows if not r["passed"]]
    for r in failed:
        print(f"FAIL {r['client']} {r['mode']} c={r['concurrency']}: {r['detail']}")
    passed = bool(rows) and not failed
    print(f"{'PASS' if passed else 'FAIL'}: {len(rows) - len(failed)}/{len(rows)} checks passed")
    summary = {"passed": passed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               **dict(kv.split("=", 1) for kv in meta), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    print(f"summary: {out}")
    return 0 if passed else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("export-tokenizer").add_argument("folder")
    sub.add_parser("check-tokenizer").add_argument("folder")
    o = sub.add_parser("openai")
    for a in ("base_url", "model", "rows"):
        o.add_argument(a)
    for name in ("guidellm", "aiperf"):
        s = sub.add_parser(name)
        for a, kind in (("path", str), ("mode", str), ("concurrency", int), ("requests", int), ("rows", str)):
            s.add_argument(a, type=kind)
        s.add_argument("--version", default="")
    f = sub.add_parser("fail")
    for a in ("client", "mode", "concurrency", "requests", "why", "rows"):
        f.add_argument(a)
    r = sub.add_parser("report")
    r.add_argument("rows")
    r.add_argument("--json", required=True)
    r.add_argument("--meta", action="append", default=[], help="KEY=VALUE recorded in the summary")
    a = p.parse_args()
    if a.cmd == "export-tokenizer":
        export_tokenizer(a.folder)
    elif a.cmd == "check-tokenizer":
        check_tokenizer(a.folder)
    elif a.cmd == "openai":
        openai_checks(a.base_url, a.model, a.rows)
    elif a.cmd == "guidellm":
        guidellm_row(a.path, a.mode, a.concurrency, a.requests, a.rows, a.version)
    elif a.cmd == "aiperf":
        aiperf_row(a.path, a.mode, a.concurrency, a.requests, a.rows, a.version)
    elif a.cmd == "fail":
        append_row(a.rows, client=a.client, mode=a.mode, concurrency=int(a.concurrency), requests=int(a.requests),
                   ok=0, errors=int(a.requests), passed=False, detail=a.why)
    elif a.cmd == "report":
        return report(a.rows, a.json, a.meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
