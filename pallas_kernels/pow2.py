"""Powers of two: kernels tile by them and the engine pads batches to them, so every compiled shape
is one of a few."""

from __future__ import annotations


def is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, x - 1).bit_length()


def pow2_factor(x: int) -> int:
    """The largest power of two dividing x (x > 0)."""
    return x & -x
