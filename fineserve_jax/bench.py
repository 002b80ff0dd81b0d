"""`fineserve bench`: replay one workload on FineServe and on every baseline, side by side.

Systems (what each changes; everything else is the same code):
  fineserve  FineServe placement (arXiv 2509.06261), one shared KV Slab pool per device, SAAB
             admission (SLO-aware, early drop), latency-aware earliest-deadline-first model stepping.
  prism      Prism-style KV-pressure placement (arXiv 2505.04021), one shared pool, FCFS, round-robin.
  muxserve   MuxServe-style greedy placement (arXiv 2404.02015), per-model KV quotas in a bf16
             head-wise pool, FCFS, round-robin.
  static     dedicated devices / static partitions, per-model pools, FCFS, round-robin.
  fineserve-replan  (`--drift flip` only) FineServe that re-places the models when the observed rates
             drift from plan (`serving.sim.simulator.simulate_replanning`).

`--simulate` runs them in the discrete-event simulator (`serving.sim.simulator`) on a cluster such as
16xH100 with Llama-3-8B- and 70B-sized models and a shipped device profile; without it, the demo fleet
serves the workload for real on this machine. Output: a table per sweep, `--json OUT`, PNG plots
(`--plots DIR`). Design notes: docs/scheduling.md; results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import sys
import time
from pathlib import Path

from tqdm import tqdm

from fineserve_jax.demo import demo_fleet_specs, demo_profile_key
from fineserve_jax.fleet import Fleet
from models.loader import load_model
from models.config import ModelConfig
from models.precision import resolve_precision
from serving.scheduling.local_scheduling import LocalScheduling
from serving.scheduling.cost_model import DEVICES, PROFILE_DIR, ROOFLINE_MODELS, DeviceProfile
from serving.scheduling.demand import Device, ModelDemand, PlacementError, SchedulerConfig
from serving.scheduling.slo import fineserve_slo_of
from serving.scheduling.strategies import place
from serving.sim.replay import WallClock, replay
from serving.sim.simulator import SystemPolicy, simulate_placement, simulate_replanning
from serving.scheduling.step_policy import STEP_POLICIES
from serving.scheduling.slo import SLO
from serving.sim.metrics import format_table, summarize
from serving.sim.workload import (AZURE_KINDS, TraceLengths, Workload, azure_workload, popularity_flip,
                              synthetic_workload)

SYSTEMS = ("fineserve", "prism", "muxserve", "static")
REPLAN_SYSTEM = "fineserve-replan"
DRIFTS = ("none", "flip")
WORKLOADS = ("poisson", "gamma", "azure-conv", "azure-code")
# Best-effort planning: a baseline that cannot place the offered rates is planned for this share of them.
PLAN_RATE_FACTORS = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1)
TARGET_ATTAINMENT = 0.9


# ---------------------------------------------------------------------------------------------------
# Workloads


def build_workload(kind: str, models: list[str], total_rate: float, *, alpha: float, cv: float,
                   duration_s: float, seed: int, lengths=None, drift: str = "none") -> Workload:
    """`total_rate` requests/s over `models` with power-law popularity `alpha`. Azure kinds replay the
    trace's arrivals and lengths, time-compressed to `total_rate`; Poisson and Gamma arrivals draw
    (prompt, output) pairs from the Azure conv trace unless `lengths` is given (production lengths,
    with outputs of at most 1,000 tokens, where a fitted lognormal's tail would set the makespan).
    `drift="flip"` (Poisson/Gamma): the popularity order reverses halfway (`popularity_flip`)."""
    if drift not in DRIFTS:
        raise ValueError(f"unknown drift {drift!r}; choose from {DRIFTS}")
    if kind in ("poisson", "gamma"):
        make = popularity_flip if drift == "flip" else synthetic_workload
        return make(models, total_rate, alpha, cv=1.0 if kind == "poisson" else cv, duration_s=duration_s,
                    lengths=lengths or TraceLengths.from_azure("conv"), seed=seed)
    if drift != "none":
        raise ValueError(f"--drift {drift} needs a synthetic workload (poisson or gamma), not {kind!r}")
    trace = kind.removeprefix("azure-")
    if trace not in AZURE_KINDS:
        raise ValueError(f"unknown workload {kind!r}; choose from {WORKLOADS}")
    full = azure_workload(models, trace, alpha, seed=seed)
    scale = total_rate / full.total_rate
    return azure_workload(models, trace, alpha, seed=seed, duration_s=duration_s * scale, rate_scale=scale)


# ---------------------------------------------------------------------------------------------------
# Simulated cluster


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    count: int
    kind: str
    per_node: int = 8

    @classmethod
    def parse(cls, text: str) -> "ClusterSpec":
        m = re.fullmatch(r"(\d+)x([A-Za-z0-9]+)", text.strip())
        if not m or int(m.group(1)) < 1:
            raise ValueError(f"--cluster must look like 16xH100, got {text!r}")
        return cls(int(m.group(1)), m.group(2).lower())


def paper_models():
    """The simulated model mix: Llama-3-8B twice at each of four precisions, Llama-3-70B once at each."""
    precisions = ("bf16", "w4a16", "fp8", "w4a8kv4")
    mix = [(f"8b-{p}-{i}", "llama3-8b", p) for i in (0, 1) for p in precisions]
    return mix + [(f"70b-{p}", "llama3-70b", p) for p in precisions]


def _base_tp(config: ModelConfig, precision: str, device_bytes: int) -> int:
    """The smallest TP whose weight share fits in 70% of a device (the SLO's 'base TP')."""
    weights = resolve_precision(precision).weight_bytes(config)
    return next((tp for tp in (1, 2, 4, 8) if weights / tp <= 0.7 * device_bytes), 8)


def simulated_setup(cluster: ClusterSpec, slo_scale: float):
    if cluster.kind not in DEVICES:
        raise ValueError(f"unknown device kind {cluster.kind!r}; known: {sorted(DEVICES)}")
    profile = DeviceProfile.shipped(cluster.kind)
    if profile is None:
        raise ValueError(f"no {cluster.kind} profile ships in {PROFILE_DIR}")
    spec = DEVICES[cluster.kind]
    devices = [Device(f"{cluster.kind}-{i}", cluster.kind, int(spec.memory_bytes), node=i // cluster.per_node)
               for i in range(cluster.count)]
    models = paper_models()
    slo_ttft = {name: fineserve_slo_of(profile.get(model, p, _base_tp(ROOFLINE_MODELS[model], p, spec.memory_bytes)),
                                       slo_scale)
                for name, model, p in models}
    return profile, devices, models, slo_ttft


def run_simulated(system: str, workload: Workload, profile, devices, models, slo_ttft: dict[str, float],
                  plan_rates: dict[str, float] | None = None, step_policy: str = "edf"):
    """Place (best effort) for `plan_rates` (default: the workload's mean rates) and simulate one system;
    returns (summary, notes)."""
    stats = workload.stats()
    strategy = "fineserve" if system == REPLAN_SYSTEM else system
    config = SchedulerConfig(tp_rule="min_devices") if strategy == "fineserve" else None

    def demands_for(rates: dict[str, float], factor: float = 1.0) -> list[ModelDemand]:
        return [ModelDemand.from_config(name, ROOFLINE_MODELS[model], p, max(rates.get(name, 0.0), 1e-3) * factor,
                                        slo_ttft[name], profile_model=model,
                                        mean_prompt=max(1, int(stats["prompt_mean"])),
                                        mean_output=max(1, int(stats["output_mean"])))
                for name, model, p in models]

    notes, placement = [], None
    for factor in PLAN_RATE_FACTORS:
        try:
            placement = place(strategy, demands_for(plan_rates or workload.rates_by_model(), factor), devices,
                              profile, config)
            break
        except PlacementError as e:
            notes.append(f"planned for {factor:.0%} of the offered rate failed: {str(e)[:160]}")
    if placement is None:
        raise PlacementError(f"{system}: no placement even at {PLAN_RATE_FACTORS[-1]:.0%} of the rates")
    if notes:
        notes.append(f"placed for {factor:.0%} of the offered rates")
    policy = SystemPolicy("saab", step_policy) if strategy == "fineserve" else SystemPolicy("fcfs", "round_robin")
    slos = {name: SLO(slo_ttft[name]) for name, _, _ in models}
    if system == REPLAN_SYSTEM:
        records, events = simulate_replanning(placement, profile, workload.requests, slos, demands_for, policy,
                                              rate_scale=factor, plan_factors=PLAN_RATE_FACTORS)
        notes += [f"re-placed at {e.time_s:g} s for {e.planned_share:.0%} of the observed rates (drift "
                  f"{', '.join(f'{m} {d:+.0%}' for m, d in e.drift.items())}); moved {list(e.moved)}"
                  for e in events] or ["no re-placement"]
    else:
        records = simulate_placement(placement, profile, workload.requests, slos, policy)
    return summarize(records, slos, duration_s=workload.duration_s), notes


# ---------------------------------------------------------------------------------------------------
# Real engine on this machine (the demo fleet)


def run_real(system: str, workload: Workload, specs, profile, slo_ttft: dict[str, float], *, pool_bytes: str,
             step_policy: str = "edf"):
    """Serve `workload` for real with the models of `specs` on this device; returns (summary, notes)."""
    rates = workload.rates_by_model()
    specs = [dataclasses.replace(s, kv_share=max(rates.get(s.served_name, 0.0), 1e-3))
             if system == "muxserve" else s for s in specs]
    slos = {s.served_name: SLO(slo_ttft[s.served_name]) for s in specs}
    if system == "fineserve":  # SAAB with early drop, (latency-aware) EDF stepping
        costs = {name: profile.get(*demo_profile_key(name), 1) for name in slos}
        scheduling = LocalScheduling("saab", step_policy, slos, costs)
    else:
        scheduling = LocalScheduling("fcfs", "round_robin", slos)  # FCFS, models take turns
    fleet = Fleet(specs, pool_bytes, pool_mode="static" if system in ("static", "muxserve") else "slab",
                  scheduling=scheduling)
    for engine in fleet.runtime.engines.values():
        engine.warmup()
    clock = WallClock()
    with tqdm(total=len(workload.requests), desc=f"{system} (real)", leave=False) as bar:
        records = replay(fleet.runtime, workload.requests, clock, clock.wait_until, progress=bar.update)
    stats = [engine.stats for engine in fleet.runtime.engines.values()]
    dense = sum(s.decode_kv_bytes_dense for s in stats)
    share = sum(s.decode_kv_bytes_read for s in stats) / dense if dense else None
    return dataclasses.replace(summarize(records, slos, duration_s=workload.duration_s), kv_read_share=share), []


# ---------------------------------------------------------------------------------------------------
# Sweeps, table, JSON, plots


def _row(system, rate, slo_scale, summary, notes, seconds):
    o = summary.to_dict()["overall"]
    return {"system": system, "rate": rate, "slo_scale": slo_scale, "slo_attainment": o["slo_attainment"],
            "goodput_attainment": o["goodput_attainment"], "throughput_tok_s": o["throughput_tok_s"],
            "finished": o["finished"], "dropped": o["dropped"], "count": o["count"], "notes": notes,
            "wall_seconds": seconds, "summary": summary.to_dict()}


def comparison(rows: list[dict], systems: list[str]) -> dict:
    """At the highest rate where FineServe holds TARGET_ATTAINMENT at the base SLO scale (the rate
    sweep's; the scale sweep runs at the top rate only): each baseline's attainment and FineServe's
    ratio to it (FineServe's targets: >= 2.5x static, >= 1.3x MuxServe and Prism)."""
    base_scale = rows[0]["slo_scale"] if rows else None
    fs = [r for r in rows if r["system"] == "fineserve" and r["slo_scale"] == base_scale
          and r["slo_attainment"] >= TARGET_ATTAINMENT]
    if not fs:
        return {"rate": None, "note": f"FineServe never reached {TARGET_ATTAINMENT:.0%} attainment in this sweep"}
    best = max(fs, key=lambda r: r["rate"])
    out = {"rate": best["rate"], "slo_scale": best["slo_scale"], "fineserve": best["slo_attainment"], "ratios": {}}
    for s in systems:
        if s == "fineserve":
            continue
        match = [r for r in rows if r["system"] == s and r["rate"] == best["rate"] and r["slo_scale"] == best["slo_scale"]]
        if match:
            att = match[0]["slo_attainment"]
            out[s] = att
            out["ratios"][s] = best["slo_attainment"] / att if att > 0 else float("inf")
    targets = {"static": 2.5, "muxserve": 1.3, "prism": 1.3}
    out["targets_met"] = {s: out["ratios"][s] >= t for s, t in targets.items() if s in out["ratios"]}
    return out


def plot(rows: list[dict], systems: list[str], out_dir: Path, title: str) -> list[str]:
    import matplotlib  # heavy, and only for --plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    base_scale = rows[0]["slo_scale"] if rows else None
    rate_rows = [r for r in rows if r["slo_scale"] == base_scale]
    base_rate = max((r["rate"] for r in rows), default=None)
    for metric, label, fname, x, subset in (
            ("slo_attainment", "SLO attainment", "attainment_vs_rate.png", "rate", rate_rows),
            ("throughput_tok_s", "throughput (output tokens/s)", "throughput_vs_rate.png", "rate", rate_rows),
            ("slo_attainment", "SLO attainment", "attainment_vs_slo_scale.png", "slo_scale",
             [r for r in rows if r["rate"] == base_rate])):
        xs = sorted({r[x] for r in subset})
        if len(xs) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in systems:
            pts = sorted((r[x], r[metric]) for r in subset if r["system"] == s)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
        ax.set_xlabel("total request rate (req/s)" if x == "rate" else "SLO scale")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(str(path))
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fineserve bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--simulate", action="store_true", help="run in the simulator on --cluster")
    p.add_argument("--cluster", default="16xH100", help="simulated devices, e.g. 16xH100 or 8xH200")
    p.add_argument("--workload", default="poisson", choices=WORKLOADS)
    p.add_argument("--rates", default=None, help="total request rates to sweep (req/s), comma-separated")
    p.add_argument("--slo-scales", default=None, help="SLO scales to sweep at the highest rate")
    p.add_argument("--alpha", type=float, default=0.9, help="power-law popularity exponent across models")
    p.add_argument("--cv", type=float, default=1.0, help="arrival CV for --workload gamma")
    p.add_argument("--drift", default="none", choices=DRIFTS,
                   help="flip: popularity reverses halfway; systems plan on the first half and "
                        f"{REPLAN_SYSTEM} re-places on drift (with --simulate)")
    p.add_argument("--duration", type=float, default=None, help="seconds of arrivals")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--step-policy", default="edf", choices=STEP_POLICIES,
                   help="FineServe's step policy over co-located models (edf: latency-aware; edf_strict, "
                        "round_robin: ablations); the baselines always take turns")
    p.add_argument("--pool-bytes", default="256MiB", help="real runs: the KV pool of the demo fleet")
    p.add_argument("--sparse", default=None, type=json.loads,
                   help='real runs: page selection for every demo model, as JSON, e.g. '
                        '\'{"policy": "bbox", "budget_tokens": 256}\' (the "KV read %%" column shows its effect)')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every summary here")
    p.add_argument("--plots", default=None, help="directory for PNG plots")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    known = SYSTEMS + ((REPLAN_SYSTEM,) if args.drift != "none" else ())
    bad = [s for s in systems if s not in known]
    if bad:
        raise SystemExit(f"unknown systems {bad}; choose from {known}")
    if args.sparse is not None and args.simulate:
        raise SystemExit("--sparse applies to real runs (the simulator does not model page selection)")
    if args.drift != "none":
        if not args.simulate or args.workload not in ("poisson", "gamma"):
            raise SystemExit("--drift needs --simulate and a poisson or gamma workload")
        if "fineserve" in systems and REPLAN_SYSTEM not in systems:
            systems.insert(systems.index("fineserve") + 1, REPLAN_SYSTEM)
    floats = lambda text: [float(x) for x in text.split(",")] if text else None
    if args.simulate:
        cluster = ClusterSpec.parse(args.cluster)
        rates = floats(args.rates) or [10.0, 20.0, 40.0, 60.0, 80.0]
        scales = floats(args.slo_scales) or [5.0]
        duration = args.duration or 60.0
        title = f"simulated {cluster.count}x{cluster.kind.upper()}, {args.workload}, alpha={args.alpha}" + \
            (", popularity flips halfway" if args.drift == "flip" else "")
    else:
        rates = floats(args.rates) or [2.0, 4.0, 8.0]
        scales = floats(args.slo_scales) or [40.0]
        duration = args.duration or 30.0
        title = f"real run on {_host()}, demo fleet, {args.workload}, alpha={args.alpha}"
    rows, summaries = [], {}
    jobs = [(s, r, scales[0]) for r in rates for s in systems] + \
           [(s, max(rates), sc) for sc in scales[1:] for s in systems]
    bar = tqdm(jobs, desc="bench", unit="run")
    setups = {}
    demo_specs = None
    for system, rate, scale in bar:
        bar.set_postfix_str(f"{system} @ {rate:g} req/s, SLO x{scale:g}")
        t0 = time.perf_counter()
        if args.simulate:
            if scale not in setups:
                setups[scale] = simulated_setup(cluster, scale)
            profile, devices, models, slo_ttft = setups[scale]
            names = [m[0] for m in models]
            workload = build_workload(args.workload, names, rate, alpha=args.alpha, cv=args.cv,
                                      duration_s=duration, seed=args.seed, drift=args.drift).truncated(8000, 8192)
            plan_rates = None
            if args.drift != "none":  # what was known before the drift: the first half's rates
                first = [r for r in workload.requests if r.arrival_s < duration / 2]
                plan_rates = Workload(first, duration / 2).rates_by_model()
            summary, notes = run_simulated(system, workload, profile, devices, models, slo_ttft, plan_rates,
                                           args.step_policy)
        else:
            if scale not in setups:
                setups[scale] = real_setup(scale, demo_specs)
            specs, profile, slo_ttft = setups[scale]
            if args.sparse is not None:
                specs = [dataclasses.replace(s, sparse=args.sparse) for s in specs]
            demo_specs = specs  # loaded once, reused by every system and scale
            names = [s.served_name for s in specs]
            workload = build_workload(args.workload, names, rate, alpha=args.alpha, cv=args.cv,
                                      duration_s=duration, seed=args.seed).truncated(768, 1024)
            summary, notes = run_real(system, workload, specs, profile, slo_ttft, pool_bytes=args.pool_bytes,
                                      step_policy=args.step_policy)
        rows.append(_row(system, rate, scale, summary, notes, time.perf_counter() - t0))
        summaries[(system, rate, scale)] = summary
        tqdm.write(f"{system:>10} rate {rate:g} SLO x{scale:g}: attainment {rows[-1]['slo_attainment']:.1%}, "
                   f"{rows[-1]['throughput_tok_s'] or 0:.0f} tok/s" + (f"  [{notes[-1]}]" if notes else ""))
    for scale in scales:
        for rate in sorted({r["rate"] for r in rows if r["slo_scale"] == scale}):
            table = {s: summaries[(s, rate, scale)] for s in systems if (s, rate, scale) in summaries}
            print(f"\n### {title}: {rate:g} req/s, SLO scale {scale:g}\n")
            print(format_table(table))
    result = {"title": title, "command": "fineserve bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "rows": rows, "comparison": comparison(rows, systems)}
    print("\ncomparison:", json.dumps(result["comparison"], indent=1))
    if args.plots:
        result["plots"] = plot(rows, systems, Path(args.plots), title)
        print("plots:", ", ".join(result["plots"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print("wrote", args.json)
    return 0


def real_setup(slo_scale: float, specs=None):
    """Demo fleet specs (models loaded once, here, unless `specs` already holds them: every system's
    fleet reuses the weights), this machine's profile and FineServe SLOs from it."""
    path = PROFILE_DIR / "cpu.json"
    if not path.exists():
        raise SystemExit(f"no CPU profile at {path}; run `fineserve profile` first")
    profile = DeviceProfile.load(path)
    if specs is None:
        specs = [dataclasses.replace(s, precision="auto", model=load_model(
            s.model, s.dtype, s.precision, kv_dtype=s.kv_dtype, calib_samples=s.calib_samples,
            kv_skip_layers=s.kv_skip_layers))
            for s in tqdm(demo_fleet_specs(), desc="loading the demo fleet", leave=False)]
    slo_ttft = {}
    for s in specs:
        slo_ttft[s.served_name] = fineserve_slo_of(profile.get(*demo_profile_key(s.served_name), 1), slo_scale)
    return specs, profile, slo_ttft


def _host() -> str:
    return platform.node() or "this machine"


if __name__ == "__main__":
    sys.exit(main())
