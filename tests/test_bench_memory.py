"""scripts/bench_memory.py --smoke runs end to end and its figures hold together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {"slab", "static", "single_page"}


def test_bench_memory_smoke(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_memory.py"), "--smoke", "--no-progress",
                           "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| pool mode | live KV (mean)" in proc.stdout
    data = json.loads(out.read_text())
    modes = data["modes"]
    assert set(modes) == MODES

    for name, r in modes.items():
        pool = r["pool_bytes"]
        assert pool == r["slab_bytes"] * r["num_slabs"]
        # Every byte of the pool is in exactly one bucket: at every step, so in the mean as well.
        assert sum(r["breakdown_last_step_bytes"].values()) == pool, name
        assert abs(sum(r["breakdown_mean_bytes"].values()) - pool) <= 1e-6 * pool, name
        assert abs(sum(r["breakdown_mean_share"].values()) - 1) < 1e-9, name
        assert 0 < r["kv_share_min"] <= r["kv_share_mean"] < 1, name
        assert abs(r["kv_share_mean"] - r["breakdown_mean_share"]["kv_bytes"]) < 1e-12
        assert r["sequences_mean"] > 0 and r["sequences_min"] >= 0
        assert r["memory_bound_share"] > 0.5, name  # the window is at saturation
        assert set(r["steps_per_model"]) == {m["name"] for m in data["config"]["models"]}
        for model in r["models"].values():
            assert model["max_running"] < data["config"]["max_num_seqs"]  # memory, not the batch cap, binds
        padding = r["breakdown_last_step_bytes"]["page_padding_bytes"]
        assert (padding > 0) if name == "single_page" else (padding == 0), name

    # One page size for all in single_page; each model's own page elsewhere.
    assert len({m["pages_per_slab"] for m in modes["single_page"]["models"].values()}) == 1
    assert len({m["pages_per_slab"] for m in modes["slab"]["models"].values()}) == len(modes["slab"]["models"])
    # Static partitions are equal, reserved and capped.
    assert len({tuple(m["slab_limits"]) for m in modes["static"]["models"].values()}) <= 2
    assert all(lo == hi for lo, hi in (m["slab_limits"] for m in modes["static"]["models"].values()))

    slab = modes["slab"]["kv_share_mean"]
    assert slab >= modes["static"]["kv_share_mean"]
    assert slab >= modes["single_page"]["kv_share_mean"]

    # The host stub changes nothing the memory figures see, and the donated pool never moves.
    real = data["real_execution_check"]
    assert real["memory_stats_identical_to_stub"], real["mismatched_steps"]
    assert real["pointer_unchanged"] and real["model_switches"] > 0 and len(real["models_stepped"]) == 4
    assert real["prefill_steps"] > 0 and real["decode_steps"] > 0
    timing = data["pool_size_timing"]
    assert timing["pointer_unchanged"] and timing["same_pages"]
    assert timing["pools"][1]["pool_bytes"] >= 15 * timing["pools"][0]["pool_bytes"]
    assert all(data["checks"].values()), data["checks"]
