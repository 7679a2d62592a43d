#!/usr/bin/env bash
# The whole test suite: install, lint, then every test (real processes, real redis-server).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${PYTHON:-python3}"
echo "== ruff"
"$PY" -m ruff check .
echo "== pytest"
exec "$PY" -m pytest "$@"
