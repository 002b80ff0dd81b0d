"""Slab geometry: how big a slab is, and which page size each co-located model formats its slabs
into, so that every model's pages tile a slab with (almost) no waste. FineServe (arXiv 2509.06261)
takes 2 x lcm(page sizes); the lcm of pages with scale rows grows fast, so here a slab is the
smallest size near a target that every model tiles within a waste bound (docs/kv_slab.md).
"""

from __future__ import annotations

from math import lcm

import numpy as np

from pallas_kernels.kv_pages import WORD_BYTES

DEFAULT_SLAB_BYTES = 2 << 20
EXACT_SLAB_SPAN = 16  # slab sizes considered: up to this many times the target size
MAX_SLAB_WASTE = 0.01


def slab_bytes_for(page_bytes: list[int], target: int = DEFAULT_SLAB_BYTES) -> int:
    """Smallest multiple of the pages' least common multiple that is >= target, so every model's
    pages tile a slab exactly."""
    unit = lcm(*page_bytes)
    return unit * max(1, -(-target // unit))


def slab_waste(slab_bytes: int, page_bytes: list[int]) -> float:
    """The largest share of a slab that some model's pages leave unused (its tail)."""
    return max(slab_bytes % p for p in page_bytes) / slab_bytes


def choose_slab_bytes(page_bytes: list[int], target: int = DEFAULT_SLAB_BYTES,
                      max_waste: float = MAX_SLAB_WASTE) -> int:
    """Slab size for co-located models with these fixed page sizes (see choose_slab_geometry)."""
    return choose_slab_geometry([[p] for p in page_bytes], target, max_waste)[0]


def choose_slab_geometry(page_options: list[list[int]], target: int = DEFAULT_SLAB_BYTES,
                         max_waste: float = MAX_SLAB_WASTE) -> tuple[int, list[int]]:
    """Slab size, and which page size each model uses, for co-located models. `page_options[m]`
    lists model m's possible page sizes (bytes, multiples of 4; e.g. 16, 32, 8 tokens per page),
    preferred first. Returns (slab bytes, index of the chosen option per model).

    FineServe takes 2 x lcm(page sizes): no waste, but the lcm of pages with scale rows grows fast
    (Llama-8B bf16 + int4 KV pages: 34 MiB). Here, with lo = max(target, largest preferred page):
      1. the smallest multiple of the preferred pages' lcm >= lo, if it is at most
         EXACT_SLAB_SPAN x lo (no waste);
      2. else the smallest multiple of some page size in [lo, EXACT_SLAB_SPAN x lo] that every model
         tiles with tail waste <= max_waste using one of its options (its most preferred such);
      3. else the preferred pages' candidate with the least worst-case waste.
    Bound: a model's tail waste per slab is (S mod page) / S < page / S, so a slab of at least
    100 pages of every model always meets 1%; `slab_waste` reports the figure.
    """
    if not page_options or any(not opts for opts in page_options):
        raise ValueError(f"every model needs at least one page size, got {page_options}")
    flat = [int(p) for opts in page_options for p in opts]
    if min(flat) <= 0 or any(p % WORD_BYTES for p in flat):
        raise ValueError(f"page sizes must be positive multiples of {WORD_BYTES} bytes, got {page_options}")
    preferred = [int(opts[0]) for opts in page_options]
    lo = -(-max(target, max(preferred)) // WORD_BYTES) * WORD_BYTES
    hi = EXACT_SLAB_SPAN * lo
    exact = slab_bytes_for(preferred, lo)
    if exact <= hi:
        return exact, [0] * len(page_options)
    candidates = np.unique(np.concatenate(
        [np.arange(-(-lo // p) * p, hi + 1, p, dtype=np.int64) for p in set(flat) if p <= hi]))
    feasible = np.ones(len(candidates), bool)
    choices = []
    for opts in page_options:
        pages = np.array(opts, np.int64)[None, :]
        ok = (pages <= candidates[:, None]) & (candidates[:, None] % pages <= max_waste * candidates[:, None])
        feasible &= ok.any(axis=1)
        choices.append(ok.argmax(axis=1))  # first (most preferred) option that fits
    hits = np.flatnonzero(feasible)
    if hits.size:
        i = hits[0]
        return int(candidates[i]), [int(c[i]) for c in choices]
    own = np.unique(np.concatenate(
        [np.arange(-(-lo // p) * p, hi + 1, p, dtype=np.int64) for p in set(preferred)]))
    waste = (own[:, None] % np.array(preferred, np.int64)[None, :]).max(axis=1) / own
    return int(own[np.argmin(waste)]), [0] * len(page_options)
