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
