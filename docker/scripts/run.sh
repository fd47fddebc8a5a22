#!/bin/sh
# Operator: wait until $NODES tenant SuperNodes are online (at most $WAIT_SECONDS), then
# submit one fedlora run with `fedlora deploy run` (arguments passed on, e.g.
# --run-dir /runs/first --set federation.rounds=1). It streams the run, waits for the final
# adapter and writes the report into the run directory.
set -eu
. "$(dirname "$0")/flwr-cli.sh"
NODES="${NODES:-2}"
end=$(( $(date +%s) + ${WAIT_SECONDS:-300} ))
while n=$(online_nodes); [ "$n" -lt "$NODES" ]; do
  if [ "$(date +%s)" -ge "$end" ]; then
    echo "only $n of $NODES tenant SuperNodes online after ${WAIT_SECONDS:-300} s" >&2
    exit 1
  fi
  sleep 2
done
echo "$n tenant SuperNodes online; submitting the run"
exec fedlora deploy run --superlink "$SUPERLINK" --ca "${CA_CERT:-/certs/ca.crt}" --flwr-home "$FLWR_HOME" "$@"
