"""The engine with kernels="interpret" (every Pallas kernel: KV write, prefill and decode attention,
quantized matmuls) generates what it generates with the XLA references, greedy, on tiny random
models covering a quantized-weight format and a quantized KV format each (int4_fp8: contexts within
one KV block, so kernels and reference round P against the same running max)."""

from __future__ import annotations

import pytest

from models.config import ModelConfig
from models.loader import random_model
from serving.engine.sampling import SamplingParams
from tests.helpers import build_engine, drain

CFG = ModelConfig("llama", 128, 64, 128, 2, 4, 2, 32, max_position_embeddings=256)


@pytest.mark.parametrize("precision,kv", [("w4a16", "int4"), ("w8a8", "fp8"), ("fp8", "int8"), ("fireq", "int4_fp8")])
def test_interpret_kernels_generate_the_reference_tokens(precision, kv, fast_cpu_compiles):
    loaded = random_model(CFG, precision, "float32", kv_dtype=kv, seed=3)
    prompts = [[5, 9, 13, 2, 7, 1, 3, 8, 10, 4, 6, 12, 11, 14, 15, 16, 17, 18], [3, 1, 4, 1, 5, 9, 2, 6]]
    tokens = {}
    for kernels in ("xla", "interpret"):
        engine = build_engine(loaded, num_pages=32, tokens_per_page=8, max_num_seqs=2, max_model_len=64,
                              max_num_batched_tokens=32, prefill_chunk=16, kernels=kernels)
        for i, p in enumerate(prompts):
            engine.add_request(p, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), request_id=str(i))
        tokens[kernels] = {rid: out.outputs[0].token_ids for rid, out in drain(engine).items()}
    assert tokens["interpret"] == tokens["xla"]
    assert all(len(t) == 6 for t in tokens["xla"].values())
