"""Fixtures shared by test modules."""

from __future__ import annotations

import jax
import numpy as np
import pytest


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
