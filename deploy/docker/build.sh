#!/usr/bin/env bash
# Build (and optionally push) the CPU and CUDA images of megascale-infer.
#
#   deploy/docker/build.sh [--push] [--dry-run] [--only cpu|cuda] [-- EXTRA docker build ARGS]
#
# Environment: IMAGE (default ghcr.io/megascale-infer/megascale-infer, the chart's default
# image.repository), TAG (default: the version in pyproject.toml, the chart's appVersion),
# ENGINE (docker or podman; default: the first one found whose daemon answers).
# Tags: IMAGE:TAG-cpu and IMAGE:TAG-cuda, the tags the Helm chart picks per role by default
# (image.variant auto: -cuda for a role whose device is cuda, -cpu otherwise).
# Exit status: 0 built (or printed, with --dry-run), 2 no container engine, else the engine's.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
IMAGE="${IMAGE:-ghcr.io/megascale-infer/megascale-infer}"
TAG="${TAG:-$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -n1)}"
PUSH=0
DRY=0
ONLY=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --push) PUSH=1 ;;
    --dry-run) DRY=1 ;;
    --only) ONLY="$2"; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done
case "$ONLY" in ""|cpu|cuda) ;; *) echo "build.sh: --only takes cpu or cuda, got $ONLY" >&2; exit 64 ;; esac

run() {
  echo "+ $*"
  if [ "$DRY" = 0 ]; then "$@"; fi
}

if [ "$DRY" = 1 ]; then
  ENGINE="${ENGINE:-docker}"
elif [ -z "${ENGINE:-}" ]; then
  for candidate in docker podman; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" info >/dev/null 2>&1; then
      ENGINE="$candidate"
      break
    fi
  done
  if [ -z "${ENGINE:-}" ]; then
    echo "build.sh: no container engine answers (docker or podman with a running daemon);" \
         "nothing built" >&2
    exit 2
  fi
fi

for flavour in cpu cuda; do
  if [ -n "$ONLY" ] && [ "$ONLY" != "$flavour" ]; then continue; fi
  run "$ENGINE" build -f "$ROOT/deploy/docker/Dockerfile.$flavour" -t "$IMAGE:$TAG-$flavour" \
    ${EXTRA[@]+"${EXTRA[@]}"} "$ROOT"
  if [ "$PUSH" = 1 ]; then
    run "$ENGINE" push "$IMAGE:$TAG-$flavour"
  fi
done
