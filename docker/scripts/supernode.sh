#!/bin/sh
# Start this tenant's SuperNode: TLS to the SuperLink with the federation's CA, the tenant's
# authentication key, its own data file; ClientApps run as local subprocesses and reach the
# SuperNode's Runtime API on 127.0.0.1 only. Telemetry, update checks and runtime
# dependency installation are off (environment set in the image).
set -eu
: "${SUPERLINK:?set SUPERLINK=host:port}"
DATA="${DATA:-/data/train.jsonl}"
exec flower-supernode \
  --superlink "$SUPERLINK" \
  --root-certificates "${CA_CERT:-/certs/ca.crt}" \
  --auth-supernode-private-key "${NODE_KEY:-/keys/node}" \
  --node-config "data-path=\"$DATA\" tenant-id=${TENANT_ID:-0}" \
  --isolation subprocess --host 127.0.0.1 --port 9094
