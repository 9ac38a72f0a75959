#!/usr/bin/env bash
# Quick start 2: install the test dependencies, start what the tests need, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# headless Chromium for the web-page tests (tests/test_web.py); Debian packages, not a test tool's own download
command -v chromium >/dev/null 2>&1 || { (apt-get update && apt-get install -y chromium chromium-driver) || \
    echo "warning: chromium not installed; the browser tests will be skipped" >&2; }
. .venv/bin/activate
bash scripts/services.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q "$@"
