#!/usr/bin/env bash
# The test command of the README and of CI: set up .venv, lint and check formatting, check the import rule, run the
# test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests
ruff format --check src tests scripts
lint-imports --no-cache  # the layers of docs/ARCHITECTURE.md (contracts in pyproject.toml)
python -m pytest tests -p no:cacheprovider "$@"
