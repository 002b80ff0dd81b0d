"""The quality scripts run end to end: eval_quality on a tiny fixture (fast), every preset on SmolLM2 (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.loader import resolve_model_path
from models.precision import PRESETS
from tests.helpers import FIXTURES

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_eval_quality_reports_every_preset(tmp_path):
    out = tmp_path / "q.json"
    stdout = _run("eval_quality.py", "--model", str(FIXTURES / "llama"), "--dtype", "float32",
                  "--presets", "bf16,w8a8,w4a8kv4,w4a16-rtn-channel", "--window", "64", "--batch", "2",
                  "--max-tokens", "256", "--calib-samples", "0", "--json", str(out))
    assert "| w4a8kv4 |" in stdout
    data = json.loads(out.read_text())
    r = data["results"]
    assert set(r) == {"bf16", "w8a8", "w4a8kv4", "w4a16-rtn-channel"}
    assert data["tokens_scored"] == 4 * 63
    assert r["bf16"]["kl"] == 0 and r["bf16"]["top1_agreement"] == 1
    for name in ("w8a8", "w4a8kv4"):
        assert r[name]["kl"] > 0 and 0 < r[name]["top1_agreement"] <= 1
    # Bytes come from the stored arrays and the page layout: int4 KV is about a quarter of f32 KV.
    assert r["w4a8kv4"]["weight_bytes"] < r["w8a8"]["weight_bytes"] < r["bf16"]["weight_bytes"]
    assert r["w4a8kv4"]["kv_bytes_per_token"] < r["bf16"]["kv_bytes_per_token"] / 4


@pytest.mark.slow
def test_every_preset_serves_the_same_prompt_in_one_process(tmp_path):
    resolve_model_path("smollm2-135m")
    out = tmp_path / "presets.json"
    # Round-to-nearest but for FireQ, which needs its calibration (INT4-FP8 weights, AWQ + GPTQ, and
    # RoPE-aware key scales; on two windows to keep the test short): the presets' quality at the default
    # eight is the quality eval's.
    _run("serve_presets.py", "--json", str(out), "--calib-samples", "2", "--calibrate", "fireq")
    rows = {r["preset"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == list(PRESETS)
    for name, row in rows.items():
        assert row["answer"].strip() and row["finish_reason"] in ("stop", "length"), row
    assert [n for n, r in rows.items() if "Paris" not in r["answer"]] == [], rows
    assert rows["fireq"]["kv_dtype"] == "int4_fp8"
    kv = {n: r["kv_bytes_per_token"] for n, r in rows.items()}
    # SmolLM2: 30 layers x 3 KV heads x 64: bf16 23040; fp8 1 byte + word-padded bf16 scales; int4 packed
    # with scales and zeros, int4_fp8 packed with scales.
    assert (kv["bf16"], kv["w8a8"], kv["fp8"], kv["w4a16"], kv["w4a8kv4"], kv["fireq"]) == (
        23040, 23040, 12000, 23040, 6480, 6240)   # fireq: one scale per head, no zero
    w = {n: r["weight_bytes"] for n, r in rows.items()}
    assert w["fireq"] < w["w4a16"] == w["w4a8kv4"] < w["w8a8"] == w["fp8"] < w["bf16"]   # fireq: no zeros
