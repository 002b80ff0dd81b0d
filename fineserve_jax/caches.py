"""What makes a restart fast: XLA's persistent compilation cache (warm-up compiles nothing it has
compiled before) and the quantized-model cache (loading skips calibration), both under one folder:
`$FINESERVE_RUNTIME_CACHE`, else `runtime/` in the model cache (`$FINESERVE_CACHE`, default
~/.cache/fineserve-jax). `fineserve serve` uses them unless `--no-cache`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import jax

from models.loader import model_cache_dir

RUNTIME_CACHE_ENV = "FINESERVE_RUNTIME_CACHE"


@dataclass(frozen=True)
class Caches:
    root: Path | None  # None: no caching

    @classmethod
    def from_flags(cls, no_cache: bool, cache_dir: str | None = None) -> Caches:
        """What `--no-cache` and `--cache-dir` ask for (neither: the default folder)."""
        if no_cache:
            return cls(None)
        return cls(Path(cache_dir)) if cache_dir else cls.default()

    @classmethod
    def default(cls) -> Caches:
        root = os.environ.get(RUNTIME_CACHE_ENV)
        return cls(Path(root) if root else model_cache_dir().parent / "runtime")

    @property
    def quantized(self) -> Path | None:
        return None if self.root is None else self.root / "quantized"

    @property
    def xla(self) -> Path | None:
        return None if self.root is None else self.root / "xla"

    def enable_compilation_cache(self) -> None:
        """Every compiled program goes to (and comes from) the XLA cache folder, unless JAX was told
        where its cache is by its own environment variable (which wins)."""
        if self.xla is None or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            return
        self.xla.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(self.xla))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
