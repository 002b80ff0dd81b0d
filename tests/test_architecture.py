"""The package architecture holds: layers and acyclic packages (import-linter contracts in
pyproject.toml), imports at module level, and code that cites nothing outside the repository."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pallas_kernels", "models", "serving", "fineserve_jax")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
# Imports that stay inside functions, each for a reason: orbax is slow to import and installs a root
# log handler, and only checkpoints need it; matplotlib only draws `fineserve bench --plots`.
LOCAL_IMPORTS_ALLOWED = {("models/checkpoint.py", "import orbax.checkpoint as ocp"),
                         ("fineserve_jax/bench.py", "import matplotlib"),
                         ("fineserve_jax/bench.py", "import matplotlib.pyplot as plt"),
                         # Ray is loaded only by `fineserve serve --ray`
                         ("fineserve_jax/serve.py", "from fineserve_jax.ray_serve import serve_on_ray"),
                         ("fineserve_jax/ray_serve.py", "import ray"),
                         ("fineserve_jax/ray_serve.py", "from ray import serve"),
                         ("fineserve_jax/ray_serve.py", "from ray.serve.api import RunTarget")}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300)


def sources(folders=PACKAGES):
    for folder in folders:
        yield from sorted((REPO / folder).rglob("*.py"))


def test_import_contracts_are_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    """The contracts bite: a kernel module importing the serving layer fails the check."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    target = tmp_path / "pallas_kernels" / "kv_pages.py"
    target.write_text(target.read_text() + "\nimport serving.kv.kv_pool  # noqa: E402,F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "pallas_kernels is not allowed to import serving" in result.stdout


def test_imports_are_at_module_level():
    local = re.compile(r"^\s+(from \S+ import .+|import .+)$")
    found = set()
    for path in sources():
        in_docstring = False
        for line in path.read_text().splitlines():
            if line.count('"""') % 2:
                in_docstring = not in_docstring
            if not in_docstring and local.match(line) and not line.strip().startswith("#"):
                found.add((str(path.relative_to(REPO)), line.strip().split("  #")[0]))
    assert found <= LOCAL_IMPORTS_ALLOWED, sorted(found - LOCAL_IMPORTS_ALLOWED)


@pytest.mark.parametrize("pattern", [r"shared/reference", r"\bissue [0-9]"])
def test_code_cites_nothing_outside_the_repository(pattern):
    hits = [f"{p.relative_to(REPO)}:{i}" for p in sources(PACKAGES + ("scripts",))
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert not hits
