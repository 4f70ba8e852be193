# syntax=docker/dockerfile:1
# alit-serve on NVIDIA GPUs: CUDA runtime base, CUDA build of torch, non-root, health-checked.
# Build:  docker build -t alit-serve .
# Run:    docker run --gpus all -p 8000:8000 -v /models:/models:ro -e ALIT_MODEL=/models/alit.pth alit-serve
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124

# ---- build stage: a self-contained virtual environment ----------------------------------------
FROM ${CUDA_IMAGE} AS build
ARG TORCH_INDEX
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url ${TORCH_INDEX} "torch==2.6.*"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install .

# ---- runtime stage: no compilers, no pip caches, no sources --------------------------------------
FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home alit
COPY --from=build /opt/venv /opt/venv
# Weights: mount them (recommended) at /models and set ALIT_MODEL, or bake them in with
#   COPY weights /models   (and ALIT_MODEL=/models)
ENV PATH=/opt/venv/bin:$PATH \
    ALIT_HOST=0.0.0.0 \
    ALIT_PORT=8000 \
    ALIT_DEVICES=auto \
    PYTHONUNBUFFERED=1
USER alit
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python3.11", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["alit-serve", "serve"]
