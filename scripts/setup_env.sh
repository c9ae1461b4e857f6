#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install cellseg_pl into it, offline-friendly.
# Usage: source scripts/setup_env.sh [extra]   e.g. "source scripts/setup_env.sh test"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch and torchvision first, pinned: the pair that imports together (see README, "Installation").
python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
python -m pip install --quiet -e ".${1:+[$1]}"
