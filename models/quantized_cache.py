"""Quantized models cached on disk, so a restart skips calibration and quantization.

An entry is a `models.checkpoint` directory (checksummed, verified on every load) named by a key
over everything that decides the quantized weights: the checkpoint's content (sha256 of its files),
the precision preset, the compute dtype, the calibration sample count and text, and this module's
format version. A missing entry is built and written atomically; a corrupt or unreadable one is
removed and built again, never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

from models.checkpoint import load_quantized, save_quantized
from models.errors import CheckpointError
from models.loaded_model import LoadedModel
from models.precision import PrecisionPreset

log = logging.getLogger("fineserve.models")

CACHE_FORMAT = 1  # bump when quantization or calibration changes what a preset produces
_CHUNK = 1 << 20


def content_digest(path: Path) -> str:
    """sha256 over a checkpoint's content: the file, or every file under the directory (by relative
    path, in sorted order)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def cache_key(checkpoint: Path, preset: PrecisionPreset, dtype: str, calib_samples: int, calib_text: Path) -> str:
    parts = {"format": CACHE_FORMAT, "checkpoint": content_digest(checkpoint), "dtype": dtype,
             "preset": dataclasses.asdict(preset), "calib_samples": calib_samples,
             "calib_text": content_digest(calib_text)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cached_quantized_model(cache_dir: Path, key: str, name: str, preset: PrecisionPreset, dtype,
                           build: Callable[[], LoadedModel]) -> LoadedModel:
    """The cached entry `key` under `cache_dir` as a LoadedModel named `name`, or `build()` written
    there first. An entry that fails verification, or holds another preset, is rebuilt."""
    entry = Path(cache_dir).expanduser() / key
    if entry.is_dir():
        try:
            loaded = load_quantized(entry, dtype, name=name)
            if loaded.precision == preset:
                log.info("%s: quantized weights from the cache (%s)", name, entry)
                return loaded
            log.warning("%s: cache entry %s holds preset %s, not %s; rebuilding it", name, entry,
                        loaded.precision.name, preset.name)
        except CheckpointError as e:
            log.warning("%s: cache entry %s is unusable (%s); rebuilding it", name, entry, e)
        shutil.rmtree(entry, ignore_errors=True)
    loaded = build()
    try:
        save_quantized(loaded, entry)
    except (CheckpointError, OSError) as e:  # a full or read-only disk costs the cache, not the model
        log.warning("%s: could not cache the quantized weights in %s: %s", name, entry, e)
    return loaded
