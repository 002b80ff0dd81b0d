"""Dispatcher for attention over KV pages. Models call only this.

`kernels` picks the implementation (a static argument, so each compiles into its own program):
  "xla"        the pure-XLA reference (`paged_attention_ref`); the default, and what runs on CPU.
  "pallas"     the Pallas kernels, compiled for the GPU (Triton lowering); raises on other backends.
  "interpret"  the same Pallas kernels under `interpret=True` (any backend; slow, for tests).
For "pallas" / "interpret" the query length picks the kernel (S is static): S == 1 (decode) goes to
the split-K decode kernel (`paged_attention_pallas`), S > 1 (prefill, chunked prefill, or a decode
batch padded to several query slots) to the prefill kernel: int4_fp8 pages to the Mosaic GPU one on
FP8 tensor cores (`paged_prefill_mgpu`) where its shape rules allow, else the Triton one
(`paged_prefill_pallas`). All have the
reference's semantics: causal on each query's position, keys up to the sequence's kv_len (this step's
writes included, see `kv_write.write_kv`), rows that see no key give 0. Decode also takes a page
table per kv head ([B, Hkv, P] with kv_lens [B, Hkv]: sparse decode over selected pages, see
`sparse_attention`). `precision`: the prefill kernel's dot precision (None: the backend default);
the decode kernel has no dot, and the reference follows `jax.default_matmul_precision`.
"""

from __future__ import annotations

from pallas_kernels.implementation import IMPLEMENTATIONS, check_implementation
from pallas_kernels.paged_attention_pallas import paged_decode_attention
from pallas_kernels.paged_attention_ref import paged_attention_reference
from pallas_kernels.paged_prefill_mgpu import paged_prefill_attention_mgpu, prefill_mgpu_shape_error
from pallas_kernels.paged_prefill_pallas import paged_prefill_attention

__all__ = ["IMPLEMENTATIONS", "paged_attention"]


def paged_attention(q, pool, layout, layer, page_table, q_positions, kv_lens, *, kernels: str = "xla",
                    precision=None):
    check_implementation(kernels)
    layout.check_uniform("paged_attention")
    if page_table.ndim == 3 and q.shape[1] != 1:
        raise ValueError(f"a page table per kv head [B, Hkv, P] is for decode (one query per sequence), "
                         f"got S={q.shape[1]}")
    if kernels == "xla":
        return paged_attention_reference(q, pool, layout, layer, page_table, q_positions, kv_lens)
    interpret = kernels == "interpret"
    if q.shape[1] == 1:
        return paged_decode_attention(q, pool, layout, layer, page_table, q_positions, kv_lens, interpret=interpret)
    if prefill_mgpu_shape_error(layout, pool.shape, page_table.shape[1]) is None:
        return paged_prefill_attention_mgpu(q, pool, layout, layer, page_table, q_positions, kv_lens,
                                            interpret=interpret)
    return paged_prefill_attention(q, pool, layout, layer, page_table, q_positions, kv_lens,
                                   precision=precision, interpret=interpret)
