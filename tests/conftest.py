"""Fixtures shared by test modules."""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import numpy as np
import pytest


def pytest_configure(config):
    """One persistent XLA compilation cache for the session, shared with the subprocesses tests start
    (servers, CLIs): many tests build engines of the same tiny models, and each engine's programs
    compile again otherwise. It starts empty in every session, so nothing outlives the run."""
    cache = tempfile.mkdtemp(prefix="fineserve-jax-test-cache-")
    config._jax_cache_dir = cache
    settings = {"jax_compilation_cache_dir": cache, "jax_persistent_cache_min_compile_time_secs": 0,
                "jax_persistent_cache_min_entry_size_bytes": -1}
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "_jax_cache_dir", ""), ignore_errors=True)


@pytest.fixture
def rng():
    """A fresh random generator per test; the seed is printed so a failure can be replayed."""
    seed = np.random.SeedSequence().entropy
    print(f"numpy seed: {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def fast_cpu_compiles():
    """XLA compile time of interpreted Pallas kernels dominates their tests' runtime on CPU: compile
    with most optimizations off for the requesting module (restored afterwards). Numerics stay IEEE
    float32."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)
