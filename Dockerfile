# The serving images. No torch in either: they run exported ONNX models only.
#
#   docker build --target cpu -t imgclf:cpu .
#   docker build --target scoring -t imgclf:scoring .   # cpu + batch scoring (Parquet), Ray workers
#   docker build --target gpu -t imgclf:gpu .
#   docker run -p 50051:50051 -p 8000:8000 -p 9090:9090 -v "$PWD/models:/models:ro" imgclf:cpu
#
# Models are mounted at /models (<name>/<version>/model.onnx). Every server setting is an
# environment variable CLASSIFIER_<NAME> or a flag after the image name.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: generated gRPC code and the wheel -------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
RUN pip install --no-cache-dir "grpcio-tools==1.85.1" "build==1.6.1"
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY service/ service/
RUN python -m service.protogen \
    && python -m build --wheel --outdir /wheels .

# --- cpu: python slim + onnxruntime -------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CLASSIFIER_HOST=0.0.0.0 \
    CLASSIFIER_MODEL_REPOSITORY=/models \
    CLASSIFIER_PROVIDERS='["CPUExecutionProvider"]'
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --create-home app
WORKDIR /app
# The locked versions (make lock), then the project without resolving anything else.
COPY requirements/serve.lock /tmp/serve.lock
COPY --from=builder /wheels/ /wheels/
RUN pip install --no-cache-dir -r /tmp/serve.lock \
    && pip install --no-cache-dir --no-deps /wheels/*.whl \
    && rm -rf /wheels /tmp/serve.lock \
    && python -c "import service.server.main, sys; assert 'torch' not in sys.modules"
USER 10001:10001
EXPOSE 50051 8000 9090
VOLUME ["/models"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "service.client", "--target", "127.0.0.1:50051", "--timeout", "3", "health"]
ENTRYPOINT ["python", "-m", "service"]

# --- scoring: the cpu image plus what batch scoring adds (Parquet, progress) ---------------
#   docker run -v "$PWD/models:/models:ro" -v "$PWD/data:/data" imgclf:scoring \
#       --model /models/demo --input /data/in --output /data/scores/
FROM cpu AS scoring
USER 0
COPY requirements/scoring.lock /tmp/scoring.lock
RUN pip install --no-cache-dir -r /tmp/scoring.lock && rm /tmp/scoring.lock
USER 10001:10001
HEALTHCHECK NONE
ENTRYPOINT ["python", "-m", "service.scoring"]

# --- ray: the scoring image plus Ray, for Ray clusters (KubeRay's RayJob, deploy/ray) -------
#   docker run --network host imgclf:ray ray start --head --block
#   docker run --network host imgclf:ray ray start --address HEAD:6379 --block
# KubeRay starts Ray itself (it replaces the command) and probes the node with wget.
FROM scoring AS ray
USER 0
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*
COPY requirements/ray.lock /tmp/ray.lock
RUN pip install --no-cache-dir -r /tmp/ray.lock && rm /tmp/ray.lock \
    && python -c "import ray, service.scoring.ray_engine"
USER 10001:10001
ENV HOME=/app
HEALTHCHECK NONE
ENTRYPOINT []
CMD ["ray", "start", "--head", "--block", "--include-dashboard=false"]

# --- gpu: CUDA 13 + cuDNN 9 runtime, onnxruntime-gpu, TensorRT 10 libraries ---------------
# onnxruntime-gpu 1.31 links libcudart.so.13, libcudnn.so.9 and libnvinfer.so.10.
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04 AS gpu
# Ubuntu's python3 follows its security updates; pinning it would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CLASSIFIER_HOST=0.0.0.0 \
    CLASSIFIER_MODEL_REPOSITORY=/models \
    CLASSIFIER_TRT_ENGINE_CACHE_DIR=/cache/tensorrt
RUN python3 -m venv /opt/venv \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --create-home app \
    && mkdir -p /cache/tensorrt && chown app:app /cache/tensorrt
WORKDIR /app
COPY requirements/serve.lock requirements/gpu.txt /tmp/
COPY --from=builder /wheels/ /wheels/
# The serving lock with onnxruntime swapped for requirements/gpu.txt: onnxruntime-gpu of the
# same version (same Python API; requirements/constraints.txt keeps the two equal) and GPU
# JPEG decoding (nvImageCodec, nvJPEG, onnx for the device resize graph).
RUN grep -v '^onnxruntime==' /tmp/serve.lock >/tmp/cpu-less.lock \
    && pip install --no-cache-dir -r /tmp/cpu-less.lock -r /tmp/gpu.txt \
    && pip install --no-cache-dir --no-deps /wheels/*.whl \
    && pip install --no-cache-dir --extra-index-url https://pypi.nvidia.com "tensorrt-cu13-libs==10.16.1.11" \
    && rm -rf /wheels /tmp/serve.lock /tmp/gpu.txt /tmp/cpu-less.lock
ENV LD_LIBRARY_PATH=/opt/venv/lib/python3.12/site-packages/tensorrt_libs
USER 10001:10001
EXPOSE 50051 8000 9090
VOLUME ["/models", "/cache/tensorrt"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-m", "service.client", "--target", "127.0.0.1:50051", "--timeout", "3", "health"]
ENTRYPOINT ["python", "-m", "service"]

# --- ray-gpu: the gpu image plus batch scoring and Ray, for GPU workers of a Ray cluster ----
FROM gpu AS ray-gpu
USER 0
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*
COPY requirements/ray.lock /tmp/ray.lock
RUN grep -v '^onnxruntime==' /tmp/ray.lock >/tmp/ray-gpu.lock \
    && pip install --no-cache-dir -r /tmp/ray-gpu.lock && rm /tmp/ray.lock /tmp/ray-gpu.lock
USER 10001:10001
HEALTHCHECK NONE
ENTRYPOINT []
CMD ["ray", "start", "--head", "--block", "--include-dashboard=false"]
