#!/usr/bin/env bash
# Install everything megascale-infer needs on a fresh Debian machine (root, Python 3.11, no GPU).
# Idempotent: a second run only checks. Used by scripts/run.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(redis-server iproute2 python3-pyverbs gcc)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing apt packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
# Editable install with the dev extra; torch is pinned to the CPU build in pyproject.toml.
if ! "$PY" -c "import services, megascale.v1, pytest, openai" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .setup-stamp ]; then
  echo "setup: pip install -e .[dev]"
  "$PY" -m pip install -q -e ".[dev]"
  touch .setup-stamp
fi
