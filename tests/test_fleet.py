"""Several models of different precisions and depths on one shared KV pool (Fleet, DeviceRuntime).

Isolation is the point: the pool starts full of NaN, and between steps every page that is free or
belongs to another model is overwritten with random words (and checked untouched afterwards); each
model must still produce exactly the tokens it produces alone. Compute is float32 so that batching
differences cannot move a greedy token; the KV pages are float32 / int8 / int4 (and, apart, FireQ's
int4_fp8 with layer 0 in float32: a page mixing formats over layers), the weights float, int8, int4
and FireQ's INT4-FP8.
"""

from __future__ import annotations

import numpy as np
import pytest

from fineserve_jax import SamplingParams
from fineserve_jax.fleet import Fleet, ModelSpec, parse_bytes
from models.config import ModelConfig
from models.loader import random_model
from serving.scheduling.step_policy import RoundRobin
from tests.helpers import evict_prefix_caches

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")   # tiny models: compiling dominates

NAN_WORD = 0x7FC07FC0  # NaN as one float32 and as two bfloat16
VOCAB = 384


def config(layers, kv_heads, head_dim):
    return ModelConfig("llama", VOCAB, 4 * head_dim, 160, layers, 4, kv_heads, head_dim,
                       max_position_embeddings=256)


@pytest.fixture(scope="module")
def models():
    return [random_model(config(2, 2, 32), "bf16", "float32", name="a-bf16", seed=1),
            random_model(config(3, 2, 40), "w8a8", "float32", kv_dtype="int8", name="b-w8a8", seed=2),
            random_model(config(4, 2, 56), "w4a8kv4", "float32", name="c-w4a8kv4", seed=3),
            # FireQ's INT4-FP8 weights (K in multiples of 64); bf16 KV: a-bf16's page size, same slabs
            random_model(ModelConfig("llama", VOCAB, 128, 256, 2, 4, 2, 32, max_position_embeddings=256),
                         "fireq", "float32", kv_dtype="bf16", name="d-fireq", seed=4)]


def specs(models, **kw):
    # Few shape buckets (decode 1/2/4, prefill 16 tokens): every fleet compiles its own programs.
    return [ModelSpec(m, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=160, tokens_per_page=8, **kw)
            for m in models]


def workload(models, seed=0):
    """Ragged prompts (1 token up to several pages) and output lengths, interleaved across models."""
    rng = np.random.default_rng(seed)
    names, prompts, params = [], [], []
    for i in range(12):
        names.append(models[i % len(models)].name)
        prompts.append(rng.integers(0, VOCAB, int(rng.choice([1, 8, 17, 40, 70]))).tolist())
        params.append(SamplingParams(temperature=0, max_tokens=int(rng.integers(3, 12)), ignore_eos=True))
    return names, prompts, params


@pytest.fixture(scope="module")
def alone(models):
    """Each model's outputs for its share of the workload, alone on its own pool."""
    names, prompts, params = workload(models)
    out = {}
    for m in models:
        idx = [i for i, n in enumerate(names) if n == m.name]
        fleet = Fleet(specs([m]), pool_bytes=4 << 20, slab_bytes=64 << 10)
        res = fleet.generate(prompt_token_ids=[prompts[i] for i in idx],
                             sampling_params=[params[i] for i in idx], model=m.name)
        out.update({i: r.token_ids for i, r in zip(idx, res)})
    return [out[i] for i in range(len(names))]


class ScribblingPolicy(RoundRobin):
    """Round-robin; before the picked model steps, every word of the pool outside that model's live
    pages is replaced by random words. After the step, those words must be exactly as scribbled
    (the model wrote nothing outside its pages), and other models' pages get their data back."""

    def __init__(self, fleet: Fleet):
        super().__init__(list(fleet.runtime.engines))
        self.fleet = fleet
        self.rng = np.random.default_rng()
        self.pending = None
        self.scribbles = 0
        # Pages handed out during a step (a sequence may get a page and finish in the same step).
        self.handed_out: list[tuple[str, list[int]]] = []
        allocate = fleet.pool.allocator.allocate

        def recording_allocate(model, n):
            pages = allocate(model, n)
            self.handed_out.append((model, pages))
            return pages

        fleet.pool.allocator.allocate = recording_allocate
        # Pages of other models moved by compaction during a step: {old page: new page}.
        self.moved: list[tuple[str, dict[int, int]]] = []
        compact = fleet.pool.allocator.compact

        def recording_compact(model):
            moves = compact(model)
            self.moved.append((model, moves))
            return moves

        fleet.pool.allocator.compact = recording_compact
        self.pages_moved = 0

    def page_words(self, name: str, pages) -> np.ndarray:
        """bool[num_slabs, slab_words]: the words of these pages of `name`."""
        layout = self.fleet.runtime.engines[name].layout
        mask = np.zeros(self.fleet.pool.words.shape, bool)
        for page in pages:
            slab, local = divmod(page, layout.pages_per_slab)
            start = local * layout.page_slot_words
            mask[slab, start:start + layout.page_slot_words] = True
        return mask

    def live_words(self, name: str) -> np.ndarray:
        """The words of `name`'s pages held by its live sequences or its prefix cache."""
        engine = self.fleet.runtime.engines[name]
        cached = engine.pages.cache.pages() if engine.pages.cache is not None else []
        return self.page_words(name, [p for seq in engine.scheduler.running for p in seq.pages] + cached)

    def pick(self, ready):
        self.settle()
        name = super().pick(ready)
        pool = self.fleet.pool
        saved = np.asarray(pool.words).copy()
        mine = self.live_words(name)
        scribbled = np.where(mine, saved, self.rng.integers(0, 2**32, saved.shape, dtype=np.uint32))
        pool.words = pool.words.at[...].set(scribbled)
        self.pending = (name, saved, mine, scribbled)
        self.handed_out.clear()
        self.moved.clear()
        self.scribbles += 1
        return name

    def settle(self):
        """Check the last scribble survived the step outside the stepping model's pages; restore."""
        if self.pending is None:
            return
        name, saved, mine_before, scribbled = self.pending
        self.pending = None
        now = np.asarray(self.fleet.pool.words)
        given = [p for model, pages in self.handed_out if model == name for p in pages]
        assert all(model == name for model, _ in self.handed_out)  # only the stepping model allocates
        own = mine_before | self.live_words(name) | self.page_words(name, given)
        # Compaction (for this model) may move other models' pages: their new slots are written.
        moved_to = np.zeros_like(own)
        for model, moves in self.moved:
            assert model != name
            moved_to |= self.page_words(model, moves.values())
        untouched = ~(own | moved_to)
        assert np.array_equal(now[untouched], scribbled[untouched]), f"{name} wrote outside its own pages"
        others = np.zeros_like(own)
        for other in self.fleet.runtime.engines:
            if other != name:
                others |= self.live_words(other)
        restored = np.where(others & ~own, saved, now)
        for model, moves in self.moved:  # a moved page gets back the data it had at its old slot
            for old_page, new_page in moves.items():
                new_slot, old_slot = self.page_words(model, [new_page]), self.page_words(model, [old_page])
                assert np.array_equal(now[new_slot], scribbled[old_slot])  # the runtime copied the page
                restored[new_slot] = saved[old_slot]
            self.pages_moved += len(moves)
        self.fleet.pool.words = self.fleet.pool.words.at[...].set(restored)


def test_colocated_models_match_alone_with_poisoned_and_scribbled_pool(models, alone):
    """4 models on a pool too small for the load, so they also preempt (recompute) their own
    sequences; the pool starts as NaN and is scribbled over before every step."""
    names, prompts, params = workload(models)
    fleet = Fleet(specs(models), pool_bytes=192 << 10, slab_bytes=8 << 10, pool_fill=NAN_WORD)
    assert len({(l.num_layers, l.kv_dtype) for l in fleet.plan.layouts.values()}) == 3
    policy = ScribblingPolicy(fleet)
    fleet.runtime.policy = policy
    out = fleet.generate(prompt_token_ids=prompts, sampling_params=params, model=names)
    policy.settle()
    assert [o.token_ids for o in out] == alone
    engines = fleet.runtime.engines.values()
    assert policy.scribbles >= 20 and all(e.stats.steps > 0 for e in engines)
    assert sum(e.scheduler.num_preemptions for e in engines) > 0
    # Models short of pages had others compacted (live pages moved on the device) and got slabs.
    assert fleet.runtime.pages_moved == policy.pages_moved > 0
    evict_prefix_caches(*engines)
    assert fleet.pool.allocator.num_free_slabs == fleet.plan.num_slabs  # every page came back


def test_a_page_mixing_kv_formats_over_layers_shares_the_pool(models):
    """A FireQ model whose layer 0 keeps float32 KV (int4_fp8 elsewhere) beside a float32-KV model on
    a NaN-filled, scribbled pool: its tokens are those it produces alone, nothing leaks either way."""
    mixed = random_model(ModelConfig("llama", VOCAB, 128, 256, 3, 4, 2, 32, max_position_embeddings=256),
                         "fireq", "float32", name="e-fireq-skip0", seed=5, kv_skip_layers=[0])
    pair = [models[0], mixed]
    names, prompts, params = workload(pair, seed=1)
    mine = [i for i, n in enumerate(names) if n == mixed.name]
    alone = Fleet(specs([mixed]), pool_bytes=1 << 20, slab_bytes=64 << 10).generate(
        prompt_token_ids=[prompts[i] for i in mine], sampling_params=[params[i] for i in mine], model=mixed.name)
    fleet = Fleet(specs(pair), pool_bytes=1 << 20, slab_bytes=64 << 10, pool_fill=NAN_WORD)
    layout = fleet.plan.layouts[mixed.name]
    assert layout.layer_kv_dtypes == ((0, "float32"),) and len(layout.layer_groups()) == 2
    policy = ScribblingPolicy(fleet)
    fleet.runtime.policy = policy
    out = fleet.generate(prompt_token_ids=prompts, sampling_params=params, model=names)
    policy.settle()
    assert [out[i].token_ids for i in mine] == [o.token_ids for o in alone]
    evict_prefix_caches(*fleet.runtime.engines.values())
    assert policy.scribbles > 0 and fleet.pool.allocator.num_free_slabs == fleet.plan.num_slabs


@pytest.mark.parametrize("mode", ["static", "single_page"])
def test_baseline_pools_give_the_same_tokens(models, alone, mode):
    names, prompts, params = workload(models)
    fleet = Fleet(specs(models), pool_bytes=4 << 20, slab_bytes=64 << 10, pool_mode=mode, pool_fill=NAN_WORD)
    out = fleet.generate(prompt_token_ids=prompts, sampling_params=params, model=names)
    assert [o.token_ids for o in out] == alone
    if mode == "single_page":
        strides = {l.page_slot_bytes for l in fleet.plan.layouts.values()}
        assert strides == {max(l.page_bytes for l in fleet.plan.layouts.values())}
    else:
        assert all(lo == hi > 0 for lo, hi in fleet.plan.limits.values())


def test_fleet_api_and_errors(models, alone):
    names, prompts, params = workload(models)
    fleet = Fleet(specs(models), pool_bytes="4MiB", slab_bytes="64KiB")
    assert fleet.model_names == [m.name for m in models]
    # One model through its LLM view; mixed lists line up with their prompts.
    first = [i for i, n in enumerate(names) if n == models[1].name]
    out = fleet.llm(models[1].name).generate(prompt_token_ids=[prompts[i] for i in first],
                                             sampling_params=[params[i] for i in first])
    assert [o.token_ids for o in out] == [alone[i] for i in first]
    # Donation: every model's steps write into the same device buffer; its address never changes.
    pointer = fleet.pool.words.unsafe_buffer_pointer()
    before = fleet.pool.words
    steps = {n: e.stats.steps for n, e in fleet.runtime.engines.items()}
    out = fleet.generate(prompt_token_ids=prompts, sampling_params=params, model=names)
    assert [o.token_ids for o in out] == alone
    assert all(e.stats.steps > steps[n] for n, e in fleet.runtime.engines.items())
    assert fleet.pool.words.unsafe_buffer_pointer() == pointer and before.is_deleted()
    with pytest.raises(ValueError, match="unknown model"):
        fleet.generate(prompt_token_ids=prompts[:1], model="nope")
    with pytest.raises(ValueError, match="unknown model"):
        fleet.generate(prompt_token_ids=prompts[:2], model=[names[0], "nope"])
    with pytest.raises(ValueError, match="one name per prompt"):
        fleet.generate(prompt_token_ids=prompts[:2], model=names[:1])
    # A bad prompt anywhere in a mixed batch queues nothing.
    bad = prompts[:3] + [[VOCAB + 5]]
    with pytest.raises(ValueError, match="outside"):
        fleet.generate(prompt_token_ids=bad, sampling_params=params[:4], model=names[:4])
    assert not fleet.runtime.has_unfinished_requests()
    with pytest.raises(ValueError, match="unique"):
        Fleet(specs([models[0], models[0]]), pool_bytes=4 << 20)
    with pytest.raises(ValueError, match="already loaded"):
        ModelSpec(models[0], precision="w4a16")
    with pytest.raises(ValueError, match="pool_mode"):
        Fleet(specs(models), pool_bytes=4 << 20, pool_mode="paged")


def test_parse_bytes():
    assert parse_bytes(123, "x") == 123
    assert parse_bytes("256MiB", "x") == 256 << 20
    assert parse_bytes("1.5 GB", "x") == 1_500_000_000
    assert parse_bytes("64kib", "x") == 64 << 10
    for bad in ("lots", "12 parsecs", True, 1.5, None):
        with pytest.raises(ValueError, match="byte count"):
            parse_bytes(bad, "pool_bytes")


def test_fleet_from_toml(tmp_path):
    from tests.helpers import FIXTURES
    path = tmp_path / "fleet.toml"
    path.write_text(f'''
pool_bytes = "8MiB"
slab_bytes = "64KiB"
pool_mode = "slab"

[[models]]
model = "{FIXTURES / 'llama'}"
precision = "bf16"
dtype = "float32"
name = "llama-bf16"
max_model_len = 128

[[models]]
model = "{FIXTURES / 'qwen2'}"
precision = "fp8"
max_model_len = 128
kv_reserve_bytes = "1MiB"
kv_skip_layers = [0]
''')
    fleet = Fleet.from_config(path)
    assert fleet.model_names == ["llama-bf16", "qwen2-fp8"]
    assert fleet.plan.layouts["qwen2-fp8"].kv_dtype == "fp8"
    assert fleet.plan.layouts["qwen2-fp8"].layer_kv_dtypes == ((0, "bf16"),)
    assert fleet.plan.layouts["llama-bf16"].kv_dtype == "float32"
    assert fleet.plan.limits["qwen2-fp8"][0] == -(-(1 << 20) // fleet.plan.slab_bytes)
    out = fleet.generate(["Hello there", "Hi"], SamplingParams(temperature=0, max_tokens=4),
                         model=["llama-bf16", "qwen2-fp8"])
    assert all(len(o.token_ids) == 4 for o in out)
    for text, match in [("pool_bytes = 1\n", "at least one"),
                        ('colour = "red"\n[[models]]\nmodel = "x"\n', "unknown fleet config keys"),
                        ('[[models]]\nprecision = "bf16"\n', "needs a 'model'"),
                        ('[[models]]\nmodel = "x"\nprecison = "bf16"\n', "unknown keys"),
                        ("[[models]\n", "cannot read")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            Fleet.from_config(path)


def test_fleet_file_errors_name_the_file_and_the_key(tmp_path):
    path = tmp_path / "fleet.toml"
    for text, message in [
            ('[[models]]\nmodel = "x"\nmax_num_seqs = "8"\n', r"\[\[models\]\] entry 0: max_num_seqs must be an int"),
            ('[[models]]\nmodel = "x"\nkv_skip_layers = 0\n', r"\[\[models\]\] entry 0: kv_skip_layers must be an array, got 0"),
            ('[[models]]\nmodel = "x"\nkv_skip_layers = [1, "a"]\n',
             r"\[\[models\]\] entry 0: kv_skip_layers item 1 must be an integer, got 'a'"),
            ('[[models]]\nmodel = "x"\nkv_skip_layers = [-1]\n', r"\[\[models\]\] entry 0: kv_skip_layers must be non-neg"),
            ('[[models]]\nmodel = "x"\nslo_ttft_ms = 500\n', r"\[\[models\]\] entry 0: unknown keys \['slo_ttft_ms'\]"),
            ('pool_bytes = true\n[[models]]\nmodel = "x"\n', r"pool_bytes must be a byte count, got True"),
            ('pool_mode = "paged"\n[[models]]\nmodel = "x"\n', r"unknown pool_mode 'paged'"),
            ('[server]\nport = 1\n[[models]]\nmodel = "x"\n', r"unknown fleet config keys \['server'\]")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"^{path}: {message}"):
            Fleet.from_config(path)
    with pytest.raises(ValueError, match=r"^fleet config: \[\[models\]\] entry 0: kv_reserve_bytes must be a byte"):
        Fleet.from_dict({"models": [{"model": "x", "kv_reserve_bytes": "lots"}]})
