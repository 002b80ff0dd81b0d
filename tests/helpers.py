"""Shared test utilities: run a model's paged forward pass directly over a fresh pool."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.kv_pages import KVPageLayout
from serving.kv_pool import KVPool, slab_bytes_for

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
HF_MODELS = ("llama", "mistral", "qwen2")


class PagedForward:
    """One sequence's forward passes through the paged pool: `step(tokens)` appends tokens (any
    count: a prefill chunk or one decode token) and returns float32 logits for each of them."""

    def __init__(self, model, max_tokens: int = 128, tokens_per_page: int = 4, kv_dtype: str = "float32"):
        cfg = model.config
        self.model = model
        layout = KVPageLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, tokens_per_page, kv_dtype)
        slab = slab_bytes_for([layout.page_bytes], layout.page_bytes * 4)
        n_pages = layout.pages_for(max_tokens)
        self.pool = KVPool(-(-n_pages // 4) + 1, slab)
        self.layout = dataclasses.replace(layout, pages_per_slab=self.pool.allocator.register("m", layout.page_bytes))
        # Use pages in a scrambled order so contiguity is never assumed.
        pages = self.pool.allocator.allocate("m", n_pages)
        np.random.default_rng().shuffle(pages)
        self.table = jnp.asarray([pages + [0] * (-len(pages) % 8)], jnp.int32)
        self.length = 0
        graphdef, self.state = nnx.split(model)
        layout = self.layout

        @jax.jit
        def forward(state, words, tokens, start, count, table):
            m = nnx.merge(graphdef, state)
            hidden, words = m(tokens, start, count, table, words, layout)
            return m.logits(hidden), words

        self._forward = forward

    def step(self, tokens) -> np.ndarray:
        n = len(tokens)
        padded = np.zeros((1, max(16, n)), np.int32)  # one compiled shape for every short step
        padded[0, :n] = tokens
        logits, self.pool.words = self._forward(self.state, self.pool.words, padded,
                                                np.asarray([self.length], np.int32), np.asarray([n], np.int32),
                                                self.table)
        self.length += n
        return np.asarray(logits[0, :n])


def build_engine(loaded, *, num_pages: int, tokens_per_page: int = 4, pages_per_slab: int = 4, **config):
    """An LLMEngine over a pool of at least `num_pages` pages (in slabs of `pages_per_slab`)."""
    from serving.engine import EngineConfig, engine_with_own_pool

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
