"""Fixtures shared by test modules."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest


LOCKS_ENV = "FINESERVE_TEST_LOCKS"
JAX_CACHE_ENV = "FINESERVE_TEST_JAX_CACHE"
HOST_DEVICES = 4   # tensor-parallel tests split models over host (CPU) devices

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):   # before any backend starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={HOST_DEVICES}").strip()


def pytest_configure(config):
    """One persistent XLA compilation cache per test session, shared by the xdist workers and the
    subprocesses tests start (servers, CLIs): many tests build engines of the same tiny models, and
    each engine's programs compile again otherwise. It starts empty in every session, so nothing
    outlives the run. The main process (not an xdist worker) makes it and the lock files `timing`
    tests take; each process keeps its own calibrated-weights cache."""
    if not hasattr(config, "workerinput"):
        config._lock_dir = tempfile.mkdtemp(prefix="fineserve-jax-test-locks-")
        os.environ[LOCKS_ENV] = config._lock_dir
        config._jax_cache_dir = tempfile.mkdtemp(prefix="fineserve-jax-test-xla-")
        os.environ[JAX_CACHE_ENV] = config._jax_cache_dir
    config._own_dir = tempfile.mkdtemp(prefix="fineserve-jax-test-cache-")
    # servers and CLIs that tests start cache calibrated weights here, not in the user's cache
    os.environ["FINESERVE_RUNTIME_CACHE"] = os.path.join(config._own_dir, "runtime")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(config._own_dir, "triton")  # the sm_90a compile check
    # No size limit: with one, every write scans (and every read stamps) the whole cache under a
    # file lock, thousands of entries deep. A read that meets an entry still being written fails
    # its decompression, and JAX compiles instead (with a warning).
    settings = {"jax_compilation_cache_dir": os.environ[JAX_CACHE_ENV],
                "jax_persistent_cache_min_compile_time_secs": 0, "jax_persistent_cache_min_entry_size_bytes": -1}
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "_own_dir", ""), ignore_errors=True)
    shutil.rmtree(getattr(config, "_jax_cache_dir", ""), ignore_errors=True)   # the main process's only
    shutil.rmtree(getattr(config, "_lock_dir", ""), ignore_errors=True)


@contextlib.contextmanager
def _test_lock(exclusive: bool):
    """Tests run in parallel (pytest-xdist) but a `timing` test runs alone: it takes the main lock
    exclusively, every other test shares it. The gate gives a waiting timing test precedence: a
    test passes the gate before it takes its shared lock, and a timing test holds the gate."""
    lock_dir = os.environ.get(LOCKS_ENV)
    if lock_dir is None:
        yield
        return
    with open(os.path.join(lock_dir, "gate"), "a") as gate, open(os.path.join(lock_dir, "main"), "a") as main:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(main, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(main, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)


# The files that start first, in this order (the workers, `--dist loadfile`, take files in
# collection order): the wall-clock file, whose timed test runs alone once its engines are compiled,
# beside files of short tests (the timed test waits only for their current ones); then the longest
# files, longest first, so that no worker runs a long file alone at the end.
FIRST_FILES = ("test_simulator_wall_clock.py", "test_sampling.py", "test_cost_model.py",
               "test_compile_check.py", "test_quality_scripts.py", "test_smollm2.py", "test_tensor_parallel.py",
               "test_fleet.py", "test_kernels_e2e.py", "test_page_selection.py", "test_paged_attention_pallas.py",
               "test_bench_kernels.py", "test_ray_serve.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(FIRST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: the rest keep their order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup (module fixtures included), call and teardown of each test under the test lock."""
    with _test_lock(exclusive=item.get_closest_marker("timing") is not None):
        yield


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
