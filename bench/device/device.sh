#!/usr/bin/env bash
# The device run on a CUDA 13 machine (README, "On a GPU"), in the repository root:
#
#   bash bench/device/device.sh receive .gpu-bundle/part-1   # each part, in the manifest's order
#   bash bench/device/device.sh prepare                      # in the background: data, models
#   bash bench/device/device.sh run OUT [SECONDS [STAGES]]   # everything measured, into OUT
#
# `receive` installs each archive as soon as all its chunks are there (the base archive
# after part 1), and the first one also starts `prepare`, so exports and the test model
# are built while the next part travels. Python is the machine's python3 (3.12), with the
# bundle's packages in front of its own on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/../.."
WORK=${IMGCLF_DEVICE_WORK:-/tmp/imgclf-device}
PY=${PYTHON:-python3}
mkdir -p "$WORK"
export PYTHONPATH="$WORK/site:$PWD" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export IMGCLF_FIXTURE_CACHE="$WORK/fixtures"

# The CUDA, cuDNN and nvJPEG libraries of NVIDIA's wheels (the machine's, and the bundle's
# nvJPEG), for onnxruntime-gpu and nvImageCodec to find.
cuda_libs=$("$PY" - "$WORK/site" <<'EOF'
import glob, site, sys
roots = [sys.argv[1], *site.getsitepackages()]
dirs = sorted({p.rsplit("/", 1)[0] for r in roots for p in glob.glob(f"{r}/nvidia/**/lib/*.so*", recursive=True)})
print(":".join(dirs))
EOF
)
export LD_LIBRARY_PATH="${cuda_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

case "${1:-}" in
receive)
    "$PY" -m bench.device.receive "$2" --work "$WORK" || exit
    if [ -f "$WORK/base.installed" ] && [ ! -f "$WORK/prepare.started" ]; then
        touch "$WORK/prepare.started"
        # Its own session: it outlives this call and keeps running between transfers.
        setsid nohup "$PY" -m bench.device.run prepare --work "$WORK" \
            >"$WORK/prepare.log" 2>&1 </dev/null &
        echo "prepare started in the background (log: $WORK/prepare.log)"
    fi
    ;;
prepare)
    "$PY" -m bench.device.run prepare --work "$WORK"
    ;;
probe)
    # What the GPU libraries resolve to: onnxruntime-gpu links cuBLAS(Lt) 13, cuRAND 10,
    # the CUDA 13 runtime and the driver, and loads cuDNN 9 and cuFFT 12 when it needs them.
    nvidia-smi -L
    "$PY" --version
    "$PY" -m bench.device.receive --probe
    ;;
run)
    "$PY" -m bench.device.run run --work "$WORK" --out "$2" --budget "${3:-480}" \
        --stages "${4:-env,gpu_tests,limit,server,cpu_workers}"
    ;;
*)
    echo "usage: $0 receive PART | prepare | probe | run OUT [SECONDS [STAGES]]" >&2
    exit 2
    ;;
esac
