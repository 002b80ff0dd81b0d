"""Token sampling for the engine, with vLLM-compatible semantics: `SamplingParams` (one request's
settings, vLLM names and defaults, validated on construction); `build_sampling_batch` (host side:
per-row arrays, `SamplingBatch`, and static `SamplerFlags` that pick a compiled variant); `sample`
(the jitted, batched sampler over device logits); `find_stop` / `longest_partial_stop_suffix` (stop
strings, on the host).

Order of operations in `sample` (vLLM V1):
  1. logprobs from the raw logits (before masks, bias, penalties and temperature);
  2. structured outputs' token masks (what the request's grammar forbids gets -inf), then logit
     bias (OpenAI's `logit_bias`, added to the named tokens' logits), then penalties: repetition
     (prompt + output tokens), then frequency and presence (output only);
  3. greedy rows: argmax of the penalised logits;
  4. random rows: temperature, min-p, top-k, top-p, then Gumbel-max with a per-request key
     `fold_in(key(seed), step)`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.page_selection import SparseSpec
from pallas_kernels.pow2 import next_pow2
from serving.engine.structured_output import StructuredOutputsParams, mask_width

# Temperatures below this are treated as greedy, as in vLLM (dividing by them overflows).
GREEDY_TEMPERATURE_EPS = 1e-5
# vLLM's cap on the number of top logprobs a request may ask for.
MAX_LOGPROBS = 20
# Smallest padded history length; lengths are rounded up to powers of two to bound compilations.
MIN_HISTORY_LEN = 16
# Padding value in `SamplingBatch.history_ids` and `bias_ids`.
HISTORY_PAD_ID = -1
# OpenAI's bounds on logit_bias values; and ours on its entries per request (a padded row each).
MAX_ABS_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 1024


# --------------------------------------------------------------------------------------------
# Request parameters
# --------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    # bool is a subclass of int, but `top_k=True` is a bug, not a 1.
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return _is_int(value) or (isinstance(value, (float, np.floating)) and not math.isnan(value))


SPARSE_REQUEST_FIELDS = ("policy", "budget_tokens", "budget_fraction")
SPARSE_MODEL_FIELDS = (*SPARSE_REQUEST_FIELDS, "gate_tokens", "layer_weights")


def sparse_spec(value, allowed: tuple[str, ...] = SPARSE_REQUEST_FIELDS) -> SparseSpec | None:
    """Page selection from a SparseSpec or a dict of the `allowed` fields (a request's by default;
    a model's default may also set gate_tokens and layer_weights); ValueError naming what is wrong."""
    if value is None or isinstance(value, SparseSpec):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"sparse must be an object like {{'policy': 'bbox', 'budget_tokens': 512}}, got {value!r}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"sparse: unknown field(s) {unknown}; allowed: {list(allowed)}")
    try:
        return SparseSpec(**value)
    except ValueError as e:
        raise ValueError(f"sparse: {e}") from None


@dataclass
class SamplingParams:
    """Per-request sampling settings. Names, defaults and meaning follow vLLM's SamplingParams."""

    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = disabled
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: str | list[str] | None = None  # normalised to a list
    stop_token_ids: list[int] | None = None  # normalised to a list
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None  # top logprobs to return besides the sampled token's
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    # What the output must match (JSON schema, regex, choice, grammar): a StructuredOutputsParams
    # or a dict of its fields, e.g. {"json": {...schema...}} or {"choice": ["yes", "no"]}.
    structured_outputs: StructuredOutputsParams | dict | None = None
    # Page selection for this request's decode steps (a SparseSpec, or a dict of its fields:
    # {"policy": "bbox", "budget_tokens": 512}); None: the model's default.
    sparse: SparseSpec | dict | None = None

    def __post_init__(self):
        self._check_int("n", minimum=1)
        self._check_real("temperature", lambda v: v >= 0, "must be >= 0")
        if math.isinf(self.temperature):
            raise ValueError(f"temperature must be finite, got {self.temperature!r}")
        self._check_real("top_p", lambda v: 0 < v <= 1, "must be in (0, 1]")
        self._check_int("top_k")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k!r}")
        self._check_real("min_p", lambda v: 0 <= v <= 1, "must be in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        self._check_real("repetition_penalty", lambda v: 0 < v < math.inf, "must be > 0 and finite")
        self._check_real("presence_penalty", lambda v: -2 <= v <= 2, "must be in [-2, 2]")
        self._check_real("frequency_penalty", lambda v: -2 <= v <= 2, "must be in [-2, 2]")
        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.max_tokens is not None:
            self._check_int("max_tokens", minimum=1)
        self._check_int("min_tokens", minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.logprobs is not None:
            self._check_int("logprobs", minimum=0, maximum=MAX_LOGPROBS)
        self.logit_bias = self._normalise_logit_bias(self.logit_bias)
        self.structured_outputs = StructuredOutputsParams.of(self.structured_outputs)
        self.sparse = sparse_spec(self.sparse)

    @staticmethod
    def _normalise_logit_bias(bias) -> dict[int, float] | None:
        if bias is None:
            return None
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {bias!r}")
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(bias)}")
        for token, value in bias.items():
            if not _is_int(token) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {token!r}")
            if not _is_real(value) or not -MAX_ABS_LOGIT_BIAS <= value <= MAX_ABS_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value!r} for token {token}")
        return {int(t): float(v) for t, v in bias.items()} or None

    def _check_int(self, name: str, minimum: int | None = None, maximum: int | None = None):
        value = getattr(self, name)
        if not _is_int(value):
            raise ValueError(f"{name} must be an int, got {value!r}")
        if minimum is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise ValueError(f"{name} must be <= {maximum}, got {value!r}")
        setattr(self, name, int(value))

    def _check_real(self, name: str, ok, requirement: str):
        value = getattr(self, name)
        if not _is_real(value):
            raise ValueError(f"{name} must be a real number, got {value!r}")
        value = float(value)
        if not ok(value):
            raise ValueError(f"{name} {requirement}, got {value!r}")
        setattr(self, name, value)

    @staticmethod
    def _normalise_stop(stop) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a str, a list of str or None, got {stop!r}")
        for s in stop:
            if not isinstance(s, str):
                raise ValueError(f"stop entries must be str, got {s!r}")
            if not s:
                raise ValueError(f"stop strings must be non-empty, got {s!r}")
        return list(stop)

    @staticmethod
    def _normalise_stop_token_ids(ids) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of int or None, got {ids!r}")
        for token in ids:
            if not _is_int(token) or token < 0:
                raise ValueError(f"stop_token_ids entries must be ints >= 0, got {token!r}")
        return [int(t) for t in ids]

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


# --------------------------------------------------------------------------------------------
# Device-side batch and sampler
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerFlags:
    """Static switches for `sample`: each combination compiles separately, so they stay coarse."""

    all_greedy: bool = True
    use_top_k_top_p: bool = False
    use_min_p: bool = False
    use_penalties: bool = False
    use_logit_bias: bool = False
    use_token_mask: bool = False
    num_logprobs: int = 0  # top logprobs per row; 0 = none


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling state. B = batch rows, H = padded history length."""

    temperature: jax.Array  # f32[B]; 0 for greedy rows
    top_k: jax.Array  # i32[B]; V when disabled
    top_p: jax.Array  # f32[B]; 1 when disabled
    min_p: jax.Array  # f32[B]; 0 when disabled
    seeds: jax.Array  # u32[B]
    steps: jax.Array  # i32[B]; tokens generated so far by the request
    repetition_penalty: jax.Array  # f32[B]
    presence_penalty: jax.Array  # f32[B]
    frequency_penalty: jax.Array  # f32[B]
    history_ids: jax.Array  # i32[B, H]; prompt + output ids, padded with -1
    history_is_output: jax.Array  # bool[B, H]; True for generated tokens
    bias_ids: jax.Array  # i32[B, K]; logit_bias tokens, padded with -1
    bias_values: jax.Array  # f32[B, K]
    token_mask: jax.Array  # i32[B, ceil(V / 32)]: bit t % 32 of word t // 32 allows token t; [B, 1] when unused


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplerOutput:
    token_ids: jax.Array  # i32[B]
    logprobs: jax.Array  # f32[B]; raw logprob of the chosen token
    top_ids: jax.Array  # i32[B, K], by descending logprob
    top_logprobs: jax.Array  # f32[B, K]


def apply_penalties(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    """vLLM penalties: repetition over prompt + output, then frequency and presence over output."""
    num_rows, vocab_size = logits.shape
    ids = batch.history_ids
    # Padding (-1) would wrap around; send it out of range and let the scatter drop it.
    ids = jnp.where((ids >= 0) & (ids < vocab_size), ids, vocab_size)
    rows = jnp.arange(num_rows)[:, None]
    output_counts = jnp.zeros((num_rows, vocab_size), jnp.float32).at[rows, ids].add(
        batch.history_is_output.astype(jnp.float32), mode="drop")
    seen = jnp.zeros((num_rows, vocab_size), jnp.bool_).at[rows, ids].set(True, mode="drop")

    rep = batch.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - batch.frequency_penalty[:, None] * output_counts
    logits = logits - batch.presence_penalty[:, None] * (output_counts > 0)
    return logits


def apply_token_mask(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """-inf for the tokens each row's bitmask forbids (a row of -1 words allows every token)."""
    num_rows, vocab_size = logits.shape
    bits = (mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    allowed = bits.reshape(num_rows, -1)[:, :vocab_size].astype(jnp.bool_)
    return jnp.where(allowed, logits, -jnp.inf)


def apply_logit_bias(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    """Add each row's logit_bias to its tokens' logits (padding, -1, is dropped)."""
    num_rows, vocab_size = logits.shape
    ids = jnp.where((batch.bias_ids >= 0) & (batch.bias_ids < vocab_size), batch.bias_ids, vocab_size)
    return logits.at[jnp.arange(num_rows)[:, None], ids].add(batch.bias_values, mode="drop")


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Drop tokens with prob < min_p * max prob. In logit space, so no softmax is needed."""
    # p_i >= min_p * p_max  <=>  l_i - l_max >= log(min_p); log(0) = -inf keeps everything.
    threshold = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(min_p)[:, None]
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def apply_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k, then top-p over the top-k renormalised distribution. One sort, values only.

    Both filters become a per-row threshold on the logit value, so the mask is applied to the
    unsorted logits and no argsort/scatter is needed. Ties with the threshold are kept (as vLLM).
    """
    vocab_size = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k = jnp.clip(top_k, 1, vocab_size)
    kth_value = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    sorted_desc = jnp.where(sorted_desc >= kth_value, sorted_desc, -jnp.inf)

    # Keep the smallest prefix whose mass reaches top_p: position i stays while the mass strictly
    # before it is < top_p, so the top token always stays.
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_count = jnp.sum(mass_before < top_p[:, None], axis=-1)
    # top_p == 1 must be a no-op even when float rounding pushes the cumsum past 1.
    keep_count = jnp.where(top_p >= 1.0, vocab_size, jnp.maximum(keep_count, 1))
    pth_value = jnp.take_along_axis(sorted_desc, (keep_count - 1)[:, None], axis=-1)

    threshold = jnp.maximum(kth_value, pth_value)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def _gumbel_noise(seeds: jax.Array, steps: jax.Array, vocab_size: int) -> jax.Array:
    """Per-row Gumbel noise from key(seed) folded with the step: depends on nothing else in the
    batch, so a request draws the same tokens whatever its row, batch or preemption history."""

    def row_noise(seed, step):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return jax.random.gumbel(key, (vocab_size,), jnp.float32)

    return jax.vmap(row_noise)(seeds, steps)


@functools.partial(jax.jit, static_argnames=("flags",))
def sample(logits: jax.Array, batch: SamplingBatch, *, flags: SamplerFlags) -> SamplerOutput:
    """Pick one token per row. logits: [B, V] (any float dtype)."""
    logits = logits.astype(jnp.float32)
    raw_logits = logits

    if flags.use_token_mask:
        logits = apply_token_mask(logits, batch.token_mask)
    if flags.use_logit_bias:
        logits = apply_logit_bias(logits, batch)
    if flags.use_penalties:
        logits = apply_penalties(logits, batch)
    greedy_ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    if flags.all_greedy:
        token_ids = greedy_ids
    else:
        is_greedy = batch.temperature < GREEDY_TEMPERATURE_EPS
        # Greedy rows get temperature 1 here only to keep their (unused) values finite.
        temperature = jnp.where(is_greedy, 1.0, batch.temperature)
        logits = logits / temperature[:, None]
        if flags.use_min_p:
            logits = apply_min_p(logits, batch.min_p)
        if flags.use_top_k_top_p:
            logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
        # Gumbel-max: argmax(logits + Gumbel) is an exact draw from softmax(logits).
        noise = _gumbel_noise(batch.seeds, batch.steps, logits.shape[-1])
        sampled_ids = jnp.argmax(logits + noise, axis=-1).astype(jnp.int32)
        token_ids = jnp.where(is_greedy, greedy_ids, sampled_ids)

    # Raw logprobs (vLLM V1 "raw_logprobs"): log_softmax of the untouched logits, gathered
    # rather than materialised for the whole vocabulary.
    log_normaliser = jax.nn.logsumexp(raw_logits, axis=-1)
    chosen = jnp.take_along_axis(raw_logits, token_ids[:, None], axis=-1)[:, 0]
    if flags.num_logprobs > 0:
        top_values, top_ids = jax.lax.top_k(raw_logits, flags.num_logprobs)
        top_logprobs = top_values - log_normaliser[:, None]
    else:
        top_ids = jnp.zeros((raw_logits.shape[0], 0), jnp.int32)
        top_logprobs = jnp.zeros((raw_logits.shape[0], 0), jnp.float32)
    return SamplerOutput(token_ids=token_ids, logprobs=chosen - log_normaliser,
                         top_ids=top_ids.astype(jnp.int32), top_logprobs=top_logprobs)


# --------------------------------------------------------------------------------------------
# Host-side batch building
# --------------------------------------------------------------------------------------------


def _padded_history_len(length: int) -> int:
    return max(MIN_HISTORY_LEN, next_pow2(length))


def build_sampling_batch(
    params: list[SamplingParams],
    histories: list[tuple[Sequence[int], int]],
    steps: list[int],
    seeds: list[int],
    batch_size: int,
    vocab_size: int,
    token_masks: Sequence[np.ndarray | None] | None = None,
) -> tuple[SamplingBatch, SamplerFlags]:
    """Per-row arrays for `sample`. Rows past len(params) are greedy padding.
    token_masks[i]: row i's allowed-token bitmask (structured outputs), None for no constraint.

    histories[i] = (prompt + output token ids, number of prompt tokens). Seeds are the resolved
    per-request seeds (any int; reduced mod 2**32). History is only copied when some row uses
    penalties; otherwise H = 1 so the common case compiles once.
    """
    num_rows = len(params)
    if not (len(histories) == len(steps) == len(seeds) == num_rows):
        raise ValueError(
            f"params, histories, steps and seeds must have equal lengths, got {num_rows}, "
            f"{len(histories)}, {len(steps)}, {len(seeds)}")
    if num_rows > batch_size:
        raise ValueError(f"batch_size ({batch_size}) must be >= len(params), got {num_rows}")

    def column(values, fill, dtype):
        out = np.full((batch_size,), fill, dtype)
        out[:num_rows] = np.asarray(values, dtype).reshape(num_rows)
        return out

    greedy = column([p.is_greedy for p in params], True, np.bool_)
    temperature = np.where(greedy, 0.0, column([p.temperature for p in params], 0.0, np.float32))
    top_k = column([p.top_k for p in params], vocab_size, np.int64)
    top_k = np.where((top_k <= 0) | (top_k > vocab_size) | greedy, vocab_size, top_k)
    top_p = np.where(greedy, 1.0, column([p.top_p for p in params], 1.0, np.float32))
    min_p = np.where(greedy, 0.0, column([p.min_p for p in params], 0.0, np.float32))
    seeds_u32 = column([s % (1 << 32) for s in seeds], 0, np.uint32)
    steps_i32 = column(steps, 0, np.int32)
    repetition = column([p.repetition_penalty for p in params], 1.0, np.float32)
    presence = column([p.presence_penalty for p in params], 0.0, np.float32)
    frequency = column([p.frequency_penalty for p in params], 0.0, np.float32)

    penalised_rows = [i for i, p in enumerate(params) if p.uses_penalties]
    if penalised_rows:
        history_len = _padded_history_len(max(len(histories[i][0]) for i in penalised_rows))
        history_ids = np.full((batch_size, history_len), HISTORY_PAD_ID, np.int32)
        history_is_output = np.zeros((batch_size, history_len), np.bool_)
        positions = np.arange(history_len)
        for i in penalised_rows:
            ids, num_prompt = histories[i]
            history_ids[i, :len(ids)] = np.asarray(ids, np.int32)
            history_is_output[i] = (positions >= num_prompt) & (positions < len(ids))
    else:
        history_ids = np.full((batch_size, 1), HISTORY_PAD_ID, np.int32)
        history_is_output = np.zeros((batch_size, 1), np.bool_)

    biased_rows = [i for i, p in enumerate(params) if p.logit_bias]
    width = _padded_history_len(max(len(params[i].logit_bias) for i in biased_rows)) if biased_rows else 1
    bias_ids = np.full((batch_size, width), HISTORY_PAD_ID, np.int32)
    bias_values = np.zeros((batch_size, width), np.float32)
    for i in biased_rows:
        bias = params[i].logit_bias
        bias_ids[i, :len(bias)] = list(bias)
        bias_values[i, :len(bias)] = list(bias.values())

    masked_rows = [i for i, m in enumerate(token_masks or ()) if m is not None]
    token_mask = np.full((batch_size, mask_width(vocab_size) if masked_rows else 1), -1, np.int32)
    for i in masked_rows:
        token_mask[i] = token_masks[i]

    random_rows = ~greedy
    flags = SamplerFlags(
        all_greedy=bool(greedy.all()),
        use_top_k_top_p=bool(np.any(random_rows & ((top_k < vocab_size) | (top_p < 1.0)))),
        use_min_p=bool(np.any(random_rows & (min_p > 0.0))),
        use_penalties=bool(penalised_rows),
        use_logit_bias=bool(biased_rows),
        use_token_mask=bool(masked_rows),
        num_logprobs=max((p.logprobs or 0 for p in params), default=0),
    )
    batch = SamplingBatch(
        temperature=jnp.asarray(temperature, jnp.float32),
        top_k=jnp.asarray(top_k, jnp.int32),
        top_p=jnp.asarray(top_p, jnp.float32),
        min_p=jnp.asarray(min_p, jnp.float32),
        seeds=jnp.asarray(seeds_u32, jnp.uint32),
        steps=jnp.asarray(steps_i32, jnp.int32),
        repetition_penalty=jnp.asarray(repetition, jnp.float32),
        presence_penalty=jnp.asarray(presence, jnp.float32),
        frequency_penalty=jnp.asarray(frequency, jnp.float32),
        history_ids=jnp.asarray(history_ids),
        history_is_output=jnp.asarray(history_is_output),
        bias_ids=jnp.asarray(bias_ids),
        bias_values=jnp.asarray(bias_values),
        token_mask=jnp.asarray(token_mask),
    )
    return batch, flags


# --------------------------------------------------------------------------------------------
# Stop strings (host side)
# --------------------------------------------------------------------------------------------


def find_stop(text: str, stops: list[str], search_from: int) -> tuple[int, str] | None:
    """Earliest stop-string occurrence whose last character is at index >= search_from.

    search_from is where the new text starts, so occurrences straddling old and new text are
    found while ones wholly inside already-checked text are not. Returns (start index, stop
    string); on equal starts the stop listed first wins. None if there is no such occurrence.
    """
    search_from = max(0, search_from)
    best: tuple[int, str] | None = None
    for stop in stops:
        # An occurrence starting before this index ends before search_from.
        index = text.find(stop, max(0, search_from - len(stop) + 1))
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def longest_partial_stop_suffix(text: str, stops: list[str]) -> int:
    """How many trailing characters of text are a proper prefix of some stop string, i.e. might
    become a stop once more text arrives; streaming holds these back."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
