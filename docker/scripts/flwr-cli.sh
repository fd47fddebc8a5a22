# Sourced by register.sh and run.sh: a flwr CLI home whose default connection `fedlora` is
# the SuperLink at $SUPERLINK over TLS with the federation's CA, and a count of online nodes.
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

# How many SuperNodes the SuperLink sees online (-1 while it does not answer).
online_nodes() {
  flwr supernode list fedlora --format json 2>/dev/null | python3 -c '
import json, sys
try:
    reply = json.load(sys.stdin)
except ValueError:
    reply = {}
if reply.get("success") is True:
    print(sum(1 for n in reply.get("nodes", []) if str(n.get("status", "")).lower() == "online"))
else:
    print(-1)' 2>/dev/null || echo -1
}

# Wait until the SuperLink answers, at most $1 seconds.
wait_superlink() {
  end=$(( $(date +%s) + $1 ))
  until [ "$(online_nodes)" -ge 0 ]; do
    if [ "$(date +%s)" -ge "$end" ]; then
      echo "the SuperLink at $SUPERLINK did not answer within $1 s" >&2
      return 1
    fi
    sleep 2
  done
}
