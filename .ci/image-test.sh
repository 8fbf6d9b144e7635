#!/usr/bin/env bash
# Build the Dockerfile's `cpu` target and run it as a user would, with no Docker daemon:
# Debian's buildah builds it and podman runs it. Fails (non-zero) unless the container
# serves, classifies a JPEG over gRPC and REST, passes its HEALTHCHECK, runs as a non-root
# user without torch, serves /metrics, and exits 0 on SIGTERM; then podman-compose runs
# docker-compose.yml's classifier service on the image and it must classify. Reports the
# image's size. Uses the ports docker-compose.yml publishes (50051, 8000, 9090): run it
# with no other server on them.
#
#   make image-test          # needs root for apt-get the first time; models/demo (make demo-model)
#
# Facts about these machines it works around (see ../shared/container/README.md):
# podman's crun refuses the hybrid cgroups here (runc instead); raising rlimits is not
# allowed (explicit --ulimit); pip inside the build trusts the host's CA bundle, mounted
# for the build only; HEALTHCHECK survives only in the docker image format; without
# systemd health checks run on demand (`podman healthcheck run`). There is no registry:
# the python:3.11-slim-bookworm base is stood in for by a debootstrap of Debian bookworm
# with python3.11 in a venv at /usr/local, imported under the name FROM resolves to.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
GRPC_PORT=${IMAGE_TEST_GRPC_PORT:-50151}
HTTP_PORT=${IMAGE_TEST_HTTP_PORT:-8100}
METRICS_PORT=${IMAGE_TEST_METRICS_PORT:-9190}
BASE=docker.io/library/python:3.11-slim-bookworm
IMAGE=localhost/imgclf:cpu
NAME=imgclf-image-test
PY=$ROOT/.venv/bin/python

T0=$(date +%s)
step() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
fail() { echo "IMAGE TEST FAILED: $*" >&2; exit 1; }

[ -x "$PY" ] || fail "no .venv: run make setup first"
ls models/demo/*/model.onnx >/dev/null 2>&1 || fail "no models/demo: run make demo-model first"

step "tools: buildah, podman, runc, debootstrap (Debian)"
if ! command -v buildah >/dev/null || ! command -v podman >/dev/null \
    || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null \
    || ! command -v podman-compose >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq buildah podman podman-compose runc debootstrap >/dev/null
fi

# shellcheck source=.ci/podman-env.sh
source .ci/podman-env.sh

step "base image stand-in ($BASE)"
if ! "${PODMAN[@]}" image exists "$BASE"; then
    MIRROR=$(grep -hE '^URIs: .*/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | head -1 | awk '{print $2}')
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    rm -rf "$W/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$W/rootfs" "$MIRROR" >"$W/debootstrap.log" 2>&1 \
        || { tail -20 "$W/debootstrap.log"; fail "debootstrap"; }
    chroot "$W/rootfs" /usr/bin/python3 -m venv /usr/local
    rm -f "$W"/rootfs/usr/local/bin/{activate,activate.csh,activate.fish,Activate.ps1}
    rm -rf "$W"/rootfs/var/cache/apt/archives/*.deb "$W"/rootfs/var/lib/apt/lists/* \
        "$W"/rootfs/usr/share/{doc,man,info}/*
    tar -C "$W/rootfs" --numeric-owner -cf "$W/base.tar" .
    "${PODMAN[@]}" import \
        --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$W/base.tar" "$BASE" >/dev/null
    rm -rf "$W/rootfs" "$W/base.tar"
fi
echo "base: $("${PODMAN[@]}" image inspect "$BASE" --format '{{.Size}}') bytes"

step "build --target cpu (context: the tracked and untracked, not ignored, files)"
rm -rf "$W/src"; mkdir -p "$W/src"
git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -x -C "$W/src"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$W/pip.conf"
build_target cpu "$IMAGE"
SIZE=$("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Size}}')

step "run: models read-only at /models, ports on 127.0.0.1"
rm -rf "$W/models"; mkdir -p "$W/models"; cp -a models/demo "$W/models/"
chmod -R a+rX "$W/models"
"${PODMAN[@]}" rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
trap '"${PODMAN[@]}" logs "$NAME" >"$W/container.log" 2>&1 || true; "${PODMAN[@]}" rm -f -t 0 "$NAME" >/dev/null 2>&1 || true' EXIT
"${PODMAN[@]}" run -d --name "$NAME" "${ULIMITS[@]}" \
    -p "127.0.0.1:$GRPC_PORT:50051" -p "127.0.0.1:$HTTP_PORT:8000" \
    -p "127.0.0.1:$METRICS_PORT:9090" \
    -v "$W/models:/models:ro" "$IMAGE" >/dev/null 2>"$W/run.err" \
    || { cat "$W/run.err"; fail "podman run"; }
client() { "$PY" -m service.client --target "127.0.0.1:$GRPC_PORT" "$@"; }

step "health: grpc.health.v1 SERVING within 120 s"
for _ in $(seq 60); do
    [ "$(client --timeout 2 health 2>/dev/null)" = SERVING ] && break
    "${PODMAN[@]}" container exists "$NAME" || fail "the container exited"
    sleep 2
done
[ "$(client --timeout 3 health)" = SERVING ] || fail "not SERVING after 120 s"

step "classify a JPEG over gRPC and over REST"
JPEG=$(ls data/demo/val/3/*.jpg 2>/dev/null | head -1 || true)
if [ -z "$JPEG" ]; then
    "$PY" -c "import skimage.data; from PIL import Image; \
Image.fromarray(skimage.data.chelsea()).save('$W/cat.jpg', quality=90)"
    JPEG=$W/cat.jpg
fi
client classify "$JPEG" --top-k 3 | tee "$W/classify.txt"
grep -q . "$W/classify.txt" || fail "Classify answered nothing"
curl -sf --data-binary "@$JPEG" -H 'Content-Type: image/jpeg' \
    "http://127.0.0.1:$HTTP_PORT/v1/models/demo:classify?top_k=3" | tee "$W/rest.json"; echo
grep -q '"predictions"' "$W/rest.json" || fail "REST classify answered no predictions"

step "HEALTHCHECK, user, torch, metrics"
"${PODMAN[@]}" healthcheck run "$NAME" 2>/dev/null || fail "the HEALTHCHECK fails"
echo "HEALTHCHECK: $("${PODMAN[@]}" inspect "$NAME" --format '{{.State.Health.Status}}')"
UID_IN=$("${PODMAN[@]}" exec "$NAME" id -u)
[ "$UID_IN" != 0 ] || fail "the server runs as root"
echo "runs as uid $UID_IN"
"${PODMAN[@]}" exec "$NAME" python -c "import importlib.util as u; \
assert u.find_spec('torch') is None, 'torch is in the image'" || fail "torch is in the image"
curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" | grep -m1 '^classifier_requests_total' \
    || fail "/metrics has no classifier_requests_total"

step "SIGTERM: drain and exit 0"
"${PODMAN[@]}" stop -t 30 "$NAME" >/dev/null 2>&1
CODE=$("${PODMAN[@]}" inspect "$NAME" --format '{{.State.ExitCode}}')
[ "$CODE" = 0 ] || { "${PODMAN[@]}" logs "$NAME" 2>&1 | tail -20; fail "exit code $CODE after SIGTERM"; }
echo "exit code 0"

step "compose: podman-compose runs docker-compose.yml's classifier service on that image"
# Prometheus and Grafana images cannot be pulled here; their configuration is checked by
# promtool and the dashboard test (tests/unit/deploy). The compose file is used as written,
# from a copy of the project with the models it mounts (./models, read-only).
rm -rf "$W/compose"; mkdir -p "$W/compose"
cp docker-compose.yml "$W/compose/"; cp -a "$W/models" "$W/compose/models"
COMPOSE=(podman-compose --podman-args "${STORE[*]} --runtime runc --cgroup-manager cgroupfs --events-backend file"
    --podman-run-args "${ULIMITS[*]}" -f "$W/compose/docker-compose.yml")
(cd "$W/compose" && "${COMPOSE[@]}" up -d --no-build --no-deps classifier) >"$W/compose.log" 2>&1 \
    || { tail -20 "$W/compose.log"; fail "podman-compose up"; }
trap '(cd "$W/compose" && "${COMPOSE[@]}" down -t 20) >>"$W/compose.log" 2>&1 || true' EXIT
for _ in $(seq 60); do
    [ "$("$PY" -m service.client --target 127.0.0.1:50051 --timeout 2 health 2>/dev/null)" = SERVING ] && break
    sleep 2
done
"$PY" -m service.client --target 127.0.0.1:50051 classify "$JPEG" --top-k 1 \
    || { tail -20 "$W/compose.log"; fail "the compose service does not classify"; }
(cd "$W/compose" && "${COMPOSE[@]}" down -t 20) >>"$W/compose.log" 2>&1 || fail "podman-compose down"
trap - EXIT

step "passed in $(( $(date +%s) - T0 )) s; image size $(( SIZE / 1000000 )) MB"
