#!/bin/sh
# Make what docker/compose.yaml mounts: a CA + SuperLink certificate valid for the compose
# service names (superlink, and fleet-proxy which the tenants dial; certificates made before the
# proxy existed lack it: delete docker/secrets/certs to make new ones), two tenant key pairs and the SuperExec secret. Run from the repository root
# with fedlora installed (or in the apps image). Makes only what is missing and never
# overwrites: delete a file (or use fedlora's --force) to replace it.
set -eu
OUT="${1:-docker/secrets}"
[ -e "$OUT/certs/ca.crt" ] || fedlora certs --out "$OUT/certs" --host superlink --host fleet-proxy --host localhost --host 127.0.0.1
for tenant in tenant-a tenant-b; do
  [ -e "$OUT/keys/$tenant" ] || fedlora keys node "$tenant" --out "$OUT/keys"
done
umask 077
[ -e "$OUT/superexec" ] || python3 -c "import secrets; print(secrets.token_hex(32), end='')" > "$OUT/superexec"
echo "credentials in $OUT (private keys mode 0600; keep ca.key offline)"
