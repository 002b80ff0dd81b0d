"""Build a model from HF-named weights (the one format every loader produces)."""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.errors import WeightsError
from models.llama import LlamaForCausalLM

# Our stacked layer parameter path -> HF per-layer tensor name (transposed for Linear kernels).
_LAYER_TENSORS = {
    ("input_layernorm", "weight"): ("input_layernorm.weight", False),
    ("post_attention_layernorm", "weight"): ("post_attention_layernorm.weight", False),
    ("q_proj", "kernel"): ("self_attn.q_proj.weight", True),
    ("k_proj", "kernel"): ("self_attn.k_proj.weight", True),
    ("v_proj", "kernel"): ("self_attn.v_proj.weight", True),
    ("o_proj", "kernel"): ("self_attn.o_proj.weight", True),
    ("q_proj", "bias"): ("self_attn.q_proj.bias", False),
    ("k_proj", "bias"): ("self_attn.k_proj.bias", False),
    ("v_proj", "bias"): ("self_attn.v_proj.bias", False),
    ("gate_proj", "kernel"): ("mlp.gate_proj.weight", True),
    ("up_proj", "kernel"): ("mlp.up_proj.weight", True),
    ("down_proj", "kernel"): ("mlp.down_proj.weight", True),
}


def model_from_hf_weights(cfg: ModelConfig, weights: Mapping[str, np.ndarray], dtype=jnp.bfloat16) -> LlamaForCausalLM:
    """Weights in HF naming and layout ((out, in) matrices) -> a LlamaForCausalLM in `dtype`.
    Raises WeightsError naming any missing or mis-shaped tensor."""
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)

    def fetch(name, shape, transpose):
        if name not in weights:
            raise WeightsError(f"weights are missing tensor {name!r}")
        arr = np.asarray(weights[name])
        if transpose:
            arr = arr.T
        if tuple(arr.shape) != tuple(shape):
            got = arr.T.shape if transpose else arr.shape
            raise WeightsError(f"tensor {name!r} has shape {tuple(got)}, config expects "
                               f"{tuple(reversed(shape)) if transpose else tuple(shape)}")
        return arr

    def put(arr):
        return jnp.asarray(arr, dtype=dtype)

    pure["embed_tokens"]["embedding"] = put(fetch("model.embed_tokens.weight",
                                                  pure["embed_tokens"]["embedding"].shape, False))
    pure["norm"]["weight"] = put(fetch("model.norm.weight", pure["norm"]["weight"].shape, False))
    if pure.get("lm_head") is not None:
        pure["lm_head"]["kernel"] = put(fetch("lm_head.weight", pure["lm_head"]["kernel"].shape, True))
    layers = pure["layers"]
    for (module, leaf), (hf_name, transpose) in _LAYER_TENSORS.items():
        if module not in layers or leaf not in layers[module]:
            continue  # e.g. biases of models without attention bias
        stacked_shape = layers[module][leaf].shape
        layers[module][leaf] = put(np.stack([
            fetch(f"model.layers.{i}.{hf_name}", stacked_shape[1:], transpose) for i in range(cfg.num_layers)]))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
