"""Dispatcher for writing one layer's K/V rows of N tokens into their pages. Models call only this.

`kernels` picks the implementation (a static argument, so each compiles into its own program):
  "xla"        `kv_pages.write_kv_tokens` (jnp quantization + a word scatter); the default, and what
               runs on CPU.
  "pallas"     the Pallas kernel (`kv_write_pallas`), compiled for the GPU (Triton lowering); raises
               on other backends.
  "interpret"  the same Pallas kernel under `interpret=True` (any backend; slow, for tests).
`write_bounds` rewrites pages' key bounds (query-aware page selection) after their tokens are
written, with the same three implementations. All store bit-identical words (checked in interpret mode; see `kv_write_pallas` for the compiled
path's division caveat). Padding tokens (`valid` false) write nothing. Jit the caller with the pool
donated so the write is in place.
"""

from __future__ import annotations

import jax

from pallas_kernels.implementation import IMPLEMENTATIONS, check_implementation
from pallas_kernels.kv_pages import KVPageLayout, write_key_bounds, write_kv_tokens
from pallas_kernels.kv_write_pallas import write_key_bounds_pallas, write_kv_tokens_pallas

__all__ = ["IMPLEMENTATIONS", "write_bounds", "write_kv"]


def write_kv(pool: jax.Array, layout: KVPageLayout, page_ids: jax.Array, slots: jax.Array, valid: jax.Array,
             layer, k: jax.Array, v: jax.Array, *, kernels: str = "xla") -> jax.Array:
    """page_ids, slots, valid: [N]; k, v: [N, Hkv, D] (any float dtype). Returns the updated pool."""
    check_implementation(kernels)
    layout.check_uniform("write_kv")
    if kernels == "xla":
        return write_kv_tokens(pool, layout, page_ids, slots, valid, layer, k, v)
    return write_kv_tokens_pallas(pool, layout, page_ids, slots, valid, layer, k, v,
                                  interpret=(kernels == "interpret"))


def write_bounds(pool: jax.Array, layout: KVPageLayout, page_ids: jax.Array, fill: jax.Array, layer, *,
                 kernels: str = "xla") -> jax.Array:
    """Recompute one layer's key bounds of M pages from their keys in slots [0, fill): page_ids,
    fill int32[M] (fill 0: padding, writes nothing; its page id must still be valid)."""
    check_implementation(kernels)
    layout.check_uniform("write_bounds")
    if kernels == "xla":
        return write_key_bounds(pool, layout, page_ids, fill, layer)
    return write_key_bounds_pallas(pool, layout, page_ids, fill, layer, interpret=(kernels == "interpret"))
