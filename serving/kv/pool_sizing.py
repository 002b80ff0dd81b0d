"""How big a device's KV pool can be, from how much memory the device has (vLLM's
`gpu_memory_utilization`): once every model of the device is loaded, the pool takes `utilization`
of the device's memory less what is in use (weights) and less the scratch memory of the largest
step any of the models runs (XLA's memory analysis of that compiled program).

JAX reports `bytes_limit`, the part of the device its allocator may use:
`XLA_PYTHON_CLIENT_MEM_FRACTION` of it (0.75 unless set), so the device's memory is
`bytes_limit / fraction`. `fineserve serve` sets the fraction to the utilization before JAX starts,
so that JAX's limit and the pool's budget are the same number.
"""

from __future__ import annotations

import os
from typing import Mapping

DEFAULT_JAX_MEM_FRACTION = 0.75  # XLA_PYTHON_CLIENT_MEM_FRACTION's default


def jax_mem_fraction() -> float:
    return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_JAX_MEM_FRACTION))


def check_utilization(utilization) -> None:
    if isinstance(utilization, bool) or not isinstance(utilization, (int, float)) or not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be a fraction in (0, 1], got {utilization!r}")


def device_memory_stats(device) -> dict:
    """What the device says of its memory (empty where it says nothing, e.g. a CPU)."""
    try:
        return dict(device.memory_stats() or {})
    except (RuntimeError, NotImplementedError):
        return {}


def check_reports_memory(stats: Mapping[str, int]) -> None:
    if not stats or "bytes_limit" not in stats:
        raise ValueError("gpu_memory_utilization needs a device that reports its memory (a GPU); "
                         "this one does not: give the pool's size (pool_bytes; LLM: kv_cache_bytes) instead")


def pool_bytes_for_utilization(utilization: float, loaded: Mapping[str, int], activations: int,
                               mem_fraction: float | None = None) -> int:
    """The pool's bytes: `loaded` are the device's memory stats once the weights are loaded,
    `activations` the largest step's scratch bytes. ValueError when nothing is left."""
    check_utilization(utilization)
    check_reports_memory(loaded)
    total = loaded["bytes_limit"] / (mem_fraction or jax_mem_fraction())
    budget = int(utilization * total)
    weights = loaded["bytes_in_use"]
    pool = budget - weights - activations
    if pool <= 0:
        raise ValueError(f"no memory left for the KV pool: gpu_memory_utilization={utilization} of "
                         f"{total / 2**30:.2f} GiB is {budget / 2**30:.2f} GiB, but the weights and other "
                         f"arrays take {weights / 2**30:.2f} GiB and a step's activations "
                         f"{activations / 2**30:.2f} GiB; raise it, or serve fewer or smaller models")
    return pool
