"""The quantized-model cache: a second load of the same checkpoint and preset restores the calibrated
weights instead of quantizing again, bit for bit; other settings get their own entry; a corrupt
entry is rebuilt, never used."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
import pytest
from flax import nnx

import models.loader
from models.checkpoint import PARAMS_DIR
from models.loader import load_model
from tests.helpers import FIXTURES

LLAMA = str(FIXTURES / "llama")


def params(loaded) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(loaded.model)))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def assert_same(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k].view(np.uint8), pb[k].view(np.uint8)), k
    assert a.precision == b.precision and a.config == b.config


def entries(cache):
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("precision", ["w8a8", "fireq"])
def test_second_load_comes_from_the_cache(tmp_path, monkeypatch, precision):
    """fireq also caches its calibrated post-RoPE key scale factors."""
    cache = tmp_path / "cache"
    first = load_model(LLAMA, "float32", precision, calib_samples=2, quantized_cache=cache)
    assert len(entries(cache)) == 1
    plain = load_model(LLAMA, "float32", precision, calib_samples=2)     # no cache: the same weights
    assert_same(first, plain)
    if precision == "fireq":
        assert (np.asarray(first.model.layers.k_rope_scale[...]) < 1).any()
    with monkeypatch.context() as m:
        m.setattr(models.loader, "quantize_model", lambda *a, **k: pytest.fail("quantized again"))
        again = load_model(LLAMA, "float32", precision, calib_samples=2, quantized_cache=cache)
    assert_same(again, first)
    assert again.name == first.name == LLAMA and again.tokenizer is not None


def test_other_settings_get_their_own_entries(tmp_path):
    cache = tmp_path / "cache"
    load_model(LLAMA, "float32", "w8a8", calib_samples=2, quantized_cache=cache)
    load_model(LLAMA, "float32", "w8a8", calib_samples=1, quantized_cache=cache)
    load_model(LLAMA, "float32", "w8a8", kv_dtype="int8", calib_samples=2, quantized_cache=cache)
    load_model(LLAMA, "float32", "bf16", quantized_cache=cache)          # nothing to quantize: no entry
    assert len(entries(cache)) == 3


def test_a_corrupt_entry_is_rebuilt(tmp_path, caplog):
    cache = tmp_path / "cache"
    first = load_model(LLAMA, "float32", "w4a16", calib_samples=2, quantized_cache=cache)
    entry, = entries(cache)
    f = max((p for p in (entry / PARAMS_DIR).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="fineserve.models"):
        rebuilt = load_model(LLAMA, "float32", "w4a16", calib_samples=2, quantized_cache=cache)
    assert "unusable" in caplog.text and "checksum mismatch" in caplog.text
    assert_same(rebuilt, first)
    assert entries(cache) == [entry]
    assert_same(load_model(LLAMA, "float32", "w4a16", calib_samples=2, quantized_cache=cache), first)


def test_checkpoint_digests_are_remembered_until_a_file_changes(tmp_path, monkeypatch):
    """A large checkpoint is hashed once: the cache folder remembers its digest against the files'
    paths, sizes and modification times, and hashes again only when one of them changes."""
    import models.quantized_cache as qc

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "a.bin").write_bytes(b"x" * 1000)
    (ckpt / "b.json").write_text("{}")
    cache = tmp_path / "cache"
    first = qc.remembered_digest(ckpt, cache)
    assert first == qc.content_digest(ckpt) and (cache / qc.DIGESTS_FILE).is_file()
    reads = []
    real = qc.content_digest
    monkeypatch.setattr(qc, "content_digest", lambda p: reads.append(p) or real(p))
    assert qc.remembered_digest(ckpt, cache) == first and reads == []            # not read again
    stat = (ckpt / "a.bin").stat()
    (ckpt / "a.bin").write_bytes(b"y" * 1000)                                     # same size, new mtime
    os.utime(ckpt / "a.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))     # (a clock tick may be coarse)
    second = qc.remembered_digest(ckpt, cache)
    assert second != first and reads == [ckpt]
    (cache / qc.DIGESTS_FILE).write_text("not json")                              # a broken memo is ignored
    assert qc.remembered_digest(ckpt, cache) == second and len(reads) == 2
    assert qc.remembered_digest(ckpt, None) == second                            # no cache: always hashed
