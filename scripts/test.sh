#!/usr/bin/env bash
# Quick start 2: install the test dependencies, start what the tests need, run the whole suite.
# Installs (Debian, when absent) redis-server, rabbitmq-server, chromium, chromium-driver and starts them
# (scripts/services.sh). CI=true: a missing service or package fails the run instead of skipping tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
bash scripts/services.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q "$@"
