"""Import pre-quantized checkpoints (AWQ, GPTQ, FP8, GGUF Q4_0/Q4_1/Q8_0) straight into our
quantized weight formats (`pallas_kernels.quant_formats.QuantizedTensor`), without a bf16 detour.

Every imported linear weight becomes a `QuantizedTensor` in kernel layout `[in, out]` (the
transpose of HF's `[out, in]`) reduced along `axis=0`: AWQ GEMM, GPTQ and GGUF Q4_0/Q4_1 as "int4"
(asymmetric, `w = (q - zero) * scale`), GGUF Q8_0 as group-wise "int8", FP8 as "fp8" with one scale
per output channel. docs/models.md tables each source's packing, scales and zero points. Arrays are
host numpy arrays; tensors not quantized in the checkpoint come back as float32 numpy arrays in HF
layout and naming, like the other loaders.

Not supported (each raises an error naming the tensor or option): act-order GPTQ (`desc_act`
with a permuted `g_idx`), GPTQ/AWQ bit widths other than 4, AWQ GEMV packing, block-wise or
group-wise FP8 scales, compressed-tensors integer formats.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import gguf
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from models.config import ModelConfig
from models.errors import ModelConfigError, WeightsError
from models.gguf_loader import (
    RawTensor,
    check_complete,
    check_tensor,
    config_from_gguf_metadata,
    expected_shapes,
    gguf_raw_tensors,
)
from models.hf_loader import safetensors_files
from pallas_kernels.quant_formats import QuantizedTensor

# AutoAWQ GEMM packing (awq/modules/linear/gemm.py, `WQLinear_GEMM.from_linear`):
#     for i in range(8): qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (4 * i)
# with order_map = [0, 2, 4, 6, 1, 3, 5, 7]: nibble i of a word holds logical output column
# AWQ_PACK_ORDER[i]. Unpacking (AutoAWQ awq/utils/packing_utils.py `reverse_awq_order`, vLLM
# awq_triton.py) reads the nibbles sequentially and gathers with AWQ_REVERSE_ORDER: logical column
# j lives in nibble AWQ_REVERSE_ORDER[j]. (The same order is used for qzeros.)
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)

GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")

_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SHIFTS = np.arange(8, dtype=np.uint32) * 4
_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
_E5M2 = np.dtype(ml_dtypes.float8_e5m2)
_FP8 = (_E4M3, _E5M2)


@dataclass(frozen=True)
class QuantInfo:
    """What a checkpoint's quantization config says: method "awq" | "gptq" | "fp8", bits, the
    int4 group size (-1: one group per input row; None for FP8), and for GPTQ the checkpoint
    format ("gptq" | "gptq_v2") and desc_act."""

    method: str
    bits: int
    group_size: int | None
    checkpoint_format: str | None = None
    desc_act: bool = False


def is_linear_weight(hf_name: str) -> bool:
    """True for the weights our model feeds to matmuls: attention/MLP projections and lm_head."""
    if hf_name == "lm_head.weight":
        return True
    parts = hf_name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in _LINEAR_MODULES


# ---- helpers -------------------------------------------------------------------------------


def _pack_u8_axis0(q: np.ndarray) -> np.ndarray:
    """numpy twin of `pack_int4(q, axis=0)` for unsigned q in [0, 15]: row 2i in the low nibble,
    row 2i+1 in the high nibble."""
    q = q.astype(np.uint8)
    return np.ascontiguousarray((q[0::2] & 0xF) | ((q[1::2] & 0xF) << 4))


def _int_words(a: Any, what: str, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype not in (np.int32, np.uint32):
        raise WeightsError(f"{name}: {what} must be int32 packed words, got dtype {a.dtype}")
    if a.ndim != 2:
        raise WeightsError(f"{name}: {what} must be 2-D, got shape {a.shape}")
    return a.view(np.uint32)


def _nibbles(words: np.ndarray, axis: int) -> np.ndarray:
    """Sequential nibbles of uint32 words: element 8j+i along `axis` is bits 4i..4i+3 of word j."""
    w = np.moveaxis(words, axis, -1)
    n = np.empty((*w.shape, 8), np.uint8)
    for i, shift in enumerate(_SHIFTS):  # one word-sized temporary at a time
        n[..., i] = (w >> shift) & 0xF
    return np.moveaxis(n.reshape(*w.shape[:-1], w.shape[-1] * 8), -1, axis)


def _is_float(dtype: np.dtype) -> bool:
    """float16/32/64 or bfloat16 (ml_dtypes); FP8 does not count (it is a quantized payload)."""
    return dtype.kind == "f" or dtype == np.dtype(ml_dtypes.bfloat16)


def _float_array(a: Any, what: str, name: str) -> np.ndarray:
    a = np.asarray(a)
    if not _is_float(a.dtype):
        raise WeightsError(f"{name}: {what} must be floating point, got dtype {a.dtype}")
    return a.astype(np.float32)


def _group(group_size: int | None, k: int, name: str) -> int:
    g = k if group_size in (None, -1) else int(group_size)
    if g <= 0 or k % g:
        raise WeightsError(f"{name}: input size {k} is not a multiple of group_size {group_size}")
    if k % 2:
        raise WeightsError(f"{name}: input size {k} must be even to pack int4 two per byte")
    return g


def _check_shape(a: np.ndarray, want: tuple[int, ...], what: str, name: str) -> None:
    if tuple(a.shape) != tuple(want):
        raise WeightsError(f"{name}: {what} has shape {tuple(a.shape)}, expected {tuple(want)}")


# ---- single-tensor converters --------------------------------------------------------------


def awq_to_quantized(qweight, qzeros, scales, group_size: int, *, bits: int = 4,
                     name: str = "AWQ tensor") -> QuantizedTensor:
    """AutoAWQ GEMM tensors -> int4 QuantizedTensor `[in, out]`.

    qweight int32 `[in, out/8]`, qzeros int32 `[in/g, out/8]` (8 nibbles per word along the OUTPUT
    axis in AWQ order, see AWQ_PACK_ORDER), scales float `[in/g, out]`; `w = (q - z) * s`.
    group_size -1/None means one group over the whole input axis.
    """
    if bits != 4:
        raise WeightsError(f"{name}: {bits}-bit AWQ is not supported (only 4-bit)")
    qw = _int_words(qweight, "qweight", name)
    qz = _int_words(qzeros, "qzeros", name)
    k, out = qw.shape[0], qw.shape[1] * 8
    g = _group(group_size, k, name)
    s = _float_array(scales, "scales", name)
    _check_shape(s, (k // g, out), "scales", name)
    _check_shape(qz, (k // g, out // 8), "qzeros", name)
    order = np.asarray(AWQ_REVERSE_ORDER)

    def unpack(words):  # [rows, out/8] -> [rows, out] in logical column order
        n = _nibbles(words, axis=1).reshape(words.shape[0], -1, 8)
        return n[:, :, order].reshape(words.shape[0], -1)

    q = unpack(qw)
    z = unpack(qz).astype(np.float32)
    return QuantizedTensor(_pack_u8_axis0(q), s, z, "int4", 0, g)


def gptq_to_quantized(qweight, qzeros, scales, g_idx, group_size: int,
                      checkpoint_format: str = "gptq", *, bits: int = 4,
                      name: str = "GPTQ tensor") -> QuantizedTensor:
    """AutoGPTQ / GPTQModel tensors -> int4 QuantizedTensor `[in, out]`.

    qweight int32 `[in/8, out]` packed along the INPUT axis (element 8j+i in bits 4i of word j),
    qzeros int32 `[in/g, out/8]` packed along the output axis (same sequential order), scales
    `[in/g, out]`. checkpoint_format "gptq" (v1) stores zero - 1 (AutoGPTQ `zeros -= 1` before
    packing, `zeros + 1` when unpacking); "gptq_v2" stores the zero itself. g_idx (may be None)
    must be the trivial `i // g`: act-order (desc_act) checkpoints raise WeightsError.
    """
    if bits != 4:
        raise WeightsError(f"{name}: {bits}-bit GPTQ is not supported (only 4-bit)")
    if checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
        raise ModelConfigError(f"unsupported GPTQ checkpoint_format {checkpoint_format!r}; "
                               f"supported: {', '.join(GPTQ_CHECKPOINT_FORMATS)}")
    qw = _int_words(qweight, "qweight", name)
    qz = _int_words(qzeros, "qzeros", name)
    k, out = qw.shape[0] * 8, qw.shape[1]
    g = _group(group_size, k, name)
    s = _float_array(scales, "scales", name)
    _check_shape(s, (k // g, out), "scales", name)
    if out % 8:
        raise WeightsError(f"{name}: output size {out} must be a multiple of 8 (packed qzeros)")
    _check_shape(qz, (k // g, out // 8), "qzeros", name)
    if g_idx is not None:
        gi = np.asarray(g_idx)
        _check_shape(gi, (k,), "g_idx", name)
        if not np.array_equal(gi.astype(np.int64), np.arange(k) // g):
            raise WeightsError(f"{name}: act-order GPTQ (desc_act=True, permuted g_idx) is not "
                               f"supported; re-quantize with desc_act=False")
    q = _nibbles(qw, axis=0)
    z = _nibbles(qz, axis=1).astype(np.float32)
    if checkpoint_format == "gptq":
        z += 1.0
    return QuantizedTensor(_pack_u8_axis0(q), s, z, "int4", 0, g)


def fp8_to_quantized(weight, weight_scale, *, name: str = "FP8 tensor") -> QuantizedTensor:
    """float8_e4m3fn weight `[out, in]` with a per-tensor (scalar/`[1]`) or per-channel
    (`[out]`/`[out, 1]`) `weight_scale` -> fp8 QuantizedTensor `[in, out]`, scales `[1, out]`.
    Block-wise scales (2-D `[out/b, in/b]`, e.g. HF "fp8" `weight_scale_inv`) raise WeightsError."""
    w = np.asarray(weight)
    if w.dtype != np.dtype(_E4M3):
        raise WeightsError(f"{name}: FP8 weight must be float8_e4m3fn, got dtype {w.dtype}")
    if w.ndim != 2:
        raise WeightsError(f"{name}: FP8 weight must be 2-D [out, in], got shape {w.shape}")
    out = w.shape[0]
    s = _float_array(weight_scale, "weight_scale", name)
    if s.size == 1:
        scales = np.full((1, out), s.reshape(()), np.float32)
    elif s.shape in ((out,), (out, 1)):
        scales = s.reshape(1, out)
    elif s.ndim == 2:
        raise WeightsError(f"{name}: block-wise FP8 not supported (weight_scale shape {s.shape} "
                           f"for a weight of shape {w.shape}); only per-tensor or per-channel scales")
    else:
        raise WeightsError(f"{name}: weight_scale has shape {s.shape}; expected a scalar, "
                           f"({out},) or ({out}, 1)")
    return QuantizedTensor(np.ascontiguousarray(w.T), np.ascontiguousarray(scales), None, "fp8", 0)


# ---- GGUF ----------------------------------------------------------------------------------


def _gguf_blocks(raw: RawTensor, type_size: int, name: str) -> np.ndarray:
    data = np.asarray(raw.data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] % type_size:
        raise WeightsError(f"{name}: raw {raw.qtype.name} data must be 2-D uint8 rows of whole "
                           f"{type_size}-byte blocks, got {data.dtype} {data.shape}")
    return data.reshape(data.shape[0], data.shape[1] // type_size, type_size)


def _f16_field(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at bytes [start, start+2) of every block -> float32 `[rows, n_blocks]`."""
    return np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16)[..., 0].astype(np.float32)


def _q4_nibbles(qs: np.ndarray) -> np.ndarray:
    """llama.cpp Q4 block nibbles `[rows, nb, 16]` -> q `[rows, nb * 32]`: element j < 16 is the low
    nibble of byte j, element j + 16 its high nibble."""
    q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)
    return q.reshape(qs.shape[0], -1)


def gguf_block_to_quantized(raw: RawTensor, *, name: str = "GGUF tensor") -> QuantizedTensor:
    """Raw GGUF Q4_0 / Q4_1 / Q8_0 rows (HF `[out, in]`, 32-wide blocks along `in`) -> a
    QuantizedTensor in kernel layout `[in, out]` (formats tabled in docs/models.md)."""
    Q = gguf.GGMLQuantizationType
    qtype = raw.qtype
    if qtype == Q.Q4_0:  # f16 d, 16 bytes of nibbles; x = (q - 8) * d
        b = _gguf_blocks(raw, 18, name)
        d = _f16_field(b, 0)
        q = _q4_nibbles(b[..., 2:])
        return QuantizedTensor(_pack_u8_axis0(q.T), np.ascontiguousarray(d.T),
                               np.full((d.shape[1], d.shape[0]), 8.0, np.float32), "int4", 0, 32)
    if qtype == Q.Q4_1:  # f16 d, f16 m, 16 bytes of nibbles; x = q * d + m
        b = _gguf_blocks(raw, 20, name)
        d, m = _f16_field(b, 0), _f16_field(b, 2)
        q = _q4_nibbles(b[..., 4:]).reshape(b.shape[0], b.shape[1], 32)
        flat = d == 0
        scale = np.where(flat, np.float32(1), d)  # float32
        zero = np.where(flat, -m, -m / scale)
        # A d == 0 block is the constant m whatever its nibbles: q = 0, scale 1, zero -m is exact.
        q = np.where(flat[..., None], 0, q).reshape(b.shape[0], -1)
        return QuantizedTensor(_pack_u8_axis0(q.T), np.ascontiguousarray(scale.T),
                               np.ascontiguousarray(zero.T), "int4", 0, 32)
    if qtype == Q.Q8_0:  # f16 d, 32 int8; x = q * d
        b = _gguf_blocks(raw, 34, name)
        d = _f16_field(b, 0)
        q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(b.shape[0], -1)
        return QuantizedTensor(np.ascontiguousarray(q.T), np.ascontiguousarray(d.T), None, "int8", 0, 32)
    raise WeightsError(f"{name}: GGUF type {getattr(qtype, 'name', qtype)} has no direct quantized "
                       f"import (supported: Q4_0, Q4_1, Q8_0)")


_DIRECT_GGUF_TYPES = (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
                      gguf.GGMLQuantizationType.Q8_0)


def gguf_quantized_tensors(reader, config: ModelConfig | None = None
                           ) -> dict[str, QuantizedTensor | np.ndarray]:
    """HF name -> QuantizedTensor (kernel layout) for every Q4_0/Q4_1/Q8_0 linear weight
    (attention/MLP projections, lm_head), float32 HF-layout arrays for everything else (the token
    embedding always: it is a gather, not a matmul). Q/K rows are un-permuted (by
    `gguf_raw_tensors`, on the raw block rows). Raises WeightsError for unexpected, mis-shaped,
    unsupported-type or missing tensors."""
    config = config or config_from_gguf_metadata(reader)
    shapes = expected_shapes(config)
    direct = _DIRECT_GGUF_TYPES
    out: dict[str, QuantizedTensor | np.ndarray] = {}
    for name, raw in gguf_raw_tensors(reader, config).items():
        check_tensor(name, raw.shape, shapes, config)
        if raw.qtype in direct and is_linear_weight(name):
            out[name] = gguf_block_to_quantized(raw, name=name)
            continue
        # Same dequantization as models.gguf_loader.iter_gguf_tensors; the rows were already
        # un-permuted, which commutes with the row-wise dequantization.
        try:
            w = gguf.quants.dequantize(raw.data, raw.qtype)
        except NotImplementedError:
            raise WeightsError(f"tensor {name!r}: unsupported GGUF tensor type {raw.qtype.name}") from None
        out[name] = np.asarray(w, dtype=np.float32)
    check_complete(out, shapes)
    return out


# ---- HF checkpoints ------------------------------------------------------------------------

# safetensors dtypes its numpy reader cannot produce (numpy has no fp8); read from the raw bytes.
_RAW_DTYPES = {"F8_E4M3": _E4M3, "F8_E5M2": _E5M2}


def _read_raw_tensors(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Read `names` from a safetensors file by parsing its header (for FP8 dtypes)."""
    out = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        for name in names:
            meta = header[name]
            dtype = _RAW_DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            begin, end = meta["data_offsets"]
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise WeightsError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
            f.seek(base + begin)
            buf = f.read(end - begin)
            if len(buf) != end - begin:
                raise WeightsError(f"{path}: truncated data for tensor {name!r}")
            out[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return out


def _read_checkpoint_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint (single file or sharded, as models.hf_loader finds them),
    in its stored dtype (bf16 as ml_dtypes.bfloat16, FP8 as float8_e4m3fn)."""
    tensors: dict[str, np.ndarray] = {}
    for path in safetensors_files(model_dir):
        try:
            raw = []
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():
                    if f.get_slice(name).get_dtype() in _RAW_DTYPES:
                        raw.append(name)
                    else:
                        tensors[name] = f.get_tensor(name)
            tensors.update(_read_raw_tensors(path, raw))
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise WeightsError(f"cannot read weights from {path}: {e}") from None
    return tensors


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path} must hold a JSON object")
    return data


def _int_option(qcfg: Mapping, keys: tuple[str, ...], default: int, method: str) -> int:
    for key in keys:
        if key in qcfg and qcfg[key] is not None:
            value = qcfg[key]
            if not isinstance(value, int) or isinstance(value, bool):
                raise ModelConfigError(f"{method} quantization_config.{key} must be an integer, got {value!r}")
            return value
    return default


def parse_quantization_config(qcfg: Mapping) -> QuantInfo:
    """QuantInfo from an HF `quantization_config` (or AutoGPTQ/AutoAWQ quantize_config) dict;
    ModelConfigError naming the unsupported method or option."""
    if not isinstance(qcfg, Mapping):
        raise ModelConfigError("quantization_config must be a JSON object")
    method = str(qcfg.get("quant_method", "")).lower()
    if method == "awq":
        bits = _int_option(qcfg, ("bits", "w_bit"), 4, "AWQ")
        if bits != 4:
            raise ModelConfigError(f"AWQ quantization_config.bits = {bits} is not supported (only 4-bit)")
        version = str(qcfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise ModelConfigError(f"AWQ quantization_config.version = {version!r} is not supported "
                                   f"(only 'gemm' packing; 'gemv' checkpoints use another layout)")
        if qcfg.get("zero_point", True) is False:
            raise ModelConfigError("AWQ quantization_config.zero_point = false is not supported")
        return QuantInfo("awq", 4, _int_option(qcfg, ("group_size", "q_group_size"), 128, "AWQ"))
    if method == "gptq":
        bits = _int_option(qcfg, ("bits",), 4, "GPTQ")
        if bits != 4:
            raise ModelConfigError(f"GPTQ quantization_config.bits = {bits} is not supported (only 4-bit)")
        fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()
        if fmt not in GPTQ_CHECKPOINT_FORMATS:
            raise ModelConfigError(f"GPTQ quantization_config.checkpoint_format = {fmt!r} is not "
                                   f"supported; supported: {', '.join(GPTQ_CHECKPOINT_FORMATS)}")
        return QuantInfo("gptq", 4, _int_option(qcfg, ("group_size",), 128, "GPTQ"), fmt,
                         desc_act=bool(qcfg.get("desc_act", False)))
    if method == "compressed-tensors":
        fmt = qcfg.get("format")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise ModelConfigError(f"compressed-tensors quantization_config.format = {fmt!r} is not "
                                   f"supported (only FP8 'float-quantized')")
        groups = qcfg.get("config_groups") or {}
        if not isinstance(groups, Mapping) or not groups:
            raise ModelConfigError("compressed-tensors quantization_config has no config_groups")
        for gname, group in groups.items():
            w = (group or {}).get("weights") or {}
            if w.get("type") != "float" or w.get("num_bits") != 8:
                raise ModelConfigError(
                    f"compressed-tensors config_groups.{gname}.weights (type {w.get('type')!r}, "
                    f"num_bits {w.get('num_bits')!r}) is not supported (only 8-bit float)")
            strategy = w.get("strategy", "tensor")
            if strategy in ("block", "group", "tensor_group"):
                raise ModelConfigError(f"compressed-tensors config_groups.{gname}.weights.strategy = "
                                       f"{strategy!r}: block-wise FP8 not supported")
            if strategy not in ("tensor", "channel"):
                raise ModelConfigError(f"compressed-tensors config_groups.{gname}.weights.strategy = "
                                       f"{strategy!r} is not supported (tensor or channel)")
        return QuantInfo("fp8", 8, None)
    if method == "fp8":
        if qcfg.get("weight_block_size"):
            raise ModelConfigError(f"fp8 quantization_config.weight_block_size = "
                                   f"{qcfg.get('weight_block_size')!r}: block-wise FP8 not supported")
        return QuantInfo("fp8", 8, None)
    raise ModelConfigError(f"unsupported quantization_config.quant_method {qcfg.get('quant_method')!r}; "
                           f"supported: awq, gptq, compressed-tensors (fp8), fp8")


def _quantization_config(model_dir: Path, config: dict) -> Mapping:
    qcfg = config.get("quantization_config")
    if qcfg is not None:
        return qcfg
    # Older AutoGPTQ / AutoAWQ exports keep it in a side file.
    for side, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        path = model_dir / side
        if path.is_file():
            data = _load_json(path)
            data.setdefault("quant_method", method)
            return data
    raise ModelConfigError(f"{model_dir / 'config.json'} has no quantization_config "
                           f"(not a pre-quantized checkpoint)")


def _need(tensors: Mapping[str, np.ndarray], name: str, module: str) -> np.ndarray:
    if name not in tensors:
        raise WeightsError(f"quantized module {module!r} is missing tensor {name!r}")
    return tensors[name]


def read_hf_quantized(path) -> tuple[dict[str, QuantizedTensor | np.ndarray], QuantInfo]:
    """Read a pre-quantized HF checkpoint directory (AWQ GEMM, GPTQ v1/v2, FP8 compressed-tensors
    or AutoFP8) into HF-named tensors: each quantized linear `X.weight` as a QuantizedTensor in
    kernel layout `[in, out]`, every other tensor as float32 numpy in HF layout.

    Validated against the config's expected tensor names and shapes (missing or mis-shaped ->
    WeightsError); unsupported methods/options -> ModelConfigError."""
    model_dir = Path(path)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelConfigError(f"{model_dir} has no config.json")
    raw_cfg = _load_json(cfg_path)
    config = ModelConfig.from_hf_dict(raw_cfg)
    info = parse_quantization_config(_quantization_config(model_dir, raw_cfg))
    tensors = _read_checkpoint_tensors(model_dir)

    out: dict[str, QuantizedTensor | np.ndarray] = {}
    used: set[str] = set()
    if info.method in ("awq", "gptq"):
        for name in sorted(n for n in tensors if n.endswith(".qweight")):
            module = name[: -len(".qweight")]
            qz_name, s_name = module + ".qzeros", module + ".scales"
            qweight = tensors[name]
            qzeros, scales = _need(tensors, qz_name, module), _need(tensors, s_name, module)
            used.update((name, qz_name, s_name))
            if info.method == "awq":
                qt = awq_to_quantized(qweight, qzeros, scales, info.group_size, name=module)
            else:
                g_name = module + ".g_idx"
                g_idx = tensors.get(g_name)
                if g_idx is None and info.desc_act:
                    raise WeightsError(f"{module}: act-order GPTQ (desc_act=True) is not supported "
                                       f"(and the checkpoint has no {g_name!r} to prove otherwise)")
                used.add(g_name)
                qt = gptq_to_quantized(qweight, qzeros, scales, g_idx, info.group_size,
                                       info.checkpoint_format, name=module)
            if module + ".weight" in tensors:
                raise WeightsError(f"module {module!r} has both a quantized qweight and a float weight")
            out[module + ".weight"] = qt
    else:
        for name in sorted(n for n in tensors if tensors[n].dtype in _FP8 and n.endswith(".weight")):
            module = name[: -len(".weight")]
            if module + ".weight_scale_inv" in tensors:
                raise WeightsError(f"{module}: block-wise FP8 not supported (weight_scale_inv)")
            s_name = module + ".weight_scale"
            scale = _need(tensors, s_name, module)
            used.update((name, s_name))
            zp_name = module + ".weight_zero_point"
            if zp_name in tensors:
                if np.any(np.asarray(tensors[zp_name]).astype(np.float32) != 0):
                    raise WeightsError(f"{module}: asymmetric FP8 (non-zero weight_zero_point) is not supported")
                used.add(zp_name)
            out[name] = fp8_to_quantized(tensors[name], scale, name=module)

    for name, arr in tensors.items():
        if name in used:
            continue
        if not _is_float(arr.dtype):
            raise WeightsError(f"unexpected {arr.dtype} tensor {name!r} in a {info.method} checkpoint "
                               f"(no matching quantized module)")
        out[name] = np.asarray(arr, dtype=np.float32)

    _validate_against_config(out, config, model_dir)
    return out, info


def _hf_shape(t: QuantizedTensor | np.ndarray) -> tuple[int, ...]:
    return tuple(reversed(t.shape)) if isinstance(t, QuantizedTensor) else tuple(t.shape)


def _validate_against_config(weights: Mapping, config: ModelConfig, where: Path) -> None:
    shapes = expected_shapes(config)
    missing = [n for n in shapes if n not in weights]
    if missing:
        raise WeightsError(f"{where}: missing tensor {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name, want in shapes.items():
        got = _hf_shape(weights[name])
        if got != want:
            raise WeightsError(f"{where}: tensor {name!r} has (HF-layout) shape {got}, expected {want}")
