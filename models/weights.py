"""Build a model from HF-named weights (the one format every loader produces).

Weights are float arrays in HF layout (`[out, in]` matrices), except that linear weights may also be
`QuantizedTensor`s in kernel layout `[in, out]` (axis 0 reduced), as `models.quant_import` returns
them for pre-quantized checkpoints (AWQ, GPTQ, FP8, GGUF Q4_0/Q4_1/Q8_0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.errors import WeightsError
from models.llama import LlamaForCausalLM
from models.quant_linear import QuantLinear
from pallas_kernels.quant_formats import QuantizedTensor, dequantize

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
# Stacked linear module -> HF per-layer weight name.
LAYER_LINEARS = {module: hf for (module, leaf), (hf, _) in _LAYER_TENSORS.items() if leaf == "kernel"}


@dataclass(frozen=True)
class QuantSpec:
    """How one QuantLinear looks (shapes include the leading layer axis of stacked layers):
    enough to rebuild it abstractly (`abstract_model`) before its arrays are filled in."""

    fmt: str
    group_size: int | None
    act_format: str | None
    values: jax.ShapeDtypeStruct
    scales: jax.ShapeDtypeStruct
    zeros: jax.ShapeDtypeStruct | None
    axis: int = 0          # each layer's reduced axis: 0 for [in, out], 1 for K-major [out, in]


def abstract_model(cfg: ModelConfig, dtype, quant: Mapping[str, QuantSpec] | None = None,
                   rotated_key_scale: bool = False) -> LlamaForCausalLM:
    """An abstract (ShapeDtypeStruct-leaved, nothing allocated) LlamaForCausalLM whose stacked layer
    linears named in `quant` ("q_proj", ..., "down_proj") are QuantLinears of the given specs, with
    post-RoPE key scale factors when `rotated_key_scale`. The float kernels the QuantLinears replace
    are never materialised."""
    quant = dict(quant or {})
    unknown = sorted(set(quant) - set(LAYER_LINEARS))
    if unknown:
        raise WeightsError(f"cannot place a quantized linear at {unknown[0]!r}; "
                           f"quantized linears: {', '.join(LAYER_LINEARS)}")

    def build():
        model = LlamaForCausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0))
        for name, spec in quant.items():
            lin = getattr(model.layers, name)
            zeros = None if spec.zeros is None else jnp.zeros(spec.zeros.shape, spec.zeros.dtype)
            qt = QuantizedTensor(jnp.zeros(spec.values.shape, spec.values.dtype),
                                 jnp.zeros(spec.scales.shape, spec.scales.dtype), zeros, spec.fmt, spec.axis,
                                 spec.group_size)
            bias = lin.bias[...] if lin.bias is not None else None
            setattr(model.layers, name, QuantLinear(qt, bias, act_format=spec.act_format))
        if rotated_key_scale:
            model.scale_rotated_keys()
        return model

    return nnx.eval_shape(build)


def _is_qt(x) -> bool:
    return isinstance(x, QuantizedTensor)


def _stackable(tensors: list) -> bool:
    """All QuantizedTensors sharing fmt, group size, axis and array shapes/dtypes."""
    if not all(_is_qt(t) for t in tensors):
        return False
    first = tensors[0]

    def sig(t):
        arrays = (t.values, t.scales, t.zeros)
        return (t.fmt, t.axis, t.group_size,
                tuple(None if a is None else (tuple(np.shape(a)), np.dtype(a.dtype)) for a in arrays))

    return all(sig(t) == sig(first) for t in tensors)


def _stack_quantized(tensors: list[QuantizedTensor]) -> QuantizedTensor:
    def stack(arrays):
        return jnp.asarray(np.stack([np.asarray(a) for a in arrays]))

    zeros = None if tensors[0].zeros is None else stack([t.zeros for t in tensors])
    return QuantizedTensor(stack([t.values for t in tensors]), stack([t.scales for t in tensors]), zeros,
                           tensors[0].fmt, 0, tensors[0].group_size)


def model_from_hf_weights(cfg: ModelConfig, weights: Mapping[str, np.ndarray | QuantizedTensor],
                          dtype=jnp.bfloat16, *, act_format: str | None = None) -> LlamaForCausalLM:
    """Weights in HF naming and layout ((out, in) matrices) -> a LlamaForCausalLM in `dtype`.
    Raises WeightsError naming any missing or mis-shaped tensor.

    Quantized linear weights (`QuantizedTensor`, kernel layout `[in, out]`, axis 0):
    * layer projections (`model.layers.{i}.self_attn.q_proj.weight`, ...): when every layer's
      tensor of one projection is a QuantizedTensor and all share fmt, group size and array
      shapes, they are stacked along a new leading layer axis and installed as one
      `QuantLinear(stacked, bias, act_format=act_format)` in place of the nnx.Linear; its float
      kernel is never built. Otherwise (e.g. a GGUF file storing ffn_down as Q4_1 in some layers
      and Q6_K, returned dequantized, in others) that projection is dequantized for ALL layers
      and stays a dense float nnx.Linear in `dtype`.
    * `lm_head.weight` is always dequantized to `dtype` (our LM head is an nnx.Linear).
    act_format: activation format of the installed QuantLinears: None (weight-only: AWQ, GPTQ,
    GGUF) or "fp8"/"int8" (per-token dynamic; FP8 checkpoints use "fp8"). Tensors the model does
    not use (e.g. FP8 checkpoints' static `input_scale`: we quantize activations with dynamic
    per-token scales) are ignored."""
    quantized: dict[str, list[QuantizedTensor]] = {}
    for module, hf in LAYER_LINEARS.items():
        tensors = [weights.get(f"model.layers.{i}.{hf}") for i in range(cfg.num_layers)]
        if any(_is_qt(t) for t in tensors) and _stackable(tensors):
            expect = kernel_shape(cfg, module)
            if tuple(tensors[0].shape) != expect:
                raise WeightsError(f"tensor 'model.layers.0.{hf}' has shape {tuple(reversed(tensors[0].shape))}, "
                                   f"config expects {tuple(reversed(expect))}")
            quantized[module] = tensors

    abstract = abstract_model(cfg, dtype, {
        m: QuantSpec(ts[0].fmt, ts[0].group_size, act_format,
                     jax.ShapeDtypeStruct((cfg.num_layers, *np.shape(ts[0].values)), ts[0].values.dtype),
                     jax.ShapeDtypeStruct((cfg.num_layers, *np.shape(ts[0].scales)), ts[0].scales.dtype),
                     None if ts[0].zeros is None else
                     jax.ShapeDtypeStruct((cfg.num_layers, *np.shape(ts[0].zeros)), ts[0].zeros.dtype),
                     ts[0].axis)
        for m, ts in quantized.items()})
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)

    def fetch(name, shape, transpose):
        """HF tensor `name` as a numpy array of our `shape` (a kernel when `transpose`)."""
        if name not in weights:
            raise WeightsError(f"weights are missing tensor {name!r}")
        w = weights[name]
        if _is_qt(w):
            if not transpose:
                raise WeightsError(f"tensor {name!r} is quantized, but the model needs it in float")
            if tuple(w.shape) != tuple(shape):
                raise WeightsError(f"tensor {name!r} has shape {tuple(reversed(w.shape))}, config expects "
                                   f"{tuple(reversed(shape))}")
            return np.asarray(dequantize(w))  # already kernel layout [in, out]
        arr = np.asarray(w)
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
    for module, tensors in quantized.items():
        qt = _stack_quantized(tensors)
        layers[module]["values"], layers[module]["scales"] = qt.values, qt.scales
        if qt.zeros is not None:
            layers[module]["zeros"] = qt.zeros
    for (module, leaf), (hf_name, transpose) in _LAYER_TENSORS.items():
        if module not in layers or leaf not in layers[module]:
            continue  # e.g. biases of models without attention bias, kernels of QuantLinears
        stacked_shape = layers[module][leaf].shape
        layers[module][leaf] = put(np.stack([
            fetch(f"model.layers.{i}.{hf_name}", stacked_shape[1:], transpose) for i in range(cfg.num_layers)]))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def kernel_shape(cfg: ModelConfig, module: str) -> tuple[int, int]:
    """Logical `[in, out]` kernel shape of one layer's projection."""
    h, q, kv, inter = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, \
        cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}[module]
