"""Tests for serving/engine/sampling.py.

Shapes are kept to a handful (B=8 x V=64 for most tests, B=2000 x V=8 for the distribution tests)
so the jitted sampler compiles only a few times. Logits are fresh random draws each run wherever
the property under test does not depend on their values.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.engine.sampling import (
    SamplerFlags,
    SamplerOutput,
    SamplingBatch,
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    build_sampling_batch,
    find_stop,
    longest_partial_stop_suffix,
    sample,
)

B, V = 8, 64  # the shape most tests share, so they share compilations

rng = np.random.default_rng()  # unseeded on purpose: the properties hold for any logits


def random_logits(num_rows=B, vocab=V):
    return rng.normal(scale=3.0, size=(num_rows, vocab)).astype(np.float32)


def run(params, logits, *, steps=None, seeds=None, histories=None, batch_size=None):
    """Build a batch for `params` and sample it. Returns (output as numpy, flags, batch)."""
    n = len(params)
    steps = steps if steps is not None else [0] * n
    seeds = seeds if seeds is not None else [int(s) for s in rng.integers(0, 2**32, n)]
    histories = histories if histories is not None else [([], 0)] * n
    batch, flags = build_sampling_batch(params, histories, steps, seeds,
                                        batch_size or logits.shape[0], logits.shape[1])
    out = sample(jnp.asarray(logits), batch, flags=flags)
    return jax.tree.map(np.asarray, out), flags, batch


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# --------------------------------------------------------------------------------------------
# SamplingParams validation
# --------------------------------------------------------------------------------------------

BAD_PARAMS = [
    ({"n": 0}, "n"),
    ({"n": 1.5}, "n"),
    ({"n": True}, "n"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"top_k": "5"}, "top_k"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.1}, "min_p"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"seed": True}, "seed"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.0}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"stop": ""}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {"3": 1.0}}, "logit_bias"),
    ({"logit_bias": {3: 100.5}}, "logit_bias"),
    ({"logit_bias": {3: float("nan")}}, "logit_bias"),
    ({"logit_bias": [3, 1.0]}, "logit_bias"),
    ({"logit_bias": {i: 1.0 for i in range(1025)}}, "logit_bias"),
    ({"stop_token_ids": ["a"]}, "stop_token_ids"),
    ({"stop_token_ids": 3}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"include_stop_str_in_output": 1}, "include_stop_str_in_output"),
    ({"skip_special_tokens": None}, "skip_special_tokens"),
]


@pytest.mark.parametrize("kwargs,name", BAD_PARAMS,
                         ids=[f"{n}={list(k.values())[0]!r}" for k, n in BAD_PARAMS])
def test_invalid_params_raise_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(**kwargs)
    message = str(excinfo.value)
    assert message.startswith(name), message
    assert "got" in message, message


def test_error_message_format():
    with pytest.raises(ValueError, match=r"^temperature must be >= 0, got -1\.0$"):
        SamplingParams(temperature=-1.0)


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert p.max_tokens == 16 and p.min_tokens == 0
    assert p.stop == [] and p.stop_token_ids == [] and p.logprobs is None and p.seed is None
    assert not p.is_greedy and not p.uses_penalties
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(temperature=1).temperature == 1.0  # ints accepted for floats
    assert isinstance(SamplingParams(temperature=1).temperature, float)
    assert SamplingParams(top_k=-1, max_tokens=None, logprobs=20, seed=-5).top_k == -1
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=0.7, top_k=1).is_greedy
    assert SamplingParams(presence_penalty=0.5).uses_penalties


# --------------------------------------------------------------------------------------------
# Settings that collapse to argmax
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"temperature": 0.0},
    {"temperature": 0.7, "top_k": 1},
    {"temperature": 1.0, "top_p": 1e-6},
    {"temperature": 1.5, "min_p": 1.0},
])
def test_argmax_equivalent_settings(kwargs):
    logits = random_logits()
    out, flags, _ = run([SamplingParams(**kwargs)] * B, logits)
    np.testing.assert_array_equal(out.token_ids, logits.argmax(-1))
    assert flags.all_greedy == SamplingParams(**kwargs).is_greedy


def test_top_k_one_on_random_path_is_argmax():
    # build_sampling_batch routes top_k=1 to the greedy path; check the filter itself too.
    logits = random_logits()
    batch, _ = build_sampling_batch([SamplingParams()] * B, [([], 0)] * B, [0] * B,
                                    list(range(B)), B, V)
    batch = SamplingBatch(**{**vars(batch), "top_k": jnp.ones(B, jnp.int32)})
    flags = SamplerFlags(all_greedy=False, use_top_k_top_p=True)
    out = sample(jnp.asarray(logits), batch, flags=flags)
    np.testing.assert_array_equal(np.asarray(out.token_ids), logits.argmax(-1))


# --------------------------------------------------------------------------------------------
# Reproducibility
# --------------------------------------------------------------------------------------------


def test_same_seed_and_step_same_token_across_rows_and_batches():
    row = random_logits(1)[0] / 3.0  # flat enough that the draw is genuinely random
    seed, step = int(rng.integers(0, 2**32)), int(rng.integers(0, 1000))
    target = SamplingParams(temperature=1.0)

    # Batch 1: the request sits in row 0 among plain sampled rows.
    logits1 = random_logits()
    logits1[0] = row
    out1, flags1, _ = run([target] * B, logits1, steps=[step] + [0] * (B - 1),
                          seeds=[seed] + list(range(B - 1)))

    # Batch 2: it sits in row 5, next to rows using every other feature (different compilation),
    # and in a partially filled batch.
    others = [SamplingParams(temperature=0.0), SamplingParams(top_k=3, top_p=0.8),
              SamplingParams(min_p=0.2, logprobs=4), SamplingParams(repetition_penalty=1.3),
              SamplingParams(frequency_penalty=0.5)]
    logits2 = random_logits()
    logits2[5] = row
    params2 = others + [target]
    out2, flags2, _ = run(params2, logits2, steps=[3] * 5 + [step], seeds=[9] * 5 + [seed],
                          histories=[([1, 2, 3], 1)] * 6)
    assert flags1 != flags2
    assert out1.token_ids[0] == out2.token_ids[5]

    # Same rows again: fully deterministic.
    out3, _, _ = run([target] * B, logits1, steps=[step] + [0] * (B - 1),
                     seeds=[seed] + list(range(B - 1)))
    np.testing.assert_array_equal(out1.token_ids, out3.token_ids)


def test_different_steps_and_seeds_draw_differently():
    # Uniform over 64 tokens: P(all 8 draws equal) = 64**-7, so this never fails by chance.
    logits = np.zeros((B, V), np.float32)
    seed = int(rng.integers(0, 2**32))
    by_step, _, _ = run([SamplingParams()] * B, logits, steps=list(range(B)), seeds=[seed] * B)
    assert len(set(by_step.token_ids.tolist())) > 1
    by_seed, _, _ = run([SamplingParams()] * B, logits, steps=[7] * B,
                        seeds=[seed + i for i in range(B)])
    assert len(set(by_seed.token_ids.tolist())) > 1


# --------------------------------------------------------------------------------------------
# Distributions
# --------------------------------------------------------------------------------------------

DIST_ROWS = 2000
BASE_PROBS = np.array([0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.01, 0.01])
TOP3 = np.r_[BASE_PROBS[:3], np.zeros(5)]
TEMP2 = np.sqrt(BASE_PROBS)  # temperature 2 -> p ** (1/2)

DIST_CASES = {
    # top_k=3 keeps the three most likely.
    "top_k": ({"top_k": 3}, TOP3),
    # mass before token i: 0, .40, .65, .80 -> the first three are needed to reach .75.
    "top_p": ({"top_p": 0.75}, TOP3),
    # keep p >= 0.3 * 0.4 = 0.12.
    "min_p": ({"min_p": 0.3}, TOP3),
    # temperature before top-k: (p ** 2) over the top three.
    "temperature_top_k": ({"temperature": 0.5, "top_k": 3}, TOP3 ** 2),
    # temperature before top-p: at T=2 the masses before tokens are 0, .26, .47, .62 -> 3 kept
    # for top_p=.55, whereas at T=1 two would be.
    "temperature_top_p": ({"temperature": 2.0, "top_p": 0.55}, np.r_[TEMP2[:3], np.zeros(5)]),
    # top-p over the top-k renormalised distribution: top-5 cumulative masses are .42, .68, .84
    # -> three reach .82; without renormalising (.40, .65, .80, .90) four would be kept.
    "top_k_then_top_p": ({"top_k": 5, "top_p": 0.82}, TOP3),
    # vLLM V1 applies min-p before top-p: min-p (p >= .04) keeps the same five tokens, so three
    # survive top-p; the V0 order (top-p first, over all tokens) would keep four.
    "min_p_then_top_p": ({"min_p": 0.1, "top_p": 0.82}, TOP3),
    # no filters: the plain softmax, small tail included.
    "plain": ({}, BASE_PROBS),
}

# Pearson's statistic over the kept categories. With m kept categories it is ~chi2(m - 1);
# for m = 3, P(X > x) = exp(-x / 2) exactly, so x = -2 ln(1e-6) = 27.6 gives a false-failure
# rate of 1e-6 per case. Expected counts are >= 2000 * 0.15 / 0.8 = 375, far above the usual
# >= 5 needed for the approximation. A wrong filter or ordering moves the mass by >= 10% of the
# rows (chi2 in the hundreds), and excluded tokens must never appear at all.
CHI2_CRITICAL_DOF2 = -2 * math.log(1e-6)
# For the 8-category "plain" case (7 dof; smallest expected counts 20): the 1e-6 upper quantile
# of chi2(7) is 40.52 (scipy.stats.chi2.isf(1e-6, 7)).
CHI2_CRITICAL_DOF7 = 40.52


@pytest.mark.parametrize("case", list(DIST_CASES))
def test_sampled_frequencies_match_filtered_softmax(case):
    kwargs, weights = DIST_CASES[case]
    expected = weights / weights.sum()
    logits = np.tile(np.log(BASE_PROBS).astype(np.float32), (DIST_ROWS, 1))
    first_seed = int(rng.integers(0, 2**31))  # fresh, distinct seeds every run
    out, _, _ = run([SamplingParams(**kwargs)] * DIST_ROWS, logits,
                    seeds=list(range(first_seed, first_seed + DIST_ROWS)))
    counts = np.bincount(out.token_ids, minlength=len(BASE_PROBS))
    kept = expected > 0
    assert counts[~kept].sum() == 0, f"filtered-out tokens sampled: {counts}"
    expected_counts = expected[kept] * DIST_ROWS
    chi2 = float(((counts[kept] - expected_counts) ** 2 / expected_counts).sum())
    critical = CHI2_CRITICAL_DOF2 if kept.sum() == 3 else CHI2_CRITICAL_DOF7
    assert chi2 < critical, f"chi2={chi2:.1f}, counts={counts}, expected={expected_counts}"


# --------------------------------------------------------------------------------------------
# Penalties
# --------------------------------------------------------------------------------------------


def reference_penalties(logits, params, histories):
    """Straightforward numpy version of vLLM's penalties, one row at a time."""
    out = logits.astype(np.float64).copy()
    for i, (p, (ids, num_prompt)) in enumerate(zip(params, histories)):
        seen = np.zeros(logits.shape[1], bool)
        seen[list(ids)] = True
        counts = np.bincount(np.asarray(ids[num_prompt:], int), minlength=logits.shape[1])
        row = out[i]
        row[seen] = np.where(row[seen] > 0, row[seen] / p.repetition_penalty,
                             row[seen] * p.repetition_penalty)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return out


def random_penalty_setup():
    params = [
        SamplingParams(temperature=0, repetition_penalty=1.5),
        SamplingParams(temperature=0, repetition_penalty=0.7),
        SamplingParams(temperature=0, presence_penalty=1.2),
        SamplingParams(temperature=0, frequency_penalty=0.8),
        SamplingParams(temperature=0, presence_penalty=-0.5, frequency_penalty=-0.3),
        SamplingParams(temperature=0, repetition_penalty=1.2, presence_penalty=0.4,
                       frequency_penalty=0.6),
        SamplingParams(temperature=0),  # no penalty: history must not matter
    ]
    histories = []
    for _ in params:
        length = int(rng.integers(1, 30))
        ids = rng.integers(0, 12, size=length).tolist()  # small id range -> repeats
        histories.append((ids, int(rng.integers(0, length + 1))))
    return params, histories


def test_penalties_match_numpy_reference():
    params, histories = random_penalty_setup()
    logits = random_logits()
    n = len(params)
    batch, flags = build_sampling_batch(params, histories, [0] * n, [0] * n, B, V)
    assert flags.use_penalties
    got = np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), batch))
    want = reference_penalties(logits[:len(params)], params, histories)
    np.testing.assert_allclose(got[:len(params)], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[len(params):], logits[len(params):])  # padding untouched

    # Greedy rows pick the argmax of the penalised logits.
    out = sample(jnp.asarray(logits), batch, flags=flags)
    np.testing.assert_array_equal(np.asarray(out.token_ids)[:len(params)], want.argmax(-1))


def test_mixed_greedy_and_random_batch():
    logits = random_logits()
    params = [SamplingParams(temperature=0.0) if i % 2 == 0 else SamplingParams(top_k=5)
              for i in range(B)]
    seeds = [int(s) for s in rng.integers(0, 2**32, B)]
    steps = [int(s) for s in rng.integers(0, 100, B)]
    out, flags, _ = run(params, logits, seeds=seeds, steps=steps)
    assert not flags.all_greedy and flags.use_top_k_top_p
    np.testing.assert_array_equal(out.token_ids[0::2], logits[0::2].argmax(-1))
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    for i in range(1, B, 2):
        assert out.token_ids[i] in top5[i]
    # The random rows draw the same as in an all-random batch with the same seeds and steps.
    all_random, _, _ = run([SamplingParams(top_k=5)] * B, logits, seeds=seeds, steps=steps)
    np.testing.assert_array_equal(out.token_ids[1::2], all_random.token_ids[1::2])


# --------------------------------------------------------------------------------------------
# Logprobs
# --------------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax():
    logits = random_logits()
    params = [SamplingParams(temperature=0.8, top_k=10, logprobs=5, repetition_penalty=1.3,
                             frequency_penalty=0.5),
              SamplingParams(temperature=0, logprobs=2)] * (B // 2)
    histories = [(rng.integers(0, V, 10).tolist(), 4)] * B
    out, flags, _ = run(params, logits, histories=histories)
    assert flags.num_logprobs == 5
    reference = log_softmax(logits)
    rows = np.arange(B)
    np.testing.assert_allclose(out.logprobs, reference[rows, out.token_ids], atol=1e-5)
    assert out.top_ids.shape == out.top_logprobs.shape == (B, 5)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-logits, axis=-1)[:, :5])
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(reference, out.top_ids, -1),
                               atol=1e-5)
    assert np.all(np.diff(out.top_logprobs, axis=-1) <= 0)


def test_no_logprobs_gives_empty_top_arrays():
    out, flags, _ = run([SamplingParams(temperature=0)] * B, random_logits())
    assert flags.num_logprobs == 0
    assert out.top_ids.shape == (B, 0) and out.top_logprobs.shape == (B, 0)
    assert out.token_ids.dtype == np.int32 and out.logprobs.dtype == np.float32


# --------------------------------------------------------------------------------------------
# Stop strings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,stops,search_from,expected", [
    ("hello world", ["wor"], 0, (6, "wor")),
    ("abcSTOP", ["STOP"], 5, (3, "STOP")),  # straddles old "abcST" / new "OP"
    ("abcSTOP", ["STOP"], 6, (3, "STOP")),  # only the last character is new
    ("STOPxx", ["STOP"], 4, None),  # wholly inside already-checked text
    ("xxSTOP", ["STOP"], 6, None),  # nothing new
    ("a END b STOP", ["STOP", "END"], 0, (2, "END")),  # earliest, not first listed
    ("xabc", ["abc", "ab"], 0, (1, "abc")),  # same start: first listed wins
    ("STOP then STOP", ["STOP"], 2, (0, "STOP")),  # first one ends at 3 >= 2: still new
    ("STOP then STOP", ["STOP"], 4, (10, "STOP")),
    ("no stops here", [], 0, None),
    ("short", ["longer than text"], 0, None),
])
def test_find_stop(text, stops, search_from, expected):
    assert find_stop(text, stops, search_from) == expected


@pytest.mark.parametrize("text,stops,expected", [
    ("hello ST", ["STOP"], 2),
    ("hello", ["STOP"], 0),
    ("xSTOP", ["STOP"], 0),  # a complete stop is find_stop's job, not a partial
    ("ab", ["abc", "b"], 2),
    ("aaa", ["aaaa"], 3),
    ("x<", ["<|end|>", "<<"], 1),
    ("", ["STOP"], 0),
    ("anything", [], 0),
])
def test_longest_partial_stop_suffix(text, stops, expected):
    assert longest_partial_stop_suffix(text, stops) == expected


def brute_force_find_stop(text, stops, search_from):
    for start in range(len(text)):
        for stop in stops:
            if text.startswith(stop, start) and start + len(stop) - 1 >= search_from:
                return start, stop
    return None


small_text = st.text(alphabet="ab", max_size=14)
small_stops = st.lists(st.text(alphabet="ab", min_size=1, max_size=4), max_size=3)


@settings(max_examples=300, deadline=None)
@given(text=small_text, stops=small_stops, search_from=st.integers(-2, 16))
def test_find_stop_matches_brute_force(text, stops, search_from):
    assert find_stop(text, stops, search_from) == brute_force_find_stop(text, stops, search_from)


@settings(max_examples=300, deadline=None)
@given(text=small_text, stops=small_stops)
def test_partial_suffix_matches_brute_force(text, stops):
    expected = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    assert longest_partial_stop_suffix(text, stops) == expected


# --------------------------------------------------------------------------------------------
# Batch building
# --------------------------------------------------------------------------------------------


def test_build_batch_without_penalties():
    params = [SamplingParams(temperature=0.7, top_k=-1), SamplingParams(temperature=0, top_p=0.5),
              SamplingParams(top_k=1000, logprobs=3)]
    batch, flags = build_sampling_batch(params, [([1, 2], 1)] * 3, [4, 5, 6], [-1, 2**32 + 5, 7],
                                        batch_size=B, vocab_size=V)
    for name in ("temperature", "top_k", "top_p", "min_p", "seeds", "steps",
                 "repetition_penalty", "presence_penalty", "frequency_penalty"):
        assert getattr(batch, name).shape == (B,), name
    assert batch.history_ids.shape == batch.history_is_output.shape == (B, 1)
    assert np.all(np.asarray(batch.history_ids) == -1)
    assert batch.seeds.dtype == jnp.uint32 and batch.steps.dtype == jnp.int32
    np.testing.assert_array_equal(batch.seeds[:3], [2**32 - 1, 5, 7])
    np.testing.assert_array_equal(batch.steps[:3], [4, 5, 6])
    np.testing.assert_allclose(batch.temperature, [0.7, 0, 1.0] + [0] * (B - 3))
    np.testing.assert_array_equal(batch.top_k, [V] * B)  # disabled and oversize both mean V
    np.testing.assert_allclose(batch.top_p, [1.0] * B)  # greedy rows ignore top_p
    assert flags == SamplerFlags(all_greedy=False, use_top_k_top_p=False, use_min_p=False,
                                 use_penalties=False, num_logprobs=3)
    hash(flags)  # static jit argument


def test_build_batch_with_penalties_and_padding():
    params = [SamplingParams(temperature=0, presence_penalty=0.5), SamplingParams(min_p=0.1),
              SamplingParams(top_k=4)]
    histories = [(list(range(20)), 15), ([3, 4, 5], 1), ([7], 1)]
    batch, flags = build_sampling_batch(params, histories, [0, 0, 0], [0, 1, 2], B, V)
    assert flags == SamplerFlags(all_greedy=False, use_top_k_top_p=True, use_min_p=True,
                                 use_penalties=True, num_logprobs=0)
    assert batch.history_ids.shape == (B, 32)  # 20 -> next power of two
    ids, is_output = np.asarray(batch.history_ids), np.asarray(batch.history_is_output)
    np.testing.assert_array_equal(ids[0, :20], range(20))
    assert np.all(ids[0, 20:] == -1) and np.all(ids[1:] == -1)  # only penalised rows filled
    np.testing.assert_array_equal(is_output[0], (np.arange(32) >= 15) & (np.arange(32) < 20))
    assert not is_output[1:].any()
    np.testing.assert_array_equal(batch.top_k[:3], [V, V, 4])

    short, _ = build_sampling_batch([params[0]], [([1, 2, 3], 1)], [0], [0], B, V)
    assert short.history_ids.shape == (B, 16)  # minimum padded length


def test_logit_bias_is_added_to_the_raw_logits_of_its_rows_only():
    logits = random_logits()
    bias = {int(t): float(v) for t, v in zip(rng.choice(V, 5, replace=False), rng.uniform(-100, 100, 5))}
    params = [SamplingParams(temperature=0, logit_bias=bias), SamplingParams(temperature=0),
              SamplingParams(temperature=0, logit_bias={3: -100.0})]
    batch, flags = build_sampling_batch(params, [([], 0)] * 3, [0] * 3, [0] * 3, B, V)
    assert flags.use_logit_bias and batch.bias_ids.shape == batch.bias_values.shape == (B, 16)
    want = logits.copy()
    want[0, list(bias)] += list(bias.values())
    want[2, 3] -= 100.0
    np.testing.assert_allclose(np.asarray(apply_logit_bias(jnp.asarray(logits), batch)), want, rtol=1e-6)
    out, _, _ = run(params, logits)
    assert list(out.token_ids[:3]) == list(want[:3].argmax(axis=-1)) and out.token_ids[2] != 3
    # logprobs stay those of the raw logits (vLLM's raw_logprobs)
    np.testing.assert_allclose(out.logprobs[:3], log_softmax(logits)[np.arange(3), out.token_ids[:3]], atol=1e-5)
    # +100 on one token makes a random row draw it every time
    forced = [SamplingParams(temperature=1.0, logit_bias={7: 100.0}, seed=i) for i in range(B)]
    assert set(run(forced, random_logits())[0].token_ids) == {7}


def test_build_batch_all_greedy_and_empty():
    _, flags = build_sampling_batch([SamplingParams(temperature=0, top_p=0.3, min_p=0.5),
                                     SamplingParams(top_k=1)], [([], 0)] * 2, [0, 0], [0, 0], B, V)
    assert flags == SamplerFlags(all_greedy=True)
    batch, flags = build_sampling_batch([], [], [], [], B, V)
    assert flags == SamplerFlags(all_greedy=True) and batch.temperature.shape == (B,)


def test_build_batch_rejects_bad_lengths():
    p = SamplingParams()
    with pytest.raises(ValueError, match="equal lengths"):
        build_sampling_batch([p, p], [([], 0)], [0, 0], [0, 0], B, V)
    with pytest.raises(ValueError, match="batch_size"):
        build_sampling_batch([p] * 3, [([], 0)] * 3, [0] * 3, [0] * 3, 2, V)


def test_output_is_a_pytree():
    leaves = jax.tree.leaves(SamplerOutput(*(jnp.zeros(1),) * 4))
    assert len(leaves) == 4
