"""fineserve-jax: serve mixed-precision LLMs from one shared KV pool per device."""

from fineserve_jax.fleet import Fleet, ModelSpec
from fineserve_jax.llm import LLM
from serving.engine.sampling import SamplingParams
from serving.engine.sequence import CompletionOutput, RequestOutput

__all__ = ["LLM", "Fleet", "ModelSpec", "SamplingParams", "RequestOutput", "CompletionOutput"]
