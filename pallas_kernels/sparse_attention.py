"""Dispatcher for sparse decode attention with query-aware page selection. Models call only this.

Two passes: the pages are scored from their key bounds (`page_scores_pallas`, or
`page_selection.page_scores_reference` for "xla"), `page_selection.select_pages` picks each kv
head's pages under the sequence's policy and budget, and `paged_attention` attends over only those,
through a page table per kv head (the decode kernel reads each head's own row; the reference reads
only the chosen pages too). A fused single pass would need the top-k inside the attention kernel
before any page is read; the score pass reads 2 x head_dim int8 codes per page and kv head, so it
costs a small fraction of what it lets attention skip. `kernels` as for `paged_attention`.
"""

from __future__ import annotations

import jax

from pallas_kernels.implementation import check_implementation
from pallas_kernels.kv_pages import KVPageLayout
from pallas_kernels.page_scores_pallas import page_scores_pallas
from pallas_kernels.page_selection import PageSelection, SelectionInputs, page_scores_reference, select_pages
from pallas_kernels.paged_attention import paged_attention

__all__ = ["sparse_decode_attention"]


def sparse_decode_attention(q: jax.Array, pool: jax.Array, layout: KVPageLayout, layer, page_table: jax.Array,
                            q_positions: jax.Array, kv_lens: jax.Array, inputs: SelectionInputs, *,
                            kernels: str = "xla") -> tuple[jax.Array, PageSelection]:
    """q [B, 1, Hq, D] (RoPE applied), page_table int32[B, P], q_positions int32[B, 1], kv_lens int32[B]
    (this step's token written), and the sequences' selection inputs -> (out [B, 1, Hq, D], the
    selection made)."""
    check_implementation(kernels)
    if q.shape[1] != 1:
        raise ValueError(f"sparse decode attention takes one query per sequence, got S={q.shape[1]}")
    if kernels == "xla":
        scores = page_scores_reference(q, pool, layout, layer, page_table, kv_lens)
    else:
        scores = page_scores_pallas(q, pool, layout, layer, page_table, kv_lens, interpret=(kernels == "interpret"))
    selection = select_pages(scores, page_table, kv_lens, inputs, layout.tokens_per_page)
    out = paged_attention(q, pool, layout, layer, selection.head_table, q_positions, selection.head_lens,
                          kernels=kernels)
    return out, selection
