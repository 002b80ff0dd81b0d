"""The fleet configuration of `fineserve serve`: parsing, the demo fleet, placement, building fleets.

Placement reads model shapes from config.json files written here (no weights) and places them on
fake devices; fleets are built from tiny random models on the host devices conftest asks XLA for."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import pytest
from flax import nnx

from fineserve_jax.fleet import Fleet, ModelSpec
from serving.engine.sampling import SamplingParams
from fineserve_jax.serve_config import (DEFAULT_SLO_TTFT_S, DeviceConfig, DeviceGroup, ServeConfig, ServedModelConfig,
                                        ServerConfig, build_fleets, device_groups, place_models, slo_ttft_s,
                                        step_cost)
from models.config import ModelConfig
from pallas_kernels.page_selection import SparseSpec
from serving.scheduling.cost_model import DeviceProfile, variant_key
from models.loader import random_model

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")   # tiny models: compiling dominates

MIB = 1 << 20

GOOD = """
pool_bytes = "64MiB"
slab_bytes = "256KiB"
[server]
host = "0.0.0.0"
port = 9000
drain_timeout_s = 5
admission = "saab"
drop_hopeless = true
step_policy = "edf"
[[devices]]
name = "d0"
kind = "H100"
memory_bytes = "80GB"
[[models]]
model = "smollm2-135m"
precision = "w4a16"
name = "small-int4"
kv_reserve_bytes = "16MiB"
slo_ttft_ms = 250
rate = 3
max_queue = 10
[[models]]
model = "smollm2-135m"
precision = "bf16"
max_num_seqs = 8
"""


def test_a_good_config_parses_with_defaults_filled_in(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text(GOOD)
    c = ServeConfig.from_toml(path)
    assert c.server == ServerConfig("0.0.0.0", 9000, 5.0, "saab", True, "edf")
    assert (c.pool_bytes, c.slab_bytes, c.pool_mode) == (64 * MIB, 256 << 10, "slab")
    assert c.devices == [DeviceConfig("d0", 0, 80 * 10**9, "H100", None)]
    small, bf16 = c.models
    assert (small.name, small.spec.precision, small.spec.kv_reserve_bytes) == ("small-int4", "w4a16", 16 * MIB)
    assert (small.slo_ttft_s, small.rate, small.max_queue) == (0.25, 3.0, 10)
    assert (bf16.name, bf16.slo_ttft_s, bf16.rate, bf16.max_queue) == ("smollm2-135m-bf16", None, 1.0, 32)
    assert c.device_pool_bytes(c.devices[0]) == 64 * MIB


def test_a_fleet_toml_is_a_serve_config_on_one_device():
    c = ServeConfig.from_dict({"pool_bytes": "256MiB", "pool_mode": "static",
                               "models": [{"model": "smollm2-135m", "precision": "w4a16"}]})
    assert c.server == ServerConfig("127.0.0.1", 8000, 30.0, "fcfs", False, "edf")
    assert c.devices == [DeviceConfig("device0", 0)]
    assert (c.pool_bytes, c.pool_mode) == (256 * MIB, "static")


def test_the_demo_is_smollm2_three_ways_on_one_device_without_loading_anything():
    c = ServeConfig.demo()
    assert [m.name for m in c.models] == ["smollm2-135m-bf16", "smollm2-135m-w8a8", "smollm2-135m-w4a16"]
    assert all(m.spec.model == "smollm2-135m" for m in c.models)  # names, not loaded models
    assert [d.name for d in c.devices] == ["device0"]
    assert place_models(c) == [DeviceGroup(("device0",), tuple((m.name, (0,)) for m in c.models))]
    # The CPU profile covers the demo: FineServe's SLO from it; no profile covers it on an H100.
    assert all(slo_ttft_s(m, "cpu") > 1 for m in c.models)
    assert all(slo_ttft_s(m, "h100") == DEFAULT_SLO_TTFT_S for m in c.models)
    # SAAB's step costs: the CPU profile's entries; the roofline on an H100; none for an unknown kind.
    cpu = DeviceProfile.shipped("cpu")
    for m in c.models:
        assert step_cost(m, "cpu", cpu) is cpu.entries[variant_key("smollm2-135m", m.spec.precision)]
        assert 0 < step_cost(m, "h100", None).prefill_seconds_per_token() < cpu.entries[
            variant_key("smollm2-135m", m.spec.precision)].prefill_seconds_per_token()
        assert step_cost(m, "tpu-v9", None) is None


def model(**extra):
    return {"model": "smollm2-135m", "precision": "bf16", **extra}


def with_devices(*entries):
    return {"models": [model()], "devices": list(entries)}


@pytest.mark.parametrize("data, message", [
    ({"models": [model()], "bogus": 1}, r"serve config: unknown keys \['bogus'\]"),
    ({"models": []}, r"at least one \[\[models\]\]"),
    ({}, r"at least one \[\[models\]\]"),
    ({"models": {"model": "x"}}, r"models must be an array of tables"),
    ({"models": [model(colour="red")]}, r"\[\[models\]\] entry 0: unknown keys \['colour'\]"),
    ({"models": [{"precision": "bf16"}]}, r"\[\[models\]\] entry 0: needs a 'model'"),
    ({"models": [model(), model(rate="fast", name="x")]}, r"entry 1 \('x'\): rate must be a number, got 'fast'"),
    ({"models": [model(rate=-1)]}, r"entry 0: rate must be a finite number >= 0"),
    ({"models": [model(slo_ttft_ms=0)]}, r"entry 0: slo_ttft_ms must be positive"),
    ({"models": [model(slo_ttft_ms="fast")]}, r"entry 0: slo_ttft_ms must be a number"),
    ({"models": [model(max_queue=2.5)]}, r"entry 0: max_queue must be an integer, got 2.5"),
    ({"models": [model(max_queue=0)]}, r"entry 0: max_queue must be >= 1"),
    ({"models": [model(max_num_seqs=True)]}, r"entry 0: max_num_seqs must be an integer, got True"),
    ({"models": [model(model=7)]}, r"entry 0: model must be a string, got 7"),
    ({"models": [model(precision="w3")]}, r"entry 0: unknown precision 'w3'"),
    ({"models": [model(kv_reserve_bytes="lots")]}, r"entry 0: kv_reserve_bytes must be a byte count"),
    ({"models": [model(), model()]}, r"duplicate model names \['smollm2-135m-bf16'\]"),
    ({"models": [model()], "pool_bytes": "big"}, r"serve config: pool_bytes must be a byte count"),
    ({"models": [model()], "pool_mode": "paged"}, r"unknown pool_mode 'paged'"),
    ({"models": [model()], "server": {"port": 70000}}, r"\[server\]: port must be in 0..65535"),
    ({"models": [model()], "server": {"port": "80"}}, r"\[server\] port must be an integer"),
    ({"models": [model()], "server": {"host": ""}}, r"\[server\]: host must be a non-empty string"),
    ({"models": [model()], "server": {"drain_timeout_s": -1}}, r"drain_timeout_s must be >= 0"),
    ({"models": [model()], "server": {"tls": True}}, r"\[server\]: unknown keys \['tls'\]"),
    ({"models": [model()], "server": {"admission": "lifo"}}, r"admission must be one of \('saab', 'fcfs'\)"),
    ({"models": [model()], "server": {"step_policy": "random"}}, r"step_policy must be one of"),
    ({"models": [model()], "server": {"drop_hopeless": "yes"}}, r"\[server\] drop_hopeless must be true or false"),
    ({"models": [model()], "server": 8000}, r"\[server\] must be a table"),
    (with_devices({"name": "a", "gpu": 1}), r"\[\[devices\]\] entry 0 \('a'\): unknown keys \['gpu'\]"),
    (with_devices({"name": 3}), r"\[\[devices\]\] entry 0: name must be a string, got 3"),
    (with_devices({"name": "a"}, {"name": "a", "jax_device": 1}), r"duplicate device names \['a'\]"),
    (with_devices({"name": "a"}, {"name": "b", "jax_device": 0}), r"duplicate jax_devices \['0'\]"),
    (with_devices({"name": "a", "jax_device": 99}), r"\[\[devices\]\] 'a': jax_device 99 does not exist"),
    (with_devices({"name": "a", "jax_device": -1}), r"entry 0 \('a'\): jax_device must be >= 0"),
    (with_devices({"name": "a", "memory_bytes": 0}), r"entry 0 \('a'\): memory_bytes must be positive"),
    (with_devices({"name": "a", "pool_bytes": "x"}), r"entry 0 \('a'\): pool_bytes must be a byte count"),
])
def test_bad_configs_are_refused_naming_the_problem(data, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig.from_dict(data)


def test_errors_name_the_file_and_the_key(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text('pool_bytes = "64MiB"\n[server]\nport = 9000\ntls = true\n'
                    '[[models]]\nmodel = "smollm2-135m"\nname = "small"\nmax_num_seqs = 2.5\ncolour = "red"\n')
    with pytest.raises(ValueError) as e:
        ServeConfig.from_toml(path)
    lines = str(e.value).splitlines()  # every problem, one line each, each naming the file
    assert len(lines) == 3
    assert f"{path}: [[models]] entry 0 ('small'): max_num_seqs must be an integer, got 2.5" in lines
    assert any(ln.startswith(f"{path}: [[models]] entry 0 ('small'): unknown keys ['colour']; known: [")
               for ln in lines)
    assert (f"{path}: [server]: unknown keys ['tls']; known: ['admission', 'drain_timeout_s', 'drop_hopeless', "
            f"'host', 'port', 'ray_address', 'step_policy']") in lines
    path.write_text('bogus = 1\n[[models]]\nmodel = "smollm2-135m"\n')
    with pytest.raises(ValueError, match=rf"^{path}: unknown serve config keys \['bogus'\]"):
        ServeConfig.from_toml(path)
    path.write_text('[[models]]\nmodel = "smollm2-135m"\nname = "a"\n[[models]]\nmodel = "smollm2-135m"\nname = "a"\n')
    with pytest.raises(ValueError, match=rf"^{path}: duplicate model names \['a'\]"):
        ServeConfig.from_toml(path)


def test_byte_sizes_are_integers_or_sizes_but_not_bools():
    c = ServeConfig.from_dict(with_devices({"name": "a", "memory_bytes": "1.5GB", "pool_bytes": "256MiB"}))
    assert (c.devices[0].memory_bytes, c.devices[0].pool_bytes) == (1_500_000_000, 256 * MIB)
    assert DeviceConfig("b", 1, 2 << 30, pool_bytes="1MiB").pool_bytes == MIB  # in code, too
    assert ServeConfig.from_dict({"models": [model(kv_max_bytes="1MiB")]}).models[0].spec.kv_max_bytes == MIB
    for data, key in [({"models": [model()], "pool_bytes": True}, "pool_bytes"),
                      ({"models": [model(kv_reserve_bytes=False)]}, r"entry 0: kv_reserve_bytes"),
                      (with_devices({"name": "a", "memory_bytes": True}), r"entry 0 \('a'\): memory_bytes")]:
        with pytest.raises(ValueError, match=rf"{key} must be a byte count, got (True|False)"):
            ServeConfig.from_dict(data)


def test_a_model_entry_takes_every_modelspec_field():
    """The entries' keys come from ModelSpec: a field added there is a key here."""
    spec = ModelSpec("smollm2-135m", "w4a16", name="x", kv_dtype="int8", dtype="float32", calib_samples=4,
                     tokens_per_page=8, max_num_seqs=4, max_model_len=256, max_num_batched_tokens=64,
                     kv_reserve_bytes=MIB, kv_max_bytes=2 * MIB, kv_share=0.5, seed=3, kernels="xla")
    entry = {f.name: getattr(spec, f.name) for f in dataclasses.fields(ModelSpec)}
    assert ServeConfig.from_dict({"models": [entry]}).models[0].spec == spec


def test_a_model_entry_takes_page_selection_as_an_inline_table(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text('[[models]]\nmodel = "smollm2-135m"\n'
                    'sparse = {policy = "bbox", budget_tokens = 512, layer_weights = [1, 0.5, 1.5]}\n'
                    'sparse_dense_layers = 1\nsparse_recall_every = 64\n')
    spec = ServeConfig.from_toml(path).models[0].spec
    assert spec.sparse == SparseSpec("bbox", budget_tokens=512, layer_weights=(1.0, 0.5, 1.5))
    assert (spec.sparse_dense_layers, spec.sparse_recall_every) == (1, 64)
    for bad, named in (('{policy = "topk"}', "policy"), ('{budget_tokens = "many"}', "budget_tokens"),
                       ('{policy = "bbox", window = 3}', "window"), ('{layer_weights = [1, -1]}', "layer_weights")):
        path.write_text(f'[[models]]\nmodel = "smollm2-135m"\nsparse = {bad}\n')
        with pytest.raises(ValueError, match=named):
            ServeConfig.from_toml(path)


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot read serve config"):
        ServeConfig.from_toml(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[[models]\nmodel = 1")
    with pytest.raises(ValueError, match="cannot read serve config"):
        ServeConfig.from_toml(tmp_path / "bad.toml")


# ---- placement on several devices (shapes from config.json, nothing loaded) ----------------------

def hf_dir(tmp_path: Path, name: str, *, layers: int, hidden: int, vocab: int) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": vocab, "max_position_embeddings": 2048}))
    return str(d)


@pytest.fixture
def two_models(tmp_path):
    """A 'big' model (~34 MB of bf16 weights, mostly embeddings) and a 'small' one (~0.2 MB)."""
    big = ServedModelConfig(ModelSpec(hf_dir(tmp_path, "big", layers=2, hidden=256, vocab=32000), "bf16", name="big"))
    small = ServedModelConfig(ModelSpec(hf_dir(tmp_path, "small", layers=2, hidden=64, vocab=512), "bf16",
                                        name="small"))
    return [small, big]


def hosts(groups: list[DeviceGroup]) -> dict[tuple[str, ...], list[str]]:
    return {g.devices: list(g.models) for g in groups}


def fake_devices(*memory_mb, kind="cpu"):
    # Indices need not exist: placement only reads name, kind and memory when they are given.
    return [DeviceConfig(f"d{i}", i, int(mb * 1e6), kind) for i, mb in enumerate(memory_mb)]


def test_a_model_that_does_not_fit_the_first_device_goes_to_the_second(two_models):
    config = ServeConfig(two_models, fake_devices(8, 200), pool_bytes=2 * MIB, slab_bytes=64 << 10)
    placed = hosts(place_models(config))
    assert "big" in placed[("d1",)] and sorted(m for ms in placed.values() for m in ms) == ["big", "small"]
    # Where both fit, the scheduler may spread them.
    assert hosts(place_models(ServeConfig(two_models, fake_devices(200, 200), pool_bytes=2 * MIB,
                                          slab_bytes=64 << 10))) == {("d0",): ["big"], ("d1",): ["small"]}


def test_models_that_fit_nowhere_are_refused_with_the_reason(two_models):
    config = ServeConfig(two_models, fake_devices(8, 8), pool_bytes=2 * MIB, slab_bytes=64 << 10)
    with pytest.raises(ValueError, match="do not fit on the configured devices: cannot place big"):
        place_models(config)
    with pytest.raises(ValueError, match=r"device 'd0': its KV pool .* does not fit in 90% of its memory"):
        place_models(ServeConfig(two_models, fake_devices(1, 200), pool_bytes=2 * MIB))


def test_several_devices_need_their_memory(two_models):
    devices = [DeviceConfig("a", 0, kind="cpu"), DeviceConfig("b", 1, kind="cpu")]
    with pytest.raises(ValueError, match="device 'a': its memory is unknown .* set memory_bytes"):
        place_models(ServeConfig(two_models, devices))


def test_unmeetable_rates_fall_back_to_memory_only_placement(two_models, caplog):
    # A known GPU kind: costs from the roofline; no device serves a billion requests a second.
    two_models[1].rate = 1e9
    config = ServeConfig(two_models, fake_devices(8, 200, kind="h100"), pool_bytes=2 * MIB, slab_bytes=64 << 10)
    with caplog.at_level(logging.WARNING, logger="fineserve.config"):
        assert "big" in hosts(place_models(config))[("d1",)]
    assert "placing by memory only" in caplog.text


def test_a_tensor_parallel_model_gets_a_device_group_and_the_others_fit_beside_it(tmp_path, two_models):
    # ~10 MB of embedding and LM head, which each of its two devices holds whole
    wide = ServedModelConfig(ModelSpec(hf_dir(tmp_path, "wide", layers=2, hidden=256, vocab=10000), "bf16",
                                       name="wide", tensor_parallel_size=2))

    def place(*memory_mb):
        return place_models(ServeConfig([wide, *two_models], fake_devices(*memory_mb), pool_bytes=2 * MIB,
                                        slab_bytes=64 << 10))

    groups = place(46, 46, 46)
    [group] = [g for g in groups if "wide" in g.models]
    assert len(group.devices) == 2 and dict(group.members)["wide"] == (0, 1)
    assert sorted(m for g in groups for m in g.models) == ["big", "small", "wide"]   # each once
    # on two devices "big" (~34 MB) shares one with wide's share: at 60 MB each it fits ...
    [group] = place(60, 60)
    assert group.devices == ("d0", "d1") and dict(group.members)["wide"] == (0, 1)
    assert len(dict(group.members)["big"]) == 1 and len(dict(group.members)["small"]) == 1
    # ... at 54 MB it would only if wide's embedding were split too (5 MB a device, not 10)
    with pytest.raises(ValueError, match="cannot place wide: tp=2 x 1: no node has 2 device"):
        place(54, 54)
    # what does not split is refused before anything loads, naming the model
    wide.spec.tensor_parallel_size = 8
    with pytest.raises(ValueError, match="wide: tensor_parallel_size=8 does not divide the model's 4 query heads"):
        place(60, 60)


def test_placement_chooses_the_tensor_parallel_size_of_an_auto_model(tmp_path):
    # ~42 MB of bf16 weights, nearly all in its linears: too much for one 40 MB device, fine split over two
    deep = ServedModelConfig(ModelSpec(hf_dir(tmp_path, "deep", layers=8, hidden=512, vocab=512), "bf16",
                                       name="deep", tensor_parallel_size="auto"))
    [group] = place_models(ServeConfig([deep], fake_devices(40, 40, 40), pool_bytes=2 * MIB, slab_bytes=64 << 10))
    assert len(group.devices) == 2 and dict(group.members)["deep"] == (0, 1)
    # on one device there is nothing to choose
    assert place_models(ServeConfig([deep], fake_devices(80))) == [DeviceGroup(("d0",), (("deep", (0,)),))]
    with pytest.raises(ValueError, match="tensor_parallel_size='auto' is the placement's choice"):
        Fleet([deep.spec])
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer or 'auto', got 'two'"):
        ServeConfig.from_dict({"models": [{"model": "x", "tensor_parallel_size": "two"}]})


def test_device_groups_join_the_devices_a_replica_spans():
    groups = device_groups([("a", ("d2",)), ("tp", ("d1", "d2")), ("b", ("d0",)), ("c", ("d3",)), ("a", ("d1",))],
                           ["d0", "d1", "d2", "d3"])
    assert groups == [DeviceGroup(("d0",), (("b", (0,)),)),
                      DeviceGroup(("d1", "d2"), (("a", (1,)), ("tp", (0, 1)))),   # a: one replica per group
                      DeviceGroup(("d3",), (("c", (0,)),))]


# ---- building fleets -----------------------------------------------------------------------------

def tiny(name: str, seed: int, layers: int = 2):
    cfg = ModelConfig("llama", 256, 64, 128, layers, 4, 2, 16, max_position_embeddings=128)
    return random_model(cfg, "bf16", "float32", name=name, seed=seed)


def tiny_spec(loaded) -> ModelSpec:
    return ModelSpec(loaded, max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64, tokens_per_page=8)


def test_build_fleets_on_one_device():
    config = ServeConfig([ServedModelConfig(tiny_spec(tiny("a", 1)), slo_ttft_s=0.5),
                          ServedModelConfig(tiny_spec(tiny("b", 2, layers=3)), max_queue=3)],
                         pool_bytes=MIB, slab_bytes=64 << 10)
    [df] = build_fleets(config)
    assert (df.device_name, df.jax_device) == ("device0", jax.devices()[0])
    assert df.fleet.model_names == ["a", "b"]
    assert df.slo_ttft_s == {"a": 0.5, "b": DEFAULT_SLO_TTFT_S}  # no profile covers random models
    assert df.max_queue == {"a": 8, "b": 3}
    assert 0.9 * MIB < df.fleet.pool.nbytes <= MIB and df.fleet.pool.words.devices() == {jax.devices()[0]}


def test_build_fleets_puts_each_fleet_on_its_own_device():
    models = [ServedModelConfig(tiny_spec(tiny(n, i))) for i, n in enumerate(["a", "b"])]  # made on cpu:0
    devices = [DeviceConfig("left", 0, 10**9), DeviceConfig("right", 1, 10**9, pool_bytes=2 << 20)]
    fleets = build_fleets(ServeConfig(models, devices, pool_bytes=1 << 20, slab_bytes=64 << 10))
    assert [(f.device_name, f.fleet.model_names) for f in fleets] == [("left", ["a"]), ("right", ["b"])]
    for f, jd, size in zip(fleets, jax.devices(), (1 << 20, 2 << 20)):
        assert f.jax_device == jd and 0.9 * size < f.fleet.pool.nbytes <= size  # whole slabs
        assert f.fleet.pool.words.devices() == {jd}
        weights = jax.tree.leaves(nnx.state(f.fleet.loaded[f.fleet.model_names[0]].model))
        assert weights and all(w.devices() == {jd} for w in weights)
        # Weights and pool are committed to jd: steps run there even outside jax.default_device(jd).
        out = f.fleet.generate(prompt_token_ids=[[1, 2, 3]], model=f.fleet.model_names[0],
                               sampling_params=SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        assert len(out[0].token_ids) == 2 and f.fleet.pool.words.devices() == {jd}


def test_build_fleets_runs_each_model_of_a_group_on_its_own_devices():
    """A group of three devices: a TP=2 model on the last two, a TP=1 model on the first and one on
    the last (sharing that device's pool with the TP model); each answers as it does alone."""
    devices = [DeviceConfig(f"d{i}", i, 10**9) for i in range(3)]
    loaded = {"tp": tiny("tp", 5), "a": tiny("a", 6), "b": tiny("b", 7, layers=3)}
    config = ServeConfig([ServedModelConfig(tiny_spec(m)) for m in loaded.values()], devices,
                         pool_bytes=MIB, slab_bytes=64 << 10)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = [[3, 1, 4, 1, 5], [9, 2, 6]]
    want = {n: [o.token_ids for o in Fleet([tiny_spec(m)], MIB, slab_bytes=64 << 10).generate(
        prompt_token_ids=prompt, sampling_params=params, model=n)] for n, m in loaded.items()}
    for spec in config.models:   # "auto": the group's members decide (2)
        spec.spec.tensor_parallel_size = "auto" if spec.name == "tp" else 1
    group = DeviceGroup(("d0", "d1", "d2"), (("tp", (1, 2)), ("a", (0,)), ("b", (2,))))
    [df] = build_fleets(config, groups=[group])
    jds = jax.devices()[:3]
    assert (df.device_name, df.jax_device) == ("d0+d1+d2", jds[0])
    fleet = df.fleet
    assert [set(p.allocator.stats()["models"]) for p in fleet.pools] == [{"a"}, {"tp"}, {"tp", "b"}]
    assert [p.words.devices() for p in fleet.pools] == [{d} for d in jds]
    placed_on = {n: {d for w in jax.tree.leaves(nnx.state(fleet.loaded[n].model)) for d in w.devices()}
                 for n in loaded}
    assert placed_on == {"tp": set(jds[1:]), "a": {jds[0]}, "b": {jds[2]}}
    outs = fleet.generate(prompt_token_ids=prompt * 3, sampling_params=params,
                          model=[n for n in loaded for _ in prompt])
    assert {n: [o.token_ids for o in outs[2 * i:2 * i + 2]] for i, n in enumerate(loaded)} == want
