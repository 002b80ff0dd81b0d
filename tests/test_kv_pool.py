"""Tests for serving/kv/: the host-side SlabAllocator (slab_allocator.py), slab_bytes_for
(slab_geometry.py) and the KVPool buffer (kv_pool.py).

The core is a hypothesis state machine that registers several models with different page sizes on
one allocator (all but one tiling the slab exactly, one leaving a remainder) and runs random
allocate/free sequences against an independent model of the bookkeeping: which pages each model
holds. From that alone it derives what the allocator must report (free pages per model, free slabs,
used pages, live bytes) and checks that no two pages handed out ever share a byte of the pool.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from serving.kv.kv_pool import KVPool
from serving.kv.slab_allocator import PoolExhausted, SlabAllocator
from serving.kv.slab_geometry import DEFAULT_SLAB_BYTES, slab_bytes_for

# ---------------------------------------------------------------------------------------------------
# Helpers shared by the state machine and the example tests


def byte_interval(alloc: SlabAllocator, model: str, page: int) -> tuple[int, int]:
    """[start, end) of `page` of `model` in the pool, following kv_pages.py's page-id convention."""
    m = alloc._models[model]  # page size as registered
    slab, local = divmod(page, alloc.pages_per_slab(model))
    start = slab * alloc.slab_bytes + local * m.page_bytes
    return start, start + m.page_bytes


def check_layout(alloc: SlabAllocator, held: dict[str, set[int]]) -> None:
    """Every held page lies inside one slab of the pool, and no two held pages share a byte."""
    intervals = []
    for model, pages in held.items():
        pps = alloc.pages_per_slab(model)
        page_bytes = alloc._models[model].page_bytes
        for page in pages:
            slab, local = divmod(page, pps)
            assert 0 <= slab < alloc.num_slabs, (model, page)
            assert 0 <= local < pps
            assert (local + 1) * page_bytes <= alloc.slab_bytes, (model, page)  # within its slab
            intervals.append((*byte_interval(alloc, model, page), model, page))
    intervals.sort()
    for (s0, e0, m0, p0), (s1, e1, m1, p1) in zip(intervals, intervals[1:]):
        assert e0 <= s1, f"{m0} page {p0} [{s0},{e0}) overlaps {m1} page {p1} [{s1},{e1})"


def snapshot(alloc: SlabAllocator) -> tuple:
    return ({m: alloc.num_free_pages(m) for m in alloc._models}, alloc.num_free_slabs, alloc.stats())


# ---------------------------------------------------------------------------------------------------
# Stateful property test


class SlabAllocatorMachine(RuleBasedStateMachine):
    """Random allocate/free traffic from 4 models sharing one pool."""

    @initialize(
        # Three page sizes (in words) from which slab_bytes_for derives an exactly-tiled slab.
        words=st.lists(st.sampled_from([64, 96, 128, 160, 192, 256, 384]), min_size=3, max_size=3),
        target_pages=st.integers(2, 6),  # slab target, in largest pages: keeps pages_per_slab small
        num_slabs=st.integers(1, 6),
        odd_frac=st.floats(0.15, 0.7),
        # Per model: slabs reserved (min) and a cap (max), each optional.
        limits=st.lists(st.tuples(st.integers(0, 2), st.one_of(st.none(), st.integers(0, 4))),
                        min_size=4, max_size=4),
    )
    def setup(self, words, target_pages, num_slabs, odd_frac, limits):
        page_bytes = [4 * w for w in words]
        slab_bytes = slab_bytes_for(page_bytes, target=target_pages * max(page_bytes))
        for p in page_bytes:
            assert slab_bytes % p == 0
        # A fourth model whose page size leaves a remainder in the slab (a multiple of 4 bytes).
        odd = max(4, int(slab_bytes * odd_frac) // 4 * 4)
        while slab_bytes % odd == 0:
            odd += 4
        assert odd <= slab_bytes
        self.alloc = SlabAllocator(num_slabs, slab_bytes)
        self.page_bytes = {f"m{i}": p for i, p in enumerate(page_bytes)} | {"odd": odd}
        self.held: dict[str, set[int]] = {}
        self.limits: dict[str, tuple[int, int | None]] = {}
        reserved = 0
        for (model, p), (lo, hi) in zip(self.page_bytes.items(), limits):
            lo = min(lo, num_slabs - reserved)  # reservations never exceed the pool
            hi = None if hi is None else max(hi, lo)
            pps = self.alloc.register(model, p, min_slabs=lo, max_slabs=hi)
            assert pps == slab_bytes // p >= 1
            reserved += lo
            self.limits[model] = (lo, hi)
            self.held[model] = set()
        assert self.alloc.pages_per_slab("odd") * odd < slab_bytes  # really does not tile

    # -- the model of the bookkeeping, derived from `held` only --

    def owned_slabs(self, model: str) -> dict[int, int]:
        """slab -> pages of `model` held in it. A slab with no held page must be free (reclaimed)."""
        pps = self.alloc.pages_per_slab(model)
        counts: dict[int, int] = {}
        for page in self.held[model]:
            counts[page // pps] = counts.get(page // pps, 0) + 1
        return counts

    def expected_free_slabs(self) -> int:
        used = set()
        for model in self.held:
            used |= set(self.owned_slabs(model))
        return self.alloc.num_slabs - len(used)

    def outstanding_reservation(self, model: str) -> int:
        return max(0, self.limits[model][0] - len(self.owned_slabs(model)))

    def expected_free_pages(self, model: str) -> int:
        """Free pages in its own slabs, plus the free slabs that are neither reserved for other
        models nor beyond its cap."""
        pps = self.alloc.pages_per_slab(model)
        partial = sum(pps - n for n in self.owned_slabs(model).values())
        fresh = self.expected_free_slabs() - sum(self.outstanding_reservation(o) for o in self.held if o != model)
        cap = self.limits[model][1]
        if cap is not None:
            fresh = min(fresh, cap - len(self.owned_slabs(model)))
        return partial + max(0, fresh) * pps

    # -- rules --

    @rule(data=st.data())
    def allocate(self, data):
        model = data.draw(st.sampled_from(sorted(self.held)), label="model")
        free = self.expected_free_pages(model)
        n = data.draw(st.one_of(st.integers(0, free + 2), st.just(free), st.just(free + 1)), label="n")
        if n > free:
            before = snapshot(self.alloc)
            with pytest.raises(PoolExhausted):
                self.alloc.allocate(model, n)
            assert snapshot(self.alloc) == before  # all or nothing
            return
        partial = {s: self.alloc.pages_per_slab(model) - c for s, c in self.owned_slabs(model).items()
                   if c < self.alloc.pages_per_slab(model)}
        pages = self.alloc.allocate(model, n)
        assert len(pages) == n
        assert len(set(pages)) == n, "the same page handed out twice in one call"
        assert not set(pages) & self.held[model], "a page already held was handed out again"
        if n and partial:  # fullest partial slab (fewest free pages) is used first
            fewest = min(partial.values())
            first_slab = pages[0] // self.alloc.pages_per_slab(model)
            assert partial.get(first_slab) == fewest, (partial, first_slab)
            # and it is drained before the allocation moves on to another slab
            take = min(n, fewest)
            assert {p // self.alloc.pages_per_slab(model) for p in pages[:take]} == {first_slab}
        self.held[model] |= set(pages)

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data())
    def free_some(self, data):
        model = data.draw(st.sampled_from(sorted(m for m, p in self.held.items() if p)), label="model")
        pages = data.draw(st.lists(st.sampled_from(sorted(self.held[model])), min_size=1, unique=True),
                          label="pages")
        self.alloc.free(model, pages)
        self.held[model] -= set(pages)

    @rule(data=st.data())
    def compact(self, data):
        model = data.draw(st.sampled_from(sorted(self.held)), label="model")
        held = self.held[model]
        pps = self.alloc.pages_per_slab(model)
        reclaimable = self.alloc.reclaimable_slabs(model)
        slabs_before = len(self.owned_slabs(model))
        moves = self.alloc.compact(model)
        assert set(moves) <= held, "moved a page that was not held"
        targets = set(moves.values())
        assert len(targets) == len(moves), "two pages moved onto one"
        assert not targets & (held - set(moves)), "moved onto a page still in use"
        self.held[model] = (held - set(moves)) | targets
        # As few slabs as the used pages need; exactly the reclaimable ones went back.
        assert len(self.owned_slabs(model)) == -(-len(held) // pps) == slabs_before - reclaimable
        assert self.alloc.reclaimable_slabs(model) == 0

    @rule()
    def free_everything(self):
        for model, pages in self.held.items():
            if pages:
                self.alloc.free(model, sorted(pages, reverse=True))
            pages.clear()
        self.check_all_back()

    def check_all_back(self):
        assert self.alloc.num_free_slabs == self.alloc.num_slabs
        stats = self.alloc.stats()
        assert stats["used_pages"] == {m: 0 for m in self.held}
        assert stats["live_kv_bytes"] == 0
        assert stats["free_slabs"] == self.alloc.num_slabs
        for model in self.held:
            assert self.alloc.num_free_pages(model) == self.expected_free_pages(model)
            assert self.alloc.num_free_pages(model) == self.alloc.capacity_pages(model)

    # -- invariants --

    @invariant()
    def no_overlap_and_within_slabs(self):
        check_layout(self.alloc, self.held)

    @invariant()
    def reservations_and_caps_hold(self):
        for model, (lo, hi) in self.limits.items():
            if hi is not None:
                assert len(self.owned_slabs(model)) <= hi, model
        # Enough free slabs remain to bring every model up to its reservation.
        assert self.alloc.num_free_slabs >= sum(self.outstanding_reservation(m) for m in self.held)

    @invariant()
    def counts_consistent(self):
        assert self.alloc.num_free_slabs == self.expected_free_slabs()
        stats = self.alloc.stats()
        assert stats["used_pages"] == {m: len(p) for m, p in self.held.items()}
        assert stats["live_kv_bytes"] == sum(len(p) * self.page_bytes[m] for m, p in self.held.items())
        assert stats["pool_bytes"] == self.alloc.num_slabs * self.alloc.slab_bytes
        for model in self.held:
            assert self.alloc.num_free_pages(model) == self.expected_free_pages(model), model

    def teardown(self):
        if hasattr(self, "alloc"):
            self.free_everything()


SlabAllocatorMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestSlabAllocatorMachine = SlabAllocatorMachine.TestCase


# ---------------------------------------------------------------------------------------------------
# Example tests


def test_fullest_partial_slab_first():
    alloc = SlabAllocator(num_slabs=4, slab_bytes=4096)
    assert alloc.register("a", 512) == 8
    slab0 = alloc.allocate("a", 8)  # fills slab 0
    slab1 = alloc.allocate("a", 8)  # fills slab 1
    assert {p // 8 for p in slab0} != {p // 8 for p in slab1}
    s0, s1 = slab0[0] // 8, slab1[0] // 8
    alloc.free("a", slab0[:2])  # slab s0: 2 free -> the fuller one
    alloc.free("a", slab1[:5])  # slab s1: 5 free
    assert alloc.num_free_slabs == 2
    got = alloc.allocate("a", 1)
    assert got[0] // 8 == s0
    # Spilling over: the rest of s0 first, then the next-fullest partial slab, before a fresh slab.
    got = alloc.allocate("a", 3)
    assert [p // 8 for p in got] == [s0, s1, s1]
    assert alloc.num_free_slabs == 2
    # Swap which slab is fuller and check again.
    alloc.free("a", [p for p in slab0 if p not in slab0[:2]][:6])  # s0 now has 6 free
    got = alloc.allocate("a", 1)
    assert got[0] // 8 == s1


def test_emptied_slab_reused_by_other_page_size():
    alloc = SlabAllocator(num_slabs=2, slab_bytes=slab_bytes_for([1024, 1536], target=3072))
    assert alloc.slab_bytes == 3072
    assert alloc.register("a", 1024) == 3
    assert alloc.register("b", 1536) == 2
    pa = alloc.allocate("a", 4)  # one slab full, one page of the other slab
    assert alloc.num_free_slabs == 0
    with pytest.raises(PoolExhausted):
        alloc.allocate("b", 1)
    spill = [p for p in pa if p // 3 != pa[0] // 3]
    assert len(spill) == 1
    # Freeing the one page in the second slab hands it back at once...
    alloc.free("a", spill)
    assert alloc.num_free_slabs == 1
    assert alloc.num_free_pages("b") == 2
    # ...and model b, with a different page size, can format and fill it.
    pb = alloc.allocate("b", 2)
    assert {p // 2 for p in pb} == {spill[0] // 3}
    check_layout(alloc, {"a": set(pa) - set(spill), "b": set(pb)})
    alloc.free("b", pb)
    alloc.free("a", [p for p in pa if p not in spill])
    assert alloc.num_free_slabs == 2


def test_double_free_raises():
    alloc = SlabAllocator(2, 4096)
    alloc.register("a", 1024)
    pages = alloc.allocate("a", 3)
    alloc.free("a", [pages[0]])
    before = snapshot(alloc)
    with pytest.raises(ValueError, match="twice"):  # slab still owned: detected as a repeat
        alloc.free("a", [pages[0]])
    assert snapshot(alloc) == before
    alloc.free("a", pages[1:])  # slab now empty and reclaimed
    before = snapshot(alloc)
    with pytest.raises(ValueError):  # slab gone back to the pool: the page is not allocated
        alloc.free("a", [pages[1]])
    assert snapshot(alloc) == before
    with pytest.raises(ValueError):  # a page id never handed out
        alloc.free("a", [7])


def test_free_page_of_another_model_raises():
    alloc = SlabAllocator(3, 4096)
    alloc.register("a", 1024)  # 4 pages per slab
    alloc.register("b", 2048)  # 2 pages per slab
    pa = alloc.allocate("a", 4)  # slab 0
    pb = alloc.allocate("b", 2)  # slab 1
    assert {p // 4 for p in pa} == {0} and {p // 2 for p in pb} == {1}
    before = snapshot(alloc)
    # b's page id 0 and 1 map to slab 0, owned by a
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free("b", [0])
    # a's page ids 4..7 map to slab 1, owned by b
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free("a", [5])
    assert snapshot(alloc) == before


def test_register_errors():
    alloc = SlabAllocator(2, 4096)
    assert alloc.register("a", 1024) == 4
    with pytest.raises(ValueError, match="already registered"):
        alloc.register("a", 1024)
    with pytest.raises(ValueError, match="already registered"):
        alloc.register("a", 2048)
    assert alloc.pages_per_slab("a") == 4  # the first registration stands
    with pytest.raises(ValueError, match="does not fit"):
        alloc.register("big", 4100)
    assert alloc.register("exact", 4096) == 1
    assert "big" not in alloc.stats()["used_pages"]


def test_constructor_errors():
    with pytest.raises(ValueError):
        SlabAllocator(0, 4096)
    with pytest.raises(ValueError):
        SlabAllocator(1, 4098)


def test_allocate_zero_and_exhaustion():
    alloc = SlabAllocator(2, 4096)
    alloc.register("a", 1024)
    assert alloc.allocate("a", 0) == []
    before = snapshot(alloc)
    with pytest.raises(PoolExhausted):
        alloc.allocate("a", 9)
    assert snapshot(alloc) == before
    pages = alloc.allocate("a", 8)
    assert sorted(pages) == list(range(8))
    with pytest.raises(PoolExhausted):
        alloc.allocate("a", 1)
    alloc.free("a", pages)
    assert alloc.num_free_slabs == 2


def test_free_with_bad_page_leaves_state_unchanged():
    alloc = SlabAllocator(2, 4096)
    alloc.register("a", 1024)
    alloc.register("b", 1024)
    pages = alloc.allocate("a", 2)
    other = alloc.allocate("b", 1)
    before = snapshot(alloc)
    for bad in ([pages[0], pages[0]], [pages[0], other[0]], [pages[1], 4 * 1024]):
        with pytest.raises(ValueError):
            alloc.free("a", bad)
        assert snapshot(alloc) == before


def test_allocate_negative_rejected():
    alloc = SlabAllocator(2, 4096)
    alloc.register("a", 1024)
    alloc.allocate("a", 1)
    before = snapshot(alloc)
    with pytest.raises(ValueError):
        alloc.allocate("a", -1)
    assert snapshot(alloc) == before


@pytest.mark.parametrize("seed_pages", [
    [1024], [1024, 1536], [4096, 6144, 8192], [12, 20, 28], [3 * 4096, 5 * 4096, 7 * 4096],
    [DEFAULT_SLAB_BYTES], [DEFAULT_SLAB_BYTES + 4], [3 * DEFAULT_SLAB_BYTES // 2],
])
def test_slab_bytes_for_examples(seed_pages):
    for target in (1, 4096, DEFAULT_SLAB_BYTES, 3 * DEFAULT_SLAB_BYTES + 1):
        s = slab_bytes_for(seed_pages, target)
        assert s >= target
        assert all(s % p == 0 for p in seed_pages)
        unit = int(np.lcm.reduce(seed_pages))
        assert s - unit < target or s == unit  # smallest such multiple
    assert slab_bytes_for(seed_pages) >= DEFAULT_SLAB_BYTES


@settings(max_examples=300, deadline=None)
@given(pages=st.lists(st.integers(1, 4096).map(lambda w: 4 * w), min_size=1, max_size=4),
       target=st.integers(1, 1 << 24))
def test_slab_bytes_for_is_tiling_multiple(pages, target):
    s = slab_bytes_for(pages, target)
    assert s >= target
    for p in pages:
        assert s % p == 0
    assert s % 4 == 0
    unit = int(np.lcm.reduce(np.array(pages, dtype=object)))
    assert s % unit == 0 and (s == unit or s - unit < target)
    # Every page size then tiles a slab of an allocator built from it exactly.
    alloc = SlabAllocator(1, s)
    for i, p in enumerate(pages):
        assert alloc.register(f"m{i}", p) * p == s


def test_kv_pool_buffer():
    pool = KVPool(num_slabs=3, slab_bytes=8192)
    assert pool.words.shape == (3, 2048)
    assert pool.words.dtype == np.uint32
    assert pool.nbytes == 3 * 8192 == pool.allocator.stats()["pool_bytes"]
    assert not np.asarray(pool.words).any()
    assert pool.allocator.num_slabs == 3 and pool.allocator.slab_bytes == 8192
    assert pool.allocator.num_free_slabs == 3
    with pytest.raises(ValueError):
        KVPool(num_slabs=1, slab_bytes=8190)
