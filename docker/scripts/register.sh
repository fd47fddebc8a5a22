#!/bin/sh
# Register every tenant public key in /keys/*.pub with the SuperLink (operator side).
# A key already registered is reported and skipped, so the script can run at every start.
set -eu
: "${SUPERLINK:?set SUPERLINK=host:port}"
export FLWR_HOME="${FLWR_HOME:-/tmp/flwr-home}"
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "fedlora"

[superlink.fedlora]
address = "$SUPERLINK"
root-certificates = "${CA_CERT:-/certs/ca.crt}"
TOML
for key in /keys/*.pub; do
  echo "registering $key"
  flwr supernode register "$key" fedlora || echo "  (not registered: already known, or see the message above)"
done
