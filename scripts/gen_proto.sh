#!/usr/bin/env bash
# Regenerate the Python gRPC stubs (*_pb2.py, *_pb2.pyi, *_pb2_grpc.py) from
# proto/megascale/v1/*.proto. This is the ONE way to regenerate them; commit the result.
#
# Usage: scripts/gen_proto.sh [OUT_DIR]
#   OUT_DIR defaults to proto/ (stubs land beside the .proto files). Works from any cwd.
#   Set PYTHON to choose the interpreter (it needs grpcio-tools, pinned in pyproject.toml).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/proto}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

# Paths relative to -I so the stubs import each other as `megascale.v1.*`; sorted so the
# output does not depend on the filesystem's listing order.
cd "$root/proto"
mapfile -t protos < <(LC_ALL=C ls megascale/v1/*.proto | LC_ALL=C sort)

"${PYTHON:-python}" -m grpc_tools.protoc -I. \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "${protos[@]}"
