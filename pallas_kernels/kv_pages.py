"""How a model's KV cache pages sit inside the shared device pool, and reads/writes through page ids.

The pool is one `uint32[num_slabs, slab_words]` buffer per device; a model formats the slabs it is
given into pages of its own size (`KVPageLayout`), so models with different KV formats and shapes
share one pool (paging as in PagedAttention, arXiv:2309.06180). Inside a page the layout is
layer-major, `[layer][K|V][chunk]`, and one layer's K (or V) of a page, values and bfloat16 scales
alike, is one contiguous chunk, read with one dynamic slice. Values are head-major inside the chunk
(`[kv_head][token][head_dim]`), so one head's page tile is one contiguous run (a TMA box for Mosaic
GPU kernels); scales are token-major, each token's scale row padded to whole words, so no two tokens
share a word and every write is a word scatter. `KVPageLayout` owns the sizes
(`page_words`, `bytes_per_token`), which are exact: scales and padding included.

`write_kv_tokens` quantizes K/V rows as `quant_formats.quantize_kv` (plain jnp, fused by XLA with the
packing), `read_kv_pages` dequantizes to float32 and `read_kv_pages_quantized` returns the stored
values and scales. Padding tokens are written out of bounds and dropped, so they touch no page.
The full page layout: docs/kernels.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.quant_formats import QuantizedTensor, dequantize_kv, quantize_kv

WORD_BYTES = 4
WORD_BITS = 32

# KV formats -> (storage dtype of the value elements, bits per value). int4 is stored as uint8 bytes
# holding two values each.
KV_DTYPES = {
    "bf16": (jnp.bfloat16, 16),
    "float32": (jnp.float32, 32),
    "fp8": (jnp.float8_e4m3fn, 8),
    "int8": (jnp.int8, 8),
    "int4": (jnp.uint8, 4),
    "int4_fp8": (jnp.uint8, 4),   # FireQ: symmetric int4 codes, attention with FP8 queries and P
}
KV_DTYPE_ALIASES = {"bfloat16": "bf16"}  # accepted on input, never stored
QUANTIZED_KV_DTYPES = ("fp8", "int8", "int4", "int4_fp8")
SCALE_DTYPE = jnp.bfloat16
SCALE_BITS = 16


def normalize_kv_dtype(kv_dtype: str) -> str:
    """The one name of a KV format (bf16, float32, fp8, int8, int4, int4_fp8), from it or an alias."""
    name = KV_DTYPE_ALIASES.get(kv_dtype, kv_dtype)
    if name not in KV_DTYPES:
        raise ValueError(f"unsupported kv_dtype {kv_dtype!r}; supported: {sorted(KV_DTYPES)} "
                         f"(aliases: {sorted(KV_DTYPE_ALIASES)})")
    return name


@dataclass(frozen=True)
class KVPageLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tokens_per_page: int
    kv_dtype: str = "bf16"  # bf16 (alias bfloat16), float32, fp8, int8, int4, int4_fp8
    pages_per_slab: int = 1  # set once the pool's slab size is known
    # Words from one page's start to the next in a slab: page_words, or more when every page of a
    # pool is padded to one size (the single-page-size baseline).
    page_stride_words: int = 0
    # (layer, format) pairs for layers whose KV is stored in another format than kv_dtype.
    layer_kv_dtypes: tuple[tuple[int, str], ...] = ()
    # Word offset of layer 0's K chunk inside the page slot: non-zero only for a later group of
    # layers of a mixed-format page (see layer_groups).
    first_word: int = 0
    # Key bounds for query-aware page selection: per layer and kv head, the channel-wise min and max
    # of the page's (dequantized) keys as int8 codes of one bfloat16 scale, rounded outward, after
    # the layers' K/V chunks (`encode_bounds`).
    key_bounds: bool = False

    def __post_init__(self):
        object.__setattr__(self, "kv_dtype", normalize_kv_dtype(self.kv_dtype))
        object.__setattr__(self, "layer_kv_dtypes", self._normalized_overrides())
        if self.num_kv_heads <= 0 or self.head_dim <= 0:
            raise ValueError("num_kv_heads and head_dim must be positive")
        if (self.head_dim * self.value_bits) % WORD_BITS:
            raise ValueError(f"a kv head's row of one token ({self.head_dim} x {self.value_bits} bits) must "
                             "fill whole 32-bit words")
        if self.value_bits == 4 and self.head_dim % 2:
            raise ValueError(f"int4 KV packs two values per byte along head_dim; head_dim {self.head_dim} is odd")
        if self.key_bounds and self.head_dim % 4:
            raise ValueError(f"key bounds pack four int8 channels per word; head_dim {self.head_dim} is not a "
                             "multiple of 4")
        if self.tokens_per_page <= 0 or self.pages_per_slab <= 0:
            raise ValueError("tokens_per_page and pages_per_slab must be positive")
        if self.mixed:
            self.layer_groups()  # builds, so checks, each group's layout (whole words, even head_dim)
        if self.first_word < 0 or (self.page_stride_words
                                   and self.page_stride_words < self.first_word + self.page_words):
            raise ValueError(f"page_stride_words={self.page_stride_words} is shorter than a page "
                             f"({self.page_words} words from word {self.first_word})")

    def _normalized_overrides(self) -> tuple[tuple[int, str], ...]:
        """layer_kv_dtypes sorted by layer, formats by their one name, entries equal to kv_dtype dropped."""
        out = {}
        for entry in self.layer_kv_dtypes:
            layer, fmt = entry
            if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
                raise ValueError(f"layer_kv_dtypes: layer {layer!r} is not one of the model's "
                                 f"{self.num_layers} layers (0..{self.num_layers - 1})")
            if int(layer) in out:
                raise ValueError(f"layer_kv_dtypes names layer {layer} twice")
            out[int(layer)] = normalize_kv_dtype(fmt)
        return tuple((layer, fmt) for layer, fmt in sorted(out.items()) if fmt != self.kv_dtype)

    @property
    def mixed(self) -> bool:
        """Whether some layers store their KV in another format than kv_dtype."""
        return bool(self.layer_kv_dtypes)

    def kv_dtype_of(self, layer: int) -> str:
        return dict(self.layer_kv_dtypes).get(layer, self.kv_dtype)

    def layer_groups(self) -> tuple[KVLayerGroup, ...]:
        """Runs of consecutive layers stored in one format, in layer order, each as a uniform layout
        of its own layers placed where they sit in this page (`first_word`, the page's slot stride):
        that group's layer i is this page's layer `first_layer + i`. A uniform page is one group."""
        if not self.mixed:
            return (KVLayerGroup(0, self),)
        groups, first, word = [], 0, self.first_word
        for layer in range(1, self.num_layers + 1):
            if layer < self.num_layers and self.kv_dtype_of(layer) == self.kv_dtype_of(first):
                continue
            groups.append((first, layer - first, self.kv_dtype_of(first), word))
            word += KVPageLayout(layer - first, self.num_kv_heads, self.head_dim, self.tokens_per_page,
                                 self.kv_dtype_of(first), key_bounds=self.key_bounds).page_words
            first = layer
        stride = self.page_stride_words or word - self.first_word
        return tuple(KVLayerGroup(first, KVPageLayout(
            n, self.num_kv_heads, self.head_dim, self.tokens_per_page, fmt, self.pages_per_slab,
            page_stride_words=stride, first_word=start, key_bounds=self.key_bounds))
            for first, n, fmt, start in groups)

    def check_uniform(self, what: str) -> None:
        """ValueError unless every layer has kv_dtype (what kernels and page reads/writes take)."""
        if self.mixed:
            raise ValueError(f"{what} takes one KV format for every layer; this page mixes "
                             f"{self.kv_dtype} with {dict(self.layer_kv_dtypes)}: pass each of "
                             "layer_groups() instead")

    def chunk_origin(self, layer, kind: int):
        """Word offset, from a page slot's start, of `layer`'s K (kind 0) or V (kind 1) chunk."""
        return self.first_word + (layer * 2 + kind) * self.chunk_words

    @property
    def quantized(self) -> bool:
        return self.kv_dtype in QUANTIZED_KV_DTYPES

    @property
    def value_dtype(self):
        """Dtype of the stored value elements (uint8 for int4: two packed values per byte)."""
        return KV_DTYPES[self.kv_dtype][0]

    @property
    def value_bits(self) -> int:
        return KV_DTYPES[self.kv_dtype][1]

    @property
    def dtype(self):
        """Dtype `read_kv_pages` returns: the stored dtype, or float32 (dequantized) when quantized."""
        return jnp.float32 if self.quantized else self.value_dtype

    @property
    def scales_per_token(self) -> int:
        """bfloat16 scale-row entries per token (K or V, one layer): H (fp8/int8/int4_fp8), 2H (int4
        scales and zeros), 0."""
        return {"fp8": 1, "int8": 1, "int4": 2, "int4_fp8": 1}.get(self.kv_dtype, 0) * self.num_kv_heads

    @property
    def row_words(self) -> int:
        """Words holding one token's K (or V) values for one layer: kv_heads x head_dim elements."""
        return self.num_kv_heads * self.head_dim * self.value_bits // WORD_BITS

    @property
    def head_words(self) -> int:
        """Words holding one token's K (or V) values of one kv head: head_dim elements."""
        return self.head_dim * self.value_bits // WORD_BITS

    def value_word(self, head, slot):
        """Word offset, inside a chunk, of kv head `head`'s values of the token at `slot` (ints or
        traced): the values region is head-major, [kv_head][token][head_dim]."""
        return (head * self.tokens_per_page + slot) * self.head_words

    @property
    def scale_row_words(self) -> int:
        """Words holding one token's K (or V) scales (and zeros) for one layer, padded to whole words."""
        return -(-self.scales_per_token * SCALE_BITS // WORD_BITS)

    @property
    def scales_offset(self) -> int:
        """Word offset of the scales region inside a chunk (the values region's size)."""
        return self.tokens_per_page * self.row_words

    @property
    def chunk_words(self) -> int:
        """Words holding one layer's K (or V) for a whole page: values region + scales region."""
        return self.tokens_per_page * (self.row_words + self.scale_row_words)

    @property
    def bounds_words(self) -> int:
        """Words holding one layer's key bounds of one kv head: head_dim int8 min codes, head_dim int8
        max codes, then a word whose low half is their bfloat16 scale, padded to 4 words so every
        head's bounds start 16-byte aligned (whole-vector loads)."""
        return self.head_dim // 2 + BOUNDS_SCALE_WORDS if self.key_bounds else 0

    def bounds_origin(self, layer, head=0):
        """Word offset, from a page slot's start, of kv head `head`'s key bounds for `layer` (the
        bounds region, [layer][kv_head][min | max][head_dim], follows the layers' K/V chunks)."""
        return (self.first_word + self.num_layers * 2 * self.chunk_words
                + (layer * self.num_kv_heads + head) * self.bounds_words)

    @property
    def page_words(self) -> int:
        """Words of one page, all layers (of every group) with their scales and key bounds."""
        if self.mixed:
            return sum(group.layout.page_words for group in self.layer_groups())
        return self.num_layers * (2 * self.chunk_words + self.num_kv_heads * self.bounds_words)

    @property
    def page_bytes(self) -> int:
        return self.page_words * WORD_BYTES

    @property
    def page_slot_words(self) -> int:
        """Words a page occupies in its slab (page_words unless pages are padded)."""
        return self.page_stride_words or self.page_words

    @property
    def page_slot_bytes(self) -> int:
        return self.page_slot_words * WORD_BYTES

    @property
    def bytes_per_token(self) -> int:
        """KV bytes per token over all layers, K and V (scales and padding included)."""
        return self.page_bytes // self.tokens_per_page

    @classmethod
    def bytes_per_token_for(cls, num_layers: int, num_kv_heads: int, head_dim: int,
                            kv_dtype: str = "bf16", layer_kv_dtypes: tuple[tuple[int, str], ...] = ()) -> int:
        """`bytes_per_token` of a model's KV cache without a page size (it does not depend on one
        without key bounds): what capacity planning should use, so the figure is always what a page
        stores."""
        return cls(num_layers, num_kv_heads, head_dim, 1, kv_dtype, layer_kv_dtypes=layer_kv_dtypes).bytes_per_token

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_page)


@dataclass(frozen=True)
class KVLayerGroup:
    """Consecutive layers of a page stored in one format: page layer `first_layer + i` is `layout`'s
    layer i (a uniform layout placed at its offset inside the page slot)."""
    first_layer: int
    layout: KVPageLayout


def _words_to_elements(words: jax.Array, dtype) -> jax.Array:
    """uint32[..., n] -> dtype[..., n * 4 / itemsize] (a bitcast, no conversion)."""
    itemsize = np.dtype(dtype).itemsize
    if itemsize == WORD_BYTES:
        return lax.bitcast_convert_type(words, dtype)
    x = lax.bitcast_convert_type(words, dtype)  # [..., n, 4 / itemsize]
    return x.reshape(*words.shape[:-1], words.shape[-1] * (WORD_BYTES // itemsize))


def _elements_to_words(x: jax.Array) -> jax.Array:
    """dtype[..., m] -> uint32[..., m * itemsize / 4]; m must fill whole words."""
    itemsize = np.dtype(x.dtype).itemsize
    if itemsize == WORD_BYTES:
        return lax.bitcast_convert_type(x, jnp.uint32)
    per_word = WORD_BYTES // itemsize
    return lax.bitcast_convert_type(x.reshape(*x.shape[:-1], x.shape[-1] // per_word, per_word), jnp.uint32)


def _page_origin(layout: KVPageLayout, page_ids: jax.Array, layer, kind: int):
    """(slab index, first word) of `layer`'s K (kind 0) or V (kind 1) chunk in each page."""
    slab = page_ids // layout.pages_per_slab
    word = (page_ids % layout.pages_per_slab) * layout.page_slot_words + layout.chunk_origin(layer, kind)
    return slab, word


def _gather_words(pool: jax.Array, slab: jax.Array, word: jax.Array, n: int) -> jax.Array:
    """pool[slab, word:word + n] for every index: int32[...] x 2 -> uint32[..., n]."""
    starts = jnp.stack([slab, word], axis=-1)
    return lax.gather(
        pool, starts,
        lax.GatherDimensionNumbers(offset_dims=(starts.ndim - 1,), collapsed_slice_dims=(0,),
                                   start_index_map=(0, 1)),
        slice_sizes=(1, n), mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _scatter_words(pool: jax.Array, slab: jax.Array, word: jax.Array, rows: jax.Array) -> jax.Array:
    """pool[slab[i], word[i]:word[i] + n] = rows[i] (rows: uint32[N, n]); out-of-bounds slabs dropped."""
    return lax.scatter(
        pool, jnp.stack([slab, word], axis=-1), rows,
        lax.ScatterDimensionNumbers(update_window_dims=(1,), inserted_window_dims=(0,),
                                    scatter_dims_to_operand_dims=(0, 1)),
        indices_are_sorted=False, unique_indices=False, mode=lax.GatherScatterMode.FILL_OR_DROP)


def _split_chunk(layout: KVPageLayout, chunk: jax.Array):
    """uint32[..., chunk_words] -> (value elements [..., T, Hkv, D or D/2], scale words [..., T, srw])."""
    t = layout.tokens_per_page
    values = _words_to_elements(chunk[..., :layout.scales_offset], layout.value_dtype)
    values = jnp.swapaxes(values.reshape(*chunk.shape[:-1], layout.num_kv_heads, t, -1), -3, -2)
    scales = chunk[..., layout.scales_offset:].reshape(*chunk.shape[:-1], t, layout.scale_row_words)
    return values, scales


def _read_chunks(pool: jax.Array, layout: KVPageLayout, page_ids: jax.Array, layer):
    """Yield (value elements, scale words) of `layer`'s K then V chunk of every page."""
    for kind in (0, 1):
        slab, word = _page_origin(layout, page_ids, layer, kind)
        yield _split_chunk(layout, _gather_words(pool, slab, word, layout.chunk_words))


def read_kv_pages_quantized(pool: jax.Array, layout: KVPageLayout, page_ids: jax.Array, layer):
    """K and V of one layer, as stored, for a quantized layout: int32[...] page ids -> 2 x QuantizedTensor
    (values [..., T, Hkv, D] (int4: uint8 [..., T, Hkv, D/2]), bfloat16 scales/zeros [..., T, Hkv, 1]),
    with `quantize_kv`'s conventions (fmt "kv_<format>", axis = last)."""
    layout.check_uniform("read_kv_pages_quantized")
    if not layout.quantized:
        raise ValueError(f"read_kv_pages_quantized needs a quantized layout, not {layout.kv_dtype!r}")
    out = []
    h = layout.num_kv_heads
    for values, scale_words in _read_chunks(pool, layout, page_ids, layer):
        s = _words_to_elements(scale_words, SCALE_DTYPE)[..., None]  # [..., T, 2 * scale_row_words, 1]
        zeros = s[..., h:2 * h, :] if layout.kv_dtype == "int4" else None
        out.append(QuantizedTensor(values, s[..., :h, :], zeros, f"kv_{layout.kv_dtype}", values.ndim - 1))
    return out[0], out[1]


def read_kv_scales(pool: jax.Array, layout: KVPageLayout, page_ids: jax.Array, layer):
    """The per-token scales of one layer's K and V, without their values, for a quantized layout:
    int32[...] page ids -> 2 x float32 [..., T, Hkv] (int4: its scales, not its zeros)."""
    layout.check_uniform("read_kv_scales")
    if not layout.quantized:
        raise ValueError(f"read_kv_scales needs a quantized layout, not {layout.kv_dtype!r}")
    out = []
    t, srw = layout.tokens_per_page, layout.scale_row_words
    for kind in (0, 1):
        slab, word = _page_origin(layout, page_ids, layer, kind)
        words = _gather_words(pool, slab, word + layout.scales_offset, t * srw)
        scales = _words_to_elements(words.reshape(*words.shape[:-1], t, srw), SCALE_DTYPE)
        out.append(scales[..., :layout.num_kv_heads].astype(jnp.float32))
    return out[0], out[1]


def read_kv_pages(pool: jax.Array, layout: KVPageLayout, page_ids: jax.Array, layer):
    """K and V of one layer for the given pages: int32[...] page ids -> 2 x dtype[..., T, Hkv, D], in the
    stored dtype, or dequantized to float32 for quantized layouts."""
    layout.check_uniform("read_kv_pages")
    if layout.quantized:
        k, v = read_kv_pages_quantized(pool, layout, page_ids, layer)
        return dequantize_kv(k), dequantize_kv(v)
    k, v = (values for values, _ in _read_chunks(pool, layout, page_ids, layer))
    return k, v


def _read_head_chunks(pool: jax.Array, layout: KVPageLayout, page_ids: jax.Array, layer):
    """Yield (value elements [..., Hkv, n, T, D or D/2], scale-row entries [..., Hkv, n, T, 2 srw]) of
    `layer`'s K then V for page_ids [..., Hkv, n]: kv head h reads only its own run of each page."""
    heads = lax.broadcasted_iota(jnp.int32, page_ids.shape, page_ids.ndim - 2)
    t = layout.tokens_per_page
    for kind in (0, 1):
        slab, word = _page_origin(layout, page_ids, layer, kind)
        values = _gather_words(pool, slab, word + layout.value_word(heads, 0), t * layout.head_words)
        values = _words_to_elements(values, layout.value_dtype).reshape(*page_ids.shape, t, -1)
        scales = None
        if layout.quantized:
            words = _gather_words(pool, slab, word + layout.scales_offset, t * layout.scale_row_words)
            scales = _words_to_elements(words, SCALE_DTYPE).reshape(*page_ids.shape, t, -1)
        yield values, scales


def read_kv_head_pages_quantized(pool: jax.Array, layout: KVPageLayout, page_ids: jax.Array, layer):
    """K and V of one layer, as stored, each kv head from its own pages: page_ids int32[..., Hkv, n]
    -> 2 x QuantizedTensor (values [..., Hkv, n, T, D] (int4: uint8 D/2), bfloat16 scales/zeros
    [..., Hkv, n, T, 1]), with `quantize_kv`'s conventions."""
    layout.check_uniform("read_kv_head_pages_quantized")
    if not layout.quantized:
        raise ValueError(f"read_kv_head_pages_quantized needs a quantized layout, not {layout.kv_dtype!r}")
    if page_ids.ndim < 2 or page_ids.shape[-2] != layout.num_kv_heads:
        raise ValueError(f"per-head page ids must be [..., {layout.num_kv_heads}, n], got {page_ids.shape}")
    h = layout.num_kv_heads
    head = lax.broadcasted_iota(jnp.int32, page_ids.shape, page_ids.ndim - 2)[..., None, None]
    out = []
    for values, entries in _read_head_chunks(pool, layout, page_ids, layer):
        pick = lambda e: jnp.take_along_axis(entries, e, axis=-1)  # noqa: E731  [..., T, 1]
        zeros = pick(head + h) if layout.kv_dtype == "int4" else None
        out.append(QuantizedTensor(values, pick(head), zeros, f"kv_{layout.kv_dtype}", values.ndim - 1))
    return out[0], out[1]


def read_kv_head_pages(pool: jax.Array, layout: KVPageLayout, page_ids: jax.Array, layer):
    """`read_kv_pages` with each kv head reading its own pages: page_ids int32[..., Hkv, n] -> K and V
    [..., Hkv, n, T, D], stored dtype or dequantized to float32."""
    if layout.quantized:
        k, v = read_kv_head_pages_quantized(pool, layout, page_ids, layer)
        return dequantize_kv(k), dequantize_kv(v)
    layout.check_uniform("read_kv_head_pages")
    k, v = (values for values, _ in _read_head_chunks(pool, layout, page_ids, layer))
    return k, v


def _quantized_rows(layout: KVPageLayout, x: jax.Array):
    """[N, Hkv, D] -> (value words uint32[N, row_words] (head after head), scale words
    uint32[N, scale_row_words])."""
    qt = quantize_kv(x, layout.kv_dtype, scale_dtype=SCALE_DTYPE)
    n = x.shape[0]
    scales = [qt.scales.reshape(n, -1)] + ([qt.zeros.reshape(n, -1)] if qt.zeros is not None else [])
    pad = layout.scale_row_words * (WORD_BITS // SCALE_BITS) - layout.scales_per_token
    scales.append(jnp.zeros((n, pad), SCALE_DTYPE))
    return (_elements_to_words(qt.values.reshape(n, -1)),
            _elements_to_words(jnp.concatenate(scales, axis=-1)))


def write_kv_tokens(pool: jax.Array, layout: KVPageLayout, page_ids: jax.Array, slots: jax.Array,
                    valid: jax.Array, layer, k: jax.Array, v: jax.Array) -> jax.Array:
    """Write one layer's K/V rows of N tokens: page_ids, slots, valid: [N]; k, v: [N, Hkv, D] (any float
    dtype; cast to the stored dtype, or quantized per token per kv head for quantized layouts)."""
    layout.check_uniform("write_kv_tokens")
    num_slabs = pool.shape[0]
    for kind, x in ((0, k), (1, v)):
        slab, word = _page_origin(layout, page_ids, layer, kind)
        slab = jnp.where(valid, slab, num_slabs)  # out of bounds: dropped
        if layout.quantized:
            rows, scale_rows = _quantized_rows(layout, x)
            pool = _scatter_words(pool, slab, word + layout.scales_offset + slots * layout.scale_row_words,
                                  scale_rows)
        else:
            rows = _elements_to_words(x.astype(layout.value_dtype).reshape(x.shape[0], -1))
        # One scatter of every (token, kv head) row of head_words words, each at its head's run.
        heads = jnp.arange(layout.num_kv_heads)[None, :]
        pool = _scatter_words(pool, jnp.repeat(slab, layout.num_kv_heads),
                              (word[:, None] + layout.value_word(heads, slots[:, None])).reshape(-1),
                              rows.reshape(-1, layout.head_words))
    return pool


def bf16_bits_up(x):
    """float32 x >= 0 -> the bit pattern (uint32, low 16 bits) of the smallest bfloat16 at or above x:
    truncation rounds down, and one step more where it dropped bits. Integer ops only, so the Pallas
    kernels and the reference round alike."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    lost = (bits & np.uint32(0xFFFF)) != 0
    return (bits >> np.uint32(16)) + jnp.where(lost, np.uint32(1), np.uint32(0))


BOUNDS_SCALE_WORDS = 4      # the scale word and its padding
BOUND_CODE_HEADROOM = 126   # |x| / scale <= 126 (1 + 2^-23): codes, one step outward included, fit +-127
BF16_ONE_BITS = 0x3F80      # bfloat16 1.0: the scale of an all-zero row (KV) or head (bounds)


def bounds_scale_bits(absmax):
    """The bfloat16 bits (uint32) of a head's bound scale from the largest |bound|: absmax / 126
    rounded up (1 for an all-zero head)."""
    bits = bf16_bits_up(absmax / BOUND_CODE_HEADROOM)
    return jnp.where(bits == 0, np.uint32(BF16_ONE_BITS), bits)


def bound_codes(x, scale, up: bool):
    """float32 bounds x and their head's scale (float32, a bfloat16 value) -> int32 codes c, the
    exact floor (mins, `up` False) or ceil (maxes) of x / scale: c * scale <= x < (c + 1) * scale,
    or the mirror. c * scale is exact in float32 (a 7-bit integer times an 8-bit mantissa), so the
    two checks fix a quotient that rounded either way, whatever the backend makes of the division."""
    step = 1.0 if up else -1.0
    c = jnp.ceil(x / scale) if up else jnp.floor(x / scale)
    back = c - step                                  # one step inward: still a bound?
    c = jnp.where((back * scale >= x) if up else (back * scale <= x), back, c)
    c = jnp.where((c * scale < x) if up else (c * scale > x), c + step, c)
    return c.astype(jnp.int32)


def encode_bounds(k_min, k_max):
    """float32 [..., D] mins and maxes of one kv head -> uint32 [..., D/2 + 4] words of its key
    bounds: int8 min codes, int8 max codes (four per word, channel 4u + j in byte j of word u), the
    scale's bfloat16 bits and 3 zero words. Decoded (`decode_bounds`), mins are at or below and maxes at or
    above the inputs, by less than one scale step (absmax / 126 rounded up to bfloat16)."""
    absmax = jnp.maximum(jnp.abs(k_min).max(axis=-1), jnp.abs(k_max).max(axis=-1))
    scale_bits = bounds_scale_bits(absmax)
    scale = lax.bitcast_convert_type(scale_bits << np.uint32(16), jnp.float32)[..., None]
    words = []
    for x, up in ((k_min, False), (k_max, True)):
        codes = lax.bitcast_convert_type(bound_codes(x, scale, up), jnp.uint32) & np.uint32(0xFF)
        codes = codes.reshape(*codes.shape[:-1], -1, 4) << (np.arange(4, dtype=np.uint32) * np.uint32(8))
        words.append(codes[..., 0] | codes[..., 1] | codes[..., 2] | codes[..., 3])
    pad = jnp.zeros((*scale_bits.shape, BOUNDS_SCALE_WORDS - 1), jnp.uint32)
    return jnp.concatenate(words + [scale_bits[..., None], pad], axis=-1)


def decode_bounds(words, head_dim: int):
    """uint32 [..., bounds_words] bound words of one kv head -> (min, max) float32 [..., D]."""
    codes = lax.bitcast_convert_type(words[..., :head_dim // 2], jnp.int8).reshape(*words.shape[:-1], 2, head_dim)
    scale = lax.bitcast_convert_type(words[..., head_dim // 2:head_dim // 2 + 1] << np.uint32(16), jnp.float32)
    return codes[..., 0, :].astype(jnp.float32) * scale, codes[..., 1, :].astype(jnp.float32) * scale


def _bounds_position(layout: KVPageLayout, page_ids: jax.Array, layer):
    """(slab index, first word) of `layer`'s key bounds (all kv heads, one run) in each page."""
    return (page_ids // layout.pages_per_slab,
            (page_ids % layout.pages_per_slab) * layout.page_slot_words + layout.bounds_origin(layer))


def read_key_bounds(pool: jax.Array, layout: KVPageLayout, page_ids: jax.Array, layer):
    """The key bounds of one layer for the given pages: int32[...] page ids -> (min, max) float32
    [..., Hkv, D]. Only meaningful for pages whose bounds `write_key_bounds` wrote."""
    layout.check_uniform("read_key_bounds")
    if not layout.key_bounds:
        raise ValueError("read_key_bounds: this layout stores no key bounds (key_bounds=False)")
    slab, word = _bounds_position(layout, page_ids, layer)
    words = _gather_words(pool, slab, word, layout.num_kv_heads * layout.bounds_words)
    return decode_bounds(words.reshape(*page_ids.shape, layout.num_kv_heads, layout.bounds_words), layout.head_dim)


def write_key_bounds(pool: jax.Array, layout: KVPageLayout, page_ids: jax.Array, fill: jax.Array,
                     layer) -> jax.Array:
    """Recompute the key bounds of one layer of M pages from their stored keys: page_ids, fill
    int32[M], `fill` the page's written tokens (slots [0, fill) count; 0: the entry is padding and
    writes nothing). Min and max are over the dequantized keys, rounded outward (`encode_bounds`), so
    they bound every key the attention reads. Call it after the tokens are written."""
    layout.check_uniform("write_key_bounds")
    if not layout.key_bounds:
        raise ValueError("write_key_bounds: this layout stores no key bounds (key_bounds=False)")
    if layout.quantized:
        k = dequantize_kv(read_kv_pages_quantized(pool, layout, page_ids, layer)[0])
    else:
        k = next(_read_chunks(pool, layout, page_ids, layer))[0].astype(jnp.float32)   # [M, T, Hkv, D]
    live = (jnp.arange(layout.tokens_per_page)[None, :] < fill[:, None])[..., None, None]
    k_min = jnp.where(live, k, jnp.inf).min(axis=1)
    k_max = jnp.where(live, k, -jnp.inf).max(axis=1)
    rows = encode_bounds(k_min, k_max).reshape(page_ids.shape[0], -1)          # [M, Hkv * bounds_words]
    slab, word = _bounds_position(layout, page_ids, layer)
    return _scatter_words(pool, jnp.where(fill > 0, slab, pool.shape[0]), word, rows)   # padding: dropped


def copy_pages(pool: jax.Array, layout: KVPageLayout, src: jax.Array, dst: jax.Array) -> jax.Array:
    """pool with page dst[i] overwritten by page src[i] (whole page slots, all layers, scales
    included); int32[N] each. Entries with dst < 0 are padding and copy nothing. Used to compact a
    model's pages into fewer slabs; jit it with the pool donated so the copy is in place."""
    n = layout.page_slot_words
    num_slabs = pool.shape[0]
    rows = _gather_words(pool, src // layout.pages_per_slab, (src % layout.pages_per_slab) * n, n)
    slab = jnp.where(dst >= 0, dst // layout.pages_per_slab, num_slabs)  # out of bounds: dropped
    return _scatter_words(pool, slab, (jnp.maximum(dst, 0) % layout.pages_per_slab) * n, rows)
