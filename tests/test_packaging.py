"""A non-editable install carries the data the serving code reads at run time (device cost profiles,
Azure traces, calibration text) and finds it with importlib.resources, not through the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pallas_kernels", "models", "serving", "fineserve_jax")

CHECK = """
import fineserve_jax, serving.scheduling.cost_model as cost_model
from fineserve_jax.serve_config import DEFAULT_SLO_TTFT_S, ServeConfig, slo_ttft_s
from models.quantize import calibration_windows
from serving.sim.workload import azure_trace
assert not cost_model.__file__.startswith(REPO), cost_model.__file__
h100 = cost_model.DeviceProfile.shipped("h100")
assert h100 is not None and h100.device_kind == "h100", h100
assert h100.get("llama3-8b", "bf16", 1).decode_seconds([1024] * 8) > 0
demo = ServeConfig.demo()
slos = [slo_ttft_s(m, "cpu") for m in demo.models]
assert all(s != DEFAULT_SLO_TTFT_S for s in slos), slos   # from the shipped CPU profile
assert len(azure_trace("conv", duration_s=60).requests) > 100
print("ok", cost_model.PROFILE_DIR)
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project built and installed (not editable) into a folder of its own."""
    src, target = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("site")
    for name in PACKAGES:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-compile", "--target", str(target), str(src)], check=True, capture_output=True, timeout=300)
    return target


def test_a_non_editable_install_serves_with_the_shipped_profiles(installed, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(installed)}
    result = subprocess.run([sys.executable, "-c", f"REPO = {str(REPO)!r}\n" + CHECK], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok " + str(installed))
