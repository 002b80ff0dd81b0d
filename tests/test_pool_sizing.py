"""Sizing a device's KV pool from its memory (gpu_memory_utilization): the arithmetic, the errors,
and a Fleet on a device whose memory statistics are faked (a CPU reports none)."""

from __future__ import annotations

import pytest

import fineserve_jax.fleet
import fineserve_jax.llm
import serving.engine.llm_engine
from fineserve_jax import Fleet, ModelSpec, SamplingParams
from models.config import ModelConfig
from models.loader import random_model
from serving.engine.model_runner import ModelRunner
from serving.kv.pool_sizing import pool_bytes_for_utilization

GiB = 1 << 30


def fake_device_memory(monkeypatch, stats: dict) -> None:
    """The device reports `stats` wherever its memory is asked for (the checks before loading, and
    the sizing after)."""
    for module in (fineserve_jax.fleet, fineserve_jax.llm, serving.engine.llm_engine):
        monkeypatch.setattr(module, "device_memory_stats", lambda device: stats)


def test_the_pool_takes_what_is_left_of_the_fraction():
    loaded = {"bytes_limit": int(0.75 * 80 * GiB), "bytes_in_use": 20 * GiB}
    assert pool_bytes_for_utilization(0.9, loaded, 2 * GiB, mem_fraction=0.75) == int(0.9 * 80 * GiB) - 22 * GiB
    # serve sets JAX's fraction to the utilization: the pool is JAX's limit less what is used
    assert pool_bytes_for_utilization(0.9, {"bytes_limit": 72 * GiB, "bytes_in_use": 20 * GiB}, 2 * GiB,
                                      mem_fraction=0.9) == 50 * GiB


@pytest.mark.parametrize("utilization, stats, match", [
    (0.0, {"bytes_limit": GiB, "bytes_in_use": 0}, "fraction in"),
    (1.5, {"bytes_limit": GiB, "bytes_in_use": 0}, "fraction in"),
    (True, {"bytes_limit": GiB, "bytes_in_use": 0}, "fraction in"),
    (0.9, {}, "reports its memory"),
    (0.5, {"bytes_limit": 8 * GiB, "bytes_in_use": 6 * GiB}, "no memory left for the KV pool"),
])
def test_bad_utilization_and_no_room_are_clear_errors(utilization, stats, match):
    with pytest.raises(ValueError, match=match):
        pool_bytes_for_utilization(utilization, stats, 0, mem_fraction=1.0)


@pytest.fixture(scope="module")
def model():
    config = ModelConfig("llama", 512, 128, 160, 2, 4, 2, 32, max_position_embeddings=256)
    return random_model(config, "bf16", "float32", name="tiny", seed=1)


def spec(model) -> ModelSpec:
    return ModelSpec(model, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128, tokens_per_page=8)


def test_a_fleet_sizes_its_pool_from_the_device(model, monkeypatch):
    stats = {"bytes_limit": 48 << 20, "bytes_in_use": 8 << 20}
    fake_device_memory(monkeypatch, stats)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
    fleet = Fleet([spec(model)], gpu_memory_utilization=0.5)
    runner = fleet.runtime.engines["tiny"].runner
    assert isinstance(runner, ModelRunner)
    activations = runner.largest_step_temp_bytes(fleet.pool.words)  # as for any pool shape
    assert activations > 0
    budget = int(0.5 * (48 << 20) / 0.75) - (8 << 20)                 # 24 MiB of the 64 MiB device
    assert budget - activations - fleet.plan.slab_bytes < fleet.pool.nbytes <= budget - activations
    assert Fleet([spec(model)], pool_bytes="4MiB", gpu_memory_utilization=0.5).pool.nbytes <= 4 << 20  # explicit wins


def test_a_device_without_memory_statistics_needs_pool_bytes(model):
    with pytest.raises(ValueError, match="pool_bytes"):
        Fleet([spec(model)], gpu_memory_utilization=0.9)           # this CPU reports no memory limit


def test_the_files_take_gpu_memory_utilization(tmp_path):
    from fineserve_jax.serve_config import ServeConfig

    config = ServeConfig.from_dict({"gpu_memory_utilization": 0.85, "models": [{"model": "smollm2-135m"}]})
    assert config.gpu_memory_utilization == 0.85 and config.device_pool_bytes(config.devices[0]) is None
    explicit = ServeConfig.from_dict({"gpu_memory_utilization": 0.85, "pool_bytes": "64MiB",
                                      "models": [{"model": "smollm2-135m"}]})
    assert explicit.device_pool_bytes(explicit.devices[0]) == 64 << 20         # an explicit size wins
    assert ServeConfig.demo().device_pool_bytes(ServeConfig.demo().devices[0]) == 512 << 20
    path = tmp_path / "fleet.toml"
    path.write_text('gpu_memory_utilization = 1.5\n[[models]]\nmodel = "smollm2-135m"\n')
    with pytest.raises(ValueError, match=r"fleet.toml: gpu_memory_utilization must be in \(0, 1\], got 1.5"):
        ServeConfig.from_toml(path)
    with pytest.raises(ValueError, match="pool_bytes"):   # a fleet file too; this CPU reports no memory
        Fleet.from_dict({"gpu_memory_utilization": 0.5, "models": [{"model": "smollm2-135m"}]})


def test_llm_sizes_its_pool_from_the_device(monkeypatch):
    from fineserve_jax import LLM
    from tests.helpers import FIXTURES

    with pytest.raises(ValueError, match="kv_cache_bytes"):                # this CPU reports no memory
        LLM(str(FIXTURES / "llama"), dtype="float32", gpu_memory_utilization=0.9)
    stats = {"bytes_limit": 96 << 20, "bytes_in_use": 16 << 20}
    fake_device_memory(monkeypatch, stats)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "1.0")
    llm = LLM(str(FIXTURES / "llama"), dtype="float32", max_model_len=128, gpu_memory_utilization=0.5)
    engine = llm.engine
    activations = engine.runner.largest_step_temp_bytes(engine.pool.words)
    budget = (48 << 20) - (16 << 20) - activations
    assert activations > 0 and budget - engine.pool.allocator.slab_bytes < engine.pool.nbytes <= budget
    out = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 4
