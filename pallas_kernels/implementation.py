"""Which implementation of the kernels a model runs: one choice per engine, resolved once.

  "auto"       "pallas" when JAX's default backend is a GPU, else "xla" (what users want by default).
  "xla"        the pure-XLA references (every op has one).
  "pallas"     the Pallas kernels compiled for the GPU; refused on other backends.
  "interpret"  the same Pallas kernels under `interpret=True` (any backend; slow, for tests).
"""

from __future__ import annotations

import jax

KERNEL_CHOICES = ("auto", "xla", "pallas", "interpret")
IMPLEMENTATIONS = ("xla", "pallas", "interpret")


def resolve_kernels(choice: str) -> str:
    """A user's kernel choice -> the implementation the dispatchers get."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernels {choice!r}; choose from {KERNEL_CHOICES}")
    if choice == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    check_implementation(choice)
    return choice


def check_implementation(implementation: str) -> None:
    """Raise ValueError for an unknown implementation, or "pallas" off the GPU."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown kernel implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
    if implementation == "pallas" and jax.default_backend() != "gpu":
        raise ValueError(f"implementation 'pallas' compiles for the GPU, but the default backend is "
                         f"{jax.default_backend()!r}; use 'interpret' (the same kernel, interpreted) or 'xla'")
