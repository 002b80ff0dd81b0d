"""The prefix cache over the slab allocator, without a model: a random mix of sequences that share
prefixes arrives, computes, finishes, is preempted, compacted and evicted, while a stand-in for the
pool's contents records which token each page slot holds. Every reused page must hold exactly the
tokens of the sequence that reuses it, no page is ever written once cached, every page is held or
idle (never both, never neither), and when all is done every page goes back. Then in the engine,
over every KV format: the same greedy tokens with the cache as without it, hits counted, through
chunked prefill and preemption, and idle cached pages given to another model of the pool first."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fineserve_jax.fleet import Fleet, ModelSpec
from models.config import ModelConfig
from models.loader import random_model
from pallas_kernels.kv_pages import KVPageLayout
from serving.engine.page_manager import PageManager
from serving.engine.prefix_cache import PrefixCache, page_keys
from serving.engine.sampling import SamplingParams
from serving.engine.sequence import Sequence
from serving.runtime.device_runtime import DeviceRuntime
from serving.kv.slab_allocator import PoolExhausted, SlabAllocator
from tests.helpers import build_engine, drain, evict_prefix_caches

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")   # tiny models: compiling dominates

TPP = 3   # tokens per page
PREFIXES = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 9, 9, 9], [5] * 10, []]


class PrefixCacheMachine(RuleBasedStateMachine):
    @initialize(slabs=st.integers(3, 8))
    def setup(self, slabs):
        layout = KVPageLayout(1, 1, 8, TPP, "bf16", pages_per_slab=4)
        self.allocator = SlabAllocator(slabs, layout.page_bytes * 4)
        self.allocator.register("m", layout.page_bytes)
        self.pages = PageManager(self.allocator, "m", layout, cache=PrefixCache())
        self.contents: dict[int, list[int | None]] = {}   # page -> the token in each slot
        self.running: list[Sequence] = []
        self.waiting: list[Sequence] = []
        self.ids = 0

    # ---- the engine's moves ----------------------------------------------------------------
    def _compute(self, seq: Sequence, n: int) -> bool:
        """Write the next `n` tokens of `seq` into its pages, as a model step would."""
        if not self.pages.can_grow(seq, n):
            return False
        try:
            self.pages.grow(seq, n)
        except PoolExhausted:
            raise AssertionError("can_grow said yes") from None
        tokens = seq.prompt_token_ids + seq.output_token_ids
        for pos in range(seq.num_computed, seq.num_computed + n):
            page = seq.pages[pos // TPP]
            assert page not in self.pages.cache._key_of, "a cached page was written"
            self.contents.setdefault(page, [None] * TPP)[pos % TPP] = tokens[pos]
        seq.num_computed += n
        self.pages.offer_full_pages(seq)
        return True

    def _admit(self, seq: Sequence, chunk: int) -> None:
        reused = self.pages.reuse_prefix(seq)
        tokens = seq.prompt_token_ids + seq.output_token_ids
        assert reused % TPP == 0 and reused < seq.num_tokens
        for pos in range(reused):   # what it reuses holds its own tokens
            assert self.contents[seq.pages[pos // TPP]][pos % TPP] == tokens[pos]
        if self._compute(seq, min(chunk, seq.num_uncomputed)):
            self.running.append(seq)
        else:
            self.pages.release(seq)
            seq.num_computed = 0
            self.waiting.append(seq)

    @rule(prefix=st.sampled_from(PREFIXES), extra=st.lists(st.integers(20, 23), max_size=8), chunk=st.integers(1, 12))
    def arrive(self, prefix, extra, chunk):
        self.ids += 1
        tokens = prefix + extra or [7]
        self._admit(Sequence(str(self.ids), None, tokens, SamplingParams(), 0), chunk)

    @precondition(lambda self: self.waiting)
    @rule(chunk=st.integers(1, 12))
    def readmit(self, chunk):
        self._admit(self.waiting.pop(0), chunk)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), n=st.integers(1, 6), token=st.integers(20, 23))
    def step(self, data, n, token):
        """Prefill more of a sequence, or decode one token (a new output token, then its KV)."""
        seq = data.draw(st.sampled_from(self.running))
        if seq.num_uncomputed == 0:
            seq.output_token_ids.append(token)
            n = 1
        self._compute(seq, min(n, seq.num_uncomputed))

    @precondition(lambda self: self.running)
    @rule(data=st.data(), preempt=st.booleans())
    def leave(self, data, preempt):
        """A sequence finishes, or is preempted (its KV is dropped, to be recomputed)."""
        seq = data.draw(st.sampled_from(self.running))
        self.running.remove(seq)
        self.pages.release(seq)
        if preempt:
            seq.num_computed = 0
            self.waiting.append(seq)

    @rule(n=st.integers(0, 6))
    def evict(self, n):
        idle = self.pages.num_idle_cached
        assert self.pages.evict(n) == min(n, idle)

    @rule()
    def compact(self):
        moves = self.allocator.compact("m")
        moved = {new: self.contents.pop(old) for old, new in moves.items() if old in self.contents}
        self.contents.update(moved)
        for seq in self.running:
            seq.pages = [moves.get(p, p) for p in seq.pages]
        self.pages.rename(moves)

    # ---- what must always hold -----------------------------------------------------------------
    @invariant()
    def every_page_is_held_or_idle(self):
        cache = self.pages.cache
        held: dict[int, int] = {}
        for seq in self.running:
            assert len(seq.pages) == -(-seq.num_computed // TPP)
            for p in seq.pages:
                held[p] = held.get(p, 0) + 1
        idle = set(cache._idle)
        assert not idle & set(held)
        assert self.allocator.used_pages("m") == len(held) + len(idle)
        for p, n in held.items():
            assert n == 1 or cache._holders[p] == n, "a page shared by sequences must be the cache's"
            if p in cache._holders:
                assert cache._holders[p] == n
        assert set(cache._holders) <= set(held)
        assert self.pages.num_used_pages == len(held)

    @invariant()
    def every_sequence_reads_its_own_tokens(self):
        for seq in self.running:
            tokens = seq.prompt_token_ids + seq.output_token_ids
            for pos in range(seq.num_computed):
                assert self.contents[seq.pages[pos // TPP]][pos % TPP] == tokens[pos], (seq.request_id, pos)

    @invariant()
    def cached_keys_match_contents(self):
        for key, page in self.pages.cache._page_of.items():
            assert self.pages.cache._key_of[page] == key and None not in self.contents[page]

    def teardown(self):
        if not hasattr(self, "pages"):
            return
        for seq in self.running:
            self.pages.release(seq)
        self.pages.evict(self.pages.num_idle_cached)
        assert self.pages.cache.num_cached == 0
        assert self.allocator.num_free_pages("m") == self.allocator.capacity_pages("m")
        assert self.allocator.num_free_slabs == self.allocator.num_slabs


TestPrefixCache = PrefixCacheMachine.TestCase
TestPrefixCache.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_page_keys_chain_the_prefix():
    a, b = [1, 2, 3, 4, 5, 6], [9, 2, 3, 4, 5, 6]
    ka, kb = page_keys(a, 3, 2, []), page_keys(b, 3, 2, [])
    assert ka[0] != kb[0] and ka[1] != kb[1]   # same second page, different first: different keys
    known = ka[:1]
    assert page_keys(a, 3, 2, known) == ka and known == ka   # extends what is known
    assert page_keys(a + [7], 3, 2, []) == ka


def test_a_hit_is_counted_and_lru_evicts_the_oldest_idle_page_first():
    layout = KVPageLayout(1, 1, 8, 2, "bf16", pages_per_slab=8)
    allocator = SlabAllocator(1, layout.page_bytes * 8)
    allocator.register("m", layout.page_bytes)
    pages = PageManager(allocator, "m", layout, cache=PrefixCache())
    seqs = []
    for first in (1, 2):
        seq = Sequence(str(first), None, [first, 0, 0, 0, 9], SamplingParams(), 0)
        assert pages.reuse_prefix(seq) == 0
        pages.grow(seq, 5)
        seq.num_computed = seq.num_prefilled = 5
        pages.offer_full_pages(seq)
        seqs.append(seq)
    for seq in seqs:
        pages.release(seq)
    assert pages.num_idle_cached == 4 and pages.num_used_pages == 0
    again = Sequence("3", None, [2, 0, 0, 0, 7, 7], SamplingParams(), 0)
    assert pages.reuse_prefix(again) == 4 and pages.num_idle_cached == 2
    assert pages.evict(1) == 1   # the oldest idle page: the last page of the first sequence
    assert pages.reuse_prefix(Sequence("4", None, [1, 0, 0, 0, 7], SamplingParams(), 0)) == 2
    assert pages.num_idle_cached == 0


def test_only_pages_prompt_chunks_computed_are_offered():
    """Decode's KV can round differently from a prefill's (bfloat16), so pages it filled are not
    cached: a later prompt that repeats them computes them once more, as an uncached run does."""
    layout = KVPageLayout(1, 1, 8, 2, "bf16", pages_per_slab=8)
    allocator = SlabAllocator(1, layout.page_bytes * 8)
    allocator.register("m", layout.page_bytes)
    pages = PageManager(allocator, "m", layout, cache=PrefixCache())
    seq = Sequence("1", None, [1, 2, 3, 4, 5], SamplingParams(), 0)
    pages.grow(seq, 5)
    seq.num_computed = seq.num_prefilled = 5
    pages.offer_full_pages(seq)
    for token in (6, 7, 8):            # decoded: computed one by one, not by a prompt chunk
        seq.output_token_ids.append(token)
        pages.grow(seq, 1)
        seq.num_computed += 1
        pages.offer_full_pages(seq)
    assert seq.num_offered_pages == 2
    pages.release(seq)
    assert pages.num_idle_cached == 2 and seq.num_prefilled == 0
    turn = Sequence("2", None, [1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams(), 0)
    assert pages.reuse_prefix(turn) == 4 and turn.num_prefilled == 4


# ---- in the engine, on tiny random models ------------------------------------------------------

VOCAB = 384
KV_FORMATS = ["bf16", "fp8", "int8", "int4"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _config(layers=2):
    return ModelConfig("llama", VOCAB, 64, 128, layers, 4, 2, 16, max_position_embeddings=256)


@pytest.fixture(scope="module", params=KV_FORMATS)
def kv_model(request):
    return random_model(_config(), "bf16", "float32", kv_dtype=request.param, seed=KV_FORMATS.index(request.param))


def _conversation(engine, system: list[int], rng) -> tuple[list[list[int]], list[int]]:
    """A first request, then four that share its 37-token prefix (one of them longer than the
    prefix by a whole page and one shorter than it) and a follow-up turn that repeats the first
    prompt and its answer: their tokens, and the tokens each reused."""
    first = system + rng.integers(3, VOCAB, 3).tolist()
    rid = engine.add_request(first, GREEDY)
    outs = [drain(engine)[rid].token_ids]
    later = [system + rng.integers(3, VOCAB, k).tolist() for k in (1, 9, 30)] + [system[:22]]
    later.append(first + outs[0] + rng.integers(3, VOCAB, 2).tolist())
    ids = [engine.add_request(p, GREEDY) for p in later]
    done = drain(engine)
    return outs + [done[i].token_ids for i in ids], [first] + later


def test_shared_prefixes_are_reused_and_decode_as_if_computed_afresh(kv_model):
    """Greedy tokens with the cache equal those without it, in every KV format, while the later
    requests skip the shared pages (prompts prefilled in chunks of 16 over pages of 4)."""
    system = np.random.default_rng().integers(3, VOCAB, 37).tolist()
    runs = {}
    for caching in (False, True):
        engine = build_engine(kv_model, num_pages=128, max_model_len=128, max_num_batched_tokens=16,
                              enable_prefix_caching=caching)
        runs[caching] = _conversation(engine, system, np.random.default_rng(7)) + (engine,)
    (plain, prompts, _), (cached, _, engine) = runs[False], runs[True]
    assert cached == plain
    cache = engine.pages.cache
    # 36 tokens (9 pages) of the prefix for three, 20 of the short one, and for the follow-up the first
    # turn's 40 prompt tokens (10 pages; its answer's KV came from decode steps: computed again)
    assert cache.hit_tokens == 3 * 36 + 20 + 40, cache.hit_tokens
    assert cache.queried_tokens == sum(len(p) for p in prompts)
    assert engine.pages.num_idle_cached > 0
    evict_prefix_caches(engine)
    assert engine.pool.allocator.num_free_slabs == engine.pool.allocator.num_slabs


def test_shared_pages_are_counted_once_in_the_memory_breakdown(kv_model):
    """Sequences running on the same cached pages: the pool's byte breakdown counts those pages'
    tokens once (no negative page tails), and every byte is still in one bucket."""
    system = np.random.default_rng().integers(3, VOCAB, 40).tolist()
    engine = build_engine(kv_model, num_pages=64, max_model_len=128)
    name = engine.pages.model_key
    runtime = DeviceRuntime(engine.pool, {name: engine})
    engine.add_request(system + [5], GREEDY)
    drain(engine)
    for tail in ([6], [7, 8], [9]):
        engine.add_request(system + tail, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.step()
    shared = {p for s in engine.live_sequences() for p in s.pages[:10]}
    assert len(engine.live_sequences()) == 3 and len(shared) == 10   # all three on the same ten pages
    stats = runtime.memory_stats()
    assert stats["page_tail_bytes"] >= 0 and stats["models"][name]["tokens"] == 40 + 1 + 2 + 1
    drain(engine)


def test_preempted_sequences_come_back_through_the_cache(kv_model):
    """A pool too small for the batch preempts; recomputation finds its pages cached or not, the
    tokens are those of a roomy pool without the cache, and every page comes back."""
    rng = np.random.default_rng()
    system = rng.integers(3, VOCAB, 24).tolist()
    prompts = [system + rng.integers(3, VOCAB, int(k)).tolist() for k in rng.integers(1, 20, 6)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = build_engine(kv_model, num_pages=128, max_model_len=128, max_num_batched_tokens=16,
                            enable_prefix_caching=False)
    ids = [expected.add_request(p, params) for p in prompts]
    want = drain(expected)
    engine = build_engine(kv_model, num_pages=32, max_model_len=128, max_num_batched_tokens=16)
    for p, i in zip(prompts, ids):
        engine.add_request(p, params, request_id=i)
    got = drain(engine)
    assert [got[i].token_ids for i in ids] == [want[i].token_ids for i in ids]
    assert engine.num_preemptions > 0 and engine.pages.cache.hit_tokens > 0
    assert engine.pages.num_used_pages == 0


def test_idle_cached_pages_are_the_first_memory_another_model_gets():
    """Two models share a pool: the first leaves its cache filling most of it; the second then
    gets the memory (the first's idle pages evicted) without waiting or preempting."""
    models = [random_model(_config(2), "bf16", "float32", name="a", seed=1),
              random_model(_config(3), "bf16", "float32", kv_dtype="int8", name="b", seed=2)]

    def fleet(*members):
        return Fleet([ModelSpec(m, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=160, tokens_per_page=8)
                      for m in members], pool_bytes=320 << 10, slab_bytes=16 << 10)

    rng = np.random.default_rng()
    a_prompts = [rng.integers(3, VOCAB, 120).tolist() for _ in range(4)]
    b_prompts = [rng.integers(3, VOCAB, 140).tolist() for _ in range(4)]
    b_alone = [o.token_ids for o in fleet(models[1]).generate(prompt_token_ids=b_prompts, sampling_params=GREEDY,
                                                              model="b")]
    shared = fleet(*models)
    shared.generate(prompt_token_ids=a_prompts, sampling_params=GREEDY, model="a")
    a, b = shared.runtime.engines["a"], shared.runtime.engines["b"]
    held_by_cache = a.pages.num_idle_cached
    assert held_by_cache > 0 and a.pages.num_used_pages == 0
    assert b.pages.num_free_pages < 4 * b.layout.pages_for(150)   # b needs some of a's cache
    out = shared.generate(prompt_token_ids=b_prompts, sampling_params=GREEDY, model="b")
    assert [o.token_ids for o in out] == b_alone
    assert a.pages.num_idle_cached < held_by_cache and b.num_preemptions == 0
