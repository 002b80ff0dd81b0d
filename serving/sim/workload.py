"""Request workloads for multi-model serving benchmarks: arrivals, model popularity, lengths, traces.

A workload is a list of requests (model, arrival time, prompt length, output length) over a time
window. Prompts carry no text: a replay sends synthetic prompts of the given token counts and forces
the output lengths (ignore EOS, max_tokens = output_len).

Sources:
- Arrivals: Poisson, or a Gamma renewal process with a given coefficient of variation (AlpaServe and
  FineServe; vLLM's ``--burstiness b`` is shape b, i.e. CV = 1/sqrt(b)).
- Popularity: MuxServe's power law (arXiv 2404.02015), rate of model i proportional to (i + 1)^-alpha.
- Azure LLM inference traces 2023 (Azure/AzurePublicDataset, CC-BY 4.0; the data behind Splitwise,
  Patel et al., ISCA 2024): one hour of a conversation service and one of a coding service, copied
  into serving/sim/traces/azure_llm_2023/.
- ShareGPT-like lengths: mean prompt 161 and output 338 tokens (vLLM and MuxServe papers). Only the
  means are published, so the synthetic sampler is a lognormal with those means and an assumed spread.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

AZURE_KINDS = ("conv", "code")
# Package data (a wheel installs it too).
AZURE_DATA_DIR = Path(str(resources.files(__package__).joinpath("traces", "azure_llm_2023")))

# ShareGPT first turns (vLLM paper, also MuxServe's cost model): mean prompt / output tokens.
SHAREGPT_MEAN_PROMPT = 161
SHAREGPT_MEAN_OUTPUT = 338
# Assumed lognormal spread: median = mean * exp(-sigma^2 / 2) ~ 0.61 x mean, a moderate right tail.
SHAREGPT_LOGNORMAL_SIGMA = 1.0

_JSON_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Request:
    request_id: str
    model: str
    arrival_s: float   # seconds from the start of the workload
    prompt_len: int    # tokens
    output_len: int    # tokens to generate

    def __post_init__(self):
        if not (math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise ValueError(f"request {self.request_id!r}: arrival_s must be finite and >= 0, got {self.arrival_s}")
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"request {self.request_id!r}: prompt_len and output_len must be >= 1, "
                             f"got {self.prompt_len} and {self.output_len}")


@dataclass
class Workload:
    requests: list[Request]  # sorted by arrival time (sorted on construction, ties keep their order)
    duration_s: float        # the window the arrivals were drawn from: rates are counts / duration_s
    description: str = ""

    def __post_init__(self):
        if not (math.isfinite(self.duration_s) and self.duration_s >= 0):
            raise ValueError(f"duration_s must be finite and >= 0, got {self.duration_s}")
        self.requests = sorted(self.requests, key=lambda r: r.arrival_s)
        if self.requests and self.requests[-1].arrival_s > self.duration_s:
            raise ValueError(f"a request arrives at {self.requests[-1].arrival_s} s, after the workload's "
                             f"duration_s {self.duration_s}")
        repeated = [rid for rid, n in Counter(r.request_id for r in self.requests).items() if n > 1]
        if repeated:
            raise ValueError(f"request ids must be unique; repeated: {repeated[:5]}")

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def models(self) -> list[str]:
        """Models with at least one request, most requests first (ties in order of first arrival)."""
        counts = Counter(r.model for r in self.requests)  # Counter keeps first-insertion order
        return sorted(counts, key=lambda m: -counts[m])

    @property
    def total_rate(self) -> float:
        return len(self.requests) / self.duration_s if self.duration_s > 0 else 0.0

    def rates_by_model(self) -> dict[str, float]:
        """Mean arrival rate (req/s) of each model over the workload's duration, most popular first."""
        counts = Counter(r.model for r in self.requests)
        return {m: (counts[m] / self.duration_s if self.duration_s > 0 else 0.0) for m in self.models}

    def scaled(self, rate_scale: float) -> Workload:
        """The same requests with time compressed by rate_scale (rates multiplied by it), as AlpaServe's
        rate_scale does for replayed traces."""
        _check_positive("rate_scale", rate_scale)
        return Workload([dataclasses.replace(r, arrival_s=r.arrival_s / rate_scale) for r in self.requests],
                        self.duration_s / rate_scale, _join(self.description, f"rate x{rate_scale:g}"))

    def for_models(self, models: Iterable[str]) -> Workload:
        """Only the requests of the given models (duration unchanged, so their rates are unchanged)."""
        wanted = _check_models(models)
        keep = set(wanted)
        return Workload([r for r in self.requests if r.model in keep], self.duration_s,
                        _join(self.description, f"models {','.join(wanted)}"))

    def truncated(self, max_prompt: int | Mapping[str, int], max_total: int | Mapping[str, int]) -> Workload:
        """Lengths clipped to fit a model's context: prompt <= max_prompt (and <= max_total - 1, so at least
        one token can be generated), prompt + output <= max_total. Each limit is one number for all models
        or a mapping model -> limit covering every model in the workload."""
        limits_prompt = _per_model_limit("max_prompt", max_prompt, self.models, minimum=1)
        limits_total = _per_model_limit("max_total", max_total, self.models, minimum=2)
        clipped = []
        for r in self.requests:
            prompt = min(r.prompt_len, limits_prompt[r.model], limits_total[r.model] - 1)
            output = min(r.output_len, limits_total[r.model] - prompt)
            clipped.append(dataclasses.replace(r, prompt_len=prompt, output_len=output))
        return Workload(clipped, self.duration_s, _join(self.description, "truncated"))

    def stats(self) -> dict:
        """Counts, rates, mean lengths and inter-arrival CV, for logging next to results."""
        gaps = np.diff([r.arrival_s for r in self.requests])
        cv = float(gaps.std() / gaps.mean()) if len(gaps) > 1 and gaps.mean() > 0 else None
        prompts = np.array([r.prompt_len for r in self.requests], dtype=float)
        outputs = np.array([r.output_len for r in self.requests], dtype=float)
        return {"requests": len(self.requests), "duration_s": self.duration_s, "rate": self.total_rate,
                "rates_by_model": self.rates_by_model(), "interarrival_cv": cv,
                "prompt_mean": float(prompts.mean()) if len(prompts) else None,
                "output_mean": float(outputs.mean()) if len(outputs) else None}

    def to_json(self) -> str:
        return json.dumps({"format_version": _JSON_FORMAT_VERSION, "description": self.description,
                           "duration_s": self.duration_s,
                           "requests": [dataclasses.asdict(r) for r in self.requests]})

    @classmethod
    def from_json(cls, text: str) -> Workload:
        data = json.loads(text)
        if data.get("format_version") != _JSON_FORMAT_VERSION:
            raise ValueError(f"unsupported workload format_version {data.get('format_version')!r}")
        return cls([Request(**r) for r in data["requests"]], data["duration_s"], data["description"])

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def read_json(cls, path: str | Path) -> Workload:
        return cls.from_json(Path(path).read_text())


# --- arrivals ---------------------------------------------------------------------------------------

def poisson_arrivals(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (s, sorted) of a Poisson process of `rate` req/s on [0, duration_s)."""
    return gamma_arrivals(rate, 1.0, duration_s, rng)


def gamma_arrivals(rate: float, cv: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (s, sorted) on [0, duration_s) of a renewal process whose gaps are Gamma with mean
    1/rate and coefficient of variation cv: shape 1/cv^2, scale cv^2/rate. cv = 1 is Poisson; cv > 1 is
    burstier (many near-zero gaps, a few long ones)."""
    _check_nonnegative("rate", rate)
    _check_positive("cv", cv)
    _check_nonnegative("duration_s", duration_s)
    if rate == 0 or duration_s == 0:
        return np.zeros(0)
    shape = 1.0 / cv**2
    scale = cv**2 / rate
    expected = rate * duration_s
    # Draw gaps in chunks a little larger than the expected count (count sd ~ cv * sqrt(expected)).
    chunk = int(expected + 6 * cv * math.sqrt(expected)) + 16
    times, last = [], 0.0
    while last < duration_s:
        t = last + np.cumsum(rng.gamma(shape, scale, size=chunk))
        times.append(t)
        last = float(t[-1])
    all_times = np.concatenate(times)
    return all_times[all_times < duration_s]


# --- popularity -------------------------------------------------------------------------------------

def power_law_shares(num_models: int, alpha: float) -> np.ndarray:
    """Traffic shares (sum 1) with share_i proportional to (i + 1)^-alpha (MuxServe); alpha 0 is uniform."""
    if num_models < 1:
        raise ValueError(f"need at least one model, got {num_models}")
    _check_nonnegative("alpha", alpha)
    weights = np.arange(1, num_models + 1, dtype=float) ** -alpha
    return weights / weights.sum()


def power_law_rates(total_rate: float, models: Sequence[str], alpha: float) -> dict[str, float]:
    """Per-model rates (req/s) summing to total_rate, rate_i proportional to (i + 1)^-alpha, in the
    given model order (most popular first). MuxServe fixes the top model's rate instead (40 x scale
    req/s): total_rate = top_rate / power_law_shares(n, alpha)[0] gives the same split."""
    models = _check_models(models)
    _check_nonnegative("total_rate", total_rate)
    return dict(zip(models, (total_rate * power_law_shares(len(models), alpha)).tolist()))


# --- lengths ----------------------------------------------------------------------------------------

@runtime_checkable
class LengthSampler(Protocol):
    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n (prompt_len, output_len) pairs as two int64 arrays, every value >= 1."""
        ...


@dataclass(frozen=True)
class FixedLengths:
    prompt_len: int
    output_len: int

    def __post_init__(self):
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"lengths must be >= 1, got prompt {self.prompt_len}, output {self.output_len}")

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return np.full(n, self.prompt_len, dtype=np.int64), np.full(n, self.output_len, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class TraceLengths:
    """(prompt, output) pairs drawn with replacement from a trace, keeping each pair together (prompt and
    output lengths are correlated)."""
    prompt_lens: np.ndarray
    output_lens: np.ndarray

    def __post_init__(self):
        prompts = np.asarray(self.prompt_lens, dtype=np.int64)
        outputs = np.asarray(self.output_lens, dtype=np.int64)
        if prompts.shape != outputs.shape or prompts.ndim != 1 or prompts.size == 0:
            raise ValueError("prompt_lens and output_lens must be non-empty 1-D arrays of the same length")
        if prompts.min() < 1 or outputs.min() < 1:
            raise ValueError("trace lengths must be >= 1")
        object.__setattr__(self, "prompt_lens", prompts)
        object.__setattr__(self, "output_lens", outputs)

    @classmethod
    def from_azure(cls, kind: str, data_dir: str | Path = AZURE_DATA_DIR) -> TraceLengths:
        _, prompts, outputs = read_azure_csv(kind, data_dir)
        return cls(prompts, outputs)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.integers(0, self.prompt_lens.size, size=n)
        return self.prompt_lens[idx], self.output_lens[idx]


@dataclass(frozen=True)
class LognormalLengths:
    """Independent lognormal prompt and output lengths with the given means (rounded, at least 1)."""
    prompt_mean: float
    output_mean: float
    prompt_sigma: float = SHAREGPT_LOGNORMAL_SIGMA
    output_sigma: float = SHAREGPT_LOGNORMAL_SIGMA

    def __post_init__(self):
        for name in ("prompt_mean", "output_mean"):
            _check_positive(name, getattr(self, name))
        for name in ("prompt_sigma", "output_sigma"):
            _check_nonnegative(name, getattr(self, name))

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        def draw(mean, sigma):
            # E[lognormal(mu, sigma)] = exp(mu + sigma^2 / 2), so mu = ln(mean) - sigma^2 / 2.
            values = rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, size=n)
            return np.maximum(np.rint(values), 1).astype(np.int64)
        return draw(self.prompt_mean, self.prompt_sigma), draw(self.output_mean, self.output_sigma)


def sharegpt_like_lengths() -> LognormalLengths:
    """Lognormal lengths with ShareGPT's published means (prompt 161, output 338 tokens)."""
    return LognormalLengths(SHAREGPT_MEAN_PROMPT, SHAREGPT_MEAN_OUTPUT)


# --- workloads --------------------------------------------------------------------------------------

def synthetic_workload(models: Sequence[str], total_rate: float, alpha: float, cv: float = 1.0,
                       duration_s: float = 60.0, lengths: LengthSampler | Mapping[str, LengthSampler] | None = None,
                       seed: int = 0) -> Workload:
    """Independent Gamma(rate_i, cv) arrivals per model (Poisson for cv = 1) with power-law rates
    (power_law_rates), lengths from one sampler or one per model (default ShareGPT-like). Each model has
    its own random stream derived from the seed. Request ids are the arrival order, "000000", ..."""
    models = _check_models(models)
    _check_nonnegative("duration_s", duration_s)
    samplers = _per_model_sampler(lengths if lengths is not None else sharegpt_like_lengths(), models)
    rates = power_law_rates(total_rate, models, alpha)
    _check_positive("cv", cv)
    arrivals, owners, prompts, outputs = [], [], [], []
    for model, child in zip(models, np.random.SeedSequence(seed).spawn(len(models))):
        rng = np.random.default_rng(child)
        times = gamma_arrivals(rates[model], cv, duration_s, rng)
        p, o = samplers[model].sample(len(times), rng)
        arrivals.append(times)
        owners += [model] * len(times)
        prompts.append(p)
        outputs.append(o)
    times = np.concatenate(arrivals)
    prompts, outputs = np.concatenate(prompts), np.concatenate(outputs)
    width = max(6, len(str(len(times))))
    requests = [Request(f"{i:0{width}d}", owners[j], float(times[j]), int(prompts[j]), int(outputs[j]))
                for i, j in enumerate(np.argsort(times, kind="stable"))]
    return Workload(requests, float(duration_s),
                    f"synthetic: {len(models)} models, {total_rate:g} req/s, alpha {alpha:g}, cv {cv:g}, "
                    f"{duration_s:g} s, seed {seed}")


def popularity_flip(models: Sequence[str], total_rate: float, alpha: float, cv: float = 1.0,
                    duration_s: float = 120.0, lengths: LengthSampler | Mapping[str, LengthSampler] | None = None,
                    seed: int = 0) -> Workload:
    """Drifting rates: `synthetic_workload` over `models` for the first half of the window, then over
    them in reverse order (the most popular model becomes the least popular) for the second half."""
    models = _check_models(models)
    half = duration_s / 2
    first = synthetic_workload(models, total_rate, alpha, cv, half, lengths, seed)
    second = synthetic_workload(models[::-1], total_rate, alpha, cv, half, lengths, seed + 1)
    joined = first.requests + [dataclasses.replace(r, arrival_s=r.arrival_s + half) for r in second.requests]
    width = max(6, len(str(len(joined))))
    return Workload([dataclasses.replace(r, request_id=f"{i:0{width}d}") for i, r in enumerate(joined)],
                    float(duration_s), f"popularity flip at {half:g} s: " + first.description)


def read_azure_csv(kind: str, data_dir: str | Path = AZURE_DATA_DIR) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Azure 2023 trace as (seconds since its first row, prompt lengths, output lengths)."""
    if kind not in AZURE_KINDS:
        raise ValueError(f"unknown Azure trace kind {kind!r}; expected one of {AZURE_KINDS}")
    path = Path(data_dir) / f"{kind}.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} has no rows")
    # "2023-11-16 18:15:46.6805900": numpy parses ISO times to nanoseconds, more than the file's 100 ns.
    stamps = np.array([row["TIMESTAMP"].strip().replace(" ", "T") for row in rows], dtype="datetime64[ns]")
    seconds = (stamps - stamps[0]).astype(np.int64) / 1e9
    prompts = np.array([int(row["ContextTokens"]) for row in rows], dtype=np.int64)
    outputs = np.array([int(row["GeneratedTokens"]) for row in rows], dtype=np.int64)
    return seconds, prompts, outputs


def azure_trace(kind: str, *, start_s: float = 0.0, duration_s: float | None = None, rate_scale: float = 1.0,
                model: str | None = None, data_dir: str | Path = AZURE_DATA_DIR) -> Workload:
    """An Azure LLM 2023 trace ("conv" or "code") as a one-model workload (model defaults to
    "azure-<kind>"). The window [start_s, start_s + duration_s) of trace time (seconds from the first
    row; to the last row when duration_s is None) is shifted to start at 0, then compressed by
    rate_scale. Request ids are "<kind>-<row index in the file>"."""
    if kind not in AZURE_KINDS:
        raise ValueError(f"unknown Azure trace kind {kind!r}; expected one of {AZURE_KINDS}")
    _check_nonnegative("start_s", start_s)
    _check_positive("rate_scale", rate_scale)
    if duration_s is not None:
        _check_positive("duration_s", duration_s)
    seconds, prompts, outputs = read_azure_csv(kind, data_dir)
    if duration_s is None:
        window = max(float(seconds[-1]) - start_s, 0.0)
        keep = seconds >= start_s
    else:
        window = float(duration_s)
        keep = (seconds >= start_s) & (seconds < start_s + duration_s)
    model = model if model is not None else f"azure-{kind}"
    rows = np.flatnonzero(keep)
    requests = [Request(f"{kind}-{i}", model, float((seconds[i] - start_s) / rate_scale), int(prompts[i]),
                        int(outputs[i])) for i in rows]
    description = f"Azure LLM 2023 {kind} trace, [{start_s:g}, {start_s + window:g}) s"
    if rate_scale != 1.0:
        description += f", rate x{rate_scale:g}"
    return Workload(requests, window / rate_scale, description)


def azure_workload(models: Sequence[str], kind: str, alpha: float, *, seed: int = 0, start_s: float = 0.0,
                   duration_s: float | None = None, rate_scale: float = 1.0,
                   data_dir: str | Path = AZURE_DATA_DIR) -> Workload:
    """The Azure trace's arrivals and lengths, each request given to model i with probability
    proportional to (i + 1)^-alpha (seeded), so the models share the trace's burstiness."""
    models = _check_models(models)
    trace = azure_trace(kind, start_s=start_s, duration_s=duration_s, rate_scale=rate_scale, data_dir=data_dir)
    rng = np.random.default_rng(seed)
    owners = rng.choice(len(models), size=len(trace), p=power_law_shares(len(models), alpha))
    requests = [dataclasses.replace(r, model=models[k]) for r, k in zip(trace.requests, owners)]
    return Workload(requests, trace.duration_s,
                    f"{trace.description}, {len(models)} models, alpha {alpha:g}, seed {seed}")


# --- argument checks --------------------------------------------------------------------------------

def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_nonnegative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_models(models: Iterable[str]) -> list[str]:
    if isinstance(models, str):  # a bare name would otherwise be split into characters
        raise ValueError(f"models must be a list of names, got the string {models!r}")
    models = list(models)
    if not models:
        raise ValueError("the model list is empty")
    if len(set(models)) != len(models):
        raise ValueError(f"model names must be unique, got {models}")
    return models


def _per_model_limit(name: str, limit: int | Mapping[str, int], models: list[str], minimum: int) -> dict[str, int]:
    if isinstance(limit, Mapping):
        missing = [m for m in models if m not in limit]
        if missing:
            raise ValueError(f"{name} has no limit for models {missing}")
        limits = {m: int(limit[m]) for m in models}
    else:
        limits = {m: int(limit) for m in models}
    too_small = {m: v for m, v in limits.items() if v < minimum}
    if too_small:
        raise ValueError(f"{name} must be >= {minimum}, got {too_small}")
    return limits


def _per_model_sampler(lengths: LengthSampler | Mapping[str, LengthSampler],
                       models: list[str]) -> dict[str, LengthSampler]:
    if isinstance(lengths, Mapping):
        missing = [m for m in models if m not in lengths]
        if missing:
            raise ValueError(f"lengths has no sampler for models {missing}")
        return {m: lengths[m] for m in models}
    if not isinstance(lengths, LengthSampler):
        raise ValueError(f"lengths must be a LengthSampler or a mapping model -> LengthSampler, got {lengths!r}")
    return {m: lengths for m in models}


def _join(description: str, note: str) -> str:
    return f"{description}; {note}" if description else note
