# A tenant's SuperNode with the ClientApp's dependencies, CUDA-capable for QLoRA
# (bitsandbytes 4-bit, bf16 compute on the GPU). ClientApps run as subprocesses of the
# SuperNode inside this container; its Runtime API stays on 127.0.0.1.
#   docker build -f docker/supernode.Dockerfile -t fedlora-supernode .
#   CPU only: docker build -f docker/supernode.Dockerfile --build-arg BASE=python:3.11-slim \
#             --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t fedlora-supernode .
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/fedlora \
    PATH=/opt/fedlora/bin:$PATH

# The CUDA runtime image has no Python: install the distribution's Python 3 and a venv.
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; fi \
    && python3 -m venv /opt/fedlora

WORKDIR /src
COPY pyproject.toml README.md ./
COPY common ./common
COPY client ./client
COPY server ./server
COPY simulations ./simulations
COPY tests/__init__.py ./tests/__init__.py
COPY docker/scripts ./docker/scripts
RUN pip install --index-url "${TORCH_INDEX}" "torch>=2.10" \
    && pip install . \
    && useradd --create-home --uid 10001 flwr
USER flwr
WORKDIR /home/flwr

# The tenant's data, its key and the federation's CA are mounted read-only:
#   /data/train.jsonl (+ holdout.jsonl), /keys/node (mode 0600, readable by uid 10001), /certs/ca.crt
ENV SUPERLINK=superlink:9093 TENANT_ID=0
ENTRYPOINT ["/src/docker/scripts/supernode.sh"]
