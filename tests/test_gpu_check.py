"""The device check's summary: every step's status, and the figures each step's JSON holds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _summary():
    spec = importlib.util.spec_from_file_location("gpu_check_summary", SCRIPTS / "gpu_check_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_gathers_the_steps(tmp_path):
    (tmp_path / "steps.tsv").write_text("check_kernels\t0\t95\nbench_kernels\t124\t150\ncompile_check\t0\t31\n")
    (tmp_path / "check_kernels.json").write_text(json.dumps(
        {"device": {"platform": "gpu", "kind": "NVIDIA H100"}, "implementation": "pallas", "passed": 180,
         "failed": 1, "seed": 7, "cases": []}))
    (tmp_path / "compile_check.json").write_text(json.dumps({"cases": [
        {"case": "decode bf16", "kernels": [{"kernel": "k1", "registers": 229, "spill_store_bytes": 0, "mma": "none"}]},
        {"case": "matmul fp8", "kernels": [{"kernel": "k2", "registers": 255, "spill_store_bytes": 64,
                                            "mma": "mma.sync"}]},
        {"case": "matmul fp8_k_major", "kernels": [{"kernel": "k3", "backend": "mosaic_gpu", "registers": None,
                                                    "spill_store_bytes": None, "mma": "wgmma"}]},
        {"case": "prefill int4", "error": "RuntimeError: boom"}]}))
    assert _summary().main([str(tmp_path)]) == 1                       # a step hit its time limit
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert [s["exit"] for s in doc["steps"]] == [0, 124, 0]
    assert doc["check_kernels"]["passed"] == 180 and doc["check_kernels"]["failed"] == 1
    assert doc["compile_check"] == {"cases": 4, "failed": ["prefill int4"], "spilling": ["k2"], "max_registers": 255,
                                    "wgmma_kernels": ["k3"]}
    assert "bench_kernels" not in doc and "serving" not in doc      # what a step did not write is left out
    md = (tmp_path / "summary.md").read_text()
    assert "| bench_kernels | 124 (time limit) | 150 |" in md and "180 passed, 1 failed" in md
