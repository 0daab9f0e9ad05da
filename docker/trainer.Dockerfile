# The trainer: `python -m tuneloom.trainer`, which the operator's training Jobs run.
# Build from the repository root: docker build -f docker/trainer.Dockerfile -t tuneloom/trainer .
# The base image's torch must be the one pyproject.toml's `train` extra pins, or pip replaces it.
ARG TORCH_VERSION=2.13.0
ARG CUDA_FLAVOUR=cuda12.8-cudnn9-runtime
FROM pytorch/pytorch:${TORCH_VERSION}-${CUDA_FLAVOUR}

WORKDIR /src
COPY pyproject.toml README.md ./
COPY tuneloom/ tuneloom/
COPY operator/ operator/
COPY trainer/ trainer/
COPY serving/ serving/
COPY openai_api/ openai_api/
# -I: run in /src, `-m pip` would import the repository's operator/ as the stdlib's operator.
RUN python3 -I -m pip install --no-cache-dir ".[train]" && rm -rf /src

WORKDIR /
# The operator runs training pods as uid 1000 with HOME=/tmp and a read-only root file system.
USER 1000:1000
ENV HOME=/tmp PYTHONUNBUFFERED=1
ENTRYPOINT ["python", "-m", "tuneloom.trainer"]
