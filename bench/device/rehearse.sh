#!/usr/bin/env bash
# The device run rehearsed on this machine (`make gpu-rehearsal`): before a GPU loan, prove
# that the bundle in .gpu-bundle/ installs with `pip --no-index` into a clean Python 3.12
# that holds only what the GPU machine's image holds, and that the run's CPU parts go
# through end to end on the current tree. Without a GPU the GPU stages run on the CPU
# provider (IMGCLF_DEVICE_REHEARSAL), so their code runs too; report.md marks their figures.
#
#   bash bench/device/rehearse.sh [DIR [BUDGET_SECONDS]]
#
# DIR (default /tmp/imgclf-rehearsal) gets: venv/ (kept between rehearsals: its first
# build downloads PyTorch and NVIDIA's CUDA 13 wheels, about 4 GB), tree/ (a copy of the
# working tree with the parts beside it, as the device tool sends them), work/ (the
# device's work folder), out/ (what the run writes) and timings.txt. PYTHON312 names the
# interpreter (default python3.12).
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=$(realpath -m "${1:-/tmp/imgclf-rehearsal}")
# Prepare alone takes ~3.5 minutes on 2 cores, and every stage runs on the CPU here.
BUDGET=${2:-1200}
PY312=${PYTHON312:-python3.12}
[ -f .gpu-bundle/manifest.json ] || { echo "no .gpu-bundle/: run make gpu-bundle" >&2; exit 2; }
mkdir -p "$DIR"

# The GPU machine's image, as far as our code uses it: of its package list (the device
# tool's KINDS.md, read 2026-11) every one that service/, training/, bench/ or tests/
# import, the versions a session saw there pinned, the rest as pip resolves them. torch
# from PyPI brings NVIDIA's CUDA 13 and cuDNN 9 wheels, as the image has them.
DEVICE_IMAGE=(torch==2.11.0 torchvision==0.26.0 onnx==1.23.1 onnxscript==0.7.2
    onnxruntime==1.30.0 numpy scipy pillow ml-dtypes protobuf grpcio psutil pyyaml tqdm
    scikit-image scikit-learn matplotlib pyarrow uvloop pytest pytest-xdist pytest-timeout
    hypothesis)
[ -x "$DIR/venv/bin/python" ] || "$PY312" -m venv "$DIR/venv"
"$DIR/venv/bin/python" -m pip install -q --upgrade pip
"$DIR/venv/bin/python" -m pip install -q "${DEVICE_IMAGE[@]}"
PY="$DIR/venv/bin/python"
"$PY" --version

# What the device tool carries: tracked and untracked-but-not-ignored files, and the parts.
rm -rf "$DIR/tree" "$DIR/work" "$DIR/out"
mkdir -p "$DIR/tree" "$DIR/out"
git ls-files -z --cached --others --exclude-standard |
    tar --null -T - --ignore-failed-read -cf - | tar -xf - -C "$DIR/tree"
parts=$("$PY" -c 'import json; print(" ".join(p["name"] for p in json.load(open(".gpu-bundle/manifest.json"))["parts"]))')
mkdir -p "$DIR/tree/.gpu-bundle"

cd "$DIR/tree"
# IMGCLF_DEVICE_REHEARSAL: the GPU stages run on the CPU here rather than being skipped.
export PYTHON="$PY" IMGCLF_DEVICE_WORK="$DIR/work" IMGCLF_DEVICE_REHEARSAL=1
: >"$DIR/timings.txt"
timed() {  # a step, its wall time in timings.txt
    local started=$SECONDS
    "$@"
    echo "$(( SECONDS - started )) s: $*" | tee -a "$DIR/timings.txt"
}
for part in $parts; do
    cp -r "$OLDPWD/.gpu-bundle/$part" ".gpu-bundle/$part"
    timed bash bench/device/device.sh receive ".gpu-bundle/$part"
done
timed bash bench/device/device.sh probe || true  # no nvidia-smi here
timed bash bench/device/device.sh run "$DIR/out" "$BUDGET"
echo "rehearsal done: $DIR/out/report.md"
