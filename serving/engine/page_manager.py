"""Per-sequence page tables of one model, backed by the shared pool's slab allocator, with the
model's prefix cache (optional) in between: a new sequence starts on the cached pages of its
longest cached prefix, full pages are offered to the cache as they fill, and idle cached pages are
evicted (least recent first) before the model counts itself short of pages."""

from __future__ import annotations

from typing import Callable

from pallas_kernels.kv_pages import KVPageLayout
from serving.kv.slab_allocator import SlabAllocator
from serving.engine.prefix_cache import PrefixCache, page_keys
from serving.engine.sequence import Sequence


class PageManager:
    def __init__(self, allocator: SlabAllocator, model_key: str, layout: KVPageLayout, *,
                 reclaim: Callable[[], bool] | None = None, cache: PrefixCache | None = None):
        self.allocator = allocator
        self.model_key = model_key
        self.layout = layout
        # From a runtime that shares the pool: frees memory other models hold without using it
        # (their idle cached pages, then compaction); returns whether it freed anything.
        self.reclaim = reclaim
        self.cache = cache

    def pages_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra pages `seq` needs to cache `num_new_tokens` more tokens."""
        return max(0, self.layout.pages_for(seq.num_computed + num_new_tokens) - len(seq.pages))

    @property
    def num_idle_cached(self) -> int:
        return self.cache.num_idle if self.cache is not None else 0

    @property
    def num_free_pages(self) -> int:
        """Pages the model can have now: free ones and idle cached ones."""
        return self.allocator.num_free_pages(self.model_key) + self.num_idle_cached

    @property
    def num_used_pages(self) -> int:
        """Pages sequences hold (idle cached pages not counted)."""
        return self.allocator.used_pages(self.model_key) - self.num_idle_cached

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.pages_needed(seq, num_new_tokens)
        if needed <= self.num_free_pages:
            return True
        return self.reclaim is not None and self.reclaim() and needed <= self.num_free_pages

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give `seq` the pages for `num_new_tokens` more tokens, evicting idle cached pages if the
        free ones are too few; raises PoolExhausted (nothing taken)."""
        n = self.pages_needed(seq, num_new_tokens)
        if n:
            self.evict(n - self.allocator.num_free_pages(self.model_key))
            seq.pages.extend(self.allocator.allocate(self.model_key, n))

    def evict(self, n: int) -> int:
        """Free up to `n` idle cached pages (least recent first); how many."""
        if self.cache is None or n <= 0:
            return 0
        pages = self.cache.evict(n)
        if pages:
            self.allocator.free(self.model_key, pages)
        return len(pages)

    def reuse_prefix(self, seq: Sequence) -> int:
        """Start a sequence that holds no pages on the cached pages of its longest cached prefix
        (whole pages, leaving at least its last token to compute); the tokens reused."""
        if self.cache is None or seq.pages:
            return 0
        tpp = self.layout.tokens_per_page
        seq.pages = self.cache.lookup(self._keys(seq, (seq.num_tokens - 1) // tpp))
        seq.num_offered_pages = len(seq.pages)
        seq.num_computed = seq.num_prefilled = len(seq.pages) * tpp
        return seq.num_computed

    def offer_full_pages(self, seq: Sequence) -> None:
        """Offer the pages `seq` has filled since last time, with tokens the host knows, to the cache.
        Only pages whose KV prompt chunks computed: a decode step's (one row of one token) can round
        differently from a prefill's in bfloat16, so reusing it could change a later request's greedy
        tokens against an uncached run. A finished answer's pages are cached once a later turn's
        prompt brings them back (its prefill computes them once more)."""
        full = min(seq.num_prefilled, seq.num_known) // self.layout.tokens_per_page
        if self.cache is None or full <= seq.num_offered_pages:
            return
        keys = self._keys(seq, full)
        for i in range(seq.num_offered_pages, full):
            self.cache.offer(seq.pages[i], keys[i])
        seq.num_offered_pages = full

    def _keys(self, seq: Sequence, num_pages: int) -> list[bytes]:
        """The prefix-cache keys of `seq`'s first `num_pages` full pages (kept on the sequence)."""
        return page_keys(seq.prompt_token_ids + seq.output_token_ids, self.layout.tokens_per_page, num_pages,
                         seq.page_keys)

    def release(self, seq: Sequence) -> None:
        if seq.pages:
            free = self.cache.release(seq.pages) if self.cache is not None else seq.pages
            if free:
                self.allocator.free(self.model_key, free)
            seq.pages = []
        seq.num_offered_pages = seq.num_prefilled = 0

    def rename(self, moves: dict[int, int]) -> None:
        """The pool moved pages (compaction): follow them in the cache."""
        if self.cache is not None:
            self.cache.rename(moves)
