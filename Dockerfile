# syntax=docker/dockerfile:1
# alit-serve API image: one Dockerfile, two variants chosen by the build arg TORCH_VARIANT.
#   docker build -t alit-serve:gpu .                                  # torch's CUDA 13.0 build (cu130)
#   docker build --build-arg TORCH_VARIANT=cpu -t alit-serve:cpu .    # torch's CPU build, no CUDA libraries
# Both: Python 3.11, every package pinned by constraints.txt (the versions the tests run), the `triton`
# extra (ALIT_ENGINE=triton), the trained default model inside the package, a non-root user.
# The CUDA build brings its CUDA libraries as pip packages; the NVIDIA container runtime supplies the driver.
# Run:  docker run --gpus all -p 8000:8000 alit-serve:gpu     (or alit-serve:cpu without --gpus)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build stage: a self-contained virtual environment ----------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cu130
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt ./
# torch first, from PyTorch's index for the variant (its local version, +cu130 / +cpu, wins over PyPI's)
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
      --extra-index-url https://pypi.org/simple -c constraints.txt torch
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install -c constraints.txt ".[triton]"

# ---- runtime stage: the environment, no build inputs ---------------------------------------------
FROM ${PYTHON_IMAGE}
ARG TORCH_VARIANT=cu130
RUN useradd --system --no-log-init --uid 10001 --no-create-home --home-dir /tmp alit
COPY --from=build /opt/venv /opt/venv
# HOME=/tmp and no .pyc writes: the root filesystem can be mounted read-only (mount /tmp writable).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ALIT_HOST=0.0.0.0 \
    ALIT_PORT=8000 \
    ALIT_DEVICES=auto \
    ALIT_TORCH_VARIANT=${TORCH_VARIANT} \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001
EXPOSE 8000
# /healthz answers from the moment the port opens (the model loads in the background; /readyz says when it is warm)
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["alit-serve", "serve"]
