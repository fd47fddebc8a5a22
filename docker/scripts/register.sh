#!/bin/sh
# Register every tenant public key in /keys/*.pub with the SuperLink (operator side). Waits
# for the SuperLink first; a key already registered counts as registered, so the script can
# run at every start. Any other refusal fails it (compose restarts it).
set -eu
. "$(dirname "$0")/flwr-cli.sh"
wait_superlink "${WAIT_SECONDS:-120}"
for key in /keys/*.pub; do
  if out=$(flwr supernode register "$key" fedlora 2>&1); then
    echo "registered $key: $out"
  elif printf '%s' "$out" | grep -qi "already in use"; then
    echo "registered $key: already known to the SuperLink"
  else
    printf 'registering %s failed:\n%s\n' "$key" "$out" >&2
    exit 1
  fi
done
