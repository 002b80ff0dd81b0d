"""Step-time model of one model variant on one device kind: what the global scheduler, SAAB and the
simulator use instead of running the model.

A step's time is a linear form in a few features, split by step kind (`context_lens` count the
cached tokens after the step):

    prefill = [1, T, A]      T = new tokens, A = sum(new_i x ctx_i) (attention work)
    decode  = [1, B, C, M]   B = rows, C = sum(ctx_i) (KV read), M = [rows > 1]

A mixed step (decode rows beside one prompt chunk) is costed as a prefill of ragged rows: its
matmuls run on every row's tokens at once, as a prefill's do.

Measured profiles (`fit_step_cost`, from `serving.sim.profiler`) compute the features on the engine's
padded bucket shapes (`pad_to_buckets=True`); roofline profiles (`roofline_step_cost`, GPUs until
measured) count exact tokens and add a compute-bound row: the step takes the larger of the two.
Profiles ship in serving/scheduling/profiles/<kind>.json. Why each feature, the padding rules, the
fit and the roofline's assumptions: docs/scheduling.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.optimize import nnls

from models.config import ModelConfig
from models.precision import PrecisionPreset, resolve_precision
from pallas_kernels.pow2 import next_pow2
from serving.engine.llm_engine import EngineConfig
from serving.engine.model_runner import MIN_PREFILL_BUCKET, ShapeBuckets
from serving.engine.scheduler import StepKind

# Device cost profiles shipped with the package (package data: a wheel installs them too).
PROFILE_DIR = Path(str(resources.files(__package__).joinpath("profiles")))
TTFT_CHUNK_TOKENS = EngineConfig.prefill_chunk  # the engine's default prefill chunk
SAAB_PROMPT_TOKENS = 903      # FineServe: p95 prompt of LMSYS-Chat, used for the SLO and τ
PREFILL_FEATURES = ("1", "T", "A")
DECODE_FEATURES = ("1", "B", "C", "M")
FEATURES_DOC = ("prefill = [1, T, A]: T new tokens, A = sum(new_i * ctx_i); decode = [1, B, C, M]: B rows, "
                "C = sum(ctx_i), M = 1 if more than one row; ctx = cached tokens after the step. "
                "pad_to_buckets: T = B_pad*S_pad, "
                "A = B_pad*S_pad*round_up(max ctx), B = B_pad, C = B_pad*round_up(max ctx) (rounded up to "
                "attention_block); step = max(features . coef, features . coef_compute) when the compute "
                "row is present, else features . coef")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check_rows(num_tokens: Sequence[int], context_lens: Sequence[int]) -> None:
    if len(num_tokens) != len(context_lens):
        raise ValueError(f"num_tokens has {len(num_tokens)} rows but context_lens has {len(context_lens)}")
    for n, c in zip(num_tokens, context_lens):
        if n < 1 or c < n:
            raise ValueError(f"every row needs 1 <= num_tokens <= context_len (context counts the "
                             f"step's own tokens), got num_tokens={n}, context_len={c}")


def prefill_features(num_tokens: Sequence[int], context_lens: Sequence[int], *, pad_to_buckets: bool,
                     attention_block: int) -> np.ndarray:
    """[1, T, A] of one prefill step (see the module docstring); zeros for an empty batch."""
    _check_rows(num_tokens, context_lens)
    if len(num_tokens) == 0:  # len(): numpy arrays are fine too
        return np.zeros(3)
    if pad_to_buckets:
        rows, seq = ShapeBuckets.bucket_for(True, num_tokens)
        tokens = rows * seq
        attention = tokens * _round_up(max(context_lens), attention_block)
    else:
        tokens = sum(num_tokens)
        attention = sum(n * c for n, c in zip(num_tokens, context_lens))
    return np.array([1.0, tokens, attention], dtype=np.float64)


def mixed_features(num_tokens: Sequence[int], context_lens: Sequence[int], *, pad_to_buckets: bool,
                   attention_block: int) -> np.ndarray:
    """[1, T, A] of one mixed step: one token for every row but the last, a chunk for the last. Padded,
    the decode rows count as the next power of two (the engine pads them to its largest batch,
    which this model does not know) and the chunk as its bucket."""
    _check_rows(num_tokens, context_lens)
    if not pad_to_buckets or len(num_tokens) == 0:
        return prefill_features(num_tokens, context_lens, pad_to_buckets=False, attention_block=attention_block)
    rows = next_pow2(len(num_tokens) - 1) if len(num_tokens) > 1 else 0
    chunk = max(MIN_PREFILL_BUCKET, next_pow2(num_tokens[-1]))
    decode_ctx = _round_up(max(context_lens[:-1]), attention_block) if rows else 0
    attention = rows * decode_ctx + chunk * _round_up(context_lens[-1], attention_block)
    return np.array([1.0, rows + chunk, attention], dtype=np.float64)


def decode_features(context_lens: Sequence[int], *, pad_to_buckets: bool, attention_block: int) -> np.ndarray:
    """[1, B, C, M] of one decode step (see the module docstring); zeros for an empty batch."""
    _check_rows([1] * len(context_lens), context_lens)
    if len(context_lens) == 0:
        return np.zeros(len(DECODE_FEATURES))
    if pad_to_buckets:
        rows, _ = ShapeBuckets.bucket_for(False, [1] * len(context_lens))
        context = rows * _round_up(max(context_lens), attention_block)
    else:
        rows = len(context_lens)
        context = sum(context_lens)
    return np.array([1.0, rows, context, float(len(context_lens) > 1)], dtype=np.float64)


@dataclass(frozen=True)
class StepCost:
    """Step-time model of one model variant on one device kind (seconds)."""

    prefill: tuple[float, ...]   # coefficients of prefill_features
    decode: tuple[float, ...]    # coefficients of decode_features
    pad_to_buckets: bool = True  # features computed on the engine's padded bucket shapes
    attention_block: int = 128   # tokens per attention block the context is rounded up to (pad mode)
    # Roofline only: coefficients of the compute-bound form; the step takes the larger of the two.
    prefill_compute: tuple[float, ...] = ()
    decode_compute: tuple[float, ...] = ()

    def __post_init__(self):
        for name, expected in (("prefill", len(PREFILL_FEATURES)), ("decode", len(DECODE_FEATURES))):
            for attr in (name, f"{name}_compute"):
                coef = tuple(float(c) for c in getattr(self, attr))
                if name == "decode" and len(coef) == 3:
                    coef += (0.0,)  # the [1, B, C] form: no multi-row term
                object.__setattr__(self, attr, coef)
                required = attr == name  # the compute row is optional (empty)
                if (required or coef) and len(coef) != expected:
                    raise ValueError(f"{attr} needs {expected} coefficients, got {len(coef)}")
                if any(c < 0 or not math.isfinite(c) for c in coef):
                    raise ValueError(f"{attr} coefficients must be finite and non-negative, got {coef}")
        if self.attention_block <= 0:
            raise ValueError(f"attention_block must be positive, got {self.attention_block}")

    @staticmethod
    def _evaluate(features: np.ndarray, coef: tuple[float, ...], compute: tuple[float, ...]) -> float:
        if not features[0]:
            return 0.0  # empty batch: no step
        t = float(features @ np.asarray(coef))
        return max(t, float(features @ np.asarray(compute))) if compute else t

    def prefill_seconds(self, num_tokens: Sequence[int], context_lens: Sequence[int]) -> float:
        """One prefill step: row i computes num_tokens[i] new tokens and has context_lens[i] cached
        tokens after the step."""
        f = prefill_features(num_tokens, context_lens, pad_to_buckets=self.pad_to_buckets,
                             attention_block=self.attention_block)
        return self._evaluate(f, self.prefill, self.prefill_compute)

    def decode_seconds(self, context_lens: Sequence[int]) -> float:
        """One decode step, one new token per row; context_lens include that token."""
        f = decode_features(context_lens, pad_to_buckets=self.pad_to_buckets, attention_block=self.attention_block)
        return self._evaluate(f, self.decode, self.decode_compute)

    def step_seconds(self, kind: StepKind, num_tokens: Sequence[int], context_lens: Sequence[int]) -> float:
        """One step of the engine's `kind` (prefill, decode or mixed; see `ScheduledBatch`)."""
        kind = StepKind(kind)
        if kind is StepKind.PREFILL:
            return self.prefill_seconds(num_tokens, context_lens)
        if kind is StepKind.MIXED:
            f = mixed_features(num_tokens, context_lens, pad_to_buckets=self.pad_to_buckets,
                               attention_block=self.attention_block)
            return self._evaluate(f, self.prefill, self.prefill_compute)
        if any(n != 1 for n in num_tokens) or len(num_tokens) != len(context_lens):
            raise ValueError(f"a decode step computes one token per row, got num_tokens={list(num_tokens)}")
        return self.decode_seconds(context_lens)

    def ttft_seconds(self, prompt_len: int) -> float:
        """Batch-1 prefill of the whole prompt in chunks of <= TTFT_CHUNK_TOKENS (the sum of the
        chunk steps; no queueing, no other model)."""
        if prompt_len < 1:
            raise ValueError(f"prompt_len must be positive, got {prompt_len}")
        total, done = 0.0, 0
        while done < prompt_len:
            n = min(TTFT_CHUNK_TOKENS, prompt_len - done)
            done += n
            total += self.prefill_seconds([n], [done])
        return total

    def prefill_seconds_per_token(self, prompt_len: int = SAAB_PROMPT_TOKENS) -> float:
        """SAAB's τ: batch-1 prefill seconds per prompt token at this prompt length."""
        return self.ttft_seconds(prompt_len) / prompt_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {k: list(getattr(self, k)) for k in
                                           ("prefill", "decode", "prefill_compute", "decode_compute")}

    @classmethod
    def from_dict(cls, d: dict) -> StepCost:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown StepCost fields {unknown}; known: {sorted(known)}")
        d = dict(d)
        for k in ("prefill", "decode", "prefill_compute", "decode_compute"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def variant_key(model: str, precision: str, tp: int = 1) -> str:
    """Profile key of one served variant, e.g. "smollm2-135m/w4a16/tp1"."""
    if not model or "/" in model:
        raise ValueError(f"model name must be non-empty and contain no '/', got {model!r}")
    if tp < 1:
        raise ValueError(f"tp must be positive, got {tp}")
    return f"{model}/{precision}/tp{tp}"


@dataclass
class DeviceProfile:
    device_kind: str               # "cpu", "h100", "h200"
    source: str                    # "measured on <host/device>, <date>" or "roofline (not measured): <why>"
    entries: dict[str, StepCost]   # keyed by variant_key(...)
    meta: dict = field(default_factory=dict)  # jax version, model shapes, fit errors per entry...

    def get(self, model: str, precision: str, tp: int = 1) -> StepCost:
        key = variant_key(model, precision, tp)
        if key not in self.entries:
            raise KeyError(f"no step cost for {key!r} in the {self.device_kind} profile; available: "
                           f"{', '.join(sorted(self.entries)) or '(none)'}")
        return self.entries[key]

    def to_dict(self) -> dict:
        return {"device_kind": self.device_kind, "source": self.source, "features": FEATURES_DOC,
                "entries": {k: v.to_dict() for k, v in sorted(self.entries.items())}, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> DeviceProfile:
        missing = [k for k in ("device_kind", "source", "entries") if k not in d]
        if missing:
            raise ValueError(f"device profile is missing {missing}")
        return cls(d["device_kind"], d["source"], {k: StepCost.from_dict(v) for k, v in d["entries"].items()},
                   d.get("meta", {}))

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def shipped(cls, kind: str) -> DeviceProfile | None:
        """The profile of device `kind` shipped with the package (`PROFILE_DIR`), if there is one."""
        path = PROFILE_DIR / f"{kind}.json"
        return cls.load(path) if path.is_file() else None

    @classmethod
    def load(cls, path) -> DeviceProfile:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read device profile {path}: {e}") from None
        return cls.from_dict(data)


# ---- fitting measured samples ------------------------------------------------------------------

@dataclass(frozen=True)
class StepSample:
    """One measured step: rows' new tokens and contexts after the step, and its wall time."""

    is_prefill: bool
    num_tokens: tuple[int, ...]
    context_lens: tuple[int, ...]
    seconds: float

    def to_dict(self) -> dict:
        return {"is_prefill": self.is_prefill, "num_tokens": list(self.num_tokens),
                "context_lens": list(self.context_lens), "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> StepSample:
        return cls(bool(d["is_prefill"]), tuple(d["num_tokens"]), tuple(d["context_lens"]), float(d["seconds"]))


def _sample_features(s: StepSample, pad_to_buckets: bool, attention_block: int) -> np.ndarray:
    if s.is_prefill:
        return prefill_features(s.num_tokens, s.context_lens, pad_to_buckets=pad_to_buckets,
                                attention_block=attention_block)
    return decode_features(s.context_lens, pad_to_buckets=pad_to_buckets, attention_block=attention_block)


def _fit_relative(features: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimising Σ ((f·c - t) / t)²: NNLS on rows divided by t (relative
    error, so 1 ms decode steps count as much as 1 s prefills). Columns are scaled to [0, 1] first
    (T and A differ by ~10^4) and the scale undone afterwards."""
    scale = np.abs(features).max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(features / scale / seconds[:, None], np.ones(len(seconds)))
    return coef / scale


def _errors(features: np.ndarray, seconds: np.ndarray, coef: np.ndarray) -> tuple[float, float]:
    rel = np.abs(features @ coef - seconds) / seconds
    return float(rel.mean()), float(rel.max())


def fit_step_cost(samples: list[StepSample], *, pad_to_buckets: bool = True,
                  attention_block: int = 128) -> tuple[StepCost, dict]:
    """Fit prefill and decode coefficients to measured steps. Returns the StepCost and its errors on
    these samples: {prefill,decode}_{mean,max}_rel_err and the sample counts."""
    fitted, errors = {}, {}
    for kind, is_prefill, names in (("prefill", True, PREFILL_FEATURES), ("decode", False, DECODE_FEATURES)):
        mine = [s for s in samples if s.is_prefill == is_prefill]
        if len(mine) < len(names):
            raise ValueError(f"fitting needs at least {len(names)} {kind} samples, got {len(mine)}")
        if any(not (s.seconds > 0 and math.isfinite(s.seconds)) for s in mine):
            raise ValueError(f"every {kind} sample needs a positive, finite time")
        features = np.stack([_sample_features(s, pad_to_buckets, attention_block) for s in mine])
        seconds = np.array([s.seconds for s in mine])
        coef = _fit_relative(features, seconds)
        fitted[kind] = tuple(float(c) for c in coef)
        errors[f"{kind}_mean_rel_err"], errors[f"{kind}_max_rel_err"] = _errors(features, seconds, coef)
        errors[f"num_{kind}_samples"] = len(mine)
    return StepCost(fitted["prefill"], fitted["decode"], pad_to_buckets, attention_block), errors


# ---- roofline (GPU, not measured) --------------------------------------------------------------

LLAMA3_8B = ModelConfig("llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                        num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=8192)
LLAMA3_70B = ModelConfig("llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                         num_heads=64, num_kv_heads=8, head_dim=128, max_position_embeddings=8192)
# The models GPU profiles are derived for, by their profile names.
ROOFLINE_MODELS = {"llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B}


@dataclass(frozen=True)
class DeviceSpec:
    """Peak numbers of one accelerator (dense, no sparsity) and the fixed costs of a step."""

    kind: str
    memory_bytes: float
    hbm_bytes_per_s: float
    bf16_flops: float
    fp8_flops: float
    int8_flops: float
    launch_overhead_s: float           # per step: program dispatch, sampling, copying tokens back
    link_bytes_per_s: float = 450e9    # NVLink 4 per direction, what a ring all-reduce streams at
    allreduce_latency_s: float = 10e-6  # one small all-reduce over NVLink (NCCL ring, 2-8 GPUs)

    def matmul_flops(self, preset: PrecisionPreset) -> float:
        """Peak FLOP/s of the linear layers' math: the activation format decides it (W4A16 dequantizes
        to BF16; W4A8KV4 runs FP8 math)."""
        return {None: self.bf16_flops, "fp8": self.fp8_flops, "int8": self.int8_flops}[preset.activation_format]


# JAX dispatch plus sampling plus the device-to-host copy of the sampled tokens: an assumption
# (a few hundred µs for an XLA program of ~30 layers without CUDA graphs), not a measurement.
GPU_LAUNCH_OVERHEAD_S = 300e-6
H100 = DeviceSpec("h100", 80e9, 3.35e12, 989e12, 1979e12, 1979e12, GPU_LAUNCH_OVERHEAD_S)
H200 = DeviceSpec("h200", 141e9, 4.8e12, 989e12, 1979e12, 1979e12, GPU_LAUNCH_OVERHEAD_S)
DEVICES = {d.kind: d for d in (H100, H200)}
# Share of peak bandwidth and FLOPs a step reaches: an assumption for an untuned stack, the same for
# both bounds, until measured profiles replace the roofline ones (docs/scheduling.md).
DEFAULT_EFFICIENCY = 0.6


def roofline_step_cost(config: ModelConfig, precision: str, device: DeviceSpec, tp: int = 1, *,
                       efficiency: float = DEFAULT_EFFICIENCY) -> StepCost:
    """Step cost from peak bandwidth and FLOPs (no measurement): each step takes the larger of
    bytes / (BW · efficiency) and FLOPs / (F · efficiency), plus launch overhead and, with tp > 1,
    two all-reduces of the hidden states per layer (Megatron TP). Exact token counts (no padding).

    Bytes: weights once per step, plus KV read (decode: Σ ctx · b_kv) or written (prefill: T · b_kv).
    FLOPs: 2 · linear params per token in the preset's math dtype; the LM head (kept BF16) once per
    row; attention 4 · L · H · d per (query, cached key) pair in BF16 (the full rectangle
    new × ctx, which the engine's kernels compute; causal skipping would halve a fresh prompt's).
    TP splits weights, KV heads (replicated once tp > H_kv) and FLOPs across tp devices.
    """
    if tp < 1 or tp & (tp - 1):
        raise ValueError(f"tp must be a power of two, got {tp}")
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency}")
    preset = resolve_precision(precision)
    bw = device.hbm_bytes_per_s * efficiency
    flops = device.matmul_flops(preset) * efficiency
    bf16 = device.bf16_flops * efficiency
    kv_share = math.ceil(config.num_kv_heads / tp) / config.num_kv_heads  # KV heads on one device
    weights = preset.weight_bytes(config) / tp
    kv_per_token = preset.kv_bytes_per_token(config) * kv_share
    linear_flops_per_token = 2 * config.layer_linear_params / tp / flops
    lm_head_per_row = 2 * config.lm_head_params / tp / bf16
    attention_per_pair = config.attention_flops_per_pair / tp / bf16
    if tp > 1:  # ring all-reduce: each device sends and receives 2 (tp-1)/tp of the buffer
        allreduces = 2 * config.num_layers
        comm_fixed = allreduces * device.allreduce_latency_s
        comm_per_token = allreduces * 2 * (tp - 1) / tp * config.hidden_size * 2 / device.link_bytes_per_s
    else:
        comm_fixed = comm_per_token = 0.0
    fixed = device.launch_overhead_s + comm_fixed
    return StepCost(
        prefill=(fixed + weights / bw, comm_per_token + kv_per_token / bw, 0.0),
        decode=(fixed + weights / bw, comm_per_token, kv_per_token / bw, 0.0),
        pad_to_buckets=False,
        prefill_compute=(fixed + lm_head_per_row, comm_per_token + linear_flops_per_token, attention_per_pair),
        decode_compute=(fixed, comm_per_token + linear_flops_per_token + lm_head_per_row, attention_per_pair, 0.0),
    )
