"""Gather what `scripts/gpu_check.sh` wrote into OUT/summary.json and OUT/summary.md: each step's
exit status and seconds, and its main figures (kernel checks passed, the kernel targets, the step-time
fits, serving attainment, the sm_90a compile report).

    .venv/bin/python scripts/gpu_check_summary.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def figures(out: Path) -> dict:
    found = {}
    if (check := _load(out / "check_kernels.json")) is not None:
        found["check_kernels"] = {"device": check["device"], "implementation": check["implementation"],
                                  "passed": check["passed"], "failed": check["failed"], "seed": check["seed"]}
    if (bench := _load(out / "bench_kernels.json")) is not None:
        found["kernel_targets"] = [{k: t[k] for k in ("name", "description", "threshold", "value", "met")}
                                   for t in bench["targets"]]
        found["copy_bandwidth"] = bench.get("copy_bandwidth")
    if (profile := _load(out / "profile.json")) is not None:
        fits = profile.get("meta", {}).get("entries", {})
        found["profile"] = {"device_kind": profile["device_kind"], "source": profile["source"],
                            "entries": sorted(profile["entries"]),
                            "fit_errors": {k: {e: v for e, v in m.items() if e.endswith("rel_err")}
                                           for k, m in fits.items() if isinstance(m, dict)}}
    if (serve := _load(out / "bench.json")) is not None:
        found["serving"] = [{k: r[k] for k in ("system", "rate", "slo_attainment", "throughput_tok_s", "finished",
                                               "dropped", "count")} for r in serve["rows"]]
    if (compiled := _load(out / "compile_check.json")) is not None:
        kernels = [k for c in compiled["cases"] for k in c.get("kernels", ())]
        triton = [k for k in kernels if k.get("backend") != "mosaic_gpu"]   # Mosaic GPU: no register figures
        found["compile_check"] = {"cases": len(compiled["cases"]),
                                  "failed": [c["case"] for c in compiled["cases"] if "error" in c],
                                  "spilling": [k["kernel"] for k in triton if k["spill_store_bytes"]],
                                  "max_registers": max((k["registers"] for k in triton), default=None),
                                  "wgmma_kernels": sorted({k["kernel"] for k in kernels if k["mma"] == "wgmma"})}
    return found


def _number(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(steps: list[dict], found: dict) -> str:
    lines = ["# Device check", "", "| step | exit | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['exit']}{' (time limit)' if s['exit'] == 124 else ''} | {s['seconds']} |"
              for s in steps]
    if "check_kernels" in found:
        c = found["check_kernels"]
        lines += ["", f"Kernels vs references ({c['implementation']} on {c['device']['kind']}): "
                      f"{c['passed']} passed, {c['failed']} failed (seed {c['seed']})."]
    if "kernel_targets" in found:
        lines += ["", "| kernel target | threshold | value | met |", "|---|---|---|---|"]
        lines += [f"| {t['description']} | {t['threshold']:g} | {_number(t['value'])} | {t['met']} |"
                  for t in found["kernel_targets"]]
    if "serving" in found:
        lines += ["", "| system | req/s | SLO attainment | tok/s | finished / dropped / all |", "|---|---|---|---|---|"]
        lines += [f"| {r['system']} | {r['rate']:g} | {r['slo_attainment']:.1%} | {r['throughput_tok_s']:.0f} | "
                  f"{r['finished']} / {r['dropped']} / {r['count']} |" for r in found["serving"]]
    if "profile" in found:
        lines += ["", f"Step-time profile ({found['profile']['source']}): {', '.join(found['profile']['entries'])}."]
    if "compile_check" in found:
        c = found["compile_check"]
        lines += ["", f"sm_90a compile report: {c['cases']} cases, {len(c['failed'])} failed, "
                      f"{len(c['spilling'])} kernels spilling, at most {c['max_registers']} registers (Triton "
                      f"kernels); wgmma in {', '.join(c['wgmma_kernels']) or 'none'}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0])
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, rc, seconds = line.split("\t")
        steps.append({"step": name, "exit": int(rc), "seconds": int(seconds)})
    found = figures(out)
    (out / "summary.json").write_text(json.dumps({"steps": steps, **found}, indent=1) + "\n")
    text = markdown(steps, found)
    (out / "summary.md").write_text(text)
    print(text)
    return 0 if all(s["exit"] == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
