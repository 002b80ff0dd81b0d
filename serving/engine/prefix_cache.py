"""Automatic prefix caching: one model's full KV pages, keyed by their tokens and every token before
them, reused by later requests that start the same way (vLLM's automatic prefix caching, SGLang's
radix cache, over the slab pool's pages).

A page is cached once it is full; its key is a chain hash (BLAKE2b, so a crafted prompt cannot
collide with another user's page) of the page's tokens and the key of the page before it, so equal
keys mean equal prefixes. A cached page is shared by every sequence that holds it, read-only: only
full pages are shared and a sequence always writes past them, so no page is ever copied on write.
When the last sequence holding a cached page lets it go, the page stays in the pool, idle, in LRU
order: the first memory anyone gets back (`evict`) before a running sequence is preempted or another
model sharing the pool waits. The cache belongs to the engine's PageManager, which frees what it
hands back to the slab allocator; the cache never touches the allocator itself.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


def page_keys(tokens: list[int], tokens_per_page: int, num_pages: int, known: list[bytes]) -> list[bytes]:
    """The keys of the first `num_pages` full pages of `tokens`, extending `known` (the keys of its
    first pages, computed before) in place."""
    for i in range(len(known), num_pages):
        page = np.asarray(tokens[i * tokens_per_page:(i + 1) * tokens_per_page], np.int64)
        known.append(hashlib.blake2b(page.tobytes(), digest_size=16, key=known[-1] if known else b"").digest())
    return known[:num_pages]


class PrefixCache:
    """Which pages hold which prefixes, who holds them, and which are idle (held by no sequence)."""

    def __init__(self):
        self._page_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._holders: dict[int, int] = {}                  # cached page -> sequences holding it
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached pages no one holds, least recent first
        self.queried_tokens = 0    # prompt tokens of admitted sequences
        self.hit_tokens = 0        # ... found cached

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    @property
    def num_cached(self) -> int:
        return len(self._key_of)

    def pages(self) -> list[int]:
        """Every page the cache holds, idle or not."""
        return list(self._key_of)

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The pages of the longest cached run of `keys` from the first; the caller now holds them."""
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
            self._holders[page] = self._holders.get(page, 0) + 1
            self._idle.pop(page, None)
        return pages

    def record(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit

    def offer(self, page: int, key: bytes) -> None:
        """A sequence's page just filled up with the prefix `key`: cache it, unless that prefix is
        already cached in another page (this one then stays the sequence's own)."""
        if key in self._page_of or page in self._key_of:
            return
        self._page_of[key], self._key_of[page], self._holders[page] = page, key, 1

    def release(self, pages: list[int]) -> list[int]:
        """A sequence lets its pages go; returns those that are not the cache's (the caller frees
        them). Cached pages no one holds any more become idle, most recent last, and a sequence's
        later pages before its earlier ones: the tail of a prefix is evicted before its head."""
        free = []
        for page in reversed(pages):
            if page not in self._key_of:
                free.append(page)
                continue
            self._holders[page] -= 1
            if not self._holders[page]:
                del self._holders[page]
                self._idle[page] = None
        return free

    def evict(self, n: int) -> list[int]:
        """Forget up to `n` idle pages, least recently used first; the caller frees them."""
        out = []
        while self._idle and len(out) < n:
            page, _ = self._idle.popitem(last=False)
            del self._page_of[self._key_of.pop(page)]
            out.append(page)
        return out

    def rename(self, moves: dict[int, int]) -> None:
        """The pool moved pages (old -> new id, compaction): follow them."""
        moved = [(old, new) for old, new in moves.items() if old in self._key_of]
        keys = {old: self._key_of.pop(old) for old, _ in moved}
        holders = {old: self._holders.pop(old, 0) for old, _ in moved}
        idle_order = list(self._idle)
        for old, new in moved:
            self._key_of[new] = keys[old]
            self._page_of[keys[old]] = new
            if holders[old]:
                self._holders[new] = holders[old]
        self._idle = OrderedDict((moves.get(p, p), None) for p in idle_order)
