#!/usr/bin/env bash
# The test command: installs what it needs, checks lint and types, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
echo "== ruff"; .venv/bin/ruff check proxy tests bench
echo "== mypy --strict"; .venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest -p no:cacheprovider -q -rs "$@"
