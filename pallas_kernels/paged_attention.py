"""Dispatcher for attention over KV pages. Models call only this.

Implementations (a static argument, so each compiles into its own program):
  "xla"        the pure-XLA reference (`paged_attention_ref`); the default, and what runs on CPU.
  "pallas"     the Pallas decode kernel (`paged_attention_pallas`), compiled for the GPU (Triton
               lowering); raises on other backends.
  "interpret"  the same Pallas kernel under `interpret=True` (any backend; slow, for tests).
The Pallas kernel covers decode only (one query token per sequence); prefill and chunked prefill
(S > 1) fall back to the reference for every implementation until the prefill kernel lands (next
part of issue 5).
"""

from __future__ import annotations

import jax

from pallas_kernels.paged_attention_pallas import paged_decode_attention
from pallas_kernels.paged_attention_ref import paged_attention_reference

IMPLEMENTATIONS = ("xla", "pallas", "interpret")


def paged_attention(q, pool, layout, layer, page_table, q_positions, kv_lens, *, implementation: str = "xla"):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
    # Prefill / chunked prefill: no Pallas kernel yet (it comes next); use the reference.
    if implementation == "xla" or q.shape[1] != 1:
        return paged_attention_reference(q, pool, layout, layer, page_table, q_positions, kv_lens)
    if implementation == "pallas" and jax.default_backend() != "gpu":
        raise ValueError(f"implementation 'pallas' compiles for the GPU, but the default backend is "
                         f"{jax.default_backend()!r}; use 'interpret' (the same kernel, interpreted) or 'xla'")
    return paged_decode_attention(q, pool, layout, layer, page_table, q_positions, kv_lens,
                                  interpret=(implementation == "interpret"))
