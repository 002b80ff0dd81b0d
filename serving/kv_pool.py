"""The device KV pool and its host-side slab allocator.

One `uint32[num_slabs, slab_words]` buffer per device holds every model's KV cache. The host hands out
pages: a slab is formatted into one model's page size the first time that model needs it, pages are
taken from the model's fullest partial slab first (so slabs empty out and can be reused by any model),
and a slab whose pages are all free goes back to the free list at once.

Page ids are per model: page `p` of a model with `pages_per_slab = n` is local page `p % n` of slab
`p // n` (see pallas_kernels/kv_pages.py for the in-slab layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from pallas_kernels.kv_pages import WORD_BYTES

DEFAULT_SLAB_BYTES = 2 << 20


def slab_bytes_for(page_bytes: list[int], target: int = DEFAULT_SLAB_BYTES) -> int:
    """Smallest multiple of the pages' least common multiple that is >= target, so every model's
    pages tile a slab exactly."""
    from math import lcm

    unit = lcm(*page_bytes)
    return unit * max(1, -(-target // unit))


class PoolExhausted(Exception):
    """Not enough free pages; the caller preempts or waits."""


@dataclass
class _ModelSlabs:
    page_bytes: int
    pages_per_slab: int
    free_pages: dict[int, list[int]] = field(default_factory=dict)  # slab -> free local pages
    used_pages: int = 0


class SlabAllocator:
    """Host-side bookkeeping of which slab belongs to which model and which pages are free."""

    def __init__(self, num_slabs: int, slab_bytes: int):
        if num_slabs <= 0:
            raise ValueError(f"the KV pool needs at least one slab, got {num_slabs}")
        if slab_bytes % WORD_BYTES:
            raise ValueError("slab_bytes must be a multiple of 4")
        self.num_slabs = num_slabs
        self.slab_bytes = slab_bytes
        self._free_slabs = list(range(num_slabs - 1, -1, -1))  # pop() takes the lowest index first
        self._owner: dict[int, str] = {}
        self._models: dict[str, _ModelSlabs] = {}

    def register(self, model: str, page_bytes: int) -> int:
        """Declare a model's page size; returns its pages per slab."""
        if model in self._models:
            raise ValueError(f"model {model!r} is already registered with this pool")
        if page_bytes > self.slab_bytes:
            raise ValueError(f"a page of {page_bytes} bytes does not fit a slab of {self.slab_bytes} bytes")
        pages_per_slab = self.slab_bytes // page_bytes
        self._models[model] = _ModelSlabs(page_bytes, pages_per_slab)
        return pages_per_slab

    def pages_per_slab(self, model: str) -> int:
        return self._models[model].pages_per_slab

    def num_free_pages(self, model: str) -> int:
        m = self._models[model]
        return sum(len(p) for p in m.free_pages.values()) + len(self._free_slabs) * m.pages_per_slab

    def allocate(self, model: str, n: int) -> list[int]:
        """n page ids for `model`, all or nothing; raises PoolExhausted."""
        m = self._models[model]
        if n < 0:
            raise ValueError(f"{model}: cannot allocate {n} pages")
        if n > self.num_free_pages(model):
            raise PoolExhausted(f"{model}: {n} pages requested, {self.num_free_pages(model)} free")
        pages: list[int] = []
        while len(pages) < n:
            if m.free_pages:
                # Fullest partial slab first: fewest free pages left.
                slab = min(m.free_pages, key=lambda s: len(m.free_pages[s]))
            else:
                slab = self._free_slabs.pop()
                self._owner[slab] = model
                m.free_pages[slab] = list(range(m.pages_per_slab - 1, -1, -1))
            free = m.free_pages[slab]
            take = min(n - len(pages), len(free))
            pages.extend(slab * m.pages_per_slab + free.pop() for _ in range(take))
            if not free:
                del m.free_pages[slab]
        m.used_pages += n
        return pages

    def free(self, model: str, pages: list[int]) -> None:
        """Return pages; all or nothing (every page is checked before any is freed)."""
        m = self._models[model]
        located = [divmod(page, m.pages_per_slab) for page in pages]
        if len(set(pages)) != len(pages):
            raise ValueError(f"pages of {model!r} listed twice in one free: {sorted(pages)}")
        for page, (slab, local) in zip(pages, located):
            if self._owner.get(slab) != model:
                raise ValueError(f"page {page} of {model!r} is not allocated")
            if local in m.free_pages.get(slab, ()):
                raise ValueError(f"page {page} of {model!r} freed twice")
        for slab, local in located:
            free = m.free_pages.setdefault(slab, [])
            free.append(local)
            if len(free) == m.pages_per_slab:  # reclaim the empty slab for any model
                del m.free_pages[slab]
                del self._owner[slab]
                self._free_slabs.append(slab)
        m.used_pages -= len(pages)

    @property
    def num_free_slabs(self) -> int:
        return len(self._free_slabs)

    def stats(self) -> dict:
        used = {name: m.used_pages for name, m in self._models.items()}
        return {
            "pool_bytes": self.num_slabs * self.slab_bytes,
            "free_slabs": len(self._free_slabs),
            "used_pages": used,
            "live_kv_bytes": sum(m.used_pages * m.page_bytes for m in self._models.values()),
        }


class KVPool:
    """The device buffer plus its allocator. `words` is replaced after every step that donates it."""

    def __init__(self, num_slabs: int, slab_bytes: int, device: jax.Device | None = None):
        self.allocator = SlabAllocator(num_slabs, slab_bytes)
        shape = (num_slabs, slab_bytes // WORD_BYTES)
        self.words = jax.device_put(jnp.zeros(shape, jnp.uint32), device)

    @property
    def nbytes(self) -> int:
        return self.words.size * WORD_BYTES
