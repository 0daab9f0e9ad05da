"""The objects one ModelServer runs as: a Deployment of `tuneloom serve` pods and a Service.

Pure functions of the ModelServer and the operator's settings. The pod template holds only what
needs a restart to change (image, base model, vLLM limits and arguments, resources): replicas are
the Deployment's, and the preload list is pushed to ready pods over HTTP, so changing either
restarts no pod.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tuneloom.api import ModelServer
from tuneloom.operator.common import LABEL_MANAGED, MANAGER
from tuneloom.operator.config import OperatorConfig
from tuneloom.operator.jobbuilder import (
    CACHE_DIR,
    CONTAINER_SECURITY_CONTEXT,
    POD_SECURITY_CONTEXT,
    owner_reference,
    pod_resources,
    storage_env,
)

SERVER_PORT = 8000
APP_NAME = "tuneloom-server"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_INSTANCE = "app.kubernetes.io/instance"
ANNOTATION_TEMPLATE_HASH = "tuneloom.dev/template-sha256"
API_KEY_ENV = "VLLM_API_KEY"
# Unlike the trainer's, the server's root file system stays writable: vLLM's engine puts its ZMQ
# sockets and compile caches in the temp dir.
_CONTAINER_SECURITY_CONTEXT = {**CONTAINER_SECURITY_CONTEXT, "readOnlyRootFilesystem": False}


def selector_labels(name: str) -> dict[str, str]:
    return {LABEL_NAME: APP_NAME, LABEL_INSTANCE: name}


def pod_selector(name: str) -> str:
    """The label selector of a ModelServer's pods, as the API's labelSelector parameter takes it."""
    return ",".join(f"{key}={value}" for key, value in selector_labels(name).items())


def _labels(name: str) -> dict[str, str]:
    return {**selector_labels(name), LABEL_COMPONENT: "server", LABEL_MANAGED: MANAGER}


def serve_command(server: ModelServer, config: OperatorConfig) -> list[str]:
    spec = server.spec
    command = [
        "tuneloom",
        "serve",
        "--base-model",
        spec.baseModel,
        "--store",
        spec.storage.uri,
        "--namespace",
        server.metadata.namespace,
        "--host",
        config.server_bind_address,
        "--port",
        str(SERVER_PORT),
        "--max-loras",
        str(spec.maxLoras),
        "--max-lora-rank",
        str(spec.maxLoraRank),
    ]
    if spec.maxCpuLoras is not None:
        command += ["--max-cpu-loras", str(spec.maxCpuLoras)]
    if spec.allowedNamespaces:
        command += ["--allowed-namespaces", ",".join(spec.allowedNamespaces)]
    if spec.allowUnpromoted:
        command += ["--allow-unpromoted"]
    if spec.apiKeySecret:
        command += ["--api-key-env", API_KEY_ENV]
    if spec.extraArgs:
        command += ["--", *spec.extraArgs]
    return command


def _env(server: ModelServer) -> list[dict[str, Any]]:
    spec = server.spec
    env: list[dict[str, Any]] = [
        {"name": "TUNELOOM_CACHE_DIR", "value": CACHE_DIR},
        {"name": "HOME", "value": CACHE_DIR},  # ~/.cache of vLLM, torch, triton and Hugging Face
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # The operator preloads adapters through /v1/load_lora_adapter, which vLLM serves only with this.
        {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"},
        *storage_env(spec.storage),
    ]
    if spec.apiKeySecret:
        ref = {"name": spec.apiKeySecret.name, "key": spec.apiKeySecret.key}
        env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": ref}})
    return env


def build_pod_template(server: ModelServer, config: OperatorConfig) -> dict[str, Any]:
    spec = server.spec
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # the server reads object storage, never the API server
        "securityContext": POD_SECURITY_CONTEXT,
        "containers": [
            {
                "name": "server",
                "image": spec.image or config.server_image,
                "command": serve_command(server, config),
                "env": _env(server),
                "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
                "readinessProbe": {
                    "httpGet": {"path": "/health", "port": "http"},
                    "periodSeconds": 5,
                    # A busy CPU or GPU can answer slowly; that is not unreadiness.
                    "timeoutSeconds": 5,
                    "failureThreshold": 3,
                },
                "resources": pod_resources(spec.resources),
                "volumeMounts": [
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    {"name": "cache", "mountPath": CACHE_DIR},
                ],
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": _CONTAINER_SECURITY_CONTEXT,
            }
        ],
        "volumes": [
            # vLLM's processes exchange tensors through shared memory; the default 64 MiB is too small.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            {"name": "cache", "emptyDir": {}},  # downloaded adapters, compiled kernels
        ],
    }
    if spec.resources.nodeSelector:
        pod_spec["nodeSelector"] = spec.resources.nodeSelector
    if spec.resources.tolerations:
        pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in spec.resources.tolerations]
    return {
        "metadata": {
            "labels": _labels(server.metadata.name),
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(SERVER_PORT),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": pod_spec,
    }


def template_hash(template: dict[str, Any]) -> str:
    """What the Deployment's pods were built from: the API server fills in defaults, so comparing
    this hash, not the stored template, tells whether the pods need to change."""
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()


def build_deployment(server: ModelServer, config: OperatorConfig) -> dict[str, Any]:
    name = server.metadata.name
    template = build_pod_template(server, config)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": server.metadata.namespace,
            "labels": _labels(name),
            "annotations": {ANNOTATION_TEMPLATE_HASH: template_hash(template)},
            "ownerReferences": [owner_reference(server)],
        },
        "spec": {
            "replicas": server.spec.replicas,
            "selector": {"matchLabels": selector_labels(name)},
            "template": template,
        },
    }


def build_service(server: ModelServer) -> dict[str, Any]:
    name = server.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": server.metadata.namespace,
            "labels": _labels(name),
            "ownerReferences": [owner_reference(server)],
        },
        "spec": {
            "selector": selector_labels(name),
            "ports": [{"name": "http", "port": SERVER_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
