#!/bin/sh
# Make what docker/compose.yaml mounts: a CA + SuperLink certificate valid for the compose
# service name, two tenant key pairs and the SuperExec secret. Run from the repository root
# with fedlora installed; never overwrites (pass --force to fedlora to replace files).
set -eu
OUT="${1:-docker/secrets}"
fedlora certs --out "$OUT/certs" --host superlink --host localhost --host 127.0.0.1
fedlora keys node tenant-a --out "$OUT/keys"
fedlora keys node tenant-b --out "$OUT/keys"
umask 077
[ -e "$OUT/superexec" ] || python3 -c "import secrets; print(secrets.token_hex(32), end='')" > "$OUT/superexec"
echo "credentials in $OUT (private keys mode 0600; keep ca.key offline)"
