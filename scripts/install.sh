#!/usr/bin/env bash
# Installs bimedix and everything its demo and tests need into ./.venv (or the active virtualenv).
# torch goes first and alone: `torch==2.13.0` is the CPU build on this project's machines; with torch
# already importable (e.g. a CUDA build a GPU user installed first) it is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "is ignored" || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${BIMEDIX_TORCH:-2.13.0}" 2>&1 | grep -v "is ignored" || true
python -m pip install -q -e ".[${BIMEDIX_EXTRAS:-train,eval,llm,dev}]" 2>&1 | grep -v "is ignored" || true
python -c "import bimedix, torch; print(f'bimedix {bimedix.__version__} with torch {torch.__version__} in {__import__(\"sys\").prefix}')"
