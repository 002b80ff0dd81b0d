"""Quantized models cached on disk, so a restart skips calibration and quantization.

An entry is a `models.checkpoint` directory (checksummed, verified on every load) named by a key
over everything that decides the quantized weights: the checkpoint's content (sha256 of its files),
the precision preset, the compute dtype, the calibration sample count and text, and this module's
format version. A missing entry is built and written atomically; a corrupt or unreadable one is
removed and built again, never used. Hashing a large checkpoint takes a while, so the cache folder
remembers each digest against its files' paths, sizes and modification times (`.digests.json`).
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

CACHE_FORMAT = 3  # bump when quantization or calibration changes what a preset produces
_CHUNK = 1 << 20
DIGESTS_FILE = ".digests.json"


def _content_files(path: Path) -> list[tuple[str, Path]]:
    """(name, file) of a checkpoint's content: the file itself, or every file under the directory by
    relative path, in sorted order."""
    if path.is_file():
        return [(path.name, path)]
    return [(str(f.relative_to(path)), f) for f in sorted(p for p in path.rglob("*") if p.is_file())]


def content_digest(path: Path) -> str:
    """sha256 over a checkpoint's content (`_content_files`: each name, then the file's bytes)."""
    h = hashlib.sha256()
    for name, f in _content_files(path):
        h.update(name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _file_stamps(path: Path) -> list:
    """(name, size, mtime in ns) of every file whose bytes `content_digest` reads."""
    return [[name, (st := f.stat()).st_size, st.st_mtime_ns] for name, f in _content_files(path)]


def remembered_digest(path: Path, cache_dir: Path | None) -> str:
    """`content_digest(path)`, remembered in `cache_dir`/.digests.json against the files' paths, sizes
    and modification times: unchanged files are not read again. An unreadable memo is ignored."""
    if cache_dir is None:
        return content_digest(path)
    memo_file = Path(cache_dir).expanduser() / DIGESTS_FILE
    try:
        memo = json.loads(memo_file.read_text())
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        memo = {}
    where, stamps = str(path.resolve()), _file_stamps(path)
    known = memo.get(where)
    if isinstance(known, dict) and known.get("files") == stamps and isinstance(known.get("sha256"), str):
        return known["sha256"]
    digest = content_digest(path)
    memo[where] = {"files": stamps, "sha256": digest}
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_file)
    except OSError as e:  # a read-only cache costs the memo, not the load
        log.warning("could not remember the digest of %s in %s: %s", path, memo_file, e)
    return digest


def cache_key(checkpoint: Path, preset: PrecisionPreset, dtype: str, calib_samples: int, calib_text: Path,
              cache_dir: Path | None = None) -> str:
    """The entry name for these inputs; `cache_dir` (the cache folder) remembers file digests."""
    parts = {"format": CACHE_FORMAT, "checkpoint": remembered_digest(checkpoint, cache_dir), "dtype": dtype,
             "preset": dataclasses.asdict(preset), "calib_samples": calib_samples,
             "calib_text": remembered_digest(calib_text, cache_dir)}
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
