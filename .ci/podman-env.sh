# Sourced by the image tests (.ci/image-test.sh, .ci/pod-test.sh, .ci/ray-image-test.sh):
# podman and buildah as these machines need them (see ../shared/container/README.md).
# crun refuses the hybrid cgroups here (runc instead); raising rlimits is not allowed
# (explicit ulimits); storage in a folder of ours (vfs), events in a file (no systemd).
W=${IMAGE_TEST_DIR:-${TMPDIR:-/tmp}/imgclf-image-test}
HARD_NOFILE=$(ulimit -Hn); [ "$HARD_NOFILE" = unlimited ] && HARD_NOFILE=1048576
NOFILE=$(( HARD_NOFILE < 65536 ? HARD_NOFILE : 65536 ))
HARD_NPROC=$(ulimit -Hu); [ "$HARD_NPROC" = unlimited ] && HARD_NPROC=32768
NPROC=$(( HARD_NPROC < 32768 ? HARD_NPROC : 32768 ))
ULIMITS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC")
STORE=(--root "$W/storage" --runroot "$W/runroot" --storage-driver vfs)
PODMAN=(podman "${STORE[@]}" --runtime runc --cgroup-manager cgroupfs --events-backend file)
BUILDAH=(buildah "${STORE[@]}")
mkdir -p "$W"
# `podman kube play` takes no --ulimit: the same limits, and the runtime, as configuration.
CONTAINERS_CONF_FILE=$W/containers.conf
cat >"$CONTAINERS_CONF_FILE" <<EOF
[containers]
default_ulimits = ["nofile=$NOFILE:$NOFILE", "nproc=$NPROC:$NPROC"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF

# build_target TARGET IMAGE: the Dockerfile's TARGET from the build context in $W/src (made
# by .ci/image-test.sh), pip trusting the host's CA bundle for the build only; prints the
# time and size, and exits (through the caller's `fail`) with the log's tail if it fails.
build_target() {
    local target=$1 image=$2 started log=$W/build-$1.log size
    started=$(date +%s)
    (cd "$W/src" && "${BUILDAH[@]}" bud --format docker --pull-never --isolation chroot \
        "${ULIMITS[@]}" -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
        -v "$W/pip.conf:/etc/pip.conf:ro" --target "$target" -t "$image" -f Dockerfile .) \
        >"$log" 2>&1 || { tail -40 "$log"; fail "the $target target does not build"; }
    size=$("${PODMAN[@]}" image inspect "$image" --format '{{.Size}}')
    echo "built in $(( $(date +%s) - started )) s; image size: $size bytes ($(( size / 1000000 )) MB)"
}
