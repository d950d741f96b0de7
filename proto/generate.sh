#!/usr/bin/env bash
# Regenerates the Python stubs of every contract in proto/ into the shared
# library (common/src/crm/...). Generated files are never edited by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
# CRM_PROTO_OUT: generate somewhere else (the tests compare that with the
# committed stubs).
out=$(realpath -m "${CRM_PROTO_OUT:-common/src}")
rm -rf "$out/crm"
mapfile -t protos < <(cd proto && find crm -name '*.proto' | sort)
(cd proto && python -m grpc_tools.protoc -I . \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" \
  "${protos[@]}")
# Make every generated directory a regular package.
find "$out/crm" -type d -exec touch {}/__init__.py \;
echo "generated stubs for ${#protos[@]} proto files into $out/crm"
