# The federation operator's SuperLink: Flower only (no ML stack). ServerApps run in the
# separate apps image (Flower's process isolation), so this image stays small.
#   docker build -f docker/superlink.Dockerfile -t fedlora-superlink .
# Another base (python3 >= 3.10 with venv, or apt to install them): --build-arg BASE=IMAGE.
# docker/build-local.sh builds it from a local Debian base with a CA bundle for pip in
# docker/build-context/certs/ (build stage only).
ARG BASE=python:3.11-slim

FROM ${BASE} AS runtime
# Nothing calls home; no per-run `uv sync` against the package index.
ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/flower \
    PATH=/opt/flower/bin:$PATH
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; fi \
    && useradd --create-home --uid 10001 flwr

FROM runtime AS build
ARG FLWR_VERSION=1.42.0
COPY docker/build-context/certs /build/certs
RUN set -e; python3 -m venv /opt/flower; \
    if [ -s /build/certs/ca-certificates.crt ]; then export PIP_CERT=/build/certs/ca-certificates.crt; fi; \
    pip install "flwr==${FLWR_VERSION}"

FROM runtime
COPY --from=build /opt/flower /opt/flower
RUN mkdir -p /state && chown flwr /state
USER flwr
WORKDIR /state
EXPOSE 9093

# TLS files and the SuperExec secret are mounted; docker/compose.yaml passes the flags:
# TLS, --enable-supernode-auth, --database, --isolation process, no runtime installs.
ENTRYPOINT ["flower-superlink"]
CMD ["--help"]
