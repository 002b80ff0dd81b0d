"""Query-aware page selection in the engine: key bounds kept right through chunked prefill and decode,
sparse decode equal to dense when the budget covers the context, selection per request, KV bytes
read counted, and bad settings refused.

Tiny random float32 models (4 layers, 2 kv heads, head_dim 32) on the XLA path."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest

from models.config import ModelConfig
from models.loader import random_model
from pallas_kernels.kv_pages import read_key_bounds, read_kv_pages
from pallas_kernels.page_selection import SparseSpec
from serving.engine.sampling import SamplingParams
from tests.helpers import PagedForward, build_engine, drain
from tests.test_page_selection import check_bounds

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")   # tiny models: compiling dominates

CFG = ModelConfig("llama", 128, 64, 128, 4, 4, 2, 32, max_position_embeddings=512)
T = 4


@pytest.fixture(scope="module")
def loaded():
    return random_model(CFG, "bf16", "float32", name="tiny", seed=3)


def engine(loaded, sparse=None, **config):
    return build_engine(loaded, num_pages=96, tokens_per_page=T, max_num_seqs=4, max_model_len=160,
                        max_num_batched_tokens=32, prefill_chunk=32, sparse=sparse, **config)


def prompts(rng, lengths):
    return [rng.integers(1, CFG.vocab_size, n).tolist() for n in lengths]


def run(eng, token_lists, params):
    ids = [eng.add_request(p, params[i] if isinstance(params, list) else params) for i, p in enumerate(token_lists)]
    out = drain(eng)
    return [out[i].outputs[0].token_ids for i in ids]


def test_key_bounds_hold_every_pages_keys_after_chunked_prefill_and_decode(rng, loaded):
    eng = engine(loaded, sparse={"policy": "full"})
    greedy = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
    ids = [eng.add_request(p, greedy) for p in prompts(rng, [45, 13, 70])]   # chunked prefills (32 per step)
    # Stop mid-way, while the sequences hold their pages, and check every page's bounds.
    for _ in range(6):
        eng.step()
    layout, pool = eng.layout, eng.pool.words
    checked = 0
    for rid in ids:
        seq = eng.requests[rid]
        n = seq.num_computed
        pages = np.asarray(seq.pages[:layout.pages_for(n)], np.int32)
        for layer in range(CFG.num_layers):
            k = np.asarray(read_kv_pages(pool, layout, pages, layer)[0]).reshape(-1, 2, 32)[:n]
            lo, hi = (np.asarray(x) for x in read_key_bounds(pool, layout, pages, layer))
            for i in range(len(pages)):
                keys = k[i * T:(i + 1) * T]
                check_bounds(lo[i], hi[i], keys.min(0), keys.max(0))
                checked += 1
    assert checked > 0
    drain(eng)


def test_sparse_decode_equals_dense_when_the_budget_covers_the_context(rng, loaded):
    tokens = prompts(rng, [30, 9, 57])
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    dense = run(engine(loaded), tokens, greedy)
    covering = run(engine(loaded, sparse={"policy": "bbox", "budget_tokens": 160, "gate_tokens": 0}), tokens, greedy)
    assert covering == dense


def test_selection_per_request_and_kv_bytes_read(rng, loaded):
    tokens = prompts(rng, [100, 100])
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    eng = engine(loaded, sparse={"policy": "bbox", "budget_tokens": 16, "gate_tokens": 32},
                 sparse_dense_layers=1, sparse_recall_every=3)
    full = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, sparse={"policy": "full"})
    mixed = run(eng, tokens, [greedy, full])
    stats = eng.stats
    # ~26 pages of 1 KiB per layer and kv head, key bounds 80 B (b = 1/13 of that). Layer 0 reads
    # every page; layers 1-3 read every page's bounds, then 4 pages (bbox) or all (full): per page of
    # context (1 + 3 * (4/26 + b) + 1 + 3 * (1 + b)) / 8 = 0.74 of dense.
    assert 0.71 < stats.decode_kv_bytes_read / stats.decode_kv_bytes_dense < 0.77
    # Every third decode step measured its selections: full rows select every page (recall 1).
    assert stats.recall_pages > 0 and 0 < stats.recall_hits <= stats.recall_pages
    dense = run(engine(loaded), tokens, greedy)
    assert mixed[1] == dense[1]                  # the request that asked for full attention
    window = run(engine(loaded, sparse={"policy": "sink_window", "budget_tokens": 16, "gate_tokens": 32}),
                 tokens[:1], greedy)
    assert all(len(x) == 10 for x in mixed + window)


def test_layer_weights_set_each_layers_budget(rng, loaded):
    """A layer reads its own share of the budget: the pages attention read add up layer by layer;
    the model's weights share out a request's own budget too."""
    pf = PagedForward(loaded.model, 128, tokens_per_page=T, key_bounds=True, sparse_dense_layers=1)
    pf.step(prompts(rng, [99])[0])
    point = pf.checkpoint()
    reads = {}
    for weights in (None, (5, 1, 1, 3)):
        pf.restore(point)
        pf.step([7], sparse=SparseSpec("bbox", budget_tokens=16, gate_tokens=0, layer_weights=weights))
        reads[weights] = int(pf.last_stats.pages_read.sum())
    # 100 tokens: 25 pages a kv head in dense layer 0; 4-page budgets, or 4 * (1, 1, 3) / (5 / 3)
    assert reads == {None: CFG.num_kv_heads * (25 + 3 * 4), (5, 1, 1, 3): CFG.num_kv_heads * (25 + 2 + 2 + 7)}

    eng = engine(loaded, sparse={"policy": "bbox", "budget_tokens": 16, "layer_weights": [5, 1, 1, 3]},
                 sparse_dense_layers=1)
    own = SamplingParams(sparse={"policy": "bbox", "budget_tokens": 32})
    inputs = eng.runner.selection_inputs([SimpleNamespace(params=own), SimpleNamespace(params=SamplingParams())],
                                         np.asarray([200, 200, 5]))
    np.testing.assert_array_equal(inputs.budget_pages, [[8, 5, 5, 14], [4, 2, 2, 7], [2, 2, 2, 2]])
    with pytest.raises(ValueError, match="layer_weights has 2 entries; the model has 4 layers"):
        eng.add_request([1, 2, 3], SamplingParams(sparse=SparseSpec("bbox", layer_weights=(1, 2))))
    with pytest.raises(ValueError, match="layer_weights has 3 entries"):
        engine(loaded, sparse={"policy": "bbox", "layer_weights": [1, 2, 3]})
    with pytest.raises(ValueError, match="unknown field"):   # the model's to set, not a request's
        SamplingParams(sparse={"policy": "bbox", "layer_weights": [1, 1, 1, 1]})


def test_bad_selection_settings_are_refused(rng, loaded):
    with pytest.raises(ValueError, match="policy"):
        SamplingParams(sparse={"policy": "topk"})
    with pytest.raises(ValueError, match="unknown field"):
        SamplingParams(sparse={"policy": "bbox", "gate_tokens": 3})
    with pytest.raises(ValueError, match="budget_tokens"):
        SamplingParams(sparse={"budget_tokens": -1})
    plain = engine(loaded)
    with pytest.raises(ValueError, match="page selection"):
        plain.add_request([1, 2, 3], SamplingParams(sparse={"policy": "bbox", "budget_tokens": 64}))
    plain.add_request([1, 2, 3], SamplingParams(sparse={"policy": "full"}, max_tokens=2))   # full: fine
    assert len(drain(plain)) == 1
    with pytest.raises(ValueError, match="sparse_dense_layers"):
        engine(loaded, sparse={"policy": "bbox"}, sparse_dense_layers=-1)


def test_selection_per_request_over_http():
    """The `sparse` extension field of a request body: honoured, validated, refused by a model
    started without page selection."""
    import httpx

    from tests.server_helpers import running_server, tiny_models, tokenizer

    models = tiny_models(tokenizer(), ("bf16", "w8a8"))
    options = {"tiny-bf16": {"sparse": {"policy": "bbox", "budget_tokens": 16, "gate_tokens": 16},
                             "sparse_dense_layers": 1, "sparse_recall_every": 2}}
    with running_server(models, model_options=options) as srv:
        prompt = "one two three four five six seven eight nine ten " * 4

        def post(model, extra):
            return httpx.post(srv.base_url + "/completions", timeout=60,
                              json={"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, **extra})

        for extra in ({}, {"sparse": {"policy": "sink_window", "budget_fraction": 0.25}},
                      {"sparse": {"policy": "full"}}):
            r = post("tiny-bf16", extra)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 6
        engine = srv.engine("tiny-bf16")
        assert 0 < engine.stats.decode_kv_bytes_read < engine.stats.decode_kv_bytes_dense
        for model, extra, named in (
                ("tiny-bf16", {"sparse": {"policy": "topk"}}, "sparse.policy"),
                ("tiny-bf16", {"sparse": {"policy": "bbox", "budget_tokens": 0}}, "sparse.budget_tokens"),
                ("tiny-bf16", {"sparse": {"budget_tokens": 8, "budget_fraction": 0.5}}, "not both"),
                ("tiny-w8a8", {"sparse": {"policy": "bbox", "budget_tokens": 64}}, "page selection")):
            r = post(model, extra)
            assert r.status_code == 400, (extra, r.text)
            error = r.json()["error"]
            assert error["param"] == "sparse" and named in error["message"], error
        assert post("tiny-w8a8", {"sparse": {"policy": "full"}}).status_code == 200
        metrics = httpx.get(srv.url + "/metrics").text
        read = float(re.search(r'fineserve_decode_kv_bytes_read_total\{model="tiny-bf16"\} (\S+)', metrics).group(1))
        dense = float(re.search(r'fineserve_decode_kv_bytes_dense_total\{model="tiny-bf16"\} (\S+)', metrics).group(1))
        assert 0 < read < dense
        recall = float(re.search(r'fineserve_page_selection_recall\{model="tiny-bf16"\} (\S+)', metrics).group(1))
        assert 0 < recall <= 1


def test_no_compilation_after_warmup_with_selection_and_sampled_recall(rng, loaded):
    """Policies, budgets and gates are data, and the sampled recall steps have their programs warmed
    up: serving a mix compiles nothing new."""
    from tests.test_engine import CompileCounter

    counter = CompileCounter()
    eng = engine(loaded, sparse={"policy": "bbox", "budget_tokens": 16, "gate_tokens": 32},
                 sparse_dense_layers=1, sparse_recall_every=2)
    eng.warmup()
    programs, compiles = eng.num_compilations, counter.count
    kinds = [{"policy": "sink_window", "budget_tokens": 24}, {"policy": "full"}, None,
             {"policy": "bbox", "budget_fraction": 0.25}]
    for i, p in enumerate(prompts(rng, [90, 40, 120, 70])):
        eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, sparse=kinds[i]))
    assert len(drain(eng)) == 4
    assert eng.num_compilations == programs
    assert counter.count == compiles, "serving compiled new XLA programs after warm-up"
