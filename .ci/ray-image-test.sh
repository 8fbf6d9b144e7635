#!/usr/bin/env bash
# The Dockerfile's `ray` target (the image deploy/ray/rayjob.yaml names): built with
# buildah, a Ray head and a Ray worker started from it (two containers, host network), and
# one scoring job run on that cluster with `--address auto`, as the RayJob runs it. Fails
# unless the worker joins, the job scores every image once with no error row, and the
# cluster comes down cleanly. Runs after .ci/image-test.sh (it builds on the cpu image's
# layers and its base-image stand-in).
#
#   bash .ci/ray-image-test.sh        # make image-test runs it
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
IMAGE=localhost/imgclf:ray
RAY_PORT=${RAY_TEST_PORT:-6390}
T0=$(date +%s)
step() { echo "=== [ray $(( $(date +%s) - T0 )) s] $*"; }
fail() { echo "RAY IMAGE TEST FAILED: $*" >&2; exit 1; }

# shellcheck source=.ci/podman-env.sh
source .ci/podman-env.sh
ls models/demo/*/model.onnx >/dev/null 2>&1 || fail "no models/demo: run make demo-model first"
[ -d "$W/src" ] || fail "no build context in $W/src: run .ci/image-test.sh first"

step "build --target ray"
build_target ray "$IMAGE"
SIZE=$("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Size}}')

step "data every node reads: the model repository and 120 images (a shared volume)"
rm -rf "$W/ray-data"; mkdir -p "$W/ray-data/images" "$W/ray-data/out"
cp -a models "$W/ray-data/models"
ls data/demo/val/*/*.jpg | head -120 | xargs -I{} cp {} "$W/ray-data/images/" 2>/dev/null || true
COUNT=$(ls "$W/ray-data/images" | wc -l)
[ "$COUNT" -gt 0 ] || fail "no images in data/demo/val (make demo-data)"
chmod -R a+rwX "$W/ray-data"

RUN=("${PODMAN[@]}" run -d --network host "${ULIMITS[@]}" -v "$W/ray-data:/data" --shm-size 512m)
cleanup() {
    "${PODMAN[@]}" logs ray-head >"$W/ray-head.log" 2>&1 || true
    "${PODMAN[@]}" logs ray-worker >"$W/ray-worker.log" 2>&1 || true
    "${PODMAN[@]}" rm -f -t 5 ray-worker ray-head >/dev/null 2>&1 || true
}
cleanup
trap cleanup EXIT

step "a head (no CPUs: it only coordinates, as in the RayJob) and a worker joining it"
"${RUN[@]}" --name ray-head "$IMAGE" ray start --head --block --port "$RAY_PORT" \
    --num-cpus 0 --include-dashboard=false --disable-usage-stats >/dev/null
for _ in $(seq 60); do
    "${PODMAN[@]}" exec ray-head ray status --address "127.0.0.1:$RAY_PORT" >/dev/null 2>&1 && break
    sleep 1
done
"${RUN[@]}" --name ray-worker "$IMAGE" ray start --address "127.0.0.1:$RAY_PORT" --block \
    --num-cpus 2 --disable-usage-stats >/dev/null
for _ in $(seq 60); do
    "${PODMAN[@]}" exec ray-head ray status --address "127.0.0.1:$RAY_PORT" 2>/dev/null \
        | grep -q "2.0 CPU" && break
    sleep 1
done
"${PODMAN[@]}" exec ray-head ray status --address "127.0.0.1:$RAY_PORT" | tee "$W/ray-status.txt"
grep -q "2.0 CPU" "$W/ray-status.txt" || fail "the worker did not join the head"

step "one scoring job on the cluster (--address auto, as the RayJob's entrypoint)"
"${PODMAN[@]}" exec -e RAY_ADDRESS="127.0.0.1:$RAY_PORT" ray-head python -m service.scoring \
    --engine ray --address auto --no-progress --model /data/models/demo --input /data/images \
    --output /data/out/scores.jsonl --batch-size 16 | tee "$W/ray-job.txt" \
    || fail "the scoring job failed"
"$PY" - "$W/ray-data/out/scores.jsonl" "$COUNT" <<'EOF' || fail "the job's output"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
paths = [r["path"] for r in rows]
assert len(rows) == int(sys.argv[2]) == len(set(paths)), (len(rows), sys.argv[2])
assert not [r for r in rows if r["error"]], "error rows"
print(f"{len(rows)} rows, each image once, no error row")
EOF

step "stop: worker, then head"
"${PODMAN[@]}" exec ray-worker ray stop >/dev/null 2>&1 || true
"${PODMAN[@]}" exec ray-head ray stop >/dev/null 2>&1 || true
cleanup
trap - EXIT
step "passed in $(( $(date +%s) - T0 )) s; image size $(( SIZE / 1000000 )) MB"
