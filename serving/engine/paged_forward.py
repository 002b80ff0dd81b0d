"""Direct forward passes of one model over a private pool, outside the engine: scoring text
(quality evaluation) and checking logits in tests.

`step(tokens[B, n])` appends n tokens to each of B sequences (a prefill chunk or one decode token)
and returns float32 logits for every appended position; `reset()` starts the sequences over.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.kv_pages import KVPageLayout
from serving.kv.kv_pool import KVPool
from serving.kv.slab_geometry import slab_bytes_for

PAGES_PER_SLAB = 4
MIN_STEP_TOKENS = 16  # short steps are padded so they share one compiled shape


class PagedForward:
    def __init__(self, model, max_tokens: int = 128, *, batch: int = 1, tokens_per_page: int = 4,
                 kv_dtype: str = "float32", layer_kv_dtypes: tuple[tuple[int, str], ...] = (),
                 shuffle_pages: bool = True):
        cfg = model.config
        layout = KVPageLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, tokens_per_page, kv_dtype,
                              layer_kv_dtypes=layer_kv_dtypes)
        pages_per_seq = layout.pages_for(max_tokens)
        self.pool = KVPool(-(-batch * pages_per_seq // PAGES_PER_SLAB) + 1,
                           slab_bytes_for([layout.page_bytes], layout.page_bytes * PAGES_PER_SLAB))
        self.layout = dataclasses.replace(layout, pages_per_slab=self.pool.allocator.register("m", layout.page_bytes))
        pages = self.pool.allocator.allocate("m", batch * pages_per_seq)
        if shuffle_pages:  # scrambled order, so nothing may assume contiguous pages
            np.random.default_rng().shuffle(pages)
        width = -(-pages_per_seq // 8) * 8  # the reference attention visits pages 8 at a time
        table = np.zeros((batch, width), np.int32)
        table[:, :pages_per_seq] = np.asarray(pages, np.int32).reshape(batch, pages_per_seq)
        self.table = jnp.asarray(table)
        self.batch, self.max_tokens, self.length = batch, max_tokens, 0
        graphdef, self.state = nnx.split(model)
        layout = self.layout

        @jax.jit
        def forward(state, words, tokens, start, count, table):
            m = nnx.merge(graphdef, state)
            hidden, words, _ = m(tokens, start, count, table, words, layout)
            return m.logits(hidden), words

        self._forward = forward

    def reset(self) -> None:
        self.length = 0

    def step(self, tokens) -> np.ndarray:
        """tokens int[B, n] (or int[n] when batch is 1) -> float32 logits [B, n, vocab] (or [n, vocab])."""
        tokens = np.asarray(tokens, np.int32)
        flat = tokens.ndim == 1
        tokens = tokens.reshape(self.batch, -1)
        n = tokens.shape[1]
        if self.length + n > self.max_tokens:
            raise ValueError(f"{self.length + n} tokens exceed max_tokens={self.max_tokens}")
        padded = np.zeros((self.batch, max(MIN_STEP_TOKENS, n)), np.int32)
        padded[:, :n] = tokens
        start = np.full((self.batch,), self.length, np.int32)
        count = np.full((self.batch,), n, np.int32)
        logits, self.pool.words = self._forward(self.state, self.pool.words, padded, start, count, self.table)
        self.length += n
        out = np.asarray(logits[:, :n])
        return out[0] if flat else out
