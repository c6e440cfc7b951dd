#!/usr/bin/env bash
# The README's main command: install, then run the whole pipeline on the embedded default
# (bundled real data, tiny random MoE, CPU). Extra arguments go to `bimedix quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
bimedix quickstart --output "${BIMEDIX_OUTPUT:-runs/quickstart}" "$@"
