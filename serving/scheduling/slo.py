"""Latency SLOs and FineServe's rule for setting them.

FineServe (arXiv 2509.06261) sets each model's TTFT SLO to its batch-1 TTFT on a 903-token prompt
(the p95 prompt of LMSYS-Chat-1M) at its base tensor parallelism, times a scale, plus a 4 ms buffer.
The same rule sets the SLOs of the server, the bench and the simulator (docs/scheduling.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FINESERVE_SLO_PROMPT_LEN = 903
FINESERVE_SLO_SCALE = 40.0
FINESERVE_SLO_SLACK_S = 0.004


@dataclass(frozen=True)
class SLO:
    ttft_s: float               # met when TTFT < ttft_s (strict, as FineServe)
    tpot_s: float | None = None  # met when TPOT <= tpot_s (as vLLM's goodput); None: no bound

    def __post_init__(self):
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"SLO {name} must be a finite number > 0, got {value!r}")


def fineserve_slo(ttft_batch1_903_s: float, scale: float = FINESERVE_SLO_SCALE) -> SLO:
    """FineServe's TTFT SLO from the model's profiled TTFT at batch 1 with a 903-token prompt."""
    if not (math.isfinite(ttft_batch1_903_s) and ttft_batch1_903_s > 0):
        raise ValueError(f"ttft_batch1_903_s must be a finite number > 0, got {ttft_batch1_903_s!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    return SLO(ttft_s=ttft_batch1_903_s * scale + FINESERVE_SLO_SLACK_S)


def fineserve_slo_of(cost, scale: float = FINESERVE_SLO_SCALE) -> float:
    """FineServe's TTFT SLO, in seconds, of a model whose step cost is `cost` (a `cost_model.StepCost`)."""
    return fineserve_slo(cost.ttft_seconds(FINESERVE_SLO_PROMPT_LEN), scale).ttft_s
