# The lorafleet image: Ray's GPU image + this repository + its dependencies (CUDA build of torch).
#   docker build -t ghcr.io/lorafleet/lorafleet:0.1.0 .
# Used by cluster/aws.yaml, cluster/gcp.yaml and the KubeRay manifests (cluster/kuberay/); the tag is the
# version in pyproject.toml, the base the Ray version the manifests name (tests/cluster/test_manifests.py).
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu

ARG RAY_VERSION
LABEL org.opencontainers.image.title="lorafleet" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.source="https://github.com/lorafleet/lorafleet"

WORKDIR /home/ray/lorafleet
# dependencies first (a layer that survives code changes), then the code
COPY --chown=ray:users pyproject.toml README.md ./
RUN mkdir -p cluster training tuning serving evaluation \
    && pip install --no-cache-dir "ray[train,tune,serve]==${RAY_VERSION}" "torch>=2.4,<=2.14.1" \
    && pip install --no-cache-dir ".[gpu]" && pip uninstall -y lorafleet
COPY --chown=ray:users . .
RUN pip install --no-cache-dir --no-deps -e . && python -c "import cluster.pipeline, serving.app"

# SIGTERM grace for `ray job stop` / `lorafleet stop` (the pipeline saves its trials), offline-capable hub cache
ENV RAY_JOB_STOP_WAIT_TIME_S=60 \
    HF_HOME=/home/ray/.cache/huggingface \
    PYTHONUNBUFFERED=1
