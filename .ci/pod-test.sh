#!/usr/bin/env bash
# The Kubernetes Deployment's pod, from deploy/k8s/classifier.yaml as written, run with
# `podman kube play` (no cluster needed): only the image name (the local build), the replica
# count (one) and loopback host ports standing in for the Service are changed, in a copy.
# Fails unless the pod comes up as the manifest says — non-root uid, read-only root
# filesystem with the manifest's volumes, the config read from the ConfigMap (its worker
# count), models from the claim — serves gRPC and HTTP, serves a version published into
# the claim later (the manifest promises it), answers its probes' health calls, and exits 0
# when stopped. Runs after .ci/image-test.sh has built localhost/imgclf:cpu.
#
#   bash .ci/pod-test.sh        # make image-test runs it
#
# What podman cannot run of the manifest is listed at the end of its output (the kinds it
# leaves out, probes, resources), and done by hand from inside the pod where possible.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
IMAGE=localhost/imgclf:cpu
GRPC_PORT=${POD_TEST_GRPC_PORT:-50251}
HTTP_PORT=${POD_TEST_HTTP_PORT:-8200}
METRICS_PORT=${POD_TEST_METRICS_PORT:-9290}
T0=$(date +%s)
step() { echo "=== [pod $(( $(date +%s) - T0 )) s] $*"; }
fail() { echo "POD TEST FAILED: $*" >&2; exit 1; }

# shellcheck source=.ci/podman-env.sh
source .ci/podman-env.sh
"${PODMAN[@]}" image exists "$IMAGE" || fail "no $IMAGE: run .ci/image-test.sh first"
ls models/demo/*/model.onnx >/dev/null 2>&1 || fail "no models/demo: run make demo-model first"

step "the manifest, adapted in a copy: image, one replica, loopback host ports"
# The claim is played first, so that a model can be published into its volume before the
# Deployment's pod starts (as a claim would hold one before a rollout).
CLAIM=$W/pod/claim.yaml
KUBE=$W/pod/classifier.yaml
mkdir -p "$W/pod"
"$PY" - "$ROOT/deploy/k8s/classifier.yaml" "$CLAIM" "$KUBE" "$IMAGE" "$GRPC_PORT" "$HTTP_PORT" \
    "$METRICS_PORT" >"$W/pod/ignored.txt" <<'EOF'
import sys
import yaml

source, claim_file, target, image, grpc_port, http_port, metrics_port = sys.argv[1:]
docs = list(yaml.safe_load_all(open(source)))
claims, played, ignored = [], [], []
host_ports = {50051: int(grpc_port), 8000: int(http_port), 9090: int(metrics_port)}
for doc in docs:
    kind = doc["kind"]
    if kind == "Deployment":
        doc["spec"]["replicas"] = 1
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        container["image"] = image
        for port in container["ports"]:
            port["hostPort"] = host_ports[port["containerPort"]]
            port["hostIP"] = "127.0.0.1"
        grace = doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        open(f"{target}.grace", "w").write(str(grace))
    if kind == "PersistentVolumeClaim":
        claims.append(doc)
    elif kind in ("Deployment", "ConfigMap"):
        played.append(doc)
    else:
        ignored.append(f"{kind}/{doc['metadata']['name']}")
yaml.safe_dump_all(claims, open(claim_file, "w"), sort_keys=False)
yaml.safe_dump_all(played, open(target, "w"), sort_keys=False)
print("\n".join(ignored))
EOF
# podman 4.3 ignores terminationGracePeriodSeconds (its containers get the default 10 s
# before SIGKILL, less than the drain takes): the manifest's value, as podman's stop_timeout,
# which `pod stop` then honours.
GRACE=$(cat "$KUBE.grace")
sed "s/^\[engine\]$/[engine]\nstop_timeout = $GRACE/" "$CONTAINERS_CONF_FILE" >"$W/pod/containers.conf"
export CONTAINERS_CONF=$W/pod/containers.conf
echo "played: ConfigMap, PersistentVolumeClaim, Deployment (1 replica)"
echo "not played by podman (no cluster): $(tr '\n' ' ' <"$W/pod/ignored.txt")"

cleanup() {
    "${PODMAN[@]}" kube down "$KUBE" >/dev/null 2>&1 || true
    "${PODMAN[@]}" kube down "$CLAIM" >/dev/null 2>&1 || true
    "${PODMAN[@]}" volume rm -f imgclf-models >/dev/null 2>&1 || true
}
cleanup
trap cleanup EXIT

step "the claim (podman kube play makes it a volume), with a model published into it"
"${PODMAN[@]}" kube play "$CLAIM" >"$W/pod/claim.log" 2>&1 || { cat "$W/pod/claim.log"; fail "kube play (claim)"; }
VOLUME=$("${PODMAN[@]}" volume inspect imgclf-models --format '{{.Mountpoint}}')
publish() {  # the manifest's recipe: copy into a dot-folder, then rename it
    local version=$1
    mkdir -p "$VOLUME/demo/.incoming-$version"
    cp "$(ls models/demo/*/model.onnx | tail -1)" "$VOLUME/demo/.incoming-$version/model.onnx"
    chmod -R a+rX "$VOLUME/demo"
    mv "$VOLUME/demo/.incoming-$version" "$VOLUME/demo/$version"
}
publish 1

step "podman kube play (ConfigMap and Deployment)"
STARTED=$(date +%s)
"${PODMAN[@]}" kube play "$KUBE" >"$W/pod/play.log" 2>&1 || { cat "$W/pod/play.log"; fail "kube play"; }
POD=$("${PODMAN[@]}" pod ps --format '{{.Name}}' | awk '/^imgclf/ && !n++')
CONTAINER=$("${PODMAN[@]}" ps -a --filter "pod=$POD" --format '{{.Names}}' | awk '!/infra/ && !n++')
[ -n "$CONTAINER" ] || { "${PODMAN[@]}" ps -a; fail "no classifier container in pod ${POD:-?}"; }
echo "pod $POD, container $CONTAINER"
client() { "$PY" -m service.client --target "127.0.0.1:$GRPC_PORT" "$@"; }
for _ in $(seq 90); do
    [ "$(client --timeout 2 health 2>/dev/null)" = SERVING ] && break
    [ "$("${PODMAN[@]}" inspect "$CONTAINER" --format '{{.State.Running}}')" = true ] \
        || { "${PODMAN[@]}" logs "$CONTAINER" 2>&1 | tail -20; fail "the container exited"; }
    sleep 1
done
[ "$(client --timeout 3 health)" = SERVING ] || fail "not SERVING after 90 s"
echo "SERVING $(( $(date +%s) - STARTED )) s after kube play"

step "as the manifest says: uid, read-only root, volumes, the ConfigMap's settings"
UID_IN=$("${PODMAN[@]}" exec "$CONTAINER" id -u)
[ "$UID_IN" = 10001 ] || fail "runs as uid $UID_IN, the manifest says 10001"
"${PODMAN[@]}" exec "$CONTAINER" sh -c 'touch /app/x 2>/dev/null' \
    && fail "the root filesystem is writable (readOnlyRootFilesystem: true)"
"${PODMAN[@]}" exec "$CONTAINER" sh -c 'touch /tmp/x && touch /cache/tensorrt/x' \
    || fail "the emptyDir volumes /tmp and /cache/tensorrt are not writable"
"${PODMAN[@]}" exec "$CONTAINER" sh -c 'touch /models/x 2>/dev/null' \
    && fail "the models volume is writable (readOnly: true)"
"${PODMAN[@]}" exec "$CONTAINER" cat /config/serve.yaml | grep -q 'repository_poll_seconds: 30' \
    || fail "the ConfigMap is not mounted at /config"
"${PODMAN[@]}" logs "$CONTAINER" 2>&1 | grep '"msg": "listening"' | tail -1 >"$W/pod/listening.json"
WORKERS=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['workers'])" "$W/pod/listening.json")
[ "$WORKERS" = 2 ] || fail "$WORKERS worker(s); the ConfigMap says workers: 2"
echo "uid 10001, read-only root, /tmp and /cache/tensorrt writable, /models read-only, $WORKERS workers from /config/serve.yaml"

step "the probes' calls, by hand from inside the pod (podman runs no grpc probes)"
"${PODMAN[@]}" exec "$CONTAINER" python -m service.client --target 127.0.0.1:50051 health \
    | grep -qx SERVING || fail "readiness (grpc.health.v1 '') is not SERVING"
"${PODMAN[@]}" exec "$CONTAINER" python -m service.client --target 127.0.0.1:50051 health \
    --service liveness | grep -qx SERVING || fail "liveness (grpc.health.v1 'liveness') is not SERVING"
echo "readiness and liveness: SERVING"

step "classify over the published gRPC and HTTP ports"
JPEG=$(ls data/demo/val/3/*.jpg 2>/dev/null | head -1 || true)
if [ -z "$JPEG" ]; then
    "$PY" -c "import skimage.data; from PIL import Image; \
Image.fromarray(skimage.data.chelsea()).save('$W/pod/cat.jpg', quality=90)"
    JPEG=$W/pod/cat.jpg
fi
client classify "$JPEG" --top-k 1 | tee "$W/pod/classify.txt"
grep -q "$(basename "$JPEG")" "$W/pod/classify.txt" || fail "gRPC Classify answered nothing"
curl -sf --data-binary "@$JPEG" -H 'Content-Type: image/jpeg' \
    "http://127.0.0.1:$HTTP_PORT/v1/models/demo:classify?top_k=1" | tee "$W/pod/rest.json"; echo
grep -q '"version":"1"' "$W/pod/rest.json" || fail "REST classify did not answer from version 1"
# Each failed attempt is reported (so a transient shows in the log), and it fails after
# 10 s. To a file, not a pipe: `grep -q` stops reading at the first match, and curl, still
# writing, would fail the pipeline under pipefail.
for attempt in $(seq 10); do
    CURL_RC=0
    HTTP_CODE=$(curl -s -o "$W/pod/metrics.txt" -w '%{http_code}' \
        "http://127.0.0.1:$METRICS_PORT/metrics") || CURL_RC=$?
    if [ "$CURL_RC" = 0 ] && [ "$HTTP_CODE" = 200 ] \
        && grep -q '^classifier_requests_total' "$W/pod/metrics.txt"; then
        break
    fi
    echo "/metrics attempt $attempt: curl exit $CURL_RC, HTTP $HTTP_CODE, $(grep -c '^classifier_requests_total' "$W/pod/metrics.txt" 2>/dev/null || true) classifier_requests_total lines"
    if [ "$attempt" = 10 ]; then
        grep '^classifier_requests\|^classifier_model_ready' "$W/pod/metrics.txt" || head -c 600 "$W/pod/metrics.txt"
        "${PODMAN[@]}" logs "$CONTAINER" 2>&1 | tail -20
        fail "/metrics on the metrics port: curl exit $CURL_RC, HTTP $HTTP_CODE"
    fi
    sleep 1
done
echo "/metrics: $(wc -c <"$W/pod/metrics.txt") bytes, classifier_requests_total present"

step "a second version published into the claim is served (the manifest polls every 30 s)"
PUBLISHED=$(date +%s)
publish 2
for _ in $(seq 60); do
    curl -sf --data-binary "@$JPEG" -H 'Content-Type: image/jpeg' \
        "http://127.0.0.1:$HTTP_PORT/v1/models/demo:classify?top_k=1" 2>/dev/null \
        | grep -q '"version":"2"' && break
    sleep 1
done
grep -q '"version":"2"' <(curl -sf --data-binary "@$JPEG" -H 'Content-Type: image/jpeg' \
    "http://127.0.0.1:$HTTP_PORT/v1/models/demo:classify?top_k=1") \
    || fail "version 2 is not served after 60 s"
client models | tee "$W/pod/models.txt"
echo "version 2 served $(( $(date +%s) - PUBLISHED )) s after it was published"

step "stop: drain, then exit 0 within terminationGracePeriodSeconds ($GRACE s), then kube down"
# `podman kube down` in podman 4.3 SIGKILLs at once, whatever the stop timeout (podman
# issues 19135, 21767); its own workaround, as a kubelet would stop it: pod stop first.
STOPPING=$(date +%s)
"${PODMAN[@]}" logs -f "$CONTAINER" >"$W/pod/container.log" 2>&1 &
"${PODMAN[@]}" pod stop "$POD" >/dev/null || fail "pod stop"
CODE=$("${PODMAN[@]}" inspect "$CONTAINER" --format '{{.State.ExitCode}}')
[ "$CODE" = 0 ] || { tail -20 "$W/pod/container.log"; fail "exit code $CODE after pod stop"; }
grep -q '"msg": "draining' "$W/pod/container.log" || fail "no drain in the container's log"
echo "drained, exit code 0, $(( $(date +%s) - STOPPING )) s after the stop"
"${PODMAN[@]}" kube down "$KUBE" >/dev/null || fail "kube down"

step "passed in $(( $(date +%s) - T0 )) s"
echo "run by podman from the manifest: the Deployment's pod spec (securityContext, env, ports,"
echo "  volumes: the ConfigMap, the claim, the emptyDirs), the ConfigMap and the claim"
echo "not run by podman: $(tr '\n' ' ' <"$W/pod/ignored.txt")and, in the pod spec, the"
echo "  probes (grpc: checked by hand above), resources (requests/limits), the rolling update"
echo "  strategy, fsGroup, terminationGracePeriodSeconds (given to podman as stop_timeout)"
