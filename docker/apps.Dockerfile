# fedlora with its ML stack: runs ServerApp processes next to the SuperLink (Flower's
# process isolation: `flower-superexec` pulls ServerApp tasks from the SuperLink's Runtime
# API) and registers tenants. CPU torch: the server never trains.
#   docker build -f docker/apps.Dockerfile -t fedlora-apps .
FROM python:3.11-slim

ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY client ./client
COPY server ./server
COPY simulations ./simulations
COPY tests/__init__.py ./tests/__init__.py
COPY docker/scripts ./docker/scripts
# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.10" \
    && pip install . \
    && useradd --create-home --uid 10001 flwr \
    && mkdir -p /runs && chown flwr /runs
USER flwr
WORKDIR /home/flwr

# Run directories (run.dir) are written under /runs. docker/compose.yaml passes the flags.
ENTRYPOINT ["flower-superexec"]
CMD ["--help"]
