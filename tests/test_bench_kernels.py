"""scripts/bench_kernels.py --smoke and scripts/check_kernels_gpu.py --interpret run end to end on
the CPU (interpret mode): the benchmark's JSON holds together and the kernel check passes on a tiny
subset. The GPU runs (compiled "pallas", full shapes) are not exercised here.

Both scripts run in-process through `main(argv)` (one JAX start-up, shared compiles); each restores
the JAX settings it changes, and neither is given a persistent compilation cache (`--xla-cache ''`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("fast_cpu_compiles")   # compiling dominates these tests

ROOT = Path(__file__).resolve().parent.parent
KV_FORMATS = {"bf16", "fp8", "int8", "int4"}
MATMUL_FORMATS = {"w4a16", "w8a16", "w8a8", "fp8", "fp8_k_major", "fireq", "w4a8"}
TARGET_NAMES = {"decode_bw_bf16", "decode_bw_int8", "decode_bw_int4", "int4_kv_vs_bf16_kv",
                "w4a16_vs_bf16_small_m", "fp8_vs_bf16_large_m", "fireq_vs_w4a16_m16", "fireq_vs_bf16_large_m"}


def _script(name: str):
    """Load scripts/<name>.py from its path (scripts/ is not a package), once per session."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules[name]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_kernels_smoke(tmp_path, capsys):
    bench = _script("bench_kernels")
    out, md = tmp_path / "kernels.json", tmp_path / "kernels.md"
    assert bench.main(["--smoke", "--json", str(out), "--markdown", str(md), "--xla-cache", "", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "op " in printed and "Targets:" in printed
    doc = json.loads(out.read_text())
    for key in ("command", "date", "device", "jax", "rows", "targets", "copy_bandwidth", "shapes"):
        assert key in doc, key
    assert doc["smoke"] and doc["device"]["platform"] == "cpu" and doc["jax"]
    assert _positive(doc["copy_bandwidth"]["gbps"])

    rows = doc["rows"]
    assert not [r for r in rows if r["status"] == "error"], [r.get("error") for r in rows if r["status"] == "error"]
    ran = [r for r in rows if r["status"] == "ok"]
    for r in ran:
        for key in ("time_s", "time_s_min", "bytes", "gbps", "pct_copy_bw"):
            assert _positive(r[key]), (key, r)
        assert _positive(r["tflops"]) and r["calls"] >= 1 and r["repeats"] >= 1
        assert all(_positive(v) for v in r["speedups"].values()), r
        if "max_abs_diff_vs_xla" in r:  # interpret / jax-paged compared with the XLA reference
            assert r["max_abs_diff_vs_xla"] <= 1e-2 * max(1.0, r["max_abs_xla"]), r

    def formats(op, impl):
        return {r["format"] for r in ran if r["op"] == op and r["impl"] == impl}

    assert formats("decode", "xla") == formats("decode", "interpret") == KV_FORMATS
    assert formats("prefill", "xla") == formats("prefill", "interpret") == {"bf16", "int4", "int4_fp8"}
    assert formats("decode", "jax-paged") == {"bf16"}                    # the JAX op, interpreted
    assert formats("matmul", "xla") == formats("matmul", "interpret") == MATMUL_FORMATS
    assert formats("matmul", "xla-dot") == {"bf16"}
    # Ratios: kernel vs reference, quantized vs bf16, ours vs the JAX op.
    assert all("vs_xla" in r["speedups"] for r in ran if r["impl"] == "interpret")
    assert all("vs_bf16" in r["speedups"] for r in ran if r["format"] not in ("bf16",))
    assert all("vs_jax_paged" in r["speedups"] for r in ran
               if r["op"] == "decode" and r["format"] == "bf16" and r["impl"] != "jax-paged")
    # KV bytes: int4 pages (4-bit values + bf16 scale and zero per head) are the smallest, bf16 the largest.
    decode_bytes = {r["format"]: r["kv_bytes"] for r in ran if r["op"] == "decode" and r["impl"] == "xla"}
    assert decode_bytes["int4"] < decode_bytes["fp8"] == decode_bytes["int8"] < decode_bytes["bf16"]
    # Off the GPU "pallas" is not run; the targets are computed on interpret rows, for the record only.
    assert not [r for r in rows if r["impl"] == "pallas" and r["status"] != "skipped"]
    targets = {t["name"]: t for t in doc["targets"]}
    assert set(targets) == TARGET_NAMES
    assert all(t["met"] is None for t in targets.values())
    assert _positive(targets["int4_kv_vs_bf16_kv"]["value"]) and _positive(targets["decode_bw_int4"]["value"])
    assert targets["fp8_vs_bf16_large_m"]["value"] is None                # no M >= 1024 in the smoke set
    assert _positive(targets["fireq_vs_w4a16_m16"]["value"])              # interpreted M = 16 rows
    text = md.read_text()
    assert "## decode" in text and "## matmul" in text and "| target |" in text


def test_bench_kernels_sparse_smoke(tmp_path):
    """--ops sparse: dense and bbox-selected decode on one pool per format, with the selected row's
    KV bytes (every page's bounds + the budget's pages) against the dense row's; at 32-token pages
    (--tokens-per-page)."""
    bench = _script("bench_kernels")
    out = tmp_path / "sparse.json"
    assert bench.main(["--smoke", "--ops", "sparse", "--tokens-per-page", "32", "--json", str(out),
                       "--xla-cache", "", "--no-progress"]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["op"] == "sparse"]
    assert {(r["format"], r["impl"], r["shape"]["budget"]) for r in rows} == {
        (f, i, b) for f in ("bf16", "int4") for i in ("xla", "interpret") for b in (0, 64)}
    assert all(r["status"] == "ok" and r["shape"]["tokens_per_page"] == 32 for r in rows), rows
    for r in rows:
        if r["shape"]["budget"]:
            # 2 of 8 pages read, plus every page's bounds (144 B per kv head at head_dim 64) against a
            # page's K and V per kv head: int4 2304 B (values + bf16 scales and zeros), bf16 8192 B.
            share = (2 + 8 * 144 / {"int4": 2304, "bf16": 8192}[r["format"]]) / 8
            assert math.isclose(r["kv_read_share"], share), r
            assert _positive(r["speedups"]["vs_dense"])
        if r["impl"] == "interpret":
            assert r["max_abs_diff_vs_xla"] <= 1e-4 * max(1.0, r["max_abs_xla"]), r


def test_check_kernels_interpret(tmp_path, capsys):
    check = _script("check_kernels_gpu")
    out = tmp_path / "check.json"
    argv = ["--interpret", "--json", str(out), "--kv-formats", "int4,int4_fp8", "--gqa", "4",
            "--matmul-formats", "w4a8_g128", "--ms", "16"]
    assert check.main(argv) == 0, capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["implementation"] == "interpret" and doc["failed"] == 0
    cases = doc["cases"]
    assert len(cases) == doc["passed"] and all(c["passed"] for c in cases)
    kinds = {(c["kind"], c.get("q_dtype"), c.get("kernel_precision")) for c in cases}
    # Decode (no dot) and prefill (float32 and bfloat16 queries, bf16x3 dots; bfloat16 queries also at
    # the serving precision), the KV write, page selection (bounds, scores, sparse decode) and the matmul.
    assert kinds == {("decode", "float32", "default"), ("decode", "bfloat16", "default"),
                     ("prefill", "float32", "bf16x3"), ("prefill", "bfloat16", "bf16x3"),
                     ("prefill", "bfloat16", "default"), ("kv_write", "-", "-"), ("sparse", "float32", "-"),
                     ("matmul", None, None)}
    assert {c["kv_format"] for c in cases if c["kind"] == "sparse"} == {"int4", "int4_fp8"}
    assert all(0 <= c["err_over_tol"] <= 1 for c in cases)
    assert {c["kv_format"] for c in cases if c["kind"] == "prefill"} == {"int4", "int4_fp8"}
    # int4_fp8 prefill runs the Mosaic GPU FP8 kernel (T = 8, D = 64 here), int4 the Triton one.
    kernels = {(c["kv_format"], c["kernel"]) for c in cases if c["kind"] == "prefill"}
    assert kernels == {("int4_fp8", "mosaic_gpu"), ("int4", "triton")}, kernels
