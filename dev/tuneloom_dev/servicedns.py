"""The pod runner's stand-in for cluster DNS for Service names, in the Python processes of its Pods.

A client in a Pod reaches a Service as `<service>.<namespace>.svc[.cluster.local]` (tuneloom's API
forwards to its ModelServers so). There is no cluster DNS on the local cluster, so `install()`
wraps `socket.getaddrinfo`: such a name resolves to the address of a ready Pod that the Service
selects; every other name resolves as before. The Pods are read by the Service's selector, not
from its Endpoints: the API server refuses Endpoints with loopback addresses, which the runner's
Pods have. The port is not translated, so this serves Services whose port is their target port.
The pod runner loads it in each Pod through the `sitecustomize` in `podsite/`, which it puts on
PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import re
import socket
from typing import Any

DNS_KUBECONFIG_ENV = "TUNELOOM_SERVICE_DNS_KUBECONFIG"  # set by the pod runner in each Pod
SERVICE_NAME = re.compile(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc(?:\.cluster\.local)?\.?")


def service_of(host: str | bytes | None) -> tuple[str, str] | None:
    """(service, namespace) when `host` is a Service's DNS name, else None."""
    name = host.decode() if isinstance(host, bytes) else host
    match = SERVICE_NAME.fullmatch((name or "").lower())
    return (match.group(1), match.group(2)) if match else None


def ready_address(pods: list[dict[str, Any]]) -> str | None:
    """The address of the first Ready Pod of `pods` (Pod objects as the API server gives them)."""
    for pod in pods:
        status = pod.get("status") or {}
        conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        if conditions.get("Ready") == "True" and status.get("podIP"):
            return str(status["podIP"])
    return None


def _service_address(service: str, namespace: str) -> str:
    # Imported here: most Pod processes never resolve a Service name.
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config
    from kubernetes.client.exceptions import ApiException

    name = f"{service}.{namespace}.svc"
    # The runner's own credentials, as cluster DNS sees every Service: the Pod's account may see none.
    with k8s_config.new_client_from_config(config_file=os.environ.get(DNS_KUBECONFIG_ENV)) as api:
        core = k8s.CoreV1Api(api)
        try:
            spec = json.loads(core.read_namespaced_service(service, namespace, _preload_content=False).data)["spec"]
        except ApiException as exc:
            raise socket.gaierror(socket.EAI_NONAME, f"{name}: no such Service ({exc.status})") from None
        selector = ",".join(f"{key}={value}" for key, value in (spec.get("selector") or {}).items())
        # A Service without a selector has its Endpoints written by hand, and they cannot be loopback.
        if not selector:
            raise socket.gaierror(socket.EAI_NONAME, f"{name}: the Service selects no Pods")
        listed = core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
        address = ready_address(json.loads(listed.data)["items"])
    if address is None:
        raise socket.gaierror(socket.EAI_NONAME, f"{name}: no ready Pod behind the Service")
    return address


def install() -> None:
    """Resolve Service names in `socket.getaddrinfo`, and in uvloop's event loop, which resolves in
    libuv without it (uvicorn's servers run on uvloop where it is installed, tuneloom's API too)."""
    resolve = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        service = service_of(host)
        return resolve(_service_address(*service) if service else host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
    try:
        import uvloop
    except ImportError:
        return
    loop_resolve = uvloop.Loop.getaddrinfo

    async def loop_getaddrinfo(loop: Any, host: Any, *args: Any, **kwargs: Any) -> Any:
        service = service_of(host)
        if service:
            host = await loop.run_in_executor(None, _service_address, *service)
        return await loop_resolve(loop, host, *args, **kwargs)

    uvloop.Loop.getaddrinfo = loop_getaddrinfo
