"""Dispatcher for attention over KV pages. Models call only this.

Implementations: "xla" (the reference; the only one until the Pallas kernels land). The choice is a
static argument so each implementation compiles into its own program.
"""

from __future__ import annotations

from pallas_kernels.paged_attention_ref import paged_attention_reference

IMPLEMENTATIONS = ("xla",)


def paged_attention(q, pool, layout, layer, page_table, q_positions, kv_lens, *, implementation: str = "xla"):
    if implementation == "xla":
        return paged_attention_reference(q, pool, layout, layer, page_table, q_positions, kv_lens)
    raise ValueError(f"unknown attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
