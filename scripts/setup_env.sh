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
if [ "${1:-}" = "test" ]; then
  # CVAT's own dataset library for tests/test_datumaro.py, without its declared pins (opencv-python-headless<5 and
  # pillow 12 would land a second OpenCV in the cv2 folder beside Ultralytics' opencv-python): it works with ours.
  python -m pip install --quiet --no-deps "datumaro==1.13.12"
  python -m pip install --quiet defusedxml imagesize json-stream json-stream-rs-tokenizer lxml orjson \
    "pandas~=2.3" "pyarrow~=25.0" "cachetools~=7.0" pytz ruamel.yaml shapely
fi
