"""The engine with kernels="interpret" (every Pallas kernel: KV write, prefill and decode attention,
quantized matmuls) generates what it generates with the XLA references, greedy, on tiny random
models covering a quantized-weight format and a quantized KV format each (int4_fp8: contexts within
one KV block, so kernels and reference round P against the same running max), through prefill and
decode steps (and a mixed step, once), and a head_dim-64
fireq model whose prefill runs the Mosaic GPU FP8 kernel."""

from __future__ import annotations

import pytest

from models.config import ModelConfig
from models.loader import random_model
from serving.engine.sampling import SamplingParams
from tests.helpers import build_engine, drain

CFG = ModelConfig("llama", 128, 64, 128, 2, 4, 2, 32, max_position_embeddings=256)


def greedy_tokens(loaded, kernels: str, prompts, **config):
    """(engine, {request id: 6 greedy tokens}) of an engine running `kernels` over a 32-page pool."""
    engine = build_engine(loaded, num_pages=32, tokens_per_page=8, max_num_seqs=2, max_model_len=64,
                          kernels=kernels, **config)
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), request_id=str(i))
    return engine, {rid: out.outputs[0].token_ids for rid, out in drain(engine).items()}


@pytest.mark.parametrize("precision,kv", [("w4a16", "int4"), ("w8a8", "fp8"), ("fp8", "int8"), ("fireq", "int4_fp8")])
def test_interpret_kernels_generate_the_reference_tokens(precision, kv, fast_cpu_compiles):
    loaded = random_model(CFG, precision, "float32", kv_dtype=kv, seed=3)
    prompts = [[5, 9, 13, 2, 7, 1, 3, 8, 10, 4, 6, 12, 11, 14, 15, 16, 17, 18], [3, 1, 4, 1, 5, 9, 2, 6]]
    # One format also runs a mixed step (the second prompt decodes while the first one's last chunk
    # rides along: both attention kernels in one program); the others take prompts in steps of their
    # own, which compiles fewer interpreted programs.
    mixed = precision == "w4a16"
    tokens = {}
    for kernels in ("xla", "interpret"):
        engine, tokens[kernels] = greedy_tokens(loaded, kernels, prompts, max_num_batched_tokens=32, prefill_chunk=16,
                                                mixed_steps=mixed)
        assert [kind for kind, *_ in engine.stats.per_step][:2] == ["prefill", "mixed" if mixed else "prefill"]
    assert tokens["interpret"] == tokens["xla"]
    assert all(len(t) == 6 for t in tokens["xla"].values())


def test_fireq_prefill_on_the_mosaic_gpu_kernel(fast_cpu_compiles):
    """head_dim 64: the engine's int4_fp8 prefill goes to the Mosaic GPU FP8 kernel (the dispatcher's
    shape rules hold for its pool and table), and greedy tokens still equal the XLA reference's. The
    prompts stay within one KV block of 8 pages (64 tokens), where both round P alike."""
    from pallas_kernels.paged_prefill_mgpu import prefill_mgpu_shape_error

    cfg = ModelConfig("llama", 128, 128, 256, 2, 2, 2, 64, max_position_embeddings=256)
    loaded = random_model(cfg, "fireq", "float32", seed=5)
    prompts = [list(range(3, 40)), [7, 1, 2, 9, 4]]
    tokens = {}
    for kernels in ("xla", "interpret"):
        engine, tokens[kernels] = greedy_tokens(loaded, kernels, prompts, max_num_batched_tokens=64, prefill_chunk=32,
                                                mixed_steps=False)
        assert prefill_mgpu_shape_error(engine.layout, engine.pool.words.shape, engine.runner.table_width) is None
    assert tokens["interpret"] == tokens["xla"]
