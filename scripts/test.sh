#!/usr/bin/env bash
# README command 2: install with the test extra and run the whole test suite (CPU only, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh test
python -m pytest -q "$@"
