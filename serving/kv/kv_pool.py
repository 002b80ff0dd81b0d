"""The device KV pool: one `uint32[num_slabs, slab_words]` buffer per device holds every model's KV
cache, with the slab allocator that hands out its pages. Each model's jitted program is given the
buffer (donated) and returns the updated one, so the pool is updated in place whichever model runs.
Untyped words, because each model reads its slabs through its own page layout
(`pallas_kernels.kv_pages.KVPageLayout`). Design notes: docs/kv_slab.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.kv_pages import WORD_BYTES, KVPageLayout, copy_pages
from serving.kv.slab_allocator import SlabAllocator

_copy_pages = jax.jit(copy_pages, static_argnums=(1,), donate_argnums=(0,))


class KVPool:
    """The device buffer plus its allocator. `words` is replaced after every step that donates it.
    `fill` is the initial word (tests poison the pool with NaN patterns). `mesh` is None: the pool
    is one device's (a tensor-parallel group's pools are a `GroupKVPool`)."""

    mesh = None

    def __init__(self, num_slabs: int, slab_bytes: int, device: jax.Device | None = None, fill: int = 0):
        self.allocator = SlabAllocator(num_slabs, slab_bytes)
        shape = (num_slabs, slab_bytes // WORD_BYTES)
        self.words = jax.device_put(jnp.full(shape, fill, jnp.uint32), device)

    @property
    def nbytes(self) -> int:
        return self.words.size * WORD_BYTES

    def copy_pages(self, layout: KVPageLayout, src, dst) -> None:
        """Copy page src[i] over page dst[i] of a model with `layout` (`kv_pages.copy_pages`), in place."""
        self.words = _copy_pages(self.words, layout, src, dst)
