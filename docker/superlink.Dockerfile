# The federation operator's SuperLink: Flower only (no ML stack). ServerApps run in the
# separate `serverapp` image (Flower's process isolation), so this image stays small.
#   docker build -f docker/superlink.Dockerfile -t fedlora-superlink .
FROM python:3.11-slim

ARG FLWR_VERSION=1.42.0
# Nothing calls home; no per-run `uv sync` against the package index.
ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PIP_NO_CACHE_DIR=1

RUN pip install "flwr==${FLWR_VERSION}" \
    && useradd --create-home --uid 10001 flwr \
    && mkdir -p /state && chown flwr /state
USER flwr
WORKDIR /state
EXPOSE 9093

# TLS files and the SuperExec secret are mounted; docker/compose.yaml passes the flags:
# TLS, --enable-supernode-auth, --database, --isolation process, no runtime installs.
ENTRYPOINT ["flower-superlink"]
CMD ["--help"]
