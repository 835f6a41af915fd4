#!/usr/bin/env bash
# Create .venv with a CPU build of PyTorch and simple-dit (editable, with test extras).
# torch is installed first and explicitly: a bare `torch` requirement resolved with no torch
# present can pull a multi-GB CUDA build. Set TORCH_SPEC to choose another build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
