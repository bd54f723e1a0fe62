#!/usr/bin/env bash
# Create .venv (once) and install attnseg with its test tools. CPU torch from the local wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: any other resolution would fetch a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,ray]"
# pydensecrf2 builds from source against the numpy installed above.
python -m pip install -q -e ".[crf]"
