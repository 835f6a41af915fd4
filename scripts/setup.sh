#!/usr/bin/env bash
# Create .venv with PyTorch and simple-dit (editable, with the extras the tests need).
#
#   TORCH_BUILD=cpu   (default) the CPU-only wheel from PyTorch's CPU index: ~200 MB, no CUDA.
#   TORCH_BUILD=cuda  the default PyPI wheel, which on Linux is the CUDA build (several GB).
#   TORCH_SPEC        the version to install (default torch==2.13.0).
#   EXTRAS            the package extras (default test; e.g. all for every optional feature).
#
# torch is installed first and explicitly: a bare `torch` requirement resolved with no torch
# present can pull the multi-GB CUDA build even on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
build="${TORCH_BUILD:-cpu}"
spec="${TORCH_SPEC:-torch==2.13.0}"
case "$build" in
  cpu) index=(--index-url https://download.pytorch.org/whl/cpu) ;;
  cuda) index=() ;;
  *) echo "setup.sh: TORCH_BUILD must be cpu or cuda, not '$build'" >&2; exit 2 ;;
esac
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install -q --retries 1 "${index[@]}" "$spec"
.venv/bin/python -m pip install -q -e ".[${EXTRAS:-test}]"
.venv/bin/python -c "import torch; print(f'setup.sh: torch {torch.__version__}', 'with CUDA ' + torch.version.cuda if torch.version.cuda else '(CPU only)')"
