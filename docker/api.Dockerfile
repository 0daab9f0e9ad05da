# The OpenAI-compatible API in Kubernetes mode (`tuneloom api --kubernetes`, the chart's api.enabled):
# FastAPI and the Kubernetes client, nothing of the ML stack.
# Build from the repository root: docker build -f docker/api.Dockerfile -t tuneloom/api .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

WORKDIR /src
# setuptools' package-dir maps all four folders, so all four are needed to build the wheel.
COPY pyproject.toml README.md ./
COPY tuneloom/ tuneloom/
COPY operator/ operator/
COPY trainer/ trainer/
COPY serving/ serving/
COPY openai_api/ openai_api/
# -I: run in /src, `-m pip` would import the repository's operator/ as the stdlib's operator.
RUN python3 -I -m pip install --no-cache-dir ".[api,operator]" && rm -rf /src

WORKDIR /
# The chart runs it as this user with a read-only root file system.
USER 65532:65532
ENTRYPOINT ["tuneloom", "api"]
