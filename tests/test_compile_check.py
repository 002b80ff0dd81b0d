"""Every kernel lowers for an H100 and compiles to sm_90a on this CPU machine, without spilling
registers at the benchmark shapes (the fast subset: every kernel, each KV format and matmul kernel
family at least once; the full table is `python -m pallas_kernels.compile_check`, recorded in
benchmarks/RESULTS.md)."""

from __future__ import annotations

import pytest

from pallas_kernels.compile_check import (BF16_X3, cases, check, decode_case, matmul_case, prefill_case, spilling,
                                          sparse_decode_case)


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sm90a")
    return [check(case, workdir) for case in cases("fast")]


def test_every_kernel_compiles_for_sm90a_without_spills(fast):
    assert len(fast) == 21 and {r["op"] for r in fast} == {"decode", "sparse_decode", "prefill", "kv_write",
                                                           "kv_bounds", "matmul"}
    assert [r["case"] for r in fast if "error" in r] == []
    assert spilling(fast) == []
    for r in fast:
        for k in r["kernels"]:
            if k.get("backend") == "mosaic_gpu":   # compiled to PTX only by a CUDA jaxlib: no figures
                continue
            assert 0 < k["registers"] <= 255 and 0 < k["occupancy"] <= 1, (r["case"], k)
            assert k["widest_global_load_bits"] >= 16, (r["case"], k)


def test_tensor_core_use(fast):
    """Prefill's dots run on Hopper's wgmma; decode has no dot (a matrix-vector product per head)."""
    mma = {r["case"]: {k["mma"] for k in r["kernels"]} for r in fast}
    assert all(mma[c] == {"wgmma"} for c in mma if c.startswith("prefill"))
    assert all(mma[c] == {"none"} for c in mma if c.startswith(("decode", "sparse decode")))


def test_prefill_loads_the_next_kv_block_during_the_current_ones_mmas(fast):
    """Triton's software pipeliner issues every prefill loop's K/V loads as cp.async copies into shared
    memory a block ahead (num_stages 2), in every KV format: loading overlaps the dots."""
    prefill = [(r["case"], k) for r in fast if r["op"] == "prefill" for k in r["kernels"]
               if k.get("backend") != "mosaic_gpu"]
    assert {case.split()[1] for case, _ in prefill} >= {"bf16", "fp8", "int8", "int4", "int4_fp8"}
    assert all(k["num_stages"] >= 2 and k["async_copies"] > 0 for _, k in prefill), prefill


def test_fp8_prefill_runs_on_fp8_tensor_cores(fast):
    """The Mosaic GPU prefill over int4_fp8 pages: both products on e4m3 wgmma (q.k^T over a 128-token
    block and p.v over head_dim 128, both m64n128k32), page tiles brought in by TMA."""
    [mosaic] = [k for r in fast if r["case"].endswith("mosaic") for k in r["kernels"]]
    assert mosaic["kernel"] == "paged_prefill_attention_int4_fp8_mgpu" and mosaic["backend"] == "mosaic_gpu"
    assert mosaic["mma"] == "wgmma" and mosaic["wgmma_shapes"] == ["m64n128k32.f32.e4m3.e4m3"] and mosaic["tma"]


def test_fp8_matmul_runs_on_fp8_tensor_cores(fast):
    """The Triton lowering gives the FP8 and W4A8 matmuls mma.sync; the Mosaic GPU kernels (K-major fp8,
    FireQ's INT4-FP8) issue wgmma on e4m3 operands, 16 tokens wide at M=16, tiles brought in by TMA."""
    kernels = {r["case"].split()[1]: r["kernels"] for r in fast if r["op"] == "matmul"}
    assert [k["mma"] for k in kernels["fp8"] + kernels["w4a8_g128"]] == ["mma.sync"] * 2
    for fmt, name in (("fp8_k_major", "fp8_matmul_mgpu"), ("int4_fp8_g128", "int4_fp8_matmul_mgpu")):
        [mosaic] = kernels[fmt]
        assert mosaic["kernel"] == name and mosaic["backend"] == "mosaic_gpu"
        assert mosaic["mma"] == "wgmma" and mosaic["wgmma_shapes"] == ["m64n16k32.f32.e4m3.e4m3"] and mosaic["tma"]


def test_the_cases_are_the_benchmark_shapes():
    d = decode_case("int4", 8)
    assert d.name == "decode int4 G=8 B=64 ctx=4096" and d.args[0].shape == (64, 1, 64, 128)
    assert d.bytes == 64 * 4096 * 8 * 2 * (64 + 4)         # one layer's int4 K and V with scales
    assert prefill_case("bf16", 4).args[0].shape == (1, 512, 32, 128)
    m = matmul_case("w4a16_g128", 4096)
    assert m.args[0].shape == (4096, 4096) and m.flops == 2 * 4096 * 4096 * 14336
    k, n = 4096, 14336                     # int4 values, bf16 g128 scales and zeros, bf16 x and out
    assert matmul_case("w4a16_g128", 1).bytes == k * n // 2 + 2 * 2 * (k // 128) * n + 2 * (k + n)
    assert prefill_case("int8", 4, precision=BF16_X3).name == "prefill int8 G=4 chunk=512 dots=bf16x3"
    sparse = sparse_decode_case("int4", 4)
    # Every page's key bounds (8 heads x (2 x 128 int8 + a 16-byte scale word)) and the budget's int4 K and V.
    assert sparse.bytes == 64 * 512 * 8 * 272 + 64 * 1024 * 8 * 2 * (64 + 4)
    assert len(cases("full")) == 90
