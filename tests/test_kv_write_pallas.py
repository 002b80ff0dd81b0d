"""Tests for the Pallas KV write kernel (pallas_kernels/kv_write_pallas.py) and its dispatcher
(pallas_kernels/kv_write.py), in interpret mode, against `kv_pages.write_kv_tokens`.

The kernel must store bit-identical words: every test compares whole pools word for word (values,
scale rows and their padding, and every word that should stay untouched). Inputs are fresh random
numbers every run (the `rng` fixture prints its seed), K in float32 and V in bfloat16 (what the
model passes), with crafted rows mixed in: all zeros (scale 1), a constant row (int4: zero range),
large and tiny magnitudes, and rows whose values sit exactly on rounding ties after scaling (int8 /
int4 half-integers with scale 1, fp8 midpoints between e4m3 neighbours, bfloat16 midpoints), where
round-half-to-even must match `jnp.round` and XLA's converts. Pools start out filled with a NaN bit
pattern; invalid (padding) tokens point at live slots of valid tokens, at other slots, and at page
ids out of range, and must write nothing. Scale rows are checked with 2 kv heads (one word of
fp8/int8 scales) and 3 (an odd number of bf16 scales: a zero-padded half word).

Strict interpreter: plain `interpret=True` clamps out-of-range stores, so one test also runs the kernel
under jax 0.11.2's TPU simulator (`pltpu.InterpretParams`), whose out-of-bounds accesses raise. That
simulator does not model writing an aliased output in place (an output block is staged in VMEM and
its unwritten words come back uninitialised), so there it serves as a bounds checker and a check of
the words written, while the plain-interpret tests check everything else.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.kv_pages import KVPageLayout, write_kv_tokens
from pallas_kernels.kv_write import IMPLEMENTATIONS, write_kv
from pallas_kernels.kv_write_pallas import (_e4m3_bits, _round_half_even, write_kv_tokens_pallas,
                                            write_shape_error)
from pallas_kernels.quant_formats import saturating_cast_e4m3
from tests.helpers import mixed_page_group

POISON = np.uint32(0x7FC07FC0)  # NaN as one float32 and as two bfloat16 halves
NUM_LAYERS = 2
LAYER = 1                       # write the second layer: the layer offset matters
PAGES_PER_SLAB = 3
NUM_SLABS = 4
KV_DTYPES = ("bf16", "float32", "fp8", "int8", "int4", "int4_fp8")

_ref = jax.jit(write_kv_tokens, static_argnums=1)
_kernel = jax.jit(write_kv_tokens_pallas, static_argnums=1, static_argnames="interpret")

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")  # tests/conftest.py


def _e4m3_midpoints() -> np.ndarray:
    """Every positive finite e4m3 value's midpoint with its successor (exact in float32 and bf16)."""
    values = np.unique(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32))
    values = values[np.isfinite(values) & (values >= 0)]
    return (values[1:] + values[:-1]) / 2


def tie_row(rng, kv_dtype: str, d: int) -> np.ndarray:
    """A row whose scale is exactly 1 and whose values, divided by it, sit on rounding ties."""
    if kv_dtype == "int8":                     # absmax 127 -> scale 1; half-integers
        row = rng.integers(-127, 127, d) + 0.5
        row[0] = 127.0
    elif kv_dtype == "int4":                   # min 0, max 15 -> scale 1, zero 0; half-integers
        row = rng.integers(0, 15, d) + 0.5
        row[:2] = 0.0, 15.0
    elif kv_dtype == "fp8":                    # absmax 448 -> scale 1; midpoints between e4m3 values
        row = rng.choice(_e4m3_midpoints(), d) * rng.choice([-1.0, 1.0], d)
        row[0] = 448.0
    else:                                      # bfloat16 midpoints (a float32 layout stores them as is)
        row = (1.0 + (2 * rng.integers(0, 128, d) + 1) * 2.0 ** -8) * 2.0 ** rng.integers(-3, 4, d)
    return row.astype(np.float32)


def build_write(rng, layout: KVPageLayout, num_valid: int, num_invalid: int):
    """(pool, page_ids, slots, valid, k, v): a NaN-poisoned pool, `num_valid` tokens at distinct random
    (page, slot)s across slabs, and `num_invalid` padding tokens aimed at valid tokens' slots, at free
    slots and at out-of-range page ids, shuffled together; k float32, v bfloat16, crafted rows first."""
    t, h, d = layout.tokens_per_page, layout.num_kv_heads, layout.head_dim
    num_pages = NUM_SLABS * layout.pages_per_slab
    slab_words = layout.pages_per_slab * layout.page_slot_words + 5  # a remainder that fits no page
    pool = jnp.full((NUM_SLABS, slab_words), POISON, jnp.uint32)
    flat = rng.permutation(num_pages * t)[:num_valid]
    pages, slots = flat // t, flat % t
    aimed = rng.integers(0, num_valid, num_invalid)
    bad_pages = np.where(rng.random(num_invalid) < 0.5, pages[aimed], rng.choice([-1, num_pages, 10 ** 6],
                                                                                  num_invalid))
    pages = np.concatenate([pages, bad_pages]).astype(np.int32)
    slots = np.concatenate([slots, slots[aimed]]).astype(np.int32)
    valid = np.arange(num_valid + num_invalid) < num_valid
    n = num_valid + num_invalid
    k = rng.standard_normal((n, h, d)).astype(np.float32) * rng.uniform(0.1, 4.0, (n, h, 1))
    v = rng.standard_normal((n, h, d)).astype(np.float32) * rng.uniform(0.1, 4.0, (n, h, 1))
    for x in (k, v):
        x[0, 0] = tie_row(rng, layout.kv_dtype, d)
        x[1, -1] = 0.0
        x[2, 0] = 3.3
        x[3] *= 1e3
        x[4] *= 1e-3
    order = np.concatenate([np.arange(5), 5 + rng.permutation(n - 5)])  # keep crafted rows valid
    return (pool, jnp.asarray(pages[order]), jnp.asarray(slots[order]), jnp.asarray(valid[order]),
            jnp.asarray(k[order]), jnp.asarray(v[order], jnp.bfloat16))


def assert_same_words(out, ref, err_msg=""):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.dtype == ref.dtype == np.uint32 and out.shape == ref.shape
    diff = np.flatnonzero(out != ref)
    assert diff.size == 0, (f"{diff.size} words differ {err_msg}, first at flat index {diff[:5]}: "
                            f"kernel {out.reshape(-1)[diff[:5]]}, reference {ref.reshape(-1)[diff[:5]]}")


# ---------------------------------------------------------------------------------------------------
# The matrix: every KV format x (page size, head_dim, kv heads)


@pytest.mark.parametrize("tokens_per_page, head_dim, num_kv_heads", [(8, 128, 2), (16, 64, 3)])
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_write_bit_identical(rng, kv_dtype, tokens_per_page, head_dim, num_kv_heads):
    layout = KVPageLayout(NUM_LAYERS, num_kv_heads, head_dim, tokens_per_page, kv_dtype,
                          pages_per_slab=PAGES_PER_SLAB)
    pool, pages, slots, valid, k, v = build_write(rng, layout, num_valid=40, num_invalid=12)
    ref = _ref(pool, layout, pages, slots, valid, jnp.int32(LAYER), k, v)
    out = _kernel(pool, layout, pages, slots, valid, jnp.int32(LAYER), k, v, interpret=True)
    written = int((np.asarray(ref) != POISON).sum())
    # Every valid token's K and V rows (and scale rows) were written: nothing vacuous about equality.
    assert written >= 2 * 40 * (layout.row_words + layout.scale_row_words) * 0.99
    assert_same_words(out, ref)
    # Padding tokens alone write nothing.
    none = _kernel(pool, layout, pages, slots, jnp.zeros_like(valid), jnp.int32(LAYER), k, v, interpret=True)
    assert_same_words(none, pool, "(all tokens invalid)")


def test_write_padded_page_stride_and_layer0(rng):
    """Pages padded to a common slot size, layer 0, bf16 K and V both."""
    base = KVPageLayout(NUM_LAYERS, 2, 64, 8, "int4", pages_per_slab=PAGES_PER_SLAB)
    layout = KVPageLayout(NUM_LAYERS, 2, 64, 8, "int4", pages_per_slab=PAGES_PER_SLAB,
                          page_stride_words=base.page_words + 3)
    pool, pages, slots, valid, k, v = build_write(rng, layout, num_valid=20, num_invalid=4)
    k = k.astype(jnp.bfloat16)
    ref = _ref(pool, layout, pages, slots, valid, jnp.int32(0), k, v)
    assert_same_words(_kernel(pool, layout, pages, slots, valid, jnp.int32(0), k, v, interpret=True), ref)


@pytest.mark.parametrize("kv_dtype", ["int4", "float32"])
def test_write_layers_of_a_mixed_format_page(rng, kv_dtype):
    """Layers placed after a bf16 first layer in a mixed-format page (KVPageLayout.layer_groups)."""
    layout = mixed_page_group(NUM_LAYERS, 2, 64, 8, kv_dtype, pages_per_slab=PAGES_PER_SLAB)
    pool, pages, slots, valid, k, v = build_write(rng, layout, num_valid=20, num_invalid=4)
    ref = _ref(pool, layout, pages, slots, valid, jnp.int32(LAYER), k, v)
    assert_same_words(_kernel(pool, layout, pages, slots, valid, jnp.int32(LAYER), k, v, interpret=True), ref)
    # Nothing before the group's first word is written (the bf16 layer's span stays poisoned).
    slots_words = np.asarray(ref)[:, :PAGES_PER_SLAB * layout.page_slot_words].reshape(
        NUM_SLABS, PAGES_PER_SLAB, layout.page_slot_words)
    assert (slots_words[:, :, :layout.first_word] == POISON).all()
    assert (slots_words[:, :, layout.first_word:] != POISON).any()


def test_write_strict_interpreter_bounds(rng):
    """Under the TPU simulator every store is bounds-checked: the words written match the reference,
    and a token whose page lies past the pool raises instead of being clamped."""
    layout = KVPageLayout(NUM_LAYERS, 3, 64, 8, "int4", pages_per_slab=PAGES_PER_SLAB)
    pool, pages, slots, valid, k, v = build_write(rng, layout, num_valid=12, num_invalid=3)
    strict = pltpu.InterpretParams()
    ref = np.asarray(_ref(pool, layout, pages, slots, valid, jnp.int32(LAYER), k, v))
    out = np.asarray(_kernel(pool, layout, pages, slots, valid, jnp.int32(LAYER), k, v, interpret=strict))
    written = ref != np.asarray(pool)
    assert written.any()
    np.testing.assert_array_equal(out[written], ref[written])
    bad_pages = pages.at[0].set(NUM_SLABS * PAGES_PER_SLAB)      # valid token 0: one page too far
    try:
        with pytest.raises(Exception, match="[Oo]ut-of-bounds"):
            _kernel(pool, layout, bad_pages, slots, valid, jnp.int32(LAYER), k, v,
                    interpret=strict).block_until_ready()
    finally:
        pltpu.reset_tpu_interpret_mode_state()


def test_write_no_tokens():
    layout = KVPageLayout(NUM_LAYERS, 2, 64, 8, "fp8")
    pool = jnp.full((1, layout.page_words), POISON, jnp.uint32)
    empty = jnp.zeros((0,), jnp.int32)
    x = jnp.zeros((0, 2, 64), jnp.float32)
    out = write_kv_tokens_pallas(pool, layout, empty, empty, empty.astype(bool), 0, x, x, interpret=True)
    assert_same_words(out, pool)


# ---------------------------------------------------------------------------------------------------
# In-register quantization helpers (plain jnp, no kernel)


def test_e4m3_encoding_matches_saturating_cast(rng):
    """`_e4m3_bits` against `saturating_cast_e4m3` over every e4m3 value, every midpoint between
    neighbours (ties to even) and the float32 values either side of it, random magnitudes from 1e-6
    to 1e3 (subnormals, saturation), and the specials."""
    values = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    values = values[np.isfinite(values)]
    mids = _e4m3_midpoints()
    x = np.concatenate([
        values, mids, -mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf),
        rng.standard_normal(50_000) * 10.0 ** rng.uniform(-6, 3, 50_000),
        [448.0, 449.0, 463.9, 464.0, 465.0, 1e30, -1e30, np.inf, -np.inf, 1e-40, -1e-40, 0.0, -0.0],
    ]).astype(np.float32)
    want = np.asarray(lax_bits_u8(saturating_cast_e4m3(jnp.asarray(x)))).astype(np.uint32)
    got = np.asarray(jax.jit(_e4m3_bits)(jnp.asarray(x)))
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"x={x[bad[:5]]}: got {got[bad[:5]]}, want {want[bad[:5]]}"
    nan_bits = np.asarray(_e4m3_bits(jnp.asarray([np.nan, -np.nan], jnp.float32)))
    assert list(nan_bits) == [0x7F, 0xFF]


def lax_bits_u8(x):
    return jax.lax.bitcast_convert_type(x, jnp.uint8)


def test_round_half_even_matches_jnp_round(rng):
    y = np.concatenate([np.arange(-600, 601) / 4, rng.standard_normal(20_000) * 200,
                        np.nextafter(np.arange(-20, 20) + 0.5, np.inf).astype(np.float32),
                        np.nextafter(np.arange(-20, 20) + 0.5, -np.inf).astype(np.float32),
                        [0.49999997, -0.49999997, 2.0 ** 22 + 0.5, -0.0]]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(_round_half_even)(jnp.asarray(y))), np.round(y))


# ---------------------------------------------------------------------------------------------------
# Dispatcher and the compiled path's shape rule


def test_dispatcher(rng):
    layout = KVPageLayout(NUM_LAYERS, 2, 64, 16, "int8", pages_per_slab=PAGES_PER_SLAB)
    pool, pages, slots, valid, k, v = build_write(rng, layout, num_valid=10, num_invalid=3)
    args = (pool, layout, pages, slots, valid, jnp.int32(LAYER), k, v)
    ref = _ref(*args)
    for impl in ("xla", "interpret"):
        # Donating the pool, as a model would: the write is in place.
        fn = jax.jit(functools.partial(write_kv, kernels=impl), static_argnums=1, donate_argnums=0)
        assert_same_words(fn(jnp.array(pool, copy=True), *args[1:]), ref, impl)
    assert set(IMPLEMENTATIONS) == {"xla", "pallas", "interpret"}
    with pytest.raises(ValueError, match="xla.*pallas.*interpret"):
        write_kv(*args, kernels="triton")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="interpret"):
            write_kv(*args, kernels="pallas")


def test_write_shape_error():
    assert write_shape_error(KVPageLayout(NUM_LAYERS, 3, 64, 16, "int4")) is None
    layout = KVPageLayout(NUM_LAYERS, 2, 96, 8, "int8")
    assert "head_dim 96" in write_shape_error(layout)
    pool = jnp.zeros((1, layout.page_words), jnp.uint32)
    ids = jnp.zeros((1,), jnp.int32)
    x = jnp.zeros((1, 2, 96), jnp.float32)
    with pytest.raises(ValueError, match="compiled Pallas KV write: head_dim 96"):
        write_kv_tokens_pallas(pool, layout, ids, ids, ids.astype(bool), 0, x, x)
