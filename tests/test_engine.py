"""The continuous-batching engine on a tiny random Llama (HF fixture, float32)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fineserve_jax import LLM, SamplingParams
from models.loader import load_model
from tests.helpers import FIXTURES, build_engine, drain, evict_prefix_caches

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")   # compiling dominates these tests

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded():
    return load_model(str(FIXTURES / "llama"), dtype="float32")


def random_prompts(n, vocab, lo=1, hi=60, seed=None):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, rng.integers(lo, hi + 1)).tolist() for _ in range(n)]


def alone(loaded, prompts, params):
    """Each prompt on its own in an otherwise idle engine."""
    engine = build_engine(loaded, num_pages=256, max_model_len=256, max_num_batched_tokens=64)
    results = []
    for p, sp in zip(prompts, params):
        rid = engine.add_request(p, sp)
        results.append(drain(engine)[rid].token_ids)
    return results


def test_continuous_batching_is_exact_and_returns_every_page(loaded):
    prompts = random_prompts(16, loaded.config.vocab_size)
    lengths = np.random.default_rng().integers(4, 20, len(prompts))
    params = [SamplingParams(temperature=0, max_tokens=int(n), ignore_eos=True) for n in lengths]
    expected = alone(loaded, prompts, params)

    # Small prefill budget: long prompts are prefilled in chunks over several steps.
    engine = build_engine(loaded, num_pages=256, max_model_len=256, max_num_batched_tokens=32)
    free_before = engine.pages.num_free_pages
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts[:8], params[:8])]
    finished = {}

    def step() -> set[str]:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        return {seq.request_id for seq in engine.scheduler.running}

    for _ in range(6):  # the first requests get going ...
        running = step()
    assert running
    # ... then the rest arrive mid-run and join the running batch.
    first = set(ids)
    ids += [engine.add_request(p, sp) for p, sp in zip(prompts[8:], params[8:])]
    together = 0   # steps after which requests of both waves run
    while engine.has_unfinished_requests():
        running = step()
        together += bool(running & first) and bool(running - first)
    assert together > 0
    assert [finished[i].token_ids for i in ids] == expected
    assert engine.pages.num_free_pages == free_before
    evict_prefix_caches(engine)
    assert engine.pool.allocator.num_free_slabs == engine.pool.allocator.num_slabs
    assert max(rows for kind, rows, *_ in engine.stats.per_step if kind != "prefill") > 1  # truly batched


def test_preemption_by_recompute_is_exact(loaded):
    prompts = random_prompts(6, loaded.config.vocab_size, lo=20, hi=40)
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)] * len(prompts)
    expected = alone(loaded, prompts, params)
    # 24 pages of 4 tokens: the six sequences (up to 70 tokens each) cannot all stay resident.
    engine = build_engine(loaded, num_pages=24, max_model_len=96, max_num_batched_tokens=64)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    out = drain(engine)
    assert engine.scheduler.num_preemptions > 0
    assert [out[i].token_ids for i in ids] == expected
    evict_prefix_caches(engine)
    assert engine.pool.allocator.num_free_slabs == engine.pool.allocator.num_slabs


def test_async_scheduling_matches_synchronous(loaded):
    """One step ahead gives every request what waiting for each step gives: mid-run arrivals,
    chunked prefill, preemption, stop ids and strings, EOS, logprobs, seeded sampling and penalties
    (which wait for the tokens) in one mixed run; every page comes back."""
    rng = np.random.default_rng()
    prompts = random_prompts(14, loaded.config.vocab_size, lo=5, hi=50)
    kinds = [SamplingParams(temperature=0, max_tokens=int(rng.integers(3, 30)), ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=25, stop=["e", "a"]),
             SamplingParams(temperature=0, max_tokens=25, stop_token_ids=[int(t) for t in rng.integers(3, 200, 20)]),
             SamplingParams(temperature=0.9, seed=int(rng.integers(1 << 30)), max_tokens=20, logprobs=2),
             SamplingParams(temperature=0, max_tokens=15, repetition_penalty=1.3, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=40, min_tokens=3)]
    params = [kinds[i % len(kinds)] for i in range(len(prompts))]
    runs = {}
    for mode in (False, True):
        # 40 pages of 4 tokens: not every sequence stays resident, so some are preempted.
        engine = build_engine(loaded, num_pages=40, max_model_len=128, max_num_batched_tokens=32,
                              async_scheduling=mode)
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts[:8], params[:8])]
        outs = {}
        for _ in range(5):
            outs.update({o.request_id: o for o in engine.step() if o.finished})
        ids += [engine.add_request(p, sp) for p, sp in zip(prompts[8:], params[8:])]
        outs.update(drain(engine))
        runs[mode] = [outs[i] for i in ids]
        assert engine.in_flight is None and engine.pages.num_used_pages == 0
        evict_prefix_caches(engine)
        assert engine.pool.allocator.num_free_slabs == engine.pool.allocator.num_slabs
        assert (engine.stats.ahead > 0) == mode
        assert engine.scheduler.num_preemptions > 0
    for sync, ahead in zip(runs[False], runs[True]):
        assert (ahead.token_ids, ahead.text, ahead.finish_reason, ahead.outputs[0].stop_reason) == \
            (sync.token_ids, sync.text, sync.finish_reason, sync.outputs[0].stop_reason)
        if sync.outputs[0].logprobs is not None:
            np.testing.assert_allclose([lp.logprob for lp in ahead.outputs[0].logprobs],
                                       [lp.logprob for lp in sync.outputs[0].logprobs], rtol=1e-5, atol=1e-6)
    assert {o.finish_reason for o in runs[True]} == {"stop", "length"}


def test_a_long_prompt_rides_along_the_decodes(loaded):
    """With mixed steps, a prompt that arrives while others decode is prefilled in chunks inside their
    steps: no step leaves them out, and every request gets the tokens that separate prefill and
    decode steps give it; every page comes back."""
    rng = np.random.default_rng()
    vocab = loaded.config.vocab_size
    prompts = random_prompts(3, vocab, lo=5, hi=10) + [rng.integers(3, vocab, 120).tolist()]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * 3 + [
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)]
    runs, kinds = {}, {}
    for mixed in (False, True):
        engine = build_engine(loaded, num_pages=256, max_model_len=256, max_num_batched_tokens=32, mixed_steps=mixed)
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts[:3], params[:3])]
        for _ in range(3):
            engine.step()
        engine.stats.per_step.clear()
        ids.append(engine.add_request(prompts[3], params[3]))
        outs = drain(engine)
        runs[mixed] = [outs[i].token_ids for i in ids]
        kinds[mixed] = [kind for kind, *_ in engine.stats.per_step]
        assert engine.in_flight is None and engine.pages.num_used_pages == 0
        evict_prefix_caches(engine)
        assert engine.pool.allocator.num_free_slabs == engine.pool.allocator.num_slabs
    assert runs[True] == runs[False]
    # 120 prompt tokens in chunks of at most 32 - 3 beside the three decodes; never a prefill step
    assert "prefill" not in kinds[True] and kinds[True].count("mixed") == 5
    assert kinds[True][:5] == ["mixed"] * 5
    assert kinds[False].count("prefill") == 4 and "mixed" not in kinds[False]


class CompileCounter:
    """Counts XLA backend compilations anywhere in the process."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


def test_no_compilation_after_warmup(loaded):
    counter = CompileCounter()
    engine = build_engine(loaded, num_pages=512, max_model_len=256, max_num_seqs=16,
                          max_num_batched_tokens=64, mixed_steps=True)
    engine.warmup()
    programs, compiles = engine.num_compilations, counter.count
    assert programs > 0 and compiles > 0
    rng = np.random.default_rng()
    kinds = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
             SamplingParams(temperature=0.8, max_tokens=12, seed=7),
             SamplingParams(temperature=1.0, top_p=0.9, top_k=20, max_tokens=12),
             # structured outputs: the sampler under a token mask, greedy and sampled
             SamplingParams(temperature=0, max_tokens=12, structured_outputs={"choice": ["yes", "no"]}),
             SamplingParams(temperature=0.8, max_tokens=12, structured_outputs={"regex": "[a-z]{1,8}"})]
    prompts = random_prompts(50, loaded.config.vocab_size, lo=1, hi=100)
    done = {}
    for wave in range(5):  # requests arrive in waves while others decode
        for p in prompts[wave * 10:(wave + 1) * 10]:
            engine.add_request(p, kinds[int(rng.integers(len(kinds)))])
        for _ in range(3):
            done.update({o.request_id: o for o in engine.step() if o.finished})
    done.update(drain(engine))
    assert len(done) == 50
    assert {kind for kind, *_ in engine.stats.per_step} == {"prefill", "decode", "mixed"}
    # a lone prompt on the idle engine: its chunks run in one-row prefill programs (no padding rows)
    engine.stats.per_step.clear()
    engine.add_request(rng.integers(3, loaded.config.vocab_size, 70).tolist(), kinds[0])
    drain(engine)
    assert [(kind, rows) for kind, rows, *_ in engine.stats.per_step][:2] == [("prefill", 1)] * 2   # 64 + 6 tokens
    assert engine.num_compilations == programs
    assert counter.count == compiles, "serving compiled new XLA programs after warm-up"


@pytest.fixture(scope="module")
def llm():
    return LLM(str(FIXTURES / "llama"), dtype="float32", kv_cache_bytes=4 << 20, max_model_len=256)


def test_streaming_grows_token_by_token_and_matches_generate(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = "the quick brown fox"
    steps = list(llm.generate_stream(prompt, params))
    assert len(steps) == 12
    for a, b in zip(steps, steps[1:]):
        assert b.token_ids[:len(a.token_ids)] == a.token_ids and len(b.token_ids) == len(a.token_ids) + 1
        assert b.text.startswith(a.text)
    assert steps[-1].finished and not any(s.finished for s in steps[:-1])
    final = llm.generate([prompt], params)[0]
    assert steps[-1].token_ids == final.token_ids and steps[-1].text == final.text


def test_timing_is_recorded_per_token(llm):
    out = llm.generate(["hello there"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    m = out.metrics
    assert len(m.token_times) == 8
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time == m.token_times[0]
    assert m.token_times == sorted(m.token_times) and m.finished_time >= m.token_times[-1]


def test_stop_conditions(llm):
    base = llm.generate(["a b c"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 20
    # Stop token id: generation ends at its first occurrence, the token is kept.
    target = base.token_ids[5]
    first = base.token_ids.index(target)
    out = llm.generate(["a b c"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                 stop_token_ids=[target]))[0]
    assert out.token_ids == base.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == target
    # Stop string: text is cut before it (or kept with include_stop_str_in_output).
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    if stop.strip():
        cut = text.index(stop)
        out = llm.generate(["a b c"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))[0]
        assert out.finish_reason == "stop" and out.text == text[:cut] and out.outputs[0].stop_reason == stop
        out = llm.generate(["a b c"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop],
                                                     include_stop_str_in_output=True))[0]
        assert out.text == text[:cut + len(stop)]
    # EOS ends generation unless ignore_eos.
    eos = llm.engine.eos_token_ids
    out = llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=SamplingParams(temperature=0, max_tokens=64))[0]
    assert out.finish_reason == "length" or out.token_ids[-1] in eos


def test_logprobs_and_n(llm):
    out = llm.generate(["x y"], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 5
    for tok, lp in zip(out.token_ids, lps):
        assert lp.token_id == tok and len(lp.top) == 3
        assert abs(max(lp.top.values()) - lp.logprob) < 1e-5  # greedy picks the most likely token
    many = llm.generate(["x y"], SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True))[0]
    assert len(many.outputs) == 3 and [o.index for o in many.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in many.outputs}) > 1
    again = llm.generate(["x y"], SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True))[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in many.outputs]


def test_seeded_sampling_does_not_depend_on_batch(llm):
    p = SamplingParams(temperature=1.0, seed=123, max_tokens=10, ignore_eos=True)
    solo = llm.generate(["one two"], p)[0].token_ids
    others = [SamplingParams(temperature=0.7, max_tokens=14, ignore_eos=True)] * 5
    mixed = llm.generate(["three", "one two", "four five six", "seven", "eight", "nine"],
                         [others[0], p] + others[1:])
    assert mixed[1].token_ids == solo


def test_chat_uses_template(llm):
    msgs = [{"role": "user", "content": "hi"}]
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    tok = llm.get_tokenizer()
    assert out.prompt_token_ids == tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False)
    assert out.prompt.startswith("<|im_start|>user\nhi<|im_end|>")
