"""Per-sequence page tables of one model, backed by the shared pool's slab allocator."""

from __future__ import annotations

from typing import Callable

from pallas_kernels.kv_pages import KVPageLayout
from serving.kv.slab_allocator import SlabAllocator
from serving.engine.sequence import Sequence


class PageManager:
    def __init__(self, allocator: SlabAllocator, model_key: str, layout: KVPageLayout, *,
                 reclaim: Callable[[], bool] | None = None):
        self.allocator = allocator
        self.model_key = model_key
        self.layout = layout
        # From a runtime that shares the pool: frees memory other models hold without using it
        # (compaction); returns whether it freed anything.
        self.reclaim = reclaim

    def pages_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra pages `seq` needs to cache `num_new_tokens` more tokens."""
        return max(0, self.layout.pages_for(seq.num_computed + num_new_tokens) - len(seq.pages))

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free_pages(self.model_key)

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.pages_needed(seq, num_new_tokens)
        if needed <= self.num_free_pages:
            return True
        return self.reclaim is not None and self.reclaim() and needed <= self.num_free_pages

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give `seq` the pages for `num_new_tokens` more tokens; raises PoolExhausted (nothing taken)."""
        n = self.pages_needed(seq, num_new_tokens)
        if n:
            seq.pages.extend(self.allocator.allocate(self.model_key, n))

    def release(self, seq: Sequence) -> None:
        if seq.pages:
            self.allocator.free(self.model_key, seq.pages)
            seq.pages = []
