# fedlora with its ML stack: runs ServerApp processes next to the SuperLink (Flower's
# process isolation: `flower-superexec` pulls ServerApp tasks from the SuperLink's Runtime
# API), registers tenants and submits runs. CPU torch: the server never trains.
#   docker build -f docker/apps.Dockerfile -t fedlora-apps .
# Another base (it needs python3 >= 3.10 with venv, or apt to install them):
#   --build-arg BASE=IMAGE. docker/build-local.sh builds from a local Debian base with the
#   torch wheel and a CA bundle for pip in docker/build-context/ (build stage only).
# The two stages before the last are the same as in supernode.Dockerfile, so with the same
# build args the second image reuses the first one's layers.
ARG BASE=python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM ${BASE} AS runtime
# Nothing calls home; no per-run `uv sync` against the package index.
ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/fedlora \
    PATH=/opt/fedlora/bin:$PATH
# A base without Python (the CUDA runtime): the distribution's Python 3 and venv.
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; fi \
    && useradd --create-home --uid 10001 flwr

FROM runtime AS build
ARG TORCH_INDEX
# the torch release requirements-lock.txt was resolved against (the Makefile's TORCH)
ARG TORCH=torch==2.13.0
# Optional: wheels/ (a torch wheel, installed instead of one from TORCH_INDEX) and
# certs/ca-certificates.crt (the CA bundle pip trusts while building). Neither reaches the image.
COPY docker/build-context /build
RUN python3 -m venv /opt/fedlora
WORKDIR /src
COPY pyproject.toml requirements-lock.txt ./
# torch first (a bare `torch` requirement would pull a multi-GB CUDA build), then exactly the
# tested set (requirements-lock.txt: pinned, hash-checked, no resolution): a change to the
# sources below does not reinstall them.
RUN set -e; \
    if [ -s /build/certs/ca-certificates.crt ]; then export PIP_CERT=/build/certs/ca-certificates.crt; fi; \
    if ls /build/wheels/torch-*.whl >/dev/null 2>&1; then \
      pip install /build/wheels/torch-*.whl; \
    else pip install --index-url "${TORCH_INDEX}" "${TORCH}"; fi; \
    pip install --require-hashes --no-deps -r requirements-lock.txt
COPY README.md ./
COPY common ./common
COPY client ./client
COPY server ./server
COPY simulations ./simulations
COPY docker/scripts ./docker/scripts
# fedlora itself as a wheel (built with the locked setuptools), as a site installs it; the
# sources stay in this stage (the image keeps docker/scripts). `fedlora deploy run` submits the installed fedlora's app.
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /build/dist . \
    && pip install --no-deps /build/dist/fedlora-*.whl && pip check

FROM runtime
COPY --from=build /opt/fedlora /opt/fedlora
COPY --from=build /src/docker/scripts /src/docker/scripts
RUN mkdir -p /runs && chown flwr /runs
USER flwr
WORKDIR /home/flwr

# Run directories (run.dir) are written under /runs. docker/compose.yaml passes the flags.
ENTRYPOINT ["flower-superexec"]
CMD ["--help"]
