"""Where the restart caches live and how the XLA compilation cache is switched on."""

from __future__ import annotations

import jax
import pytest

from fineserve_jax.caches import RUNTIME_CACHE_ENV, Caches
from fineserve_jax.serve import build_parser
from fineserve_jax.serve import main as serve_main

XLA_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture
def jax_settings():
    saved = {name: getattr(jax.config, name) for name in XLA_SETTINGS}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_the_cache_folder_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(RUNTIME_CACHE_ENV, str(tmp_path / "rt"))
    caches = Caches.default()
    assert (caches.quantized, caches.xla) == (tmp_path / "rt" / "quantized", tmp_path / "rt" / "xla")
    monkeypatch.delenv(RUNTIME_CACHE_ENV)
    monkeypatch.setenv("FINESERVE_CACHE", str(tmp_path / "models-home"))
    assert Caches.default().root == tmp_path / "models-home" / "runtime"
    assert Caches(None).quantized is None and Caches(None).xla is None


def test_compilation_cache_is_switched_on_unless_jax_was_told(tmp_path, monkeypatch, jax_settings):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "theirs"))
    before = jax.config.jax_compilation_cache_dir
    Caches(tmp_path / "ours").enable_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == before   # JAX's own variable wins
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    Caches(None).enable_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == before   # caching off: untouched
    Caches(tmp_path / "ours").enable_compilation_cache()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "ours" / "xla")
    assert (tmp_path / "ours" / "xla").is_dir()
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0


def test_serve_cache_and_memory_flags(capsys):
    args = build_parser().parse_args(["--cache-dir", "/tmp/x", "--no-cache", "--gpu-memory-utilization", "0.9"])
    assert args.cache_dir == "/tmp/x" and args.no_cache and args.gpu_memory_utilization == 0.9
    defaults = build_parser().parse_args([])
    assert not defaults.no_cache and defaults.gpu_memory_utilization is None
    assert serve_main(["--gpu-memory-utilization", "1.5"]) == 2
    assert "gpu_memory_utilization must be a fraction in (0, 1]" in capsys.readouterr().err
