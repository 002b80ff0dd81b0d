"""Engine benchmark: how much host time the device waits for, synchronous vs one step ahead.

For each batch size B, B requests decode --gen-len tokens each, on one model or on three models
sharing the device (stepped in turn), with `async_scheduling` off and on. Every program is
compiled first. Per decode step it reports:

- exposed host ms: the device's idle time before the step's program (launched after the previous
  program had ended): what host work costs the device;
- host ms: the engine's own time in the step, less its waits for tokens;
- decode tok/s, and with the stand-in the share of the device-only bound (tokens over the sum of
  the device's step times).

Two devices: `cpu` runs SmolLM2-135M on this CPU, and a watcher thread stamps the end of each
program; `h100` stands in for an H100 serving Llama-3-8B bf16: a tiny random model runs the real
runner's host work (batches, sampling inputs, dispatch, copies) and a device timeline takes each
step's time from the shipped H100 profile (`serving/scheduling/profiles/h100.json`), so host
time is real and device time is the profile's.

`--mixed` instead measures the decoders' inter-token latency while long prompts arrive, with the
prompts in steps of their own (synchronous and one step ahead) and in mixed steps.

    .venv/bin/python scripts/bench_engine.py [--devices cpu h100] [--batch-sizes 1 8 32 64] [--json OUT]
    .venv/bin/python scripts/bench_engine.py --mixed [--devices cpu h100] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import statistics
import threading
import time

import jax
import numpy as np

from fineserve_jax import Fleet, ModelSpec, SamplingParams
from models.config import ModelConfig
from models.loader import load_model, random_model
from serving.scheduling.cost_model import DeviceProfile
from serving.engine.scheduler import StepKind
from serving.sim.simulator import TimedStep

STAND_IN_MODEL = "llama3-8b"   # the H100 profile entry the stand-in's steps take their time from
# the stand-in's model only does the host work: one small layer, a vocabulary of 512
STAND_IN_CONFIG = ModelConfig("llama", 512, 64, 128, 1, 2, 1, 32, max_position_embeddings=4096)
SPIN_S = 5e-4                  # the stand-in clock spins the last half millisecond of a wait


class PerfClock:
    """The stand-in device's clock: wall time (perf_counter), and when the device ends the steps
    launched so far."""

    def __init__(self):
        self.device_free_at = 0.0

    def __call__(self) -> float:
        return time.perf_counter()

    def wait_until(self, t: float) -> None:
        if t - time.perf_counter() > SPIN_S:
            time.sleep(t - time.perf_counter() - SPIN_S)
        while time.perf_counter() < t:
            pass

    def launch(self, seconds: float) -> float:
        self.device_free_at = max(time.perf_counter(), self.device_free_at) + seconds
        return self.device_free_at


class Timeline:
    """When each program was launched and when the device finished it (a watcher thread waits for
    each in launch order); every runner of the device records here."""

    def __init__(self):
        self.steps: list[list] = []   # [prefill?, rows, launched, done, device seconds]
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._watch, daemon=True).start()

    def launched(self, is_prefill: bool, rows: int, t: float, step, device_seconds: float | None) -> None:
        entry = [is_prefill, rows, t, None, device_seconds]
        self.steps.append(entry)
        self._queue.put((entry, step))

    def _watch(self):
        while True:
            entry, step = self._queue.get()
            step.wait()
            entry[3] = max(time.perf_counter(), getattr(step, "done_at", 0.0))

    def settle(self) -> list[list]:
        while any(e[3] is None for e in self.steps):
            time.sleep(0.001)
        return self.steps


class Recorded:
    """Wraps a model's runner: records its launches on the device's timeline; with a cost (the
    stand-in), each step also takes its device time from it."""

    def __init__(self, runner, timeline: Timeline, cost=None, clock: PerfClock | None = None):
        self.runner, self.timeline, self.cost, self.clock = runner, timeline, cost, clock

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def dispatch(self, pool, kind, seqs, num_tokens):
        context = [s.num_computed + n for s, n in zip(seqs, num_tokens)]
        pool, step = self.runner.dispatch(pool, kind, seqs, num_tokens)
        t = time.perf_counter()   # the program is in the device's queue from here
        seconds = None
        if self.cost is not None:
            seconds = self.cost.step_seconds(kind, num_tokens, context)
            step = TimedStep(self.clock, self.clock.launch(seconds), step)
        self.timeline.launched(kind == StepKind.PREFILL, len(seqs), t, step, seconds)
        return pool, step


def run(fleet: Fleet, batch: int, prompt_len: int, gen_len: int, vocab: int, rng) -> dict:
    """B requests on every model of the fleet, decoded to the end; per full decode step, the device
    idle time before its program (exposed host time), the device time, and the engine's host time."""
    runtime = fleet.runtime
    timeline = next(iter(runtime.engines.values())).runner.timeline
    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    for engine in runtime.engines.values():
        engine.stats.per_step.clear()
        for _ in range(batch):
            engine.add_request(rng.integers(10, vocab, prompt_len).tolist(), params)
    timeline.steps.clear()
    t0 = time.perf_counter()
    tokens = sum(len(out.token_ids) for _, out in runtime.run_until_done() if out.finished)
    wall = time.perf_counter() - t0
    steps = timeline.settle()
    exposed, device = [], []
    for before, step in zip(steps, steps[1:]):
        if not step[0] and step[1] == batch:   # a full decode step
            exposed.append(max(0.0, step[2] - before[3]))
            device.append(step[4] if step[4] is not None else step[3] - max(step[2], before[3]))
    host = [total - waited for e in runtime.engines.values()
            for kind, rows, total, waited in e.stats.per_step if kind == StepKind.DECODE and rows == batch]
    return {"exposed": exposed, "device": device, "host": host, "tokens": tokens, "wall": wall}


def summary(runs: list[dict], batch: int, models: int) -> dict:
    """Medians over the decode steps of all `runs` (repeats of one setting)."""
    exposed = [x for r in runs for x in r["exposed"]]
    device = [x for r in runs for x in r["device"]]
    host = [x for r in runs for x in r["host"]]
    return {
        "batch": batch, "models": models, "decode_steps": len(exposed),
        "exposed_host_ms_median": 1e3 * statistics.median(exposed),
        "exposed_host_ms_mean": 1e3 * statistics.fmean(exposed),
        "host_ms_median": 1e3 * statistics.median(host),
        "device_ms_median": 1e3 * statistics.median(device),
        "decode_tokens_per_s": batch * len(exposed) / (sum(exposed) + sum(device)),
        "device_bound_share": sum(device) / (sum(exposed) + sum(device)),
        "end_to_end_tokens_per_s": sum(r["tokens"] for r in runs) / sum(r["wall"] for r in runs),
    }


def mixed_run(fleet: Fleet, decoders: int, long_prompt: int, interval: float, arrivals: int, vocab: int,
              rng) -> dict:
    """`decoders` requests decode while a `long_prompt`-token prompt arrives every `interval` seconds
    (`arrivals` of them): the decoders' inter-token latencies from the first arrival on, and the long
    prompts' time to first token."""
    engine = next(iter(fleet.runtime.engines.values()))
    limit = engine.config.max_model_len
    decode = SamplingParams(temperature=0, max_tokens=limit - 65, ignore_eos=True)
    ids = [engine.add_request(rng.integers(10, vocab, 64).tolist(), decode) for _ in range(decoders)]
    seqs = [engine.requests[i] for i in ids]
    while min(len(s.output_token_ids) for s in seqs) < 4:   # decoding steadily before the first arrival
        engine.step()
    start = time.time()
    long_seqs = []
    while len(long_seqs) < arrivals or not all(s.is_finished for s in long_seqs):
        if len(long_seqs) < arrivals and time.time() >= start + len(long_seqs) * interval:
            rid = engine.add_request(rng.integers(10, vocab, long_prompt).tolist(),
                                     SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
            long_seqs.append(engine.requests[rid])
        engine.step()
    end = time.time()
    # until every decoder has a token from after the last prompt's: a stall that lasted to the end counts
    while any(s.metrics.token_times[-1] < long_seqs[-1].metrics.finished_time for s in seqs if not s.is_finished):
        engine.step()
    itl = [b - a for s in seqs for a, b in zip(s.metrics.token_times, s.metrics.token_times[1:]) if b >= start]
    if not itl:
        raise RuntimeError("no decoder got a token after the first long prompt arrived: give them more "
                           "max_model_len or fewer arrivals")
    ttft = [s.metrics.ttft for s in long_seqs]
    kinds = [kind for kind, *_ in engine.stats.per_step]
    engine.abort_all()
    return {"decoders": decoders, "long_prompt": long_prompt, "interval_s": interval, "arrivals": arrivals,
            "seconds": end - start, "itl_ms_p50": 1e3 * float(np.percentile(itl, 50)),
            "itl_ms_p99": 1e3 * float(np.percentile(itl, 99)), "itl_ms_max": 1e3 * max(itl),
            "itl_p99_over_p50": float(np.percentile(itl, 99) / np.percentile(itl, 50)),
            "itl_over_2x_p50": float(np.mean(np.asarray(itl) > 2 * np.percentile(itl, 50))),
            "long_ttft_ms_p50": 1e3 * float(np.median(ttft)), "prefill_steps": kinds.count(StepKind.PREFILL),
            "mixed_steps": kinds.count(StepKind.MIXED)}


def build(device: str, models: int, async_scheduling: bool, max_batch: int, max_model_len: int, smollm2,
          mixed_steps: bool = True) -> Fleet:
    """A fleet of `models` copies of the model on one pool, every runner recorded on one timeline."""
    if device == "cpu":
        loaded = smollm2
    else:
        loaded = random_model(STAND_IN_CONFIG, "bf16", "float32", name="stand-in")
    specs = [ModelSpec(loaded, name=f"m{i}", max_num_seqs=max_batch, max_model_len=max_model_len,
                       async_scheduling=async_scheduling, mixed_steps=mixed_steps, enable_prefix_caching=False)
             for i in range(models)]
    fleet = Fleet(specs, pool_bytes=(256 << 20) * models)
    timeline = Timeline()
    cost = DeviceProfile.shipped("h100").get(STAND_IN_MODEL, "bf16") if device == "h100" else None
    clock = PerfClock() if device == "h100" else None
    for engine in fleet.runtime.engines.values():
        engine.warmup([SamplingParams(temperature=0)])
        engine.runner = Recorded(engine.runner, timeline, cost, clock)
    return fleet


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", nargs="+", default=["cpu", "h100"], choices=["cpu", "h100"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--models", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each setting, sync and async alternated")
    ap.add_argument("--mixed", action="store_true",
                    help="instead: --decoders requests decode while --long-prompt-token prompts arrive every "
                         "--interval seconds; the decoders' inter-token latency, with prompts in steps of their "
                         "own (sync and one step ahead) and in mixed steps")
    ap.add_argument("--decoders", type=int, default=16)
    ap.add_argument("--long-prompt", type=int, default=2048)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--arrivals", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.mixed:
        return mixed_main(args)

    smollm2 = load_model("smollm2-135m", "bfloat16") if "cpu" in args.devices else None
    rng = np.random.default_rng(0)
    rows = []
    for device in args.devices:
        for models in args.models:
            vocab = (smollm2.config if device == "cpu" else STAND_IN_CONFIG).vocab_size
            fleets = {mode: build(device, models, mode, max(args.batch_sizes), args.prompt_len + args.gen_len + 16,
                                  smollm2) for mode in (False, True)}
            compiled = {mode: sum(e.num_compilations for e in f.runtime.engines.values()) for mode, f in fleets.items()}
            for b in args.batch_sizes:
                runs = {False: [], True: []}
                for _ in range(args.repeats):   # alternated, so both see the same machine
                    for mode, fleet in fleets.items():
                        runs[mode].append(run(fleet, b, args.prompt_len, args.gen_len, vocab, rng))
                for mode in (False, True):
                    r = summary(runs[mode], b, models)
                    rows.append({"device": device, "async_scheduling": mode, **r})
                    print(f"{device} {models} model(s) async={mode} batch {b}: exposed host "
                          f"{r['exposed_host_ms_median']:.2f} ms, host {r['host_ms_median']:.2f} ms, "
                          f"device {r['device_ms_median']:.2f} ms, {r['end_to_end_tokens_per_s']:.0f} tok/s",
                          flush=True)
            for mode, fleet in fleets.items():
                assert sum(e.num_compilations for e in fleet.runtime.engines.values()) == compiled[mode], \
                    "benchmark compiled during timing"

    print(f"\n{platform.processor() or platform.machine()}, {jax.devices()[0].platform}; prompt {args.prompt_len}, "
          f"generate {args.gen_len}; per full decode step, medians\n")
    print_table(rows, [("device", "{device}"), ("models", "{models}"), ("batch", "{batch}"),
                       ("scheduling", "{scheduling}"), ("exposed host ms", "{exposed_host_ms_median:.2f}"),
                       ("host ms", "{host_ms_median:.2f}"),
                       ("device ms", "{device_ms_median:.2f}"), ("decode tok/s", "{decode_tokens_per_s:.0f}"),
                       ("of device bound", "{device_bound_share:.1%}"),
                       ("end-to-end tok/s", "{end_to_end_tokens_per_s:.0f}")])
    write_json(args.json, rows, prompt_len=args.prompt_len, gen_len=args.gen_len)


def mixed_main(args) -> None:
    smollm2 = load_model("smollm2-135m", "bfloat16") if "cpu" in args.devices else None
    rng = np.random.default_rng(0)
    rows = []
    for device in args.devices:
        vocab = (smollm2.config if device == "cpu" else STAND_IN_CONFIG).vocab_size
        for mode, mixed in ((False, False), (True, False), (True, True)):
            fleet = build(device, 1, mode, 2 * args.decoders, 4096, smollm2, mixed)   # room for the long prompts
            r = mixed_run(fleet, args.decoders, args.long_prompt, args.interval, args.arrivals, vocab, rng)
            rows.append({"device": device, "async_scheduling": mode, "prompts": "mixed steps" if mixed else
                         "own steps", **r})
            print(f"{device} async={mode} mixed={mixed}: ITL p50 {r['itl_ms_p50']:.1f} ms, p99 {r['itl_ms_p99']:.1f} "
                  f"ms ({r['itl_p99_over_p50']:.2f}x), max {r['itl_ms_max']:.1f} ms, long-prompt TTFT p50 "
                  f"{r['long_ttft_ms_p50']:.0f} ms", flush=True)
    print(f"\n{args.decoders} requests decoding while a {args.long_prompt}-token prompt arrives every "
          f"{args.interval:g} s ({args.arrivals} of them)\n")
    print_table(rows, [("device", "{device}"), ("scheduling", "{scheduling}"), ("prompts in", "{prompts}"),
                       ("decode ITL p50 ms", "{itl_ms_p50:.1f}"),
                       ("p99 ms", "{itl_ms_p99:.1f}"), ("max ms", "{itl_ms_max:.1f}"),
                       ("p99 / p50", "{itl_p99_over_p50:.2f}"), ("ITLs over 2x p50", "{itl_over_2x_p50:.1%}"),
                       ("long-prompt TTFT p50 ms", "{long_ttft_ms_p50:.0f}"),
                       ("prefill / mixed steps", "{prefill_steps} / {mixed_steps}")])
    write_json(args.json, rows, mixed=True)


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """A markdown table of `rows`, one column per (header, format of the row's fields); `scheduling`
    names the row's mode."""
    print("| " + " | ".join(header for header, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        scheduling = "one step ahead" if r["async_scheduling"] else "sync"
        print("| " + " | ".join(cell.format(**r, scheduling=scheduling) for _, cell in columns) + " |")


def write_json(path: str | None, rows: list[dict], **meta) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({**meta, "stand_in": STAND_IN_MODEL, "machine": platform.machine(),
                       "date": time.strftime("%Y-%m-%d"), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
