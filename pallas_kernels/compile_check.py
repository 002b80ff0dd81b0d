"""Every Pallas kernel compiled for an H100 without a GPU, with what the compiler made of it.

Each case is lowered for an abstract H100 (`jax.sharding.use_abstract_mesh` with an `AbstractDevice`
named "NVIDIA H100"), the Triton IR that JAX emits for each `pallas_call` is captured, compiled to
sm_90a by the pinned `triton` wheel and assembled by its `ptxas`, which reports registers, spills and
shared memory. From the PTX: the MMA instructions used (wgmma, mma.sync, or none: FMA) and the widest
global load, overall and per loop iteration. Mosaic GPU kernels (`plgpu.kernel`) are lowered the
same way, but their MLIR becomes PTX only inside a CUDA jaxlib: for them the report reads the
instructions the lowered module spells out (wgmma shapes and operand types, TMA copies) and has no
register figures. A roofline estimate (bytes and FLOPs of the case over H100 peaks) says what the
shape should cost. Upstream Triton is not XLA's fork of it, so this is strong evidence, not proof.

    python -m pallas_kernels.compile_check [--subset fast|full] [--json OUT] [--markdown OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import triton
from jax._src.pallas.triton import lowering as triton_lowering
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import compiler as nvidia_compiler

from pallas_kernels.fp8_matmul_mgpu import fp8_matmul_mgpu
from pallas_kernels.kernel_cases import MATMUL_FORMATS
from pallas_kernels.kv_pages import KVPageLayout
from pallas_kernels.kv_write_pallas import write_key_bounds_pallas, write_kv_tokens_pallas
from pallas_kernels.page_scores_pallas import page_scores_pallas
from pallas_kernels.page_selection import POLICY_IDS, SelectionInputs, select_pages
from pallas_kernels.paged_attention_pallas import paged_decode_attention
from pallas_kernels.paged_prefill_mgpu import paged_prefill_attention_mgpu
from pallas_kernels.paged_prefill_pallas import paged_prefill_attention
from pallas_kernels.quantized_matmul import uses_mosaic
from pallas_kernels.quantized_matmul_pallas import quantized_matmul_pallas

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
SM90A = GPUTarget("cuda", 90, 32)
PTXAS = Path(nvidia_compiler.__file__).parent / "bin" / "ptxas-blackwell"  # the wheel's newest ptxas
HBM_BYTES_PER_S, BF16_FLOPS, FP8_FLOPS = 3.35e12, 989e12, 1979e12         # H100 SXM peaks
REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM, SHARED_PER_SM = 65536, 64, 32, 228 << 10

KV_FORMATS = ("bf16", "fp8", "int8", "int4", "int4_fp8")
NUM_LAYERS, HEAD_DIM, KV_HEADS, TOKENS_PER_PAGE, PAGES_PER_SLAB = 32, 128, 8, 16, 64
DECODE_BATCH, DECODE_CONTEXT, PREFILL_CHUNK, WRITE_TOKENS = 64, 4096, 512, 512
SPARSE_CONTEXT, SPARSE_BUDGET = 8192, 1024
MATMUL_K, MATMUL_N, MATMUL_MS = 4096, 14336, (1, 16, 256, 4096)
# one format per matmul kernel family: int4 and int8 weight-only (Triton), int8 and fp8 activations
# (Triton), W4A8 (Triton), and the Mosaic GPU kernels (K-major fp8, FireQ's int4 x fp8)
FAST_MATMUL_FORMATS = ("w4a16_g128", "w8a16", "w8a8", "fp8", "w4a8_g128", "fp8_k_major", "int4_fp8_g128")
S = jax.ShapeDtypeStruct
BF16_X3 = jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3


@dataclass(frozen=True)
class Case:
    op: str                    # decode | sparse_decode | prefill | kv_write | kv_bounds | matmul
    name: str
    fn: Callable
    args: tuple
    bytes: float               # what the case must move through HBM at least
    flops: float
    fp8_math: bool = False     # its dots run on FP8 tensor cores (else BF16 peak)

    @property
    def roofline_us(self) -> float:
        peak = FP8_FLOPS if self.fp8_math else BF16_FLOPS
        return max(self.bytes / HBM_BYTES_PER_S, self.flops / peak) * 1e6


def _pool(layout: KVPageLayout, pages: int) -> S:
    slabs = -(-pages // PAGES_PER_SLAB) + 1
    return S((slabs, layout.page_words * PAGES_PER_SLAB), jnp.uint32)


def _layout(kv: str, key_bounds: bool = False) -> KVPageLayout:
    return KVPageLayout(NUM_LAYERS, KV_HEADS, HEAD_DIM, TOKENS_PER_PAGE, kv, pages_per_slab=PAGES_PER_SLAB,
                        key_bounds=key_bounds)


def decode_case(kv: str, group: int, batch: int = DECODE_BATCH, context: int = DECODE_CONTEXT) -> Case:
    layout, q_heads, pages = _layout(kv), KV_HEADS * group, context // TOKENS_PER_PAGE
    args = (S((batch, 1, q_heads, HEAD_DIM), jnp.bfloat16), _pool(layout, batch * pages), S((), jnp.int32),
            S((batch, pages), jnp.int32), S((batch, 1), jnp.int32), S((batch,), jnp.int32))
    kv_bytes = batch * context * layout.bytes_per_token / NUM_LAYERS
    return Case("decode", f"decode {kv} G={group} B={batch} ctx={context}",
                lambda q, pool, layer, table, pos, lens: paged_decode_attention(q, pool, layout, layer, table, pos, lens),
                args, kv_bytes, 4.0 * batch * q_heads * context * HEAD_DIM)


def sparse_decode_case(kv: str, group: int, batch: int = DECODE_BATCH, context: int = SPARSE_CONTEXT,
                       budget: int = SPARSE_BUDGET) -> Case:
    """Decode with query-aware page selection, as `sparse_attention` runs it on the GPU: the score
    kernel over every page's key bounds, selection in XLA, the decode kernel over per-head tables."""
    layout, q_heads, pages = _layout(kv, key_bounds=True), KV_HEADS * group, context // TOKENS_PER_PAGE
    args = (S((batch, 1, q_heads, HEAD_DIM), jnp.bfloat16), _pool(layout, batch * pages), S((), jnp.int32),
            S((batch, pages), jnp.int32), S((batch, 1), jnp.int32), S((batch,), jnp.int32))

    def fn(q, pool, layer, table, pos, lens):
        scores = page_scores_pallas(q, pool, layout, layer, table, lens)
        inputs = SelectionInputs(*(jnp.full((batch,), x, jnp.int32)
                                   for x in (POLICY_IDS["bbox"], budget // TOKENS_PER_PAGE, 0)))
        chosen = select_pages(scores, table, lens, inputs, TOKENS_PER_PAGE)
        return paged_decode_attention(q, pool, layout, layer, chosen.head_table, pos, chosen.head_lens)

    bounds_bytes = batch * pages * KV_HEADS * layout.bounds_words * 4
    kv_bytes = batch * budget * (layout.page_words - NUM_LAYERS * KV_HEADS * layout.bounds_words) * 4 / (
        NUM_LAYERS * TOKENS_PER_PAGE)
    return Case("sparse_decode", f"sparse decode {kv} G={group} B={batch} ctx={context} budget={budget}", fn,
                args, bounds_bytes + kv_bytes, 4.0 * batch * q_heads * (budget + 2 * pages) * HEAD_DIM)


def prefill_case(kv: str, group: int, chunk: int = PREFILL_CHUNK, precision=None, mosaic: bool = False) -> Case:
    """`precision`: of the Triton kernel's dots (None: serving; BF16_BF16_F32_X3: the GPU check's);
    `mosaic`: the Mosaic GPU FP8 kernel instead (int4_fp8; what the dispatcher runs for it)."""
    layout, q_heads, pages = _layout(kv), KV_HEADS * group, chunk // TOKENS_PER_PAGE
    args = (S((1, chunk, q_heads, HEAD_DIM), jnp.bfloat16), _pool(layout, pages), S((), jnp.int32),
            S((1, pages), jnp.int32), S((1, chunk), jnp.int32), S((1,), jnp.int32))
    io = chunk * (layout.bytes_per_token / NUM_LAYERS + 2 * 2 * q_heads * HEAD_DIM)
    if mosaic:
        kernel, variant = paged_prefill_attention_mgpu, " mosaic"
    else:
        kernel = functools.partial(paged_prefill_attention, precision=precision)
        variant = "" if precision is None else " dots=bf16x3" if precision == BF16_X3 else f" dots={precision}"
    return Case("prefill", f"prefill {kv} G={group} chunk={chunk}{variant}",
                lambda q, pool, layer, table, pos, lens: kernel(q, pool, layout, layer, table, pos, lens),
                args, io, 4.0 * chunk * chunk * q_heads * HEAD_DIM, fp8_math=mosaic)


def kv_write_case(kv: str, tokens: int = WRITE_TOKENS) -> Case:
    layout = _layout(kv)
    row = S((tokens, KV_HEADS, HEAD_DIM), jnp.bfloat16)
    args = (_pool(layout, tokens // TOKENS_PER_PAGE), S((tokens,), jnp.int32), S((tokens,), jnp.int32),
            S((tokens,), jnp.bool_), S((), jnp.int32), row, row)
    moved = tokens * (layout.bytes_per_token / NUM_LAYERS + 2 * 2 * KV_HEADS * HEAD_DIM)
    return Case("kv_write", f"kv_write {kv} N={tokens}",
                lambda pool, pages, slots, valid, layer, k, v: write_kv_tokens_pallas(pool, layout, pages, slots,
                                                                                      valid, layer, k, v),
                args, moved, 0.0)


def kv_bounds_case(kv: str, pages: int = WRITE_TOKENS // TOKENS_PER_PAGE) -> Case:
    layout = _layout(kv, key_bounds=True)
    args = (_pool(layout, pages), S((pages,), jnp.int32), S((pages,), jnp.int32), S((), jnp.int32))
    key_bytes = pages * TOKENS_PER_PAGE * layout.bytes_per_token / NUM_LAYERS / 2
    return Case("kv_bounds", f"kv_bounds {kv} pages={pages}",
                lambda pool, ids, fill, layer: write_key_bounds_pallas(pool, layout, ids, fill, layer),
                args, key_bytes + pages * KV_HEADS * layout.bounds_words * 4, 0.0)


def matmul_case(fmt: str, m: int, k: int = MATMUL_K, n: int = MATMUL_N) -> Case:
    quantize, act = MATMUL_FORMATS[fmt]
    try:
        w = jax.eval_shape(quantize, S((k, n), jnp.bfloat16))
    except jax.errors.TracerArrayConversionError:  # a numpy quantizer (GGUF Q8_0): quantize zeros instead
        w = jax.tree_util.tree_map(lambda a: S(a.shape, a.dtype), quantize(jnp.zeros((k, n), jnp.bfloat16)))
    w_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(w))  # int4: packed bytes
    kernel = fp8_matmul_mgpu if uses_mosaic(w, act) else functools.partial(quantized_matmul_pallas, act_format=act)
    return Case("matmul", f"matmul {fmt} M={m} K={k} N={n}", kernel, (S((m, k), jnp.bfloat16), w),
                w_bytes + 2 * m * (k + n), 2.0 * m * k * n, fp8_math=act == "fp8")


def cases(subset: str = "full") -> list[Case]:
    """The benchmark shapes: decode at B=64 ctx=4096 (GQA 4 and 8), sparse decode at ctx=8192 with a
    1024-token budget, a 512-token prefill chunk (and at GQA 4 with the GPU check's bf16x3 dots;
    int4_fp8 also on the Mosaic GPU FP8 kernel), a 512-token KV write and its pages' key bounds, in
    every KV format; every matmul format on a 4096x14336 weight at M = 1, 16, 256, 4096. "fast" (the
    tests'): every kernel at GQA 4 and M=16 (serving dots), each KV format through decode or sparse
    decode and through prefill, the quantizing KV writes, and each family of matmul kernel once."""
    if subset == "fast":
        return ([decode_case(kv, 4) for kv in ("bf16", "int8", "int4_fp8")]
                + [sparse_decode_case(kv, 4) for kv in ("fp8", "int4")]
                + [prefill_case(kv, 4) for kv in KV_FORMATS] + [prefill_case("int4_fp8", 4, mosaic=True)]
                + [kv_write_case(kv) for kv in ("fp8", "int4")] + [kv_bounds_case("int8")]
                + [matmul_case(fmt, 16) for fmt in FAST_MATMUL_FORMATS])
    groups = (4, 8)
    out = [decode_case(kv, g) for g in groups for kv in KV_FORMATS]
    out += [sparse_decode_case(kv, g) for g in groups for kv in KV_FORMATS]
    out += [prefill_case(kv, g) for g in groups for kv in KV_FORMATS]
    out += [prefill_case("int4_fp8", g, mosaic=True) for g in groups]
    # (int4_fp8 has no dot precision: its dots multiply e4m3 values and int4 codes in bf16, exactly)
    out += [prefill_case(kv, 4, precision=BF16_X3) for kv in KV_FORMATS if kv != "int4_fp8"]
    out += [kv_write_case(kv) for kv in KV_FORMATS]
    out += [kv_bounds_case(kv) for kv in KV_FORMATS]
    out += [matmul_case(fmt, m) for fmt in MATMUL_FORMATS for m in MATMUL_MS]
    return out


# --------------------------------------------------------------------------------------------------
# Lowering and compiling


@dataclass(frozen=True)
class TritonKernel:
    name: str
    ttir: str
    num_warps: int
    num_stages: int


@contextlib.contextmanager
def _capture_triton_ir(into: list[str]):
    """Collect the Triton IR JAX emits for each pallas_call while lowering (its lowering hook)."""
    lower = triton_lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        into.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    triton_lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield
    finally:
        triton_lowering.lower_jaxpr_to_triton_module = lower


def lower_for_h100(case: Case) -> tuple[list[TritonKernel], str]:
    """The case's Triton kernels, as JAX lowers them for an H100 (on any machine), and the lowered
    module's text."""
    modules: list[str] = []
    mesh = AbstractMesh((1,), ("d",), abstract_device=H100)
    with warnings.catch_warnings(), _capture_triton_ir(modules), use_abstract_mesh(mesh):
        warnings.simplefilter("ignore", DeprecationWarning)  # the Triton backend's deprecation notice
        text = jax.jit(case.fn).trace(*case.args).lower(lowering_platforms=("cuda",)).as_text()
    configs = re.findall(r"num_stages = (\d+) : i32, num_warps = (\d+) : i32", text)
    names = [re.search(r"tt\.func public @(\w+)", m).group(1) for m in modules]
    if len(configs) != len(modules):
        raise RuntimeError(f"{case.name}: {len(modules)} Triton modules but {len(configs)} kernel calls")
    return [TritonKernel(n, m, int(w), int(s)) for n, m, (s, w) in zip(names, modules, configs)], text


def mosaic_kernels(text: str) -> list[dict]:
    """What a lowered module says about its Mosaic GPU kernels (one warpgroup each, as ours are):
    the wgmma shapes and operand types and whether operands arrive by TMA."""
    calls = text.count("custom_call @mosaic_gpu")
    if not calls:
        return []
    # Each kernel's module carries "<kernel name>_mosaic_gpu" (beside a "stable_mosaic_gpu" dialect tag).
    names = [n for n in re.findall(r"([a-z][a-z0-9_]*?)_mosaic_gpu\b", text) if n != "stable"] or ["mosaic_gpu"]
    shapes = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+\.\w+?\.\w+?\.\w+)\b", text)))
    mma = "wgmma" if shapes else "mma.sync" if "mma.sync" in text else "none"
    return [{"kernel": names[0], "backend": "mosaic_gpu", "num_warps": 4, "registers": None,
             "spill_store_bytes": None, "spill_load_bytes": None, "shared_bytes": None, "occupancy": None,
             "mma": mma, "wgmma_shapes": shapes, "tma": "cp.async.bulk.tensor" in text}] * calls


def _occupancy(registers: int, shared: int, num_warps: int) -> float:
    threads = 32 * num_warps
    blocks = min(MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // num_warps,
                 REGISTERS_PER_SM // max(1, registers * threads),
                 SHARED_PER_SM // shared if shared else MAX_BLOCKS_PER_SM)
    return blocks * num_warps / MAX_WARPS_PER_SM


def _global_loads(ptx: str) -> dict[int, int]:
    """How many `ld.global` instructions of each width (bits) the PTX holds."""
    counts: dict[int, int] = {}
    for vec, bits in re.findall(r"ld\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx):
        width = int(vec or 1) * int(bits)
        counts[width] = counts.get(width, 0) + 1
    return dict(sorted(counts.items()))


def _loop_bodies(ptx: str) -> str:
    """The PTX of every loop: from each loop header label (LLVM marks it "Loop Header") to the branch
    back to it. Static counts over the whole kernel mix set-up loads with the ones each iteration
    issues; these are the latter."""
    lines = ptx.splitlines()
    bodies = []
    for i, line in enumerate(lines):
        if "Loop Header" in line:
            label = line.split(":")[0]
            back = re.compile(rf"\bbra(\.uni)?\s+{re.escape(label)};")
            end = next((j for j in range(i + 1, len(lines)) if back.search(lines[j])), len(lines))
            bodies.append("\n".join(lines[i:end + 1]))
    return "\n".join(bodies)


def _async_copies(ptx: str) -> dict[int, int]:
    """How many `cp.async` global-to-shared copies of each width (bits) the PTX holds."""
    counts: dict[int, int] = {}
    for size in re.findall(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (0x[0-9a-f]+|\d+)", ptx):
        counts[8 * int(size, 0)] = counts.get(8 * int(size, 0), 0) + 1
    return counts


def _loop_loads(ptx: str) -> dict[int, int]:
    """Global loads and async copies per loop iteration, by width (bits)."""
    body = _loop_bodies(ptx)
    counts = _global_loads(body)
    for bits, n in _async_copies(body).items():
        counts[bits] = counts.get(bits, 0) + n
    return dict(sorted(counts.items()))


def _widest_global_load(ptx: str, loads: dict[int, int]) -> int:
    """Bits of the widest load from global memory: an `ld.global` (`loads`, by width) or an
    asynchronous copy to shared memory (`cp.async ... 16`: 128)."""
    return max([*loads, *_async_copies(ptx)], default=0)


def compile_sm90a(kernel: TritonKernel, workdir: Path) -> dict:
    """Compile one kernel's Triton IR to sm_90a; what ptxas and the PTX say about it."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said explicitly
    src = workdir / f"{kernel.name}.ttir"
    src.write_text(kernel.ttir)
    compiled = triton.compile(str(src), target=SM90A,
                              options={"num_warps": kernel.num_warps, "num_stages": kernel.num_stages})
    ptx = compiled.asm["ptx"]
    (workdir / f"{kernel.name}.ptx").write_text(ptx)
    out = subprocess.run([str(PTXAS), "-v", f"--gpu-name=sm_{SM90A.arch}a", str(workdir / f"{kernel.name}.ptx"),
                          "-o", str(workdir / f"{kernel.name}.cubin")], capture_output=True, text=True, check=True)
    info = out.stderr
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    shared = compiled.metadata.shared
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    loads = _global_loads(ptx)
    return {"kernel": kernel.name, "num_warps": kernel.num_warps, "num_stages": kernel.num_stages,
            "registers": registers, "spill_store_bytes": int(spills.group(1)), "spill_load_bytes": int(spills.group(2)),
            "shared_bytes": shared, "occupancy": _occupancy(registers, shared, kernel.num_warps), "mma": mma,
            "fma": len(re.findall(r"\bfma\.rn\.f32\b", ptx)), "global_loads_by_bits": loads,
            "loop_global_loads_by_bits": _loop_loads(ptx),
            "widest_global_load_bits": _widest_global_load(ptx, loads),
            # Triton's software pipeliner turns a loop's loads into cp.async copies into shared memory
            # issued num_stages - 1 iterations ahead: none means the loop waits for every load.
            "async_copies": sum(_async_copies(ptx).values())}


def check(case: Case, workdir: Path) -> dict:
    """Lower and compile one case: its kernels' figures, or the error that stopped it."""
    row = {"op": case.op, "case": case.name, "roofline_us": case.roofline_us, "bytes": case.bytes,
           "flops": case.flops}
    try:
        triton_kernels, text = lower_for_h100(case)
        row["kernels"] = [compile_sm90a(k, workdir) for k in triton_kernels] + mosaic_kernels(text)
    except Exception as e:  # reported per case, so one failure does not hide the others
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
    return row


# --------------------------------------------------------------------------------------------------
# Report


def markdown(rows: list[dict], header: str = "") -> str:
    lines = [header, "| case | kernel | warps | regs | spill B (st/ld) | smem KiB | occupancy | MMA | widest load | "
                     "loop loads (count x bits) | stages (cp.async) | roofline us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | **failed**: {r['error'][:120]} | | | | | | | | | | |")
            continue
        for k in r["kernels"]:
            if k.get("backend") == "mosaic_gpu":
                lines.append(f"| {r['case']} | {k['kernel']} (Mosaic GPU) | {k['num_warps']} | n/a | n/a | n/a | n/a | "
                             f"{k['mma']} {', '.join(k['wgmma_shapes'])} | {'TMA' if k['tma'] else '-'} | - | "
                             f"TMA pipeline | {r['roofline_us']:.1f} |")
                continue
            lines.append(f"| {r['case']} | {k['kernel']} | {k['num_warps']} | {k['registers']} | "
                         f"{k['spill_store_bytes']}/{k['spill_load_bytes']} | {k['shared_bytes'] / 1024:.0f} | "
                         f"{k['occupancy']:.0%} | {k['mma']} | {k['widest_global_load_bits']} b | "
                         f"{_load_mix(k['loop_global_loads_by_bits'])} | {k['num_stages']} ({k['async_copies']}) | "
                         f"{r['roofline_us']:.1f} |")
    return "\n".join(lines) + "\n"


def _load_mix(loads: dict[int, int]) -> str:
    return " + ".join(f"{n}x{bits}" for bits, n in sorted(loads.items(), reverse=True)) or "-"


def spilling(rows: list[dict]) -> list[str]:
    return [f"{r['case']}: {k['kernel']} spills {k['spill_store_bytes']} B" for r in rows
            for k in r.get("kernels", ()) if k["spill_store_bytes"] or k["spill_load_bytes"]]   # None: Mosaic


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subset", choices=("fast", "full"), default="full")
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--markdown", default=None, help="write the table here")
    args = ap.parse_args(argv)
    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases(args.subset):
            rows.append(check(case, Path(tmp)))
            status = rows[-1].get("error") or ", ".join(
                f"Mosaic GPU, {k['mma']} {' '.join(k['wgmma_shapes'])}" if k.get("backend") == "mosaic_gpu" else
                f"{k['registers']} regs, {k['spill_store_bytes']} B spilled, {k['mma']}" for k in rows[-1]["kernels"])
            print(f"{case.name}: {status}", file=sys.stderr, flush=True)
    header = (f"Compiled for sm_90a with triton {triton.__version__} (jax {jax.__version__}), "
              f"{len(rows)} cases in {time.time() - t0:.0f} s\n")
    table = markdown(rows, header)
    print(table)
    meta = {"triton": triton.__version__, "jax": jax.__version__, "target": dataclasses.asdict(SM90A)}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "cases": rows}, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    failed = [r["case"] for r in rows if "error" in r]
    for line in spilling(rows) + [f"{c}: failed" for c in failed]:
        print(line, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
