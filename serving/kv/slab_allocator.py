"""The host-side slab allocator of a device's KV pool (FineServe's KV Slab, arXiv 2509.06261, over
PagedAttention-style pages, arXiv 2309.06180).

The host hands out pages: a slab is formatted into one model's page size the first time that model
needs it, pages are taken from the model's fullest partial slab first (so slabs empty out and can be
reused by any model), and a slab whose pages are all free goes back to the free list at once. Page
ids are per model: page `p` of a model with `pages_per_slab = n` is local page `p % n` of slab
`p // n` (pallas_kernels/kv_pages.py has the in-slab layout). A model may reserve slabs (`min_slabs`)
and be capped (`max_slabs`); equal reservation and cap give a static partition, the baseline of
separate per-model pools. `compact` moves a model's live pages into as few slabs as possible.
Design notes (allocation order, byte accounting, compaction): docs/kv_slab.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pallas_kernels.kv_pages import WORD_BYTES

class PoolExhausted(Exception):
    """Not enough free pages; the caller preempts or waits."""


@dataclass
class _ModelSlabs:
    page_bytes: int
    pages_per_slab: int
    min_slabs: int = 0            # reserved: other models never take the slabs it still needs
    max_slabs: int | None = None  # cap on slabs held
    free_pages: dict[int, list[int]] = field(default_factory=dict)  # slab -> free local pages
    slabs: set[int] = field(default_factory=set)                    # slabs formatted for this model
    used_pages: int = 0

    @property
    def reserve_outstanding(self) -> int:
        return max(0, self.min_slabs - len(self.slabs))


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

    def register(self, model: str, page_bytes: int, *, min_slabs: int = 0, max_slabs: int | None = None) -> int:
        """Declare a model's page size (and optional slab reservation and cap); returns its pages per
        slab."""
        if model in self._models:
            raise ValueError(f"model {model!r} is already registered with this pool")
        if page_bytes <= 0 or page_bytes > self.slab_bytes:
            raise ValueError(f"a page of {page_bytes} bytes does not fit a slab of {self.slab_bytes} bytes")
        if min_slabs < 0 or (max_slabs is not None and not min_slabs <= max_slabs):
            raise ValueError(f"{model}: need 0 <= min_slabs <= max_slabs, got {min_slabs}, {max_slabs}")
        reserved = sum(m.min_slabs for m in self._models.values()) + min_slabs
        if reserved > self.num_slabs:
            raise ValueError(f"{model}: reservations of {reserved} slabs exceed the pool's {self.num_slabs}")
        pages_per_slab = self.slab_bytes // page_bytes
        self._models[model] = _ModelSlabs(page_bytes, pages_per_slab, min_slabs, max_slabs)
        return pages_per_slab

    def unregister(self, model: str) -> None:
        """Forget a model that holds no slabs."""
        if self._models[model].slabs:
            raise ValueError(f"model {model!r} still holds slabs of this pool")
        del self._models[model]

    def pages_per_slab(self, model: str) -> int:
        return self._models[model].pages_per_slab

    def fresh_slabs_for(self, model: str) -> int:
        """Free slabs `model` may format now: minus other models' outstanding reservations, within
        its own cap."""
        m = self._models[model]
        others = sum(o.reserve_outstanding for name, o in self._models.items() if name != model)
        n = max(0, len(self._free_slabs) - others)
        if m.max_slabs is not None:
            n = min(n, m.max_slabs - len(m.slabs))
        return n

    def free_pages_in_slabs(self, model: str) -> int:
        """Free pages inside the slabs already formatted for `model`."""
        return sum(len(p) for p in self._models[model].free_pages.values())

    def num_free_pages(self, model: str) -> int:
        return self.free_pages_in_slabs(model) + self.fresh_slabs_for(model) * self._models[model].pages_per_slab

    def capacity_pages(self, model: str) -> int:
        """Pages `model` could hold if every other model held only its reservation."""
        m = self._models[model]
        others = sum(o.min_slabs for name, o in self._models.items() if name != model)
        slabs = self.num_slabs - others
        if m.max_slabs is not None:
            slabs = min(slabs, m.max_slabs)
        return slabs * m.pages_per_slab

    def used_pages(self, model: str) -> int:
        return self._models[model].used_pages

    def used_pages_of_others(self, model: str) -> int:
        return sum(m.used_pages for name, m in self._models.items() if name != model)

    def allocate(self, model: str, n: int, fresh_slabs: list[int] | None = None) -> list[int]:
        """n page ids for `model`, all or nothing; raises PoolExhausted. `fresh_slabs`: the free slabs
        to format, in order, when the model's partial slabs run out (a tensor-parallel group takes
        the same slabs on every member pool); default: the most recently freed first."""
        m = self._models[model]
        if n < 0:
            raise ValueError(f"{model}: cannot allocate {n} pages")
        if n > self.num_free_pages(model):
            raise PoolExhausted(f"{model}: {n} pages requested, {self.num_free_pages(model)} free")
        pages: list[int] = []
        fresh = iter(fresh_slabs) if fresh_slabs is not None else None
        while len(pages) < n:
            if m.free_pages:
                # Fullest partial slab first: fewest free pages left.
                slab = min(m.free_pages, key=lambda s: len(m.free_pages[s]))
            else:
                if fresh is None:
                    slab = self._free_slabs.pop()
                else:
                    slab = next(fresh)
                    self._free_slabs.remove(slab)
                self._owner[slab] = model
                m.slabs.add(slab)
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
                self._release_slab(m, slab)
        m.used_pages -= len(pages)

    def _release_slab(self, m: _ModelSlabs, slab: int) -> None:
        """An empty slab of model `m` goes back to the free list, reformattable for any model."""
        del m.free_pages[slab]
        del self._owner[slab]
        m.slabs.discard(slab)
        self._free_slabs.append(slab)

    def reclaimable_slabs(self, model: str) -> int:
        """Slabs `compact` would hand back: held slabs beyond what its used pages need."""
        m = self._models[model]
        return len(m.slabs) - -(-m.used_pages // m.pages_per_slab)

    def compact(self, model: str) -> dict[int, int]:
        """Pack `model`'s used pages into as few slabs as possible and return the emptied slabs to
        the free list. Returns the moves {old page: new page}; the caller copies the pages' contents
        (kv_pages.copy_pages) and renames them in its page tables. Free pages stranded in a model's
        slabs (free for it, useless to others) become free slabs for anyone."""
        m = self._models[model]
        keep_count = -(-m.used_pages // m.pages_per_slab)
        partial = sorted(m.free_pages, key=lambda s: len(m.free_pages[s]))  # fullest first
        full = len(m.slabs) - len(partial)
        keep, drain = partial[:max(0, keep_count - full)], partial[max(0, keep_count - full):]
        holes = [slab * m.pages_per_slab + local for slab in keep for local in m.free_pages[slab]]
        moves: dict[int, int] = {}
        for slab in drain:
            free = set(m.free_pages[slab])
            for local in range(m.pages_per_slab):
                if local not in free:
                    moves[slab * m.pages_per_slab + local] = holes.pop()
        for slab in keep:  # what stays free in the kept slabs: the holes no page moved into
            del m.free_pages[slab]
        for page in holes:
            m.free_pages.setdefault(page // m.pages_per_slab, []).append(page % m.pages_per_slab)
        for slab in drain:
            self._release_slab(m, slab)
        return moves

    @property
    def num_free_slabs(self) -> int:
        return len(self._free_slabs)

    def free_slab_ids(self) -> set[int]:
        return set(self._free_slabs)

    def stats(self) -> dict:
        """Where the pool's bytes are. Every byte is in exactly one of: pages in use
        (`live_kv_bytes`), free pages inside slabs formatted for a model (`stranded_bytes`: free,
        but only for that model), slab tails no page of the owner fits (`slab_tail_bytes`), free
        slabs (`free_bytes`). External fragmentation is the stranded share: memory free for one
        model but not for the others."""
        s = self.slab_bytes
        models = {}
        for name, m in self._models.items():
            free = sum(len(p) for p in m.free_pages.values())
            models[name] = {"page_bytes": m.page_bytes, "pages_per_slab": m.pages_per_slab,
                            "slabs": len(m.slabs), "used_pages": m.used_pages, "free_pages": free,
                            "min_slabs": m.min_slabs, "max_slabs": m.max_slabs}
        allocated = sum(m.used_pages * m.page_bytes for m in self._models.values())
        stranded = sum(v["free_pages"] * v["page_bytes"] for v in models.values())
        tails = sum(len(m.slabs) * (s - m.pages_per_slab * m.page_bytes) for m in self._models.values())
        pool = self.num_slabs * s
        return {
            "pool_bytes": pool,
            "slab_bytes": s,
            "free_slabs": len(self._free_slabs),
            "free_bytes": len(self._free_slabs) * s,
            "used_pages": {name: v["used_pages"] for name, v in models.items()},
            "live_kv_bytes": allocated,
            "stranded_bytes": stranded,
            "slab_tail_bytes": tails,
            "external_fragmentation": stranded / pool,
            "models": models,
        }
