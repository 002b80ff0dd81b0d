"""Direct forward passes of one model over a private pool, outside the engine: scoring text
(quality evaluation) and checking logits in tests.

`step(tokens[B, n])` appends n tokens to each of B sequences (a prefill chunk or one decode token)
and returns float32 logits for every appended position; `reset()` starts the sequences over, and
`checkpoint()` / `restore()` return to an earlier point (the pool is an immutable array, so several
continuations can start from one prefill). With `key_bounds`, a one-token step may select pages
(`step(tokens, sparse=SparseSpec(...))`), dense in the first `sparse_dense_layers` layers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.llama import Segment
from pallas_kernels.kv_pages import KVPageLayout
from pallas_kernels.page_selection import SelectionInputs, SparseSpec
from serving.kv.kv_pool import KVPool
from serving.kv.slab_geometry import slab_bytes_for

PAGES_PER_SLAB = 4
MIN_STEP_TOKENS = 16  # short steps are padded so they share one compiled shape


class PagedForward:
    def __init__(self, model, max_tokens: int = 128, *, batch: int = 1, tokens_per_page: int = 4,
                 kv_dtype: str = "float32", layer_kv_dtypes: tuple[tuple[int, str], ...] = (),
                 shuffle_pages: bool = True, key_bounds: bool = False, sparse_dense_layers: int = 2,
                 measure_recall: bool = False):
        cfg = model.config
        layout = KVPageLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, tokens_per_page, kv_dtype,
                              layer_kv_dtypes=layer_kv_dtypes, key_bounds=key_bounds)
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
        self.dense_layers = sparse_dense_layers
        graphdef, self.state = nnx.split(model)
        layout = self.layout

        @jax.jit
        def forward(state, words, tokens, start, count, table, selection):
            m = nnx.merge(graphdef, state)
            hidden, words, reads = m(Segment(tokens, start, count, table), words, layout, selection=selection,
                                     dense_layers=sparse_dense_layers, measure_recall=measure_recall)
            return m.logits(hidden), words, reads

        self._forward = forward

    def reset(self) -> None:
        self.length = 0

    def checkpoint(self):
        """Where the sequences are now, for `restore`."""
        return self.pool.words, self.length

    def restore(self, point) -> None:
        self.pool.words, self.length = point

    def step(self, tokens, sparse: SparseSpec | None = None) -> np.ndarray:
        """tokens int[B, n] (or int[n] when batch is 1) -> float32 logits [B, n, vocab] (or [n, vocab]).
        `sparse`: page selection for a one-token step (the layout must keep key bounds); what
        attention read (`AttentionStats`: pages, and with measure_recall the selections' recall) is
        in `last_stats` afterwards."""
        tokens = np.asarray(tokens, np.int32)
        flat = tokens.ndim == 1
        tokens = tokens.reshape(self.batch, -1)
        n = tokens.shape[1]
        if self.length + n > self.max_tokens:
            raise ValueError(f"{self.length + n} tokens exceed max_tokens={self.max_tokens}")
        selection = None
        if sparse is not None:
            if n != 1 or not self.layout.key_bounds:
                raise ValueError("page selection needs one-token steps over pages with key bounds")
            policy, budget, gate = sparse.row(self.length + 1, self.layout.tokens_per_page)
            layers = sparse.layer_budgets(budget, self.layout.num_layers, self.dense_layers)
            selection = SelectionInputs(np.full((self.batch,), policy, np.int32), np.tile(layers, (self.batch, 1)),
                                        np.full((self.batch,), gate, np.int32))
        padded = np.zeros((self.batch, n if selection is not None else max(MIN_STEP_TOKENS, n)), np.int32)
        padded[:, :n] = tokens
        start = np.full((self.batch,), self.length, np.int32)
        count = np.full((self.batch,), n, np.int32)
        logits, self.pool.words, reads = self._forward(self.state, self.pool.words, padded, start, count, self.table,
                                                       selection)
        self.length += n
        self.last_stats = jax.device_get(reads)
        out = np.asarray(logits[:, :n])
        return out[0] if flat else out
