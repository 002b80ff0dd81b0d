"""Megatron-style tensor parallelism of a Llama model over a 1-D device mesh (axis `TP_AXIS`).

Each device of the group holds 1/tp of every layer's heads and MLP columns:
  column-parallel  q/k/v_proj, gate/up_proj: output columns split (device d: query heads
                   [d*Hq/tp, (d+1)*Hq/tp) and the kv heads they read, MLP columns likewise);
  row-parallel     o_proj, down_proj: input rows split the same way; their partial outputs are
                   summed over the group (`lax.psum`, one all-reduce per linear);
  replicated       embedding, norms and the LM head: every device holds all of them, so each
                   computes the full logits with no gather before sampling (the LM head of an 8B
                   model is 1 GB in bf16; vocab-parallel would save that per device at the price
                   of one all-gather of the logits per step).
Quantized weights (`QuantLinear`) split their packed values, scales and zero points along the same
logical axis; a row-parallel split must keep whole quantization groups on each device. Each device's
KV cache holds its own kv heads (`local_layout`), so kv heads must divide evenly (no replication of
kv heads across devices). The model code runs unchanged on a shard: head counts come from its
weights' shapes, and `LlamaForCausalLM.__call__(tp_axis=...)` adds the two all-reduces.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.config import ModelConfig
from models.quant_linear import QuantLinear
from pallas_kernels.kv_pages import KVPageLayout

TP_AXIS = "tp"
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def tp_mesh(devices) -> Mesh:
    """A 1-D mesh over a tensor-parallel group's devices, in the order given."""
    return Mesh(np.asarray(list(devices)), (TP_AXIS,))


def check_tensor_parallel_size(tp) -> None:
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError naming what does not split evenly over `tp` devices."""
    check_tensor_parallel_size(tp)
    for what, n in (("query heads", cfg.num_heads), ("kv heads", cfg.num_kv_heads),
                    ("MLP columns (intermediate_size)", cfg.intermediate_size)):
        if n % tp:
            raise ValueError(f"tensor_parallel_size={tp} does not divide the model's {n} {what}")


def local_layout(layout: KVPageLayout, tp: int) -> KVPageLayout:
    """The page layout of one device of the group: its own kv heads."""
    return dataclasses.replace(layout, num_kv_heads=layout.num_kv_heads // tp)


def _quant_specs(lin: QuantLinear, name: str, tp: int) -> dict[str, P]:
    """Partition specs of one stacked QuantLinear's arrays ([L, ...] each; a bias is [L, N])."""
    k_values = 1 + lin.axis                  # values: [L, K', N] (axis 0) or [L, N, K'] (axis 1)
    n_values = 2 - lin.axis
    # Scales and zero points keep the values' axis order, except int4_fp8's group scales [L, K/g, N].
    k_scales, n_scales = (1, 2) if lin.fmt == "int4_fp8" else (k_values, n_values)
    specs = {}
    for key in ("values", "scales", "zeros", "bias"):
        if getattr(lin, key) is None:
            continue
        shape = getattr(lin, key)[...].shape
        k_dim, n_dim = {"values": (k_values, n_values), "bias": (None, 1)}.get(key, (k_scales, n_scales))
        spec = [None] * len(shape)
        if name in COLUMN_PARALLEL:
            spec[n_dim] = TP_AXIS
        elif key == "bias":
            pass                             # row-parallel bias: replicated (refused when tp > 1)
        elif key == "values" or shape[k_dim] > 1:   # per-channel scales (one row) are replicated
            if shape[k_dim] % tp:
                raise ValueError(f"{name}: its {lin.fmt} {key} have {shape[k_dim]} rows along the input, which "
                                 f"do not split over tensor_parallel_size={tp} (each device needs whole "
                                 f"groups of {lin.group_size})")
            spec[k_dim] = TP_AXIS
        elif lin.group_size is not None and tp > 1:
            raise ValueError(f"{name}: one {lin.fmt} group of {lin.group_size} spans its whole input, so it "
                             f"cannot split over tensor_parallel_size={tp}")
        specs[key] = P(*spec)
    return specs


def partition_specs(model: nnx.Module, state: nnx.State, tp: int) -> nnx.State:
    """PartitionSpecs for `nnx.split(model)`'s state, laid out over a mesh axis of `tp` devices
    (the module docstring says which array splits where)."""
    quant = {}
    for name in COLUMN_PARALLEL + ROW_PARALLEL:
        lin = getattr(model.layers, name)
        if name in ROW_PARALLEL and tp > 1 and getattr(lin, "bias", None) is not None:
            raise ValueError(f"{name} has a bias; a row-parallel bias would be summed tp times")
        if isinstance(lin, QuantLinear):
            quant[name] = _quant_specs(lin, name, tp)

    def spec(path, leaf) -> P:
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        keys = [k for k in keys if k not in (None, "value")]
        if keys[:2] == ["layers", "k_rope_scale"]:   # [L, Hkv * D], per kv head
            return P(None, TP_AXIS)
        if len(keys) < 3 or keys[0] != "layers":
            return P()
        name, param = keys[1], keys[2]
        if name in quant:
            return quant[name][param]
        if name in COLUMN_PARALLEL:          # kernel [L, in, out], bias [L, out]
            return P(None, None, TP_AXIS) if param == "kernel" else P(None, TP_AXIS)
        if name in ROW_PARALLEL:
            return P(None, TP_AXIS, None)
        return P()

    return jax.tree_util.tree_map_with_path(spec, state)


def shard_model(model: nnx.Module, mesh: Mesh) -> None:
    """Place the model's own variables over `mesh` (in place): the whole copy it was loaded as, on
    one device, is then freed, and `shard_state` finds every variable already placed (no copy)."""
    _, sharded, _ = shard_state(model, mesh)
    nnx.update(model, sharded)


def shard_state(model: nnx.Module, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Split `model` and place its state over `mesh` (tensor parallel over its one axis): returns
    the graphdef, the sharded state and the state's PartitionSpecs (for `shard_map`)."""
    tp = mesh.devices.size
    check_tensor_parallel(model.config, tp)
    graphdef, state = nnx.split(model)
    specs = partition_specs(model, state, tp)
    sharded = jax.tree_util.tree_map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), state, specs)
    return graphdef, sharded, specs
