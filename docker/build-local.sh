#!/usr/bin/env bash
# Build fedlora's three images from a local Debian base and run the compose federation
# (SuperLink, ServerApp executor, two tenants; TLS and SuperNode authentication) for one
# round, then tear it down. For machines without an image registry; see usage below.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: docker/build-local.sh [options] [--set KEY=VALUE ...]

Build fedlora-superlink, fedlora-apps and fedlora-supernode from a local base image and
run the federation in docker/compose.yaml for one round with two synthetic tenants:

  1. base: debootstrap a minimal Debian (python3, venv, CA certificates) and `docker
     import` it as fedlora-base:SUITE, unless that image exists (needs root and
     debootstrap); or use --base IMAGE (e.g. python:3.11-slim) instead.
  2. images: build the three Dockerfiles FROM the base. The torch wheel is taken from
     pip's find-links directory (`pip config list`, or --wheels DIR) and the CA bundle pip
     trusts (pip's `cert`, or --ca-bundle FILE) is given to pip in the build stage only;
     neither ends up in an image. Without a wheel, torch comes from --torch-index.
  3. federation: credentials (docker/secrets: CA, SuperLink certificate, two tenant keys,
     SuperExec secret; never overwritten), two tenants' synthetic data (docker/data), then
     `compose up`, one `fedlora deploy run` from the operator container (run directory
     docker/runs/NAME), the round's result, and `compose down`.

Prints the build time and size of each image and the round's result (tenants sampled and
finished, their metrics, the final adapter). Exit status 0 only with a final adapter.
Running it again reuses the base, the layer cache, the credentials and the data.

options:
  --base IMAGE          build from IMAGE instead of the local Debian base
  --suite NAME          Debian suite for the local base (default: bookworm)
  --mirror URL          Debian mirror (default: the first one apt is configured with)
  --rebuild-base        debootstrap the local base again even if the image exists
  --base-only           make the local base image and stop
  --wheels DIR          directory holding the torch wheel (default: pip's find-links)
  --ca-bundle FILE      CA bundle for pip during the build (default: pip's cert, or the
                        system bundle)
  --torch-index URL     where torch comes from without a local wheel
                        (default: https://download.pytorch.org/whl/cpu)
  --git REF             build from the committed tree at REF (default: the working tree)
  --build-only          build the images, do not run the federation
  --run-only            do not build: run with the images that exist
  --run-name NAME       run directory docker/runs/NAME (default: round-<UTC time>)
  --rounds N            rounds of the run (default: 1)
  --set KEY=VALUE       one more run-config override for `fedlora deploy run` (repeatable;
                        defaults here: a short round, see RUN_DEFAULTS in this script)
  --timeout SECONDS     give up on the run after SECONDS (default: 1800)
  --keep                leave the federation running (stop it: docker compose -p fedlora
                        -f docker/compose.yaml down)
  -h, --help            this text

Needs a running Docker engine (`docker info` answers) and `docker compose` or
`docker-compose`. Environment: SUPERLINK_PORT (host port of the SuperLink, default 9093).
EOF
}

say() { printf '%s\n' "docker/build-local.sh: $*"; }
die() { printf '%s\n' "docker/build-local.sh: $*" >&2; exit 2; }

# A short round for a demonstration on a CPU: the deployment scenario (secure aggregation
# on), four local steps of eight examples, one thread per tenant, short generations.
RUN_DEFAULTS=(train.local-steps=4 train.batch-size=8 train.threads=1 eval.max-new-tokens=16
              federation.round-timeout=600)

BASE="" SUITE=bookworm MIRROR="" REBUILD_BASE=0 BASE_ONLY=0 WHEELS="" CA_BUNDLE=""
TORCH_INDEX=https://download.pytorch.org/whl/cpu GIT_REF="" BUILD=1 RUN=1
RUN_NAME="round-$(date -u +%Y%m%dT%H%M%SZ)" ROUNDS=1 TIMEOUT=1800 KEEP=0 SETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --base) BASE="${2:?--base needs an image}"; shift ;;
    --suite) SUITE="${2:?--suite needs a name}"; shift ;;
    --mirror) MIRROR="${2:?--mirror needs a URL}"; shift ;;
    --rebuild-base) REBUILD_BASE=1 ;;
    --base-only) BASE_ONLY=1 ;;
    --wheels) WHEELS="${2:?--wheels needs a directory}"; shift ;;
    --ca-bundle) CA_BUNDLE="${2:?--ca-bundle needs a file}"; shift ;;
    --torch-index) TORCH_INDEX="${2:?--torch-index needs a URL}"; shift ;;
    --git) GIT_REF="${2:?--git needs a ref}"; shift ;;
    --build-only) RUN=0 ;;
    --run-only) BUILD=0 ;;
    --run-name) RUN_NAME="${2:?--run-name needs a name}"; shift ;;
    --rounds) ROUNDS="${2:?--rounds needs a number}"; shift ;;
    --set) SETS+=("${2:?--set needs KEY=VALUE}"); shift ;;
    --timeout) TIMEOUT="${2:?--timeout needs seconds}"; shift ;;
    --keep) KEEP=1 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done
case "$ROUNDS" in ''|*[!0-9]*) die "--rounds takes a positive integer, not '$ROUNDS'" ;; esac
case "$RUN_NAME" in ''|*[!A-Za-z0-9._-]*) die "--run-name takes letters, digits, '.', '_', '-'" ;; esac

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
cd "$ROOT"
STAGE="$HERE/.stage"
LOGS="$STAGE/logs"

# --------------------------------------------------------------------------- engine
command -v docker >/dev/null || die "no docker command: install Docker (Debian/Ubuntu: apt-get install docker.io)"
if ! docker info >/dev/null 2>&1; then
  die "no Docker engine answers (\`docker info\` failed). Start one, e.g.
    sudo systemctl start docker
  or, without systemd:
    sudo sh -c 'dockerd > /var/log/dockerd.log 2>&1 &'
  (stop it again by its process id: sudo kill \$(pidof dockerd))"
fi
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
  COMPOSE=(docker-compose)
else
  die "neither \`docker compose\` nor \`docker-compose\` is installed (Debian: apt-get install docker-compose)"
fi
COMPOSE+=(-f "$HERE/compose.yaml" -p fedlora)
mkdir -p "$LOGS"

declare -A BUILD_SECONDS=()
BASE_NOTE=""

# --------------------------------------------------------------------------- base image
debian_mirror() {
  [ -n "$MIRROR" ] && { echo "$MIRROR"; return; }
  local m=""
  if ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
    m=$(awk '/^URIs:/ {print $2}' /etc/apt/sources.list.d/*.sources | grep -v -- '-security' | head -n 1 || true)
  fi
  if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
    m=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' /etc/apt/sources.list \
        | grep -v -- '-security' | head -n 1 || true)
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

make_base() {
  local image="fedlora-base:$SUITE"
  BASE="$image"
  if [ "$REBUILD_BASE" = 0 ] && docker image inspect "$image" >/dev/null 2>&1; then
    BASE_NOTE="$image (exists; --rebuild-base to make it again)"
    return
  fi
  [ "$(id -u)" = 0 ] || die "debootstrap needs root: run as root, or pass --base IMAGE (e.g. python:3.11-slim)"
  command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap), or pass --base IMAGE"
  local mirror rootfs start
  mirror="$(debian_mirror)"
  rootfs="$(mktemp -d "${TMPDIR:-/tmp}/fedlora-rootfs.XXXXXX")"
  say "debootstrap $SUITE from $mirror (a few minutes; log: $LOGS/debootstrap.log)"
  start=$(date +%s)
  if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$rootfs" "$mirror" > "$LOGS/debootstrap.log" 2>&1; then
    tail -n 20 "$LOGS/debootstrap.log" >&2
    rm -rf "$rootfs"
    die "debootstrap failed; see $LOGS/debootstrap.log"
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$image" >/dev/null
  rm -rf "$rootfs"
  BUILD_SECONDS[base]=$(( $(date +%s) - start ))
  BASE_NOTE="$image (debootstrap + import: ${BUILD_SECONDS[base]} s)"
}

# --------------------------------------------------------------------------- build context
pip_config() {  # the last value pip is configured with for KEY (find-links, cert)
  local pip
  for pip in pip3 pip; do
    if command -v "$pip" >/dev/null; then
      "$pip" config list 2>/dev/null | sed -n "s/^[^=]*\.$1='\(.*\)'$/\1/p" | tail -n 1
      return
    fi
  done
}

torch_wheel() {  # a torch wheel for the base's Python in the given directories
  local tag dir
  tag=$(docker run --rm --entrypoint python3 "$BASE" -c \
        'import platform, sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}", platform.machine())')
  for dir in "$@"; do
    [ -d "$dir" ] || continue
    ls "$dir"/torch-*-"${tag% *}"-"${tag% *}"-*"${tag#* }".whl 2>/dev/null | sort -V | tail -n 1
  done | tail -n 1
}

stage_context() {
  local ctx="$STAGE/context" paths wheel_dirs wheel bundle
  rm -rf "$ctx"
  mkdir -p "$ctx/docker/build-context/wheels" "$ctx/docker/build-context/certs"
  paths=(pyproject.toml README.md requirements-lock.txt common client server simulations docker/scripts
         docker/superlink.Dockerfile docker/apps.Dockerfile docker/supernode.Dockerfile
         docker/fleet-proxy.Dockerfile docker/fleet-proxy.conf)
  if [ -n "$GIT_REF" ]; then
    git rev-parse --verify --quiet "$GIT_REF^{commit}" >/dev/null || die "--git $GIT_REF: no such commit"
    git archive --format=tar "$GIT_REF" -- "${paths[@]}" | tar -x -C "$ctx"
    SOURCE_NOTE="commit $(git rev-parse --short "$GIT_REF^{commit}")"
  else
    tar -c --exclude=__pycache__ --exclude='*.pyc' "${paths[@]}" | tar -x -C "$ctx"
    SOURCE_NOTE="working tree"
  fi
  # shellcheck disable=SC2206  # find-links may name several directories
  wheel_dirs=(${WHEELS:-${FEDLORA_WHEELS:-$(pip_config find-links)}})
  wheel=""
  [ ${#wheel_dirs[@]} -gt 0 ] && wheel="$(torch_wheel "${wheel_dirs[@]}")"
  if [ -n "$wheel" ]; then
    ln "$wheel" "$ctx/docker/build-context/wheels/" 2>/dev/null || cp "$wheel" "$ctx/docker/build-context/wheels/"
    TORCH_NOTE="$(basename "$wheel") (local wheel)"
  else
    TORCH_NOTE="from $TORCH_INDEX (no torch wheel for the base's Python in: ${wheel_dirs[*]:-no find-links})"
  fi
  bundle="${CA_BUNDLE:-$(pip_config cert)}"
  bundle="${bundle:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
  if [ -s "$bundle" ]; then
    cp -L "$bundle" "$ctx/docker/build-context/certs/ca-certificates.crt"
  elif [ -n "$CA_BUNDLE" ]; then
    die "--ca-bundle $CA_BUNDLE: no such file"
  fi
}

build_image() {  # NAME: docker/NAME.Dockerfile -> fedlora-NAME
  local name="$1" start
  say "building fedlora-$name (log: $LOGS/build-$name.log)"
  start=$(date +%s)
  if ! docker build --force-rm --build-arg "BASE=$BASE" --build-arg "TORCH_INDEX=$TORCH_INDEX" \
        -f "$STAGE/context/docker/$name.Dockerfile" -t "fedlora-$name" "$STAGE/context" \
        > "$LOGS/build-$name.log" 2>&1; then
    tail -n 30 "$LOGS/build-$name.log" >&2
    die "building fedlora-$name failed; see $LOGS/build-$name.log"
  fi
  BUILD_SECONDS[$name]=$(( $(date +%s) - start ))
}

if [ "$BUILD" = 1 ]; then
  if [ -n "$BASE" ]; then
    docker image inspect "$BASE" >/dev/null 2>&1 || die "base image $BASE is not on this engine (docker pull $BASE, or drop --base)"
    BASE_NOTE="$BASE (given)"
  else
    make_base
  fi
  if [ "$BASE_ONLY" = 1 ]; then say "base $BASE_NOTE"; exit 0; fi
  stage_context
  say "base $BASE_NOTE; sources: $SOURCE_NOTE; torch: $TORCH_NOTE"
  for name in superlink fleet-proxy apps supernode; do build_image "$name"; done
  rm -rf "$STAGE/context"
fi
for name in superlink fleet-proxy apps supernode; do
  docker image inspect "fedlora-$name" >/dev/null 2>&1 || die "image fedlora-$name does not exist: run without --run-only"
done

print_images() {
  local name size
  printf '%-20s %10s %10s\n' image "build s" "size MB"
  for name in superlink fleet-proxy apps supernode; do
    size=$(docker image inspect -f '{{.Size}}' "fedlora-$name")
    printf '%-20s %10s %10s\n' "fedlora-$name" "${BUILD_SECONDS[$name]:--}" "$(( size / 1000000 ))"
  done
  [ -z "$BASE_NOTE" ] || printf 'base: %s, %s MB\n' "$BASE_NOTE" \
    "$(( $(docker image inspect -f '{{.Size}}' "$BASE") / 1000000 ))"
}

if [ "$RUN" = 0 ]; then
  print_images
  exit 0
fi

# --------------------------------------------------------------------------- federation
as_root_in() {  # run a shell command as root in the apps image, docker/ mounted at /docker
  docker run --rm --user 0 --entrypoint sh -v "$HERE:/docker" -w /docker "$@"
}

say "credentials in docker/secrets, synthetic data in docker/data"
as_root_in fedlora-apps -c '
  set -e
  sh /src/docker/scripts/credentials.sh secrets >/dev/null
  if [ ! -s data/tenant-a/train.jsonl ] || [ ! -s data/tenant-b/train.jsonl ]; then
    python3 -c "
from pathlib import Path
import shutil
from fedlora.simulations.synthetic import write_tenants
write_tenants(\"/tmp/synthetic\", num_tenants=2, train_size=48, holdout_size=8, preference_size=8, seed=0)
for tenant, name in ((0, \"tenant-a\"), (1, \"tenant-b\")):
    out = Path(\"data\") / name
    out.mkdir(parents=True, exist_ok=True)
    for split in (\"train\", \"holdout\"):
        shutil.copy(f\"/tmp/synthetic/tenant_{tenant:03d}/{split}.jsonl\", out / f\"{split}.jsonl\")
"
  fi
  mkdir -p runs state/superlink state/tenant-a state/tenant-b
  chmod -R a+rX data
  chown -R 10001 secrets runs state'

cleanup() {
  local code=$?
  if [ "$KEEP" = 1 ]; then
    say "the federation keeps running; stop it with: ${COMPOSE[*]} down"
  else
    say "compose down"
    "${COMPOSE[@]}" down --remove-orphans >/dev/null 2>&1 || "${COMPOSE[@]}" down --remove-orphans || true
    # one-off `run` containers a timeout left behind
    docker ps -aq --filter label=com.docker.compose.project=fedlora | xargs -r docker rm -f >/dev/null || true
  fi
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "compose up: superlink, serverapp, fleet-proxy, register, tenant-a, tenant-b"
"${COMPOSE[@]}" up -d superlink serverapp fleet-proxy register tenant-a tenant-b

SET_ARGS=(--set "federation.rounds=$ROUNDS")
for kv in "${RUN_DEFAULTS[@]}" "${SETS[@]}"; do SET_ARGS+=(--set "$kv"); done
say "fedlora deploy run --run-dir /runs/$RUN_NAME ${SET_ARGS[*]}"
start=$(date +%s)
set +e
timeout "$TIMEOUT" "${COMPOSE[@]}" run --rm -T operator --run-dir "/runs/$RUN_NAME" "${SET_ARGS[@]}" \
  2>&1 | tee "$LOGS/run-$RUN_NAME.log"
run_code=${PIPESTATUS[0]}
set -e
RUN_SECONDS=$(( $(date +%s) - start ))
if [ "$run_code" != 0 ]; then
  say "the run failed (exit $run_code after $RUN_SECONDS s); the containers' last lines:"
  "${COMPOSE[@]}" logs --no-color --tail 40 superlink serverapp fleet-proxy register tenant-a tenant-b >&2 || true
fi

worker_status() {  # one line per tenant: what its tenant worker says of itself
  local tenant
  for tenant in tenant-a tenant-b; do
    printf '%s worker: ' "$tenant"
    "${COMPOSE[@]}" exec -T "$tenant" sh -c 'fedlora deploy worker-status --state-dir /state 2>/dev/null \
      | python3 -c "import json, sys; h = json.load(sys.stdin); print(\"pid {pid}, up {uptime_s} s, messages served {served} (pulled by the worker itself {tasks}), failed {failed}; warm-up {w}\".format(w=h.get(\"warm\", {}).get(\"state\", \"-\"), **h))" \
      || echo "no tenant worker answers"' || echo "(container not running)"
  done
}

control_plane() {  # from a tenant's container: Control and Runtime refused, the SuperLink itself unreachable
  "${COMPOSE[@]}" exec -T tenant-a python3 -c '
import socket, ssl, urllib.error, urllib.request
ctx = ssl.create_default_context(cafile="/certs/ca.crt")
got = {}
for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/control/stop-run",
             "/v1/control/stream-logs", "/v1/runtime/acquire-task", "/v1/fleet/get-run"):
    req = urllib.request.Request("https://fleet-proxy:9093" + path, data=b"", method="POST",
                                 headers={"content-type": "application/protobuf"})
    try:
        got[path] = urllib.request.urlopen(req, context=ctx, timeout=10).status
    except urllib.error.HTTPError as err:
        got[path] = err.code
try:
    socket.create_connection(("superlink", 9093), timeout=5).close()
    direct = "reachable"
except OSError as err:
    direct = type(err).__name__
closed = all(code == 403 for path, code in got.items() if "/fleet/" not in path)
print("control plane from tenant-a:", "closed" if closed and got["/v1/fleet/get-run"] != 403 and
      direct != "reachable" else "OPEN", got, "superlink:9093 directly:", direct)
' || echo "control plane from tenant-a: (check failed to run)"
}

echo
echo "== fedlora on Docker: $ROUNDS round(s), two tenants, TLS + SuperNode authentication =="
print_images
echo "run: docker/runs/$RUN_NAME (${RUN_SECONDS} s from submission to report)"
set +e
docker run --rm --entrypoint python3 -v "$HERE/runs:/runs:ro" fedlora-apps \
  /src/docker/scripts/summary.py "/runs/$RUN_NAME"
summary_code=$?
worker_status
control_plane
set -e
[ "$run_code" = 0 ] && [ "$summary_code" = 0 ] || exit 1
