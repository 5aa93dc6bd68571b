# meshllm replica image: one model on one GPU. CUDA 12 runtime with cuDNN (the CTranslate2 4.8.5
# wheel links libcublas 12), Ubuntu 24.04 for its Python 3.12 (22.04 ships 3.10; meshllm needs
# 3.11 or later), the replica with the CTranslate2 engine.
#   docker build -f helm/images/replica.Dockerfile -t meshllm/replica:0.1.0 .
# ExLlamaV3 as well (its PyPI wheel compiles its CUDA extension with nvcc on first use, so it
# needs the devel base; the extension is built into MESHLLM_CACHE_DIR, an emptyDir in the chart):
#   docker build -f helm/images/replica.Dockerfile --build-arg EXLLAMAV3=1 \
#     --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 -t meshllm/replica:0.1.0-exl3 .
# CPU-only clusters can build on a plain base: --build-arg CUDA_IMAGE=ubuntu:24.04
# (build context: the repository root)
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE}
# checkov:skip=CKV_DOCKER_7: the base is the CUDA_IMAGE build argument, whose default is a pinned version tag (checkov cannot read an ARG default)
ARG EXLLAMAV3=0
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/meshllm
COPY protos/ /src/protos/
COPY server/ /src/server/
COPY replica/ /src/replica/
RUN extras="ctranslate2,tracing"; \
    if [ "$EXLLAMAV3" = "1" ]; then extras="$extras,exllamav3"; fi; \
    /opt/meshllm/bin/pip install /src/protos /src/server "/src/replica[$extras]" \
    && rm -rf /src
# checkov:skip=CKV_DOCKER_2: Kubernetes probes the replica over native gRPC health (grpc.health.v1); a Docker HEALTHCHECK would need a second client in the image and is ignored by the kubelet
RUN groupadd --gid 10001 meshllm && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp meshllm
ENV PATH=/opt/meshllm/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp \
    MESHLLM_CACHE_DIR=/var/cache/meshllm TORCH_EXTENSIONS_DIR=/var/cache/meshllm/torch_extensions
USER 10001:10001
EXPOSE 50061 9091
ENTRYPOINT ["meshllm-replica"]
CMD ["--host", "0.0.0.0", "--port", "50061"]
