#!/usr/bin/env bash
# The main job on the embedded default: install, write the small random demo MoE checkpoint
# (no network), and run generation on it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL_DIR="${MEGASCALE_MODEL:-.demo/mixtral}"
if [ ! -f "$MODEL_DIR/config.json" ]; then
  megascale demo-model --family mixtral --out "$MODEL_DIR"
fi
exec megascale generate --model "$MODEL_DIR" --prompt "The expert said" --prompt "Hello" \
  --max-tokens 32 "$@"
