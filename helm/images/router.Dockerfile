# meshllm router image: the router, the client (its `meshllm` CLI is handy inside the
# pod; the router does not depend on it), the server runtime and the wire contract, on a slim Python base.
#   docker build -f helm/images/router.Dockerfile -t meshllm/router:0.1.0 .
# (build context: the repository root)
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/meshllm
COPY protos/ /src/protos/
COPY server/ /src/server/
COPY client/ /src/client/
COPY router/ /src/router/
# non-editable installs of the local distributions; tracing adds the OTLP exporter
RUN /opt/meshllm/bin/pip install /src/protos /src/server /src/client "/src/router[tracing]"

FROM python:3.11-slim-bookworm
# checkov:skip=CKV_DOCKER_2: Kubernetes probes the router over native gRPC health (grpc.health.v1); a Docker HEALTHCHECK would need a second client in the image and is ignored by the kubelet
COPY --from=build /opt/meshllm /opt/meshllm
RUN groupadd --gid 10001 meshllm && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp meshllm
ENV PATH=/opt/meshllm/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp
USER 10001:10001
EXPOSE 50051 9090
ENTRYPOINT ["meshllm-router"]
CMD ["--config", "/etc/meshllm/config/router.toml"]
