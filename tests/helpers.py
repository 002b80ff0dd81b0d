"""Shared test utilities: fixture paths, an engine over a small pool, direct paged forwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from pallas_kernels.kv_pages import KVPageLayout
from serving.engine.paged_forward import PagedForward  # noqa: F401  (re-exported for tests)

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
HF_MODELS = ("llama", "mistral", "qwen2")


def build_engine(loaded, *, num_pages: int, tokens_per_page: int = 4, pages_per_slab: int = 4, **config):
    """An LLMEngine over a pool of at least `num_pages` pages (in slabs of `pages_per_slab`)."""
    from serving.engine.llm_engine import EngineConfig, engine_with_own_pool

    layout = loaded.kv_layout(tokens_per_page, key_bounds=config.get("sparse") is not None)
    slab_bytes = layout.page_bytes * pages_per_slab
    return engine_with_own_pool(loaded.model, EngineConfig(**config), layout=layout,
                                kv_cache_bytes=slab_bytes * -(-num_pages // pages_per_slab), slab_bytes=slab_bytes,
                                tokenizer=loaded.tokenizer, eos_token_ids=loaded.eos_token_ids)


def mixed_page_group(num_layers: int, num_kv_heads: int, head_dim: int, tokens_per_page: int,
                     kv_dtype: str, *, pages_per_slab: int) -> KVPageLayout:
    """The `num_layers` layers of `kv_dtype` that follow a bf16 first layer in a mixed-format page: a
    uniform layout at a word offset inside each page slot (kernel tests leave the bf16 layer's span
    poisoned, so a read or write that misses the offset shows up)."""
    page = KVPageLayout(num_layers + 1, num_kv_heads, head_dim, tokens_per_page, kv_dtype,
                        pages_per_slab=pages_per_slab, layer_kv_dtypes=((0, "bf16"),))
    group = page.layer_groups()[1]
    assert group.first_layer == 1 and group.layout.first_word > 0
    return group.layout


def evict_prefix_caches(*engines) -> None:
    """Once no sequence holds a page: give every idle cached page back to the pool (then a test can
    check that every slab is free)."""
    for engine in engines:
        assert engine.pages.num_used_pages == 0, "a sequence still holds pages"
        engine.pages.evict(engine.pages.num_idle_cached)


def drain(engine) -> dict[str, object]:
    """Run an engine until idle; the final RequestOutput of each request by id."""
    return {o.request_id: o for o in engine.run_until_done() if o.finished}


def kv_bytes_per_token_per_layer(
    kv_format: str, num_kv_heads: int, head_dim: int, scale_dtype: Any = jnp.bfloat16
) -> int:
    """An independent count of the bytes one token occupies in one layer's KV cache (K and V, values
    + scales + zeros), from bit widths alone: what `KVPageLayout.bytes_per_token` is checked against.

    bf16 (alias bfloat16)/float32: values only. fp8/int8: 1 byte/element + one scale per head. int4:
    4 bits/element + one scale and one zero (both `scale_dtype`) per head; int4_fp8 (FireQ's
    symmetric int4): 4 bits/element + one scale per head. Each token's values row and
    its scale row fill whole 32-bit words: the values row must (ValueError otherwise), the scale row is
    zero-padded (e.g. int8 with 3 KV heads and bf16 scales: 6 bytes of scales stored in 8).
    """
    kv_format = "bf16" if kv_format == "bfloat16" else kv_format
    elems = num_kv_heads * head_dim
    sbits = jnp.dtype(scale_dtype).itemsize * 8
    if kv_format == "bf16":
        bits, scale_bits = elems * 16, 0
    elif kv_format == "float32":
        bits, scale_bits = elems * 32, 0
    elif kv_format in ("fp8", "int8"):
        bits, scale_bits = elems * 8, num_kv_heads * sbits
    elif kv_format == "int4":
        bits, scale_bits = elems * 4, num_kv_heads * 2 * sbits
    elif kv_format == "int4_fp8":
        bits, scale_bits = elems * 4, num_kv_heads * sbits
    else:
        raise ValueError(f"unsupported kv_format {kv_format!r}; supported: bf16 (bfloat16), float32, fp8, int8, "
                         "int4, int4_fp8")
    if bits % 32:
        raise ValueError(f"a token's K row is not a whole number of 32-bit words ({bits} bits)")
    return 2 * (bits + -(-scale_bits // 32) * 32) // 8


def check_fp8_p(out, ref, rtol=2e-5, atol=2e-5):
    """int4_fp8 attention against its reference: tight (rtol = atol = 2e-5) except where float32
    summation order puts an unrounded P value on the other side of an e4m3 rounding boundary than the
    reference's (rare: the values differ by ~1e-7 relative, boundaries are 2^-4 apart). A flip moves one P entry of one row by one e4m3 step
    (2^-3 relative), so that row moves by at most 2^-3 x its largest weight x max|v| (see
    tests/test_fp8_attention.py): at least 99% of the outputs match tightly, and none by more than
    2^-3 max|ref| (a wrong page, scale or mask moves whole sequences, far more than 1%)."""
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), "NaN/inf in the kernel output"
    err = np.abs(out - ref)
    close = err <= atol + rtol * np.abs(ref)
    assert close.mean() >= 0.99, (close.mean(), err.max())
    assert err.max() <= 2.0 ** -3 * np.abs(ref).max(), err.max()


def hf_fleet_config(**per_model):
    """The three HF fixture models as a serve config (float32, tiny pools): the cluster tests' fleet."""
    from fineserve_jax.serve_config import ServeConfig

    return ServeConfig.from_dict({"pool_bytes": "8MiB", "models": [
        {"model": str(FIXTURES / m), "precision": "bf16", "name": m, "dtype": "float32", "max_model_len": 128,
         "max_num_seqs": 4, "max_num_batched_tokens": 64, "tokens_per_page": 8} | per_model for m in HF_MODELS]})
