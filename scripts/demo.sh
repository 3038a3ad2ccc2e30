#!/usr/bin/env bash
# README command 1: install, then run the main job on the built-in default
# (2 ranks on this machine, no hostfile needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m launcher exec -- python -m runtime.selftest "$@"
