"""How one device's KV pool is carved for a set of co-located models.

Given each model's page layout (its precision and depth fix the bytes per page), `plan_pool` picks the
slab size and gives every model its geometry (pages per slab, page stride) and its slab limits. Three
modes share all the code downstream (allocator, runtime, kernels):

  "slab"         KV Slab: any slab can be formatted for any model; slab size and each model's page
                 length from `choose_slab_geometry` (pages tile the slab with no waste, or < 1%
                 when an exact tiling would be too coarse, taking 2x or half a model's tokens per
                 page where that is what it takes).
  "static"       the baseline of separate per-model pools (one vLLM instance per model): each model
                 owns a fixed share of the slabs (equal by default), reserved and capped.
  "single_page"  the baseline of one page size for the whole pool: every page padded to the largest
                 model's page, slabs shared as in "slab".
Design notes (modes, baselines, where plans come from): docs/kv_slab.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pallas_kernels.kv_pages import WORD_BYTES, KVPageLayout
from serving.kv.kv_pool import KVPool
from serving.kv.slab_allocator import SlabAllocator
from serving.kv.slab_geometry import DEFAULT_SLAB_BYTES, choose_slab_geometry, slab_bytes_for

POOL_MODES = ("slab", "static", "single_page")
MIN_TOKENS_PER_PAGE = 8


@dataclass(frozen=True)
class ModelPages:
    """One model's request to the pool: its page layout and optional limits (bytes)."""

    layout: KVPageLayout
    reserve_bytes: int = 0          # slabs reserved for this model (rounded up to whole slabs)
    max_bytes: int | None = None    # cap (rounded down to whole slabs)
    share: float | None = None      # "static" mode: fraction of the pool (default: equal shares)


@dataclass(frozen=True)
class PoolPlan:
    mode: str
    slab_bytes: int
    num_slabs: int
    layouts: dict[str, KVPageLayout]          # with pages_per_slab (and page stride) set
    limits: dict[str, tuple[int, int | None]]  # (min_slabs, max_slabs)

    @property
    def pool_bytes(self) -> int:
        return self.slab_bytes * self.num_slabs

    def build(self, device=None, fill: int = 0, models: list[str] | None = None) -> KVPool:
        """The device pool with every model (or those of `models`: the ones on this device of a
        group planned together) registered."""
        pool = KVPool(self.num_slabs, self.slab_bytes, device, fill=fill)
        self.register(pool.allocator, models)
        return pool

    def register(self, allocator: SlabAllocator, models: list[str] | None = None) -> SlabAllocator:
        """Register every model (or those of `models`) with `allocator` (one of `num_slabs` x `slab_bytes`)."""
        for name, layout in self.layouts.items():
            if models is not None and name not in models:
                continue
            lo, hi = self.limits[name]
            pps = allocator.register(name, layout.page_slot_bytes, min_slabs=lo, max_slabs=hi)
            assert pps == layout.pages_per_slab
        return allocator


def plan_pool(models: dict[str, ModelPages], pool_bytes: int, mode: str = "slab",
              target_slab_bytes: int = DEFAULT_SLAB_BYTES) -> PoolPlan:
    if mode not in POOL_MODES:
        raise ValueError(f"unknown pool mode {mode!r}; choose one of {POOL_MODES}")
    if not models:
        raise ValueError("a pool needs at least one model")
    if not isinstance(pool_bytes, int) or pool_bytes <= 0:
        raise ValueError(f"pool_bytes must be a positive integer, got {pool_bytes!r}")
    page_bytes = [m.layout.page_bytes for m in models.values()]
    if mode == "single_page":
        slot_words = max(page_bytes) // WORD_BYTES
        slab_bytes = slab_bytes_for([slot_words * WORD_BYTES], target_slab_bytes)
        layouts = {name: dataclasses.replace(m.layout, page_stride_words=slot_words) for name, m in models.items()}
    else:
        options = {name: page_size_options(m.layout) for name, m in models.items()}
        slab_bytes, chosen = choose_slab_geometry([[l.page_bytes for l in opts] for opts in options.values()],
                                                  target_slab_bytes)
        layouts = {name: opts[i] for (name, opts), i in zip(options.items(), chosen)}
    num_slabs = pool_bytes // slab_bytes
    if num_slabs < len(models):
        raise ValueError(f"a pool of {pool_bytes} bytes holds {num_slabs} slabs of {slab_bytes} bytes, "
                         f"fewer than the {len(models)} models sharing it; give it more memory")
    layouts = {name: dataclasses.replace(l, pages_per_slab=slab_bytes // l.page_slot_bytes)
               for name, l in layouts.items()}
    if mode == "static":
        limits = _static_partition(models, num_slabs)
    else:
        limits = {}
        for name, m in models.items():
            lo = -(-m.reserve_bytes // slab_bytes)
            hi = None if m.max_bytes is None else m.max_bytes // slab_bytes
            if hi is not None and hi < max(1, lo):
                raise ValueError(f"{name}: max_bytes={m.max_bytes} is below one slab ({slab_bytes} bytes) "
                                 f"or below its reservation")
            limits[name] = (lo, hi)
        if sum(lo for lo, _ in limits.values()) > num_slabs:
            raise ValueError(f"reservations ({sum(m.reserve_bytes for m in models.values())} bytes) exceed "
                             f"the pool ({num_slabs * slab_bytes} bytes)")
    return PoolPlan(mode, slab_bytes, num_slabs, layouts, limits)


def page_size_options(layout: KVPageLayout) -> list[KVPageLayout]:
    """A model's page geometries, preferred first: its own tokens per page, then twice and half
    that (not below MIN_TOKENS_PER_PAGE). Scale rows give quantized pages odd factors (an int8
    Llama-8B page is 2^14 x 65 bytes), so the pages of a precision mix may tile no slab near the
    target size; another page length per model often does (within MAX_SLAB_WASTE)."""
    t = layout.tokens_per_page
    tokens = [t, 2 * t] + ([t // 2] if t // 2 >= MIN_TOKENS_PER_PAGE and t % 2 == 0 else [])
    return [dataclasses.replace(layout, tokens_per_page=n, page_stride_words=0) for n in tokens]


def _static_partition(models: dict[str, ModelPages], num_slabs: int) -> dict[str, tuple[int, int]]:
    """Whole slabs per model in proportion to `share` (equal when unset); largest remainders first."""
    shares = {name: (1.0 if m.share is None else m.share) for name, m in models.items()}
    if any(s <= 0 for s in shares.values()):
        raise ValueError(f"static shares must be positive, got {shares}")
    total = sum(shares.values())
    exact = {name: num_slabs * s / total for name, s in shares.items()}
    slabs = {name: int(x) for name, x in exact.items()}
    for name in sorted(exact, key=lambda n: slabs[n] - exact[n])[:num_slabs - sum(slabs.values())]:
        slabs[name] += 1
    if min(slabs.values()) == 0:
        raise ValueError(f"static partition of {num_slabs} slabs leaves a model without memory: {slabs}")
    return {name: (n, n) for name, n in slabs.items()}
