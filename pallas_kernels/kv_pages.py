"""How a model's KV cache pages sit inside the shared device pool, and reads/writes through page ids.

The pool is one `uint32[num_slabs, slab_words]` device buffer per device. A model formats the slabs it
is given into pages of its own size: page id `p` lives in slab `p // pages_per_slab` at word
`(p % pages_per_slab) * page_words`. Inside a page the layout is layer-major,

    page = [layer][K|V][token][kv_head][head_dim]   (elements of the KV dtype, packed into words)

so one layer's K (or V) for a page is a single contiguous chunk of `chunk_words` words, read with one
dynamic slice. Word offsets stay within a slab, so int32 indexing is enough for any pool size.

Writes for padding tokens go to slab index `num_slabs` (out of bounds) and are dropped by the scatter,
so no page, and no other model's page, is ever touched by padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

WORD_BYTES = 4

# KV formats this layout stores unquantized. Quantized formats (fp8/int8/int4 with scales) join later.
KV_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclass(frozen=True)
class KVPageLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tokens_per_page: int
    kv_dtype: str = "bfloat16"
    pages_per_slab: int = 1  # set once the pool's slab size is known

    def __post_init__(self):
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"unsupported kv_dtype {self.kv_dtype!r}; supported: {sorted(KV_DTYPES)}")
        if (self.num_kv_heads * self.head_dim * self.itemsize) % WORD_BYTES:
            raise ValueError("a token's K row must fill whole 32-bit words")
        if self.tokens_per_page <= 0 or self.pages_per_slab <= 0:
            raise ValueError("tokens_per_page and pages_per_slab must be positive")

    @property
    def dtype(self):
        return KV_DTYPES[self.kv_dtype]

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def row_words(self) -> int:
        """Words holding one token's K (or V) for one layer: kv_heads x head_dim elements."""
        return self.num_kv_heads * self.head_dim * self.itemsize // WORD_BYTES

    @property
    def chunk_words(self) -> int:
        """Words holding one layer's K (or V) for a whole page."""
        return self.tokens_per_page * self.row_words

    @property
    def page_words(self) -> int:
        return self.num_layers * 2 * self.chunk_words

    @property
    def page_bytes(self) -> int:
        return self.page_words * WORD_BYTES

    @property
    def bytes_per_token(self) -> int:
        """KV bytes per token over all layers, K and V."""
        return self.page_bytes // self.tokens_per_page

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_page)


def _words_to_elements(words: jax.Array, dtype) -> jax.Array:
    """uint32[..., n] -> dtype[..., n * 4 / itemsize] (a bitcast, no conversion)."""
    itemsize = np.dtype(dtype).itemsize
    if itemsize == WORD_BYTES:
        return lax.bitcast_convert_type(words, dtype)
    x = lax.bitcast_convert_type(words, dtype)  # [..., n, 4 / itemsize]
    return x.reshape(*words.shape[:-1], words.shape[-1] * (WORD_BYTES // itemsize))


def _elements_to_words(x: jax.Array) -> jax.Array:
    itemsize = np.dtype(x.dtype).itemsize
    if itemsize == WORD_BYTES:
        return lax.bitcast_convert_type(x, jnp.uint32)
    per_word = WORD_BYTES // itemsize
    return lax.bitcast_convert_type(x.reshape(*x.shape[:-1], x.shape[-1] // per_word, per_word), jnp.uint32)


def _page_origin(layout: KVPageLayout, page_ids: jax.Array, layer, kind: int):
    """(slab index, first word) of `layer`'s K (kind 0) or V (kind 1) chunk in each page."""
    slab = page_ids // layout.pages_per_slab
    word = (page_ids % layout.pages_per_slab) * layout.page_words + (layer * 2 + kind) * layout.chunk_words
    return slab, word


def read_kv_pages(pool: jax.Array, layout: KVPageLayout, page_ids: jax.Array, layer):
    """K and V of one layer for the given pages: int32[...] page ids -> 2 x dtype[..., T, Hkv, D]."""
    out = []
    for kind in (0, 1):
        slab, word = _page_origin(layout, page_ids, layer, kind)
        starts = jnp.stack([slab, word], axis=-1)
        chunk = lax.gather(
            pool, starts,
            lax.GatherDimensionNumbers(offset_dims=(starts.ndim - 1,), collapsed_slice_dims=(0,),
                                       start_index_map=(0, 1)),
            slice_sizes=(1, layout.chunk_words), mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)
        elems = _words_to_elements(chunk, layout.dtype)
        out.append(elems.reshape(*page_ids.shape, layout.tokens_per_page, layout.num_kv_heads, layout.head_dim))
    return out[0], out[1]


def write_kv_tokens(pool: jax.Array, layout: KVPageLayout, page_ids: jax.Array, slots: jax.Array,
                    valid: jax.Array, layer, k: jax.Array, v: jax.Array) -> jax.Array:
    """Write one layer's K/V rows of N tokens: page_ids, slots, valid: [N]; k, v: [N, Hkv, D]."""
    num_slabs = pool.shape[0]
    for kind, x in ((0, k), (1, v)):
        slab, word = _page_origin(layout, page_ids, layer, kind)
        slab = jnp.where(valid, slab, num_slabs)  # out of bounds: dropped
        word = word + slots * layout.row_words
        rows = _elements_to_words(x.astype(layout.dtype).reshape(x.shape[0], -1))
        pool = lax.scatter(
            pool, jnp.stack([slab, word], axis=-1), rows,
            lax.ScatterDimensionNumbers(update_window_dims=(1,), inserted_window_dims=(0,),
                                        scatter_dims_to_operand_dims=(0, 1)),
            indices_are_sorted=False, unique_indices=False, mode=lax.GatherScatterMode.FILL_OR_DROP)
    return pool
