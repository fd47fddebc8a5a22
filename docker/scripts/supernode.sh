#!/bin/sh
# Start this tenant's SuperNode through `fedlora deploy supernode`: TLS to the SuperLink with
# the federation's CA, the tenant's authentication key, its own data file (read-only) and
# its writable state directory (privacy ledger, delta residuals). ClientApps run as local
# subprocesses and reach the SuperNode's Runtime API on 127.0.0.1 only. Telemetry, update
# checks and runtime dependency installation are off (environment set in the image).
# `fedlora deploy supernode` stays in the foreground as the supervisor of the SuperNode and
# the tenant worker (which keeps the model loaded; its socket lives in the state directory).
#   SUPERLINK (host:port, required), TENANT_ID (default 0), LORA_RANK (optional, svd runs),
#   DATA (default /data/train.jsonl), CA_CERT (/certs/ca.crt), NODE_KEY (/keys/node),
#   STATE_DIR (/state), NO_WORKER=1 (no tenant worker: a cold ClientApp process per message),
#   WARM (a scenario whose base and adapter the worker loads as it starts, e.g. deployment)
set -eu
: "${SUPERLINK:?set SUPERLINK=host:port}"
set -- --superlink "$SUPERLINK" \
  --ca "${CA_CERT:-/certs/ca.crt}" \
  --key "${NODE_KEY:-/keys/node}" \
  --data "${DATA:-/data/train.jsonl}" \
  --tenant-id "${TENANT_ID:-0}" \
  --state-dir "${STATE_DIR:-/state}"
if [ -n "${LORA_RANK:-}" ]; then
  set -- "$@" --lora-rank "$LORA_RANK"
fi
if [ "${NO_WORKER:-0}" = 1 ]; then
  set -- "$@" --no-worker
elif [ -n "${WARM:-}" ]; then
  set -- "$@" --warm "$WARM"
fi
exec fedlora deploy supernode "$@"
