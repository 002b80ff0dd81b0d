"""Tensor parallelism over host devices (conftest asks XLA for 4): the same greedy tokens as one
device, quantized presets sharded consistently, a TP model sharing its members' pools with TP=1
models (engines, Fleet, server), the group allocator's mirroring, and clear errors for what does
not split."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import openai
import pytest

from fineserve_jax.config_files import fleet_file
from fineserve_jax.fleet import Fleet, ModelSpec
from fineserve_jax.llm import group_devices
from models.config import ModelConfig
from models.loader import load_model, random_model
from models.tensor_parallel import check_tensor_parallel, local_layout, shard_state, tp_mesh
from serving.engine.llm_engine import EngineConfig, LLMEngine, engine_with_own_pool
from serving.engine.sampling import SamplingParams
from serving.kv.group_pool import GroupKVPool, GroupSlabAllocator
from serving.kv.kv_pool import KVPool
from serving.kv.slab_allocator import PoolExhausted, SlabAllocator
from serving.kv.slab_geometry import slab_bytes_for
from tests.helpers import evict_prefix_caches
from tests.server_helpers import running_server, tiny_models, tokenizer

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")   # compiling dominates these tests

SMALL = ModelConfig("llama", 256, 64, 128, 2, 8, 4, 16, max_position_embeddings=256)
# Wide enough that int4 groups of 64-128 split over two devices (o_proj: K = 256, down_proj: K = 512).
WIDE = ModelConfig("llama", 256, 128, 512, 2, 8, 4, 32, max_position_embeddings=256)
CONFIG = dict(max_num_seqs=4, max_model_len=128, max_num_batched_tokens=256, prefill_chunk=64)


@pytest.fixture(scope="module")
def devices():
    if len(jax.devices()) < 4:
        pytest.fail("these tests need 4 host devices: XLA_FLAGS=--xla_force_host_platform_device_count=4 "
                    "(tests/conftest.py sets it)")
    return jax.devices()[:4]


def prompts(seed: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, vocab, n)] for n in (5, 17, 40)]


def run(engine: LLMEngine, token_prompts, params) -> list:
    """Every request's final output, in submission order."""
    ids = [engine.add_request(p, params) for p in token_prompts]
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
    return [outs[i] for i in ids]


def engine(loaded, devs, kv_cache_bytes=4 << 20, tokens_per_page=4, **config):
    return engine_with_own_pool(loaded.model, EngineConfig(**{**CONFIG, **config}),
                                layout=loaded.kv_layout(tokens_per_page), kv_cache_bytes=kv_cache_bytes,
                                devices=devs, eos_token_ids=())


GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
MIXED = dict(max_num_batched_tokens=32, prefill_chunk=32, mixed_steps=True)   # the 40-token prompt rides along the others' decodes


@pytest.fixture(scope="module")
def small_on_one_device(devices):
    """A random f32 model and its greedy tokens on one device."""
    loaded = random_model(SMALL, "bf16", "float32", seed=2)
    return loaded, [o.token_ids for o in run(engine(loaded, devices[:1], **MIXED), prompts(2, SMALL.vocab_size),
                                             GREEDY)]


@pytest.mark.parametrize("tp", [2, 4])
def test_greedy_tokens_match_one_device(devices, small_on_one_device, tp):
    loaded, want = small_on_one_device
    token_prompts, params = prompts(2, SMALL.vocab_size), GREEDY
    tp_engine = engine(loaded, devices[:tp], **MIXED)
    assert tp_engine.pool.mesh.devices.size == tp and tp_engine.layout.num_kv_heads == SMALL.num_kv_heads // tp
    got = [o.token_ids for o in run(tp_engine, token_prompts, params)]
    assert got == want
    assert {kind for kind, *_ in tp_engine.stats.per_step} == {"prefill", "mixed", "decode"}
    evict_prefix_caches(tp_engine)
    assert tp_engine.pool.allocator.members[0].stats()["used_pages"]["model"] == 0   # all pages returned


def test_weights_are_split_megatron_style(devices):
    loaded = random_model(WIDE, "w4a16", "float32")
    layers = loaded.model.layers
    full = {name: np.asarray(getattr(layers, name).values[...]) for name in ("q_proj", "o_proj")}
    _, state, _ = shard_state(loaded.model, tp_mesh(devices[:2]))
    for name, axis in (("q_proj", 2), ("o_proj", 1)):   # column: output columns; row: packed input rows
        shards = sorted(state["layers"][name]["values"][...].addressable_shards, key=lambda s: s.device.id)
        np.testing.assert_array_equal(np.concatenate([np.asarray(s.data) for s in shards], axis=axis), full[name])
        assert shards[0].data.shape[axis] == full[name].shape[axis] // 2
    embed = state["embed_tokens"]["embedding"][...]
    assert all(s.data.shape == embed.shape for s in embed.addressable_shards)   # replicated


def top_logprob_gap(a, b) -> float:
    """Largest difference of the first token's top log-probabilities two runs share."""
    top_a, top_b = a.logprobs[0].top, b.logprobs[0].top
    return max(abs(top_a[t] - top_b[t]) for t in set(top_a) & set(top_b))


QUANT_PROMPTS_SEED = 7
QUANT_PARAMS = SamplingParams(temperature=0.0, max_tokens=6, logprobs=8)


@pytest.fixture(scope="module")
def float_run(devices):
    """The float model the quantized presets are made from, on one device."""
    loaded = random_model(WIDE, "bf16", "float32", seed=3)
    return run(engine(loaded, devices[:1]), prompts(QUANT_PROMPTS_SEED, WIDE.vocab_size), QUANT_PARAMS)


@pytest.mark.parametrize("preset", ["w4a16", "w8a8", "fp8", "w4a8kv4", "fireq"])
def test_quantized_presets_shard_consistently(devices, float_run, preset):
    """Weight-only int4 gives the same tokens and log-probabilities (to float rounding). Presets
    that quantize activations compute the row-parallel layers' per-token activation scales over
    each device's half of the channels: the activations are rounded differently, not worse, so the
    log-probabilities move by the order of the preset's own quantization error (its gap to the float
    model): at most 1.5 times it."""
    loaded = random_model(WIDE, preset, "float32", seed=3)
    token_prompts = prompts(QUANT_PROMPTS_SEED, WIDE.vocab_size)
    one = run(engine(loaded, devices[:1]), token_prompts, QUANT_PARAMS)
    two = run(engine(loaded, devices[:2]), token_prompts, QUANT_PARAMS)
    drift = max(top_logprob_gap(a, b) for a, b in zip(one, two))
    if preset == "w4a16":
        assert [o.token_ids for o in two] == [o.token_ids for o in one]
        assert drift < 1e-4
        return
    quant_error = max(top_logprob_gap(a, b) for a, b in zip(float_run, one))
    assert 0 < drift <= 1.5 * quant_error


def test_smollm2_tp3_matches_one_device(devices):
    """SmolLM2-135M has 9 query and 3 kv heads: TP=3 (f32) greedy text equals TP=1."""
    loaded = load_model("smollm2-135m", "float32", "bf16")
    tok = loaded.tokenizer
    token_prompts = [tok.encode(t) for t in ("The capital of France is", "def fibonacci(n):")]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    want = run(engine(loaded, devices[:1], 32 << 20, 16, max_model_len=256), token_prompts, params)
    got = run(engine(loaded, devices[:3], 32 << 20, 16, max_model_len=256), token_prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert "Paris" in tok.decode(got[0].token_ids)


def test_tp_model_shares_pools_with_single_device_models(devices):
    """A TP=2 model on devices 0-1 and a TP=1 model on device 0 (another page size) step in turn
    over the same pools: each gives its solo tokens, the TP model's slabs are the same on both
    devices and never one the TP=1 model holds, and every slab comes back."""
    tp_loaded = random_model(SMALL, "bf16", "float32", seed=11)
    solo_loaded = random_model(WIDE, "bf16", "bfloat16", seed=12)
    tp_layout = local_layout(tp_loaded.kv_layout(4), 2)
    solo_layout = solo_loaded.kv_layout(4)
    slab = slab_bytes_for([tp_layout.page_bytes, solo_layout.page_bytes])
    pools = [KVPool(12, slab, d) for d in devices[:2]]
    group = GroupKVPool(pools, tp_mesh(devices[:2]))
    config = EngineConfig(**CONFIG)
    tp_engine = LLMEngine(tp_loaded.model, dataclasses.replace(
        tp_layout, pages_per_slab=group.allocator.register("tp", tp_layout.page_bytes)), group, "tp", config)
    solo_engine = LLMEngine(solo_loaded.model, dataclasses.replace(
        solo_layout, pages_per_slab=pools[0].allocator.register("solo", solo_layout.page_bytes)), pools[0], "solo",
        config)
    params = SamplingParams(temperature=0.0, max_tokens=10)
    want_tp = [o.token_ids for o in run(engine(tp_loaded, devices[:2]), prompts(1, 256), params)]
    want_solo = [o.token_ids for o in run(engine(solo_loaded, devices[:1]), prompts(2, 256), params)]

    ids = {"tp": [tp_engine.add_request(p, params) for p in prompts(1, 256)],
           "solo": [solo_engine.add_request(p, params) for p in prompts(2, 256)]}
    outs, engines = {}, {"solo": solo_engine, "tp": tp_engine}
    owners_checked = False
    while any(e.has_unfinished_requests() for e in engines.values()):
        for name, e in engines.items():
            if e.has_unfinished_requests():
                outs.update({(name, o.request_id): o.outputs[0].token_ids for o in e.step() if o.finished})
        stats = [p.allocator.stats()["models"] for p in pools]
        tp_slabs = [pools[i].allocator._models["tp"].slabs for i in range(2)]
        if tp_slabs[0]:
            assert tp_slabs[0] == tp_slabs[1]
            assert not tp_slabs[0] & pools[0].allocator._models["solo"].slabs
            owners_checked = owners_checked or bool(stats[0]["solo"]["slabs"])
    assert owners_checked   # both models held slabs of device 0 at the same time
    assert [outs["tp", i] for i in ids["tp"]] == want_tp
    assert [outs["solo", i] for i in ids["solo"]] == want_solo
    evict_prefix_caches(tp_engine, solo_engine)
    assert all(p.allocator.num_free_slabs == 12 for p in pools)


def test_group_allocator_takes_only_slabs_free_everywhere():
    a, b = SlabAllocator(4, 1024), SlabAllocator(4, 1024)
    a.register("x", 256)                       # a TP=1 model on the first device
    group = GroupSlabAllocator([a, b])
    assert group.register("g", 512) == 2
    a.allocate("x", 4)                         # slab 0 of device 0
    b.register("y", 1024)
    b.allocate("y", 1)                         # slab 0 of device 1 too (most recent free first)
    pages = group.allocate("g", 3)             # slabs 1 and 2: free on both
    assert sorted(p // 2 for p in pages) == [1, 1, 2]
    assert a._owner[1] == b._owner[1] == "g" and a._owner[2] == b._owner[2] == "g"
    a.allocate("x", 4)                         # slab 3 of device 0: nothing is free on both any more
    assert group.num_free_pages("g") == 1      # the free page in slab 2
    with pytest.raises(PoolExhausted, match="every device of its group"):
        group.allocate("g", 2)
    group.free("g", pages)
    assert a.num_free_slabs == 2 and b.num_free_slabs == 3


def test_group_allocator_compacts_every_member_alike():
    members = [SlabAllocator(4, 1024) for _ in range(2)]
    group = GroupSlabAllocator(members)
    group.register("g", 256)
    pages = group.allocate("g", 8)             # slabs 0 and 1
    group.free("g", pages[1::2])               # half of each slab free
    assert group.reclaimable_slabs("g") == 1
    moves = group.compact("g")
    assert len(moves) == 2 and all(m.num_free_slabs == 3 for m in members)


def test_group_register_is_all_or_nothing():
    a, b = SlabAllocator(4, 1024), SlabAllocator(4, 1024)
    b.register("big", 1024, min_slabs=4)       # device 1 is all reserved
    with pytest.raises(ValueError, match="reservations"):
        GroupSlabAllocator([a, b]).register("g", 256, min_slabs=1)
    a.register("g", 256)                       # not left registered on device 0


def test_what_does_not_split_is_a_clear_error(devices):
    with pytest.raises(ValueError, match="does not divide the model's 4 kv heads"):
        check_tensor_parallel(dataclasses.replace(SMALL, num_heads=16, intermediate_size=192), 8)
    with pytest.raises(ValueError, match="3 does not divide the model's 8 query heads"):
        check_tensor_parallel(SMALL, 3)
    with pytest.raises(ValueError, match="positive integer"):
        check_tensor_parallel(SMALL, 0)
    loaded = random_model(WIDE, "w4a16", "float32")   # o_proj: K = 256 in 2 groups of 128
    with pytest.raises(ValueError, match="o_proj.*do not split over tensor_parallel_size=4"):
        shard_state(loaded.model, tp_mesh(devices))
    pools = [KVPool(2, 1024, d) for d in devices[:2]]
    with pytest.raises(ValueError, match="given for mesh device"):
        GroupKVPool(pools[::-1], tp_mesh(devices[:2]))
    with pytest.raises(ValueError, match="needs 64 devices"):
        group_devices(64)


def test_fleet_runs_tp_and_single_device_models_over_shared_pools(devices):
    """A fleet with a TP=2 model becomes a group of two devices: the TP=1 model shares the first
    device's pool with it; both answer as they do alone, and the memory account covers both pools."""
    tp_loaded = random_model(SMALL, "bf16", "float32", seed=21)
    solo_loaded = random_model(WIDE, "bf16", "float32", seed=22)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    want_tp = [o.token_ids for o in run(engine(tp_loaded, devices[:1]), prompts(3, 256), params)]
    want_solo = [o.token_ids for o in run(engine(solo_loaded, devices[:1]), prompts(4, 256), params)]
    fleet = Fleet([ModelSpec(tp_loaded, name="tp", tokens_per_page=4, tensor_parallel_size=2, max_model_len=128),
                   ModelSpec(solo_loaded, name="solo", tokens_per_page=4, max_model_len=128)],
                  pool_bytes=8 << 20, slab_bytes=1 << 20)
    assert fleet.devices == devices[:2] and len(fleet.pools) == 2
    assert set(fleet.pools[1].allocator.stats()["models"]) == {"tp"}
    outs = fleet.generate(prompt_token_ids=prompts(3, 256) + prompts(4, 256), sampling_params=params,
                          model=["tp"] * 3 + ["solo"] * 3)
    assert [o.outputs[0].token_ids for o in outs] == want_tp + want_solo
    evict_prefix_caches(*fleet.runtime.engines.values())
    stats = fleet.memory_stats()
    assert stats["pool_bytes"] == 2 * (8 << 20) and stats["kv_bytes"] == 0 and stats["free_bytes"] == stats["pool_bytes"]
    # the TP model keeps only its shards: no whole copy of a split weight is left on the first device
    q = fleet.loaded["tp"].model.layers.q_proj.kernel[...]
    assert q.sharding.device_set == set(devices[:2])
    assert [s.data.shape[-1] for s in q.addressable_shards] == [q.shape[-1] // 2] * 2


def test_fleet_file_takes_tensor_parallel_size(tmp_path):
    config = fleet_file({"models": [{"model": "smollm2-135m", "tensor_parallel_size": 3}]}, ModelSpec, "f.toml")
    assert config.models[0].spec.tensor_parallel_size == 3
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        fleet_file({"models": [{"model": "smollm2-135m", "tensor_parallel_size": 0}]}, ModelSpec, "f.toml")


def test_group_pool_copies_pages_on_every_member(devices):
    """Compaction of a TP model moves its pages on every device; other pages stay as they were."""
    layout = local_layout(random_model(SMALL, "bf16", "float32").kv_layout(4), 2)
    slab = layout.page_bytes * 4
    rng = np.random.default_rng()
    pools = [KVPool(3, slab, d) for d in devices[:2]]
    for p in pools:
        p.words = jax.device_put(rng.integers(0, 2 ** 32, p.words.shape, dtype=np.uint32), p.words.devices().pop())
    before = [np.asarray(p.words) for p in pools]
    group = GroupKVPool(pools, tp_mesh(devices[:2]))
    layout = dataclasses.replace(layout, pages_per_slab=group.allocator.register("g", layout.page_bytes))
    group.copy_pages(layout, np.array([9, 2], np.int32), np.array([1, -1], np.int32))   # page 9 -> 1; padding
    n = layout.page_slot_words
    for p, old in zip(pools, before):
        new = np.asarray(p.words).reshape(-1, n)
        want = old.reshape(-1, n).copy()
        want[1] = old.reshape(-1, n)[9]
        np.testing.assert_array_equal(new, want)


def test_server_streams_from_a_tp_model_beside_a_single_device_one(devices):
    """`fineserve serve`'s path (Fleet, engine thread, HTTP) with a TP=2 model and a TP=1 model on
    its first device: the official client gets the TP model's greedy tokens, streamed and not."""
    tok = tokenizer()
    tp_model, solo_model = tiny_models(tok, ("bf16", "w4a16"))
    prompt = "The quick brown fox"
    params = SamplingParams(temperature=0.0, max_tokens=8)
    want = run(engine(tp_model, devices[:1], tokens_per_page=8), [tok.encode(prompt)], params)[0].token_ids
    with running_server([tp_model, solo_model], model_options={"tiny-bf16": {"tensor_parallel_size": 2}}) as srv:
        assert len(srv.fleet.pools) == 2
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=120)
        text = client.completions.create(model="tiny-bf16", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
        assert text == tok.decode(want)
        chunks = client.completions.create(model="tiny-bf16", prompt=prompt, max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
        assert client.completions.create(model="tiny-w4a16", prompt=prompt, max_tokens=4).usage.completion_tokens == 4


def test_fleet_members_must_be_each_model_s_own_distinct_devices(devices):
    spec = ModelSpec(random_model(SMALL, "bf16", "float32", seed=1), name="tp", tensor_parallel_size=2)
    for members in ({"tp": [0, 0]}, {"tp": [2]}, {"tp": [1, 3]}):
        with pytest.raises(ValueError, match=r"tp: members .* must be 2 distinct device\(s\) of the group's 3"):
            Fleet([spec], device=devices[:3], members=members)
    with pytest.raises(ValueError, match=r"members given for models the fleet does not have: \['x'\]"):
        Fleet([spec], device=devices[:3], members={"x": [0]})
