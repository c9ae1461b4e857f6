#!/usr/bin/env bash
# README command 1: install, write the demo data, train yolov8n-seg on it (CPU, about 6 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
python scripts/make_demo_data.py
python -m cellseg_pl fit --config configs/demo.yaml "$@"
