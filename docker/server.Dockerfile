# The vLLM server with tuneloom's plugin: `tuneloom serve`. Installing the project registers the
# plugin's `vllm.general_plugins` entry point; no extra is installed, so vLLM and torch stay the
# base image's.
# Build from the repository root: docker build -f docker/server.Dockerfile -t tuneloom/server .
# The tag matches pyproject.toml's `serve-cpu` pin, the vLLM the plugin is tested with.
ARG VLLM_VERSION=0.32.0
FROM vllm/vllm-openai:v${VLLM_VERSION}

WORKDIR /src
COPY pyproject.toml README.md ./
COPY tuneloom/ tuneloom/
COPY operator/ operator/
COPY trainer/ trainer/
COPY serving/ serving/
COPY openai_api/ openai_api/
# -I: run in /src, `-m pip` would import the repository's operator/ as the stdlib's operator.
RUN python3 -I -m pip install --no-cache-dir . && rm -rf /src

WORKDIR /
ENTRYPOINT ["tuneloom", "serve"]
