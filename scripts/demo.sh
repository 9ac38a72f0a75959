#!/usr/bin/env bash
# Quick start 1: install, then run the main job on the embedded default (no GPU, no server, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec autointerp demo "$@"
