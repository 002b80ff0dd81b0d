"""The built-in demo fleet: SmolLM2-135M at three precisions sharing one device pool. `fineserve serve`
serves it when no fleet file is given, and `fineserve bench` replays workloads on it."""

from __future__ import annotations

from fineserve_jax.fleet import ModelSpec

DEMO_MODEL = "smollm2-135m"
DEMO_PRECISIONS = ("bf16", "w8a8", "w4a16")


def demo_fleet_specs() -> list[ModelSpec]:
    return [ModelSpec(DEMO_MODEL, p, name=f"{DEMO_MODEL}-{p}", max_model_len=1024, max_num_seqs=16)
            for p in DEMO_PRECISIONS]


def demo_profile_key(served_name: str) -> tuple[str, str]:
    """The profile key parts of a demo-fleet name: "smollm2-135m-w8a8" -> ("smollm2-135m", "w8a8")."""
    model, precision = served_name.rsplit("-", 1)
    return model, precision
