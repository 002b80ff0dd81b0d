"""Shared test utilities: fixture paths, an engine over a small pool, direct paged forwards."""

from __future__ import annotations

from pathlib import Path

from pallas_kernels.kv_pages import KVPageLayout
from serving.engine.paged_forward import PagedForward  # noqa: F401  (re-exported for tests)

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
HF_MODELS = ("llama", "mistral", "qwen2")


def build_engine(loaded, *, num_pages: int, tokens_per_page: int = 4, pages_per_slab: int = 4, **config):
    """An LLMEngine over a pool of at least `num_pages` pages (in slabs of `pages_per_slab`)."""
    from serving.engine.llm_engine import EngineConfig, engine_with_own_pool

    cfg = loaded.config
    page_bytes = KVPageLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, tokens_per_page,
                              loaded.kv_dtype).page_bytes
    slab_bytes = page_bytes * pages_per_slab
    return engine_with_own_pool(loaded.model, EngineConfig(**config), kv_dtype=loaded.kv_dtype,
                                kv_cache_bytes=slab_bytes * -(-num_pages // pages_per_slab),
                                tokens_per_page=tokens_per_page, slab_bytes=slab_bytes,
                                tokenizer=loaded.tokenizer, eos_token_ids=loaded.eos_token_ids)


def drain(engine) -> dict[str, object]:
    """Run an engine until idle; the final RequestOutput of each request by id."""
    return {o.request_id: o for o in engine.run_until_done() if o.finished}
