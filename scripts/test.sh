#!/usr/bin/env bash
# README command 2: install everything the tests need, then run them (slow ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
exec python3 -m pytest "$@"
