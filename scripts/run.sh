#!/usr/bin/env bash
# The main job on the embedded default: install, write the small random demo MoE checkpoint
# (no network), and bring the whole mesh up on loopback with `megascale up`: a local
# redis-server, the scheduler, 2 expert nodes, 1 attention replica (m = 2) and the
# OpenAI-compatible gateway on http://127.0.0.1:8000/v1. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL_DIR="${MEGASCALE_MODEL:-.demo/mixtral}"
if [ ! -f "$MODEL_DIR/config.json" ]; then
  megascale demo-model --family mixtral --out "$MODEL_DIR"
fi
# The demo shows the disaggregated architecture; `megascale up` alone picks the layout for the
# machine (colocated on one CPU host) and says why. Later flags win (--layout colocated).
exec megascale up --model "$MODEL_DIR" --layout disaggregated "$@"
