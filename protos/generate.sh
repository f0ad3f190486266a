#!/usr/bin/env bash
# Regenerates proxy/cri/gen from protos/ (needs the dev extra: grpcio-tools).
set -euo pipefail
cd "$(dirname "$0")/.."
out=proxy/cri/gen
rm -rf "$out/runtime"
"${PYTHON:-.venv/bin/python}" -m grpc_tools.protoc -Iprotos \
  --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" protos/runtime/v1/api.proto
# protoc writes absolute imports rooted at protos/; make them package-relative.
sed -i 's/^from runtime\.v1 import api_pb2/from proxy.cri.gen.runtime.v1 import api_pb2/' \
  "$out/runtime/v1/api_pb2_grpc.py"
touch "$out/__init__.py" "$out/runtime/__init__.py" "$out/runtime/v1/__init__.py"
