r"""Measure a model's real step times on the current device and fit its StepCost.

`profile_engine` runs the engine's own jitted ModelRunner on synthetic sequences over a grid of batch
sizes and context lengths (prefill chunks and decode steps): one untimed pass over the grid compiles
every bucket, then `repeats` timed passes; each point's median (or min: `--statistic`) is its
sample. A sample's time is the wall time of `ModelRunner.execute`, what an engine step spends
outside its scheduler: building the padded batch on the host, the jitted forward, greedy sampling
and the sampled tokens' copy to the host. Rows get distinct KV pages, so the attention reads as
many bytes as real sequences would.

`profile_models` loads each model, profiles it, fits it (serving/scheduling/cost_model.py) and saves a
DeviceProfile whose meta holds the fit errors and the raw samples. The shipped CPU profile is made by
(`--statistic min` suits a machine shared with other jobs; docs/scheduling.md):

    .venv/bin/python -m serving.sim.profiler --models smollm2-135m-bf16,smollm2-135m-w8a8,smollm2-135m-w4a16 \
        --quick --statistic min --out serving/scheduling/profiles/cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from models.errors import ModelLoadError
from models.loader import LoadedModel, load_model, random_model
from models.precision import PRESETS, resolve_precision
from serving.scheduling.cost_model import (
    FEATURES_DOC,
    LLAMA3_8B,
    LLAMA3_70B,
    DeviceProfile,
    StepSample,
    fit_step_cost,
    variant_key,
)
from serving.engine.llm_engine import EngineConfig, LLMEngine, engine_with_own_pool
from serving.kv.slab_geometry import slab_bytes_for
from serving.engine.model_runner import PAGES_PER_ATTENTION_BLOCK
from serving.engine.sampling import SamplingParams
from serving.engine.scheduler import StepKind
from serving.engine.sequence import Sequence

RANDOM_SHAPES = {"8b": ("llama3-8b", LLAMA3_8B), "70b": ("llama3-70b", LLAMA3_70B)}  # profile name, config
TOKENS_PER_PAGE = 16
DEFAULT_REPEATS = 5
QUICK_REPEATS = 3
STATISTICS = ("median", "min")


@dataclass(frozen=True)
class ProfileGrid:
    """Steps to time. Every row of a step has the same shape; contexts count the step's tokens."""

    prefill: tuple[tuple[int, int, int], ...]   # (rows, new tokens per row, context per row)
    decode: tuple[tuple[int, int], ...]         # (rows, context per row)

    def __post_init__(self):
        for rows, n, ctx in self.prefill:
            if rows < 1 or n < 1 or ctx < n:
                raise ValueError(f"bad prefill point (rows={rows}, tokens={n}, context={ctx})")
        for rows, ctx in self.decode:
            if rows < 1 or ctx < 1:
                raise ValueError(f"bad decode point (rows={rows}, context={ctx})")

    @property
    def max_tokens_in_flight(self) -> int:
        """KV tokens the largest step holds (the pool must fit them)."""
        return max([r * c for r, _, c in self.prefill] + [r * c for r, c in self.decode])

    @property
    def max_context(self) -> int:
        return max([c for _, _, c in self.prefill] + [c for _, c in self.decode])

    @classmethod
    def for_config(cls, config: EngineConfig, *, quick: bool = False) -> ProfileGrid:
        """Points inside the engine's buckets. Decode: every power-of-two batch up to max_num_seqs
        (quick: 1, 4, 16, max) at contexts from 128 up to 2048 (quick: 1024). Prefill: chunks of 16
        to prefill_chunk tokens (quick: 16, 64, 256, 512) at batch 1 and the largest batch the token
        budget allows (full: every power of two), each at a fresh prompt (context = chunk) and deep
        in a context, so that the attention term separates from the per-token term."""
        top_ctx = min(config.max_model_len, 1024 if quick else 2048)
        contexts = [c for c in ((128, 512, 1024) if quick else (128, 512, 1024, 2048)) if c <= top_ctx]
        max_rows = 1 << (config.max_num_seqs.bit_length() - 1)
        rows_all = [1 << i for i in range(max_rows.bit_length())]
        rows = sorted({r for r in rows_all if r in (1, 4, 16)} | {max_rows}) if quick else rows_all
        decode = tuple((r, c) for r in rows for c in contexts)
        chunks, s = [], 16
        while s <= config.prefill_chunk:
            chunks.append(s)
            s *= 2
        if quick:
            chunks = [c for c in chunks if c in (16, 64, 256, 512)] or chunks[:1]
        prefill = []
        for s in chunks:
            batch_sizes = [r for r in rows_all if r * s <= config.max_num_batched_tokens]
            if quick:
                batch_sizes = sorted({batch_sizes[0], batch_sizes[-1]})
            deep = [c for c in (512, 1024, 2048) if s < c <= top_ctx][-1:] if quick else \
                [c for c in (512, 1024, 2048) if s < c <= top_ctx]
            for b in batch_sizes:
                for ctx in [s] + deep:
                    prefill.append((b, s, ctx))
        return cls(tuple(prefill), decode)


def profile_engine_config(*, max_num_seqs: int = 32, max_num_batched_tokens: int = 512,
                          max_model_len: int = 2048) -> EngineConfig:
    """The engine limits profiled by default: the engine's defaults (chunks of 512 tokens)."""
    return EngineConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                        max_num_batched_tokens=max_num_batched_tokens, prefill_chunk=max_num_batched_tokens)


def build_profile_engine(loaded: LoadedModel, config: EngineConfig, grid: ProfileGrid) -> LLMEngine:
    """An engine over a private pool just large enough for the grid's largest step (distinct pages
    per row, plus one slab of slack for partly used slabs)."""
    layout = loaded.kv_layout(TOKENS_PER_PAGE)
    slab = slab_bytes_for([layout.page_bytes])
    pages = max(layout.pages_for(config.max_model_len),
                max([r * layout.pages_for(c) for r, _, c in grid.prefill] +
                    [r * layout.pages_for(c) for r, c in grid.decode]))
    slabs = -(-pages // (slab // layout.page_bytes)) + 1
    return engine_with_own_pool(loaded.model, config, layout=layout, kv_cache_bytes=slabs * slab, slab_bytes=slab)


def attention_block_tokens(engine: LLMEngine) -> int:
    """Tokens per block of the engine's reference attention loop (the context rounding unit)."""
    return min(PAGES_PER_ATTENTION_BLOCK, engine.runner.table_width) * engine.layout.tokens_per_page


def _synthetic_rows(engine: LLMEngine, rows: int, num_tokens: int, context: int, rng) -> list[Sequence]:
    """Sequences whose next step computes `num_tokens` tokens ending at `context`, with pages for it."""
    seqs = []
    for i in range(rows):
        ids = rng.integers(1, engine.vocab_size, context).tolist()
        seq = Sequence(f"profile-{i}", None, ids, SamplingParams(temperature=0.0), seed=i)
        seq.num_computed = context - num_tokens
        seq.pages = engine.pool.allocator.allocate(engine.pages.model_key, engine.layout.pages_for(context))
        seqs.append(seq)
    return seqs


@dataclass(frozen=True)
class PointTimes:
    """Every timed run of one grid step (seconds, in run order)."""

    is_prefill: bool
    rows: int
    num_tokens: int   # per row
    context: int      # per row, after the step
    seconds: tuple[float, ...]

    def sample(self, statistic: str = "median") -> StepSample:
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        reduce = {"median": statistics.median, "min": min}[statistic]
        return StepSample(self.is_prefill, (self.num_tokens,) * self.rows, (self.context,) * self.rows,
                          reduce(self.seconds))


def measure_engine(engine: LLMEngine, grid: ProfileGrid, *, repeats: int = DEFAULT_REPEATS, seed: int = 0,
                   progress: bool = True, desc: str = "profiling") -> list[PointTimes]:
    """Time every grid step `repeats` times on the engine's jitted ModelRunner.

    The runs are interleaved: one untimed pass over the whole grid (compiles each bucket, warms
    caches), then `repeats` timed passes. A burst of load from other processes then lands on one run
    of many points instead of every run of one point, and a median drops it. The engine must be
    idle (its pool is borrowed for synthetic sequences and handed back)."""
    if engine.has_unfinished_requests():
        raise ValueError("profile an idle engine: it has unfinished requests")
    if repeats < 1:
        raise ValueError(f"repeats must be positive, got {repeats}")
    runner, rng = engine.runner, np.random.default_rng(seed)
    points = [(True, r, n, c) for r, n, c in grid.prefill] + [(False, r, 1, c) for r, c in grid.decode]
    for is_prefill, rows, n, ctx in points:  # fail before compiling anything
        if ctx > engine.config.max_model_len:
            raise ValueError(f"grid context {ctx} exceeds the engine's max_model_len {engine.config.max_model_len}")
        if is_prefill and not runner.prefill_fits([n] * rows):
            raise ValueError(f"prefill of {rows} x {n} tokens is outside the engine's buckets")
        if not is_prefill and rows > runner.max_batch:
            raise ValueError(f"decode batch {rows} exceeds the engine's max_num_seqs")
    times: list[list[float]] = [[] for _ in points]
    with tqdm(total=len(points) * (repeats + 1), desc=desc, disable=not progress, file=sys.stderr) as bar:
        for _ in range(repeats + 1):
            for i, (is_prefill, rows, n, ctx) in enumerate(points):
                seqs = _synthetic_rows(engine, rows, n, ctx, rng)
                try:
                    t0 = time.perf_counter()
                    kind = StepKind.PREFILL if is_prefill else StepKind.DECODE
                    engine.pool.words, _ = runner.execute(engine.pool.words, kind, seqs, [n] * rows)
                    times[i].append(time.perf_counter() - t0)
                finally:
                    for seq in seqs:
                        engine.pool.allocator.free(engine.pages.model_key, seq.pages)
                bar.update()
    return [PointTimes(is_prefill, rows, n, ctx, tuple(t[1:])) for (is_prefill, rows, n, ctx), t in zip(points, times)]


def profile_engine(engine: LLMEngine, grid: ProfileGrid, *, repeats: int = DEFAULT_REPEATS, seed: int = 0,
                   progress: bool = True, statistic: str = "median") -> list[StepSample]:
    """One StepSample per grid step: the median (or min) of its timed runs (see measure_engine)."""
    return [p.sample(statistic) for p in measure_engine(engine, grid, repeats=repeats, seed=seed, progress=progress)]


# ---- whole models ------------------------------------------------------------------------------

@dataclass
class ProfileTarget:
    """One model to profile: a name or path `load_model` accepts (or a loaded model) at a precision."""

    model: str | LoadedModel
    precision: str = "bf16"   # a preset, or "auto"/"native" (the key then names what was loaded)
    name: str | None = None   # the model part of the profile key; default: the model's name
    dtype: str = "bfloat16"
    kv_dtype: str | None = None
    calib_samples: int = 0    # step time does not depend on calibrated values: plain RTN is enough

    @property
    def model_name(self) -> str:
        if self.name:
            return self.name
        return self.model.name if isinstance(self.model, LoadedModel) else Path(str(self.model)).name

    def load(self) -> LoadedModel:
        if isinstance(self.model, LoadedModel):
            return self.model
        return load_model(self.model, self.dtype, self.precision, kv_dtype=self.kv_dtype,
                          calib_samples=self.calib_samples)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_description() -> str:
    """Where a profile was measured: host, device, CPU, jax version."""
    dev = jax.devices()[0]
    device = "CPU" if dev.platform == "cpu" else f"{jax.local_device_count()} x {dev.device_kind}"
    return (f"host {platform.node()}: {device}, {_cpu_model()} ({os.cpu_count()} cores), "
            f"jax {jax.__version__}")


def profile_models(specs: list, device_kind: str, out_path, quick: bool = False, *, grid: ProfileGrid | None = None,
                   config: EngineConfig | None = None, repeats: int | None = None,
                   statistic: str = "median", progress: bool = True) -> DeviceProfile:
    """Load, profile and fit each target (ProfileTarget, or fleet.ModelSpec), save a DeviceProfile to
    `out_path` (None: do not save) and return it. Meta: fit errors, model shapes, raw samples."""
    config = config or profile_engine_config()
    grid = grid or ProfileGrid.for_config(config, quick=quick)
    repeats = repeats or (QUICK_REPEATS if quick else DEFAULT_REPEATS)
    entries, meta_entries = {}, {}
    started = time.perf_counter()
    load_before = _load_average()
    for spec in specs:
        target = _as_target(spec)
        t0 = time.perf_counter()
        loaded = target.load()
        load_seconds = time.perf_counter() - t0
        key = variant_key(target.model_name, loaded.precision.name, 1)
        engine = build_profile_engine(loaded, config, grid)
        measured = measure_engine(engine, grid, repeats=repeats, progress=progress, desc=key)
        samples = [p.sample(statistic) for p in measured]
        cost, errors = fit_step_cost(samples, pad_to_buckets=True, attention_block=attention_block_tokens(engine))
        entries[key] = cost
        meta_entries[key] = {
            "fit_errors": errors,
            "fit_errors_by_statistic": {stat: fit_step_cost([p.sample(stat) for p in measured],
                                                            attention_block=cost.attention_block)[1]
                                        for stat in STATISTICS},
            "load_seconds": round(load_seconds, 2),
            "profile_seconds": round(time.perf_counter() - t0 - load_seconds, 2),
            "ttft_903_seconds": cost.ttft_seconds(903),
            "prefill_seconds_per_token_903": cost.prefill_seconds_per_token(903),
            "model_config": loaded.config.to_dict(),
            "dtype": str(np.dtype(loaded.dtype)),
            "kv_dtype": loaded.kv_dtype,
            "weight_bytes": loaded.precision.weight_bytes(loaded.config),
            "kv_bytes_per_token": engine.layout.bytes_per_token,
            "samples": [s.to_dict() | {"runs": list(p.seconds)} for s, p in zip(samples, measured)],
        }
        del engine, loaded
        gc.collect()
    meta = {"jax_version": jax.__version__, "backend": jax.devices()[0].platform, "quick": quick,
            "repeats": repeats, "statistic": statistic, "features": FEATURES_DOC,
            "total_seconds": round(time.perf_counter() - started, 1),
            "load_average_1min": {"before": load_before, "after": _load_average()},
            "engine_config": dataclasses.asdict(config),
            "timing": f"{statistic} wall time of ModelRunner.execute (host batch building + jitted forward + "
                      "greedy sampling + tokens to host) over interleaved passes, after one untimed pass",
            "entries": meta_entries}
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    profile = DeviceProfile(device_kind, f"measured on {host_description()}, {when}", entries, meta)
    if out_path is not None:
        profile.save(out_path)
    return profile


def _load_average() -> float | None:
    """Other processes' load while profiling (a shared machine's timings are only as good as this)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _as_target(spec) -> ProfileTarget:
    if isinstance(spec, ProfileTarget):
        return spec
    # fineserve_jax.fleet.ModelSpec (duck-typed, so profiling needs no fleet import):
    # its model, precision, KV format and dtype; calibration skipped (it changes values, not time).
    if isinstance(spec.model, LoadedModel):
        return ProfileTarget(spec.model, spec.model.precision.name)
    return ProfileTarget(spec.model, spec.precision, None, spec.dtype, spec.kv_dtype)


# ---- command line ------------------------------------------------------------------------------

def parse_model_variant(text: str) -> ProfileTarget:
    """"smollm2-135m-w4a16" -> ProfileTarget("smollm2-135m", "w4a16") (the suffix names a preset)."""
    base, _, precision = text.strip().rpartition("-")
    if not base or precision not in PRESETS:
        raise ValueError(f"expected <model>-<precision> with precision one of {', '.join(PRESETS)}, got {text!r}")
    return ProfileTarget(base, precision)


def current_device_kind() -> str:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "cpu"
    name = getattr(dev, "device_kind", dev.platform).lower()
    for kind in ("h200", "h100", "a100", "l4", "v5e", "v5p", "v6e"):
        if kind in name.replace(" ", ""):
            return kind
    return name.replace(" ", "-")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fineserve profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated <model>-<precision>, e.g. "
                    "smollm2-135m-bf16,smollm2-135m-w8a8,smollm2-135m-w4a16")
    ap.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES), default=None,
                    help="also profile a random-weight model shaped like Llama-3-8B / 70B (GPU only)")
    ap.add_argument("--precisions", default="bf16", help="comma-separated presets for --random-shape")
    ap.add_argument("--out", default=None, help="profile JSON (default serving/scheduling/profiles/<device>.json)")
    ap.add_argument("--device-kind", default=None, help="name of this device in the profile (default: detected)")
    ap.add_argument("--quick", action="store_true", help="a smaller grid and 3 repeats (minutes on CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per step (default 5; 3 with --quick)")
    ap.add_argument("--statistic", choices=STATISTICS, default="median",
                    help="reduce each step's runs by median (default) or min (the uncontended time, for a "
                         "machine shared with other work)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=2048)
    args = ap.parse_args(argv)

    kind = args.device_kind or current_device_kind()
    try:
        targets = [parse_model_variant(m) for m in args.models.split(",") if m.strip()]
        if args.random_shape:
            shape_name, shape = RANDOM_SHAPES[args.random_shape]
            if jax.devices()[0].platform == "cpu":
                bf16_bytes = resolve_precision("bf16").weight_bytes(shape)
                raise ValueError(f"--random-shape {args.random_shape}: {shape_name} is too big for a CPU "
                                 f"({bf16_bytes / 1e9:.0f} GB of bf16 weights, minutes per "
                                 f"step). Profile it on a GPU, or use the roofline profiles "
                                 f"(scripts/make_roofline_profiles.py)")
            for precision in args.precisions.split(","):
                loaded = random_model(shape, precision.strip(), "bfloat16", name=shape_name)
                targets.append(ProfileTarget(loaded, loaded.precision.name, shape_name))
        if not targets:
            raise ValueError("nothing to profile: give --models and/or --random-shape")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          prefill_chunk=args.max_num_batched_tokens)
    out = Path(args.out or Path("benchmarks") / "profiles" / f"{kind}.json")
    try:
        profile = profile_models(targets, kind, out, quick=args.quick, config=config, repeats=args.repeats,
                                 statistic=args.statistic)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{profile.source}; {profile.meta['total_seconds']} s; wrote {out}")
    for key, info in profile.meta["entries"].items():
        e = info["fit_errors"]
        print(f"  {key}: prefill mean/max rel err {e['prefill_mean_rel_err']:.1%}/{e['prefill_max_rel_err']:.1%}, "
              f"decode {e['decode_mean_rel_err']:.1%}/{e['decode_max_rel_err']:.1%}; "
              f"TTFT(903) {1e3 * info['ttft_903_seconds']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
