"""Save and load quantized models as a self-describing, checksummed directory.

`fineserve quantize` writes (and `load_quantized` / `load_model(dir)` read) a directory holding
`params/` (an Orbax checkpoint of the NNX `Param` state as a pure dict, each leaf in its own
dtype), the tokenizer files `Tokenizer.from_hf_dir` reads, `fineserve_model.json` (format version,
config, precision preset, each QuantLinear's format, every parameter's shape and dtype, every
file's size) and `checksums.sha256` (one line per other file; written last, so its presence marks
a complete checkpoint).

`load_quantized` verifies checksums, sizes, the format version and the metadata (against the config
and against Orbax's own array metadata) before restoring anything into an abstract model
(`models.weights.abstract_model`), then checks every restored leaf again. Every failure is a
`CheckpointError` naming the file and the problem. docs/models.md has the full layout and checks.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.errors import CheckpointError, ModelLoadError
from models.loaded_model import LoadedModel, parse_dtype
from models.precision import PRESETS, PrecisionPreset
from models.quant_linear import QuantLinear
from models.quantize import model_weight_bytes
from models.tokenizer import Tokenizer
from models.weights import LAYER_LINEARS, QuantSpec, abstract_model, kernel_shape
from pallas_kernels.quant_formats import stored_weight_arrays

FORMAT = "fineserve-quantized-model"
FORMAT_VERSION = 2  # 2: presets name their key scaling (post-RoPE factors are parameters)
METADATA_FILE = "fineserve_model.json"
CHECKSUM_FILE = "checksums.sha256"
PARAMS_DIR = "params"
_QUANT_PARTS = ("values", "scales", "zeros")


def is_quantized_checkpoint(path) -> bool:
    """True for a directory written by `save_quantized` (it holds fineserve_model.json)."""
    p = Path(path)
    return p.is_dir() and (p / METADATA_FILE).is_file()


# ---- helpers -------------------------------------------------------------------------------


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for key, v in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def _spec_str(shape, dtype) -> str:
    return f"{_dtype_name(dtype)}[{', '.join(str(int(s)) for s in shape)}]"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_under(root: Path) -> list[str]:
    """Relative POSIX paths of every regular file under root, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def write_checksums(root) -> None:
    """(Re)write checksums.sha256 over every other file under `root` (tests use it to craft
    self-consistent but mismatched checkpoints)."""
    root = Path(root)
    lines = [f"{_sha256(root / rel)}  {rel}\n" for rel in _files_under(root) if rel != CHECKSUM_FILE]
    (root / CHECKSUM_FILE).write_text("".join(lines), encoding="utf-8")


def _quant_linears(model) -> dict[str, QuantLinear]:
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, QuantLinear):
            out[".".join(str(p) for p in path)] = node
    return out


# ---- save ----------------------------------------------------------------------------------


def save_quantized(loaded, out_dir, *, overwrite: bool = False) -> Path:
    """Write `loaded` (a models.loaded_model.LoadedModel, quantized or not) to `out_dir` in the format
    above and return its path. The directory is written under a temporary name next to `out_dir`
    and renamed into place, so a failure leaves nothing behind. A non-empty `out_dir` is refused
    unless `overwrite`; even then only an existing fineserve checkpoint is replaced, never a
    directory holding anything else."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    replace = out.is_dir() and any(out.iterdir())
    if replace:
        if not overwrite:
            raise CheckpointError(f"{out} is not empty; use --force (overwrite=True) to replace it")
        if not is_quantized_checkpoint(out):
            raise CheckpointError(f"{out} is not empty and is not a fineserve checkpoint; "
                                  f"refusing to replace it even with --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.partial"
    tmp.mkdir()
    try:
        _write(loaded, tmp)
        if replace:
            old = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # replaces an empty directory, creates a missing one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(loaded, root: Path) -> None:
    import orbax.checkpoint as ocp  # local: a heavy import that adds a root log handler; only checkpoints use it

    model = loaded.model
    params = nnx.state(model, nnx.Param)
    if len(jax.tree.leaves(nnx.state(model))) != len(jax.tree.leaves(params)):
        raise CheckpointError("the model holds non-parameter state; only parameters can be saved")
    pure = nnx.to_pure_dict(params)
    flat = _flatten(pure)
    quant = {}
    for path, lin in _quant_linears(model).items():
        scope, _, name = path.rpartition(".")
        if scope != "layers" or name not in LAYER_LINEARS:
            raise CheckpointError(f"cannot save a QuantLinear at {path!r}: only the stacked layer "
                                  f"projections ({', '.join(LAYER_LINEARS)}) may be quantized")
        quant[path] = {"fmt": lin.fmt, "group_size": lin.group_size, "act_format": lin.act_format,
                       "axis": lin.axis}

    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(root / PARAMS_DIR, pure)
        ckptr.wait_until_finished()
    finally:
        ckptr.close()
    has_tokenizer = loaded.tokenizer is not None
    if has_tokenizer:
        loaded.tokenizer.save(root)
        _check_tokenizer_round_trip(loaded.tokenizer, Tokenizer.from_hf_dir(root))

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source_model": loaded.name,
        "dtype": _dtype_name(loaded.dtype),
        "config": loaded.config.to_dict(),
        "precision": dataclasses.asdict(loaded.precision),
        "quant_linears": quant,
        "eos_token_ids": list(loaded.eos_token_ids),
        "tokenizer": has_tokenizer,
        "weight_bytes": model_weight_bytes(model),
        "params": {k: {"shape": [int(s) for s in v.shape], "dtype": _dtype_name(v.dtype)}
                   for k, v in sorted(flat.items())},
        "files": {rel: (root / rel).stat().st_size for rel in _files_under(root)},
    }
    (root / METADATA_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    write_checksums(root)


def _check_tokenizer_round_trip(a: Tokenizer, b: Tokenizer) -> None:
    got = (b.bos_token_id, b.eos_token_ids, b.add_bos_token, b.chat_template, b.vocab_size)
    want = (a.bos_token_id, a.eos_token_ids, a.add_bos_token, a.chat_template, a.vocab_size)
    if got != want:
        raise CheckpointError(f"the saved tokenizer does not read back identically ({got} != {want})")


# ---- verify --------------------------------------------------------------------------------


def _read_checksums(root: Path) -> dict[str, str]:
    path = root / CHECKSUM_FILE
    if not path.is_file():
        raise CheckpointError(f"{root}: missing {CHECKSUM_FILE} (an incomplete or foreign checkpoint)")
    listed: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if (not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not rel
                or rel.startswith("/") or ".." in rel.split("/")):
            raise CheckpointError(f"{path}:{n}: malformed line {line!r}")
        listed[rel] = digest
    if METADATA_FILE not in listed:
        raise CheckpointError(f"{path} does not list {METADATA_FILE}")
    return listed


def verify_checkpoint(root) -> dict:
    """Check every file against checksums.sha256 and the sizes in the metadata; return the
    parsed metadata. CheckpointError naming the file and the problem otherwise."""
    root = Path(root)
    listed = _read_checksums(root)
    for rel in listed:
        if not (root / rel).is_file():
            raise CheckpointError(f"{root}: missing file {rel} (listed in {CHECKSUM_FILE})")
    meta_path = root / METADATA_FILE
    if _sha256(meta_path) != listed[METADATA_FILE]:
        raise CheckpointError(f"{meta_path}: checksum mismatch (the metadata is corrupt or was edited)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a {FORMAT} metadata file")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: unsupported format version {version!r} "
                              f"(this fineserve reads version {FORMAT_VERSION})")
    sizes = meta.get("files")
    if not isinstance(sizes, dict):
        raise CheckpointError(f"{meta_path}: no 'files' table")
    others = set(listed) - {METADATA_FILE}
    if set(sizes) != others:
        diff = sorted(set(sizes) ^ others)
        raise CheckpointError(f"{root}: {CHECKSUM_FILE} and {METADATA_FILE} disagree about file {diff[0]}")
    for rel in sorted(others):
        path = root / rel
        size, want = path.stat().st_size, sizes[rel]
        if size < want:
            raise CheckpointError(f"{path}: truncated file ({size} bytes, expected {want})")
        if size != want:
            raise CheckpointError(f"{path}: wrong size ({size} bytes, expected {want})")
        if _sha256(path) != listed[rel]:
            raise CheckpointError(f"{path}: checksum mismatch (corrupt file)")
    params = root / PARAMS_DIR
    if not params.is_dir():
        raise CheckpointError(f"{root}: missing {PARAMS_DIR}/ directory")
    for rel in _files_under(params):
        if f"{PARAMS_DIR}/{rel}" not in listed:
            raise CheckpointError(f"{params / rel}: unlisted parameter file (not in {CHECKSUM_FILE})")
    return meta


# ---- load ----------------------------------------------------------------------------------


def _field(meta: dict, key: str, kind, where: Path):
    value = meta.get(key)
    if not isinstance(value, kind):
        raise CheckpointError(f"{where}: field {key!r} is missing or malformed")
    return value


def _stored_specs(meta: dict, where: Path) -> dict[str, jax.ShapeDtypeStruct]:
    specs = {}
    for key, entry in _field(meta, "params", dict, where).items():
        try:
            specs[key] = jax.ShapeDtypeStruct(tuple(int(s) for s in entry["shape"]), jnp.dtype(entry["dtype"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: malformed params entry {key!r} ({e})") from None
    return specs


def _quant_specs(meta: dict, stored: dict[str, jax.ShapeDtypeStruct], config: ModelConfig,
                 where: Path) -> dict[str, QuantSpec]:
    """QuantSpecs of every QuantLinear, checked against the arrays the metadata lists."""
    out = {}
    for path, q in _field(meta, "quant_linears", dict, where).items():
        scope, _, name = path.rpartition(".")
        if scope != "layers" or name not in LAYER_LINEARS or not isinstance(q, dict):
            raise CheckpointError(f"{where}: unsupported quantized linear {path!r}")
        fmt, g, axis = q.get("fmt"), q.get("group_size"), q.get("axis", 0)
        parts = {p: stored.get(f"{path}.{p}") for p in _QUANT_PARTS}
        if parts["values"] is None or parts["scales"] is None:
            raise CheckpointError(f"{where}: {path} ({fmt}) lists no values/scales arrays")
        # What the format implies for the arrays ([L, ...] each): quant_formats owns the layouts.
        k, n = kernel_shape(config, name)
        try:
            arrays = stored_weight_arrays(fmt, k, n, g, axis)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: {path}: {e}") from None
        (values_shape, vdtype) = arrays["values"]
        want = {"values": (config.num_layers, *values_shape), "scales": (config.num_layers, *arrays["scales"])}
        if arrays["zeros"] is not None:
            want["zeros"] = (config.num_layers, *arrays["zeros"])
        for part in _QUANT_PARTS:
            got = parts[part]
            if part not in want:
                if got is not None:
                    raise CheckpointError(f"{where}: {path} is {fmt} but lists a {part} array")
                continue
            if got is None:
                raise CheckpointError(f"{where}: {path} ({fmt}) lists no {part} array")
            if tuple(got.shape) != want[part] or (part == "values" and _dtype_name(got.dtype) != vdtype):
                expect = _spec_str(want[part], vdtype) if part == "values" else f"shape {list(want[part])}"
                raise CheckpointError(f"{where}: metadata/param mismatch: {path} is {fmt} (group {g}) but "
                                      f"its {part} are {_spec_str(got.shape, got.dtype)} (expected {expect})")
        out[name] = QuantSpec(fmt, g, q.get("act_format"), parts["values"], parts["scales"], parts["zeros"], axis)
    return out


def load_quantized(path, dtype=None, *, name: str | None = None):
    """Load a checkpoint written by `save_quantized` as a models.loaded_model.LoadedModel with the stored
    precision preset. dtype: None keeps the stored model dtype; "bfloat16"/"float32" (or the jnp
    dtype) casts the float parameters (embedding, norms, float linears, biases; not quantized
    values or scales) to it. Raises CheckpointError (a ModelLoadError) naming the file and the
    problem; nothing half-loaded survives a failure."""
    try:
        return _load(Path(path), dtype, name)
    except BaseException:
        gc.collect()
        raise


def _load(root: Path, dtype, name):
    import orbax.checkpoint as ocp  # local: a heavy import that adds a root log handler; only checkpoints use it

    meta = verify_checkpoint(root)
    where = root / METADATA_FILE
    try:
        config = ModelConfig.from_dict(_field(meta, "config", dict, where))
    except ModelLoadError as e:
        raise CheckpointError(f"{where}: {e}") from None
    try:
        preset = PrecisionPreset(**_field(meta, "precision", dict, where))
    except TypeError as e:
        raise CheckpointError(f"{where}: malformed precision ({e})") from None
    if preset.name in PRESETS and PRESETS[preset.name] == preset:
        preset = PRESETS[preset.name]
    try:
        stored_dtype = parse_dtype(_field(meta, "dtype", str, where))
        target_dtype = stored_dtype if dtype is None else parse_dtype(dtype)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    stored = _stored_specs(meta, where)
    quant = _quant_specs(meta, stored, config, where)

    # What the metadata's config and QuantLinears imply, in the stored dtypes.
    abstract = abstract_model(config, target_dtype, quant, rotated_key_scale=preset.post_rope_key_scaling)
    graphdef, abs_state = nnx.split(abstract)
    implied = _flatten(nnx.to_pure_dict(abs_state))
    quantized_leaves = {f"layers.{m}.{p}" for m in quant for p in _QUANT_PARTS}
    castable = {k for k in implied if k not in quantized_leaves}
    for key in sorted(set(implied) | set(stored)):
        if key not in stored:
            raise CheckpointError(f"{where}: metadata/param mismatch: no parameter {key!r} listed")
        if key not in implied:
            raise CheckpointError(f"{where}: metadata/param mismatch: unexpected parameter {key!r}")
        want = implied[key]
        want_dtype = stored_dtype if key in castable else want.dtype
        if tuple(want.shape) != tuple(stored[key].shape) or jnp.dtype(want_dtype) != stored[key].dtype:
            raise CheckpointError(f"{where}: metadata/param mismatch: {key} is listed as "
                                  f"{_spec_str(stored[key].shape, stored[key].dtype)}, the config implies "
                                  f"{_spec_str(want.shape, want_dtype)}")

    # The Orbax checkpoint's own record of its arrays must agree with the metadata.
    params_dir = root / PARAMS_DIR
    ckptr = ocp.StandardCheckpointer()
    try:
        try:
            on_disk = _flatten(_tree_of(ckptr.metadata(params_dir)))
        except Exception as e:  # orbax/tensorstore raise many types on unreadable checkpoints
            raise CheckpointError(f"{params_dir}: cannot read the Orbax checkpoint metadata "
                                  f"({type(e).__name__}: {e})") from None
        problems = []
        for key in sorted(set(on_disk) | set(stored)):
            if key not in on_disk:
                problems.append(f"{METADATA_FILE} lists {key}, the parameter files do not hold it")
            elif key not in stored:
                problems.append(f"the parameter files hold {key}, which {METADATA_FILE} does not list")
            else:
                got = on_disk[key]
                if tuple(got.shape) != tuple(stored[key].shape) or jnp.dtype(got.dtype) != stored[key].dtype:
                    problems.append(f"{key} is {_spec_str(got.shape, got.dtype)} in the parameter files but "
                                    f"{_spec_str(stored[key].shape, stored[key].dtype)} in {METADATA_FILE}")
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise CheckpointError(f"{params_dir}: metadata/param mismatch: {'; '.join(problems[:3])}{more}")
    finally:
        ckptr.close()
    # Restored as host numpy arrays, then placed like every other loader's weights (uncommitted, on
    # the default device), so a restored model compiles to the same programs as an in-memory one.
    restore_args = _unflatten({k: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype)
                               for k, s in stored.items()})
    reader = ocp.PyTreeCheckpointer()
    try:
        restored = _flatten(reader.restore(params_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args)))
    except Exception as e:
        raise CheckpointError(f"{params_dir}: cannot restore parameters ({type(e).__name__}: {e})") from None
    finally:
        reader.close()
    arrays = {}
    for key, spec in stored.items():
        got = restored.pop(key, None)
        if got is None or tuple(got.shape) != tuple(spec.shape) or got.dtype != spec.dtype:
            raise CheckpointError(f"{params_dir}: restored {key} is "
                                  f"{'missing' if got is None else _spec_str(got.shape, got.dtype)}, "
                                  f"expected {_spec_str(spec.shape, spec.dtype)}")
        arrays[key] = jnp.asarray(got, dtype=target_dtype if key in castable else None)
        del got
    if restored:
        raise CheckpointError(f"{params_dir}: unexpected restored parameter {sorted(restored)[0]!r}")
    nnx.replace_by_pure_dict(abs_state, _unflatten(arrays))
    del arrays
    model = nnx.merge(graphdef, abs_state)

    tokenizer = None
    if meta.get("tokenizer"):
        tokenizer = Tokenizer.from_hf_dir(root)
    loaded = LoadedModel(name or str(root), config, model, tokenizer, target_dtype, preset)
    if list(loaded.eos_token_ids) != meta.get("eos_token_ids"):
        raise CheckpointError(f"{where}: EOS ids {meta.get('eos_token_ids')} do not match the config and "
                              f"tokenizer ({list(loaded.eos_token_ids)})")
    return loaded


def _tree_of(step_metadata):
    """The array-metadata tree from `StandardCheckpointer.metadata` (a StepMetadata in recent
    Orbax, the bare tree in older ones)."""
    item = getattr(step_metadata, "item_metadata", step_metadata)
    tree = getattr(item, "tree", item)
    if not isinstance(tree, dict):
        raise TypeError(f"unexpected Orbax metadata {type(tree).__name__}")
    return tree
