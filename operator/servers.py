"""Reconciling ModelServers: a Deployment of `tuneloom serve` pods and a Service, kept as the spec
says, and the preload set pushed to every ready pod over HTTP.

Level-triggered like the FineTuneJob reconciler: each pass reads what exists (the Deployment, the
pods, what each pod has loaded) and acts on the difference, so it is safe to run any number of
times and after any restart. What the operator preloaded on each pod is kept in status, so an
adapter that leaves the preload set is unloaded where, and only where, the operator loaded it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tuneloom.api import (
    API_GROUP,
    API_VERSION,
    AdapterPhase,
    AdapterStatus,
    ModelServer,
    ModelServerSpec,
    ModelServerStatus,
    ServerPod,
)
from tuneloom.jobfile import SpecError
from tuneloom.locks import KeyedLocks
from tuneloom.names import AdapterId
from tuneloom.operator import adapters
from tuneloom.operator.common import (
    ADAPTERS,
    MODELSERVERS,
    condition_of,
    parse_object,
    read_custom,
    read_secret,
    read_status,
    set_condition,
    status_patch,
)
from tuneloom.operator.config import OperatorConfig
from tuneloom.operator.metrics import OperatorMetrics
from tuneloom.operator.serverbuilder import (
    ANNOTATION_TEMPLATE_HASH,
    SERVER_PORT,
    build_deployment,
    build_service,
    pod_selector,
)
from tuneloom.operator.serverclient import ServerClient, ServerError, format_label_selector, plan_preload

log = logging.getLogger("tuneloom.operator.servers")

# The ModelServer's name is its Service's, which must be a DNS-1035 label.
_SERVICE_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_MESSAGE_LIMIT = 2000


class _NameTaken(Exception):
    """A Deployment or Service of the ModelServer's name exists and belongs to something else."""


class ServerReconciler:
    def __init__(self, config: OperatorConfig, api: k8s.ApiClient, metrics: OperatorMetrics):
        self.config = config
        self.core = k8s.CoreV1Api(api)
        self.apps = k8s.AppsV1Api(api)
        self.custom = k8s.CustomObjectsApi(api)
        self.metrics = metrics
        self._locks = KeyedLocks()

    # -- entry points ----------------------------------------------------------------------------

    def reconcile(self, body: dict[str, Any]) -> dict[str, Any]:
        """Brings the Deployment, the Service, the pods' adapters and the status up to date;
        returns the status fields it changed."""
        meta = body["metadata"]
        with self._locks.lock(meta["uid"]):
            fresh = read_custom(self.custom, MODELSERVERS, meta["namespace"], meta["name"])
            if fresh is None:
                return {}
            status = self._reconcile(fresh)
            # Adapters first: if the operator stops in between, the next pass, comparing with the
            # old status, writes them again.
            self._publish_loaded_on(fresh, read_status(ModelServerStatus, fresh), status)
            changes = status_patch(fresh.get("status") or {}, status)
            if changes:
                self.custom.patch_namespaced_custom_object_status(
                    API_GROUP, API_VERSION, meta["namespace"], MODELSERVERS, meta["name"], {"status": changes}
                )
            replicas = (fresh.get("spec") or {}).get("replicas", ModelServerSpec.model_fields["replicas"].default)
            self.metrics.servers.set(meta["namespace"], meta["name"], replicas, status.readyReplicas)
            return changes

    def forget(self, body: dict[str, Any]) -> None:
        """A deleted ModelServer: its Deployment and Service go with it (owner references); its
        gauges and its entries in Adapters' loadedOn go here."""
        meta = body["metadata"]
        self.metrics.servers.set(meta["namespace"], meta["name"], None, None)
        self._publish_loaded_on(body, read_status(ModelServerStatus, body), ModelServerStatus())
        self._locks.forget(meta["uid"])

    # -- the pass --------------------------------------------------------------------------------

    def _reconcile(self, body: dict[str, Any]) -> ModelServerStatus:
        meta = body["metadata"]
        status = read_status(ModelServerStatus, body, conditions=[])
        status.observedGeneration = meta.get("generation")
        status.selector = pod_selector(meta["name"])
        try:
            server = parse_object(ModelServer, body)
        except SpecError as exc:
            return _not_ready(status, "InvalidSpec", "; ".join(exc.problems))
        api_key = self._api_key(server)
        problem = self._deeper_validation(server, api_key)
        if problem is not None:
            return _not_ready(status, *problem)
        try:
            self._ensure(
                server,
                build_service(server),
                self.core.read_namespaced_service,
                self.core.create_namespaced_service,
                self._update_service,
            )
            deployment = self._ensure(
                server,
                build_deployment(server, self.config),
                self.apps.read_namespaced_deployment,
                self.apps.create_namespaced_deployment,
                self._update_deployment,
            )
        except _NameTaken as exc:
            return _not_ready(status, "NameTaken", str(exc))
        observed = deployment.get("status") or {}
        status.replicas = observed.get("replicas") or 0
        status.readyReplicas = observed.get("readyReplicas") or 0
        desired, skipped = self._desired_adapters(server)
        status.pods, failures = self._sync_pods(server, desired, api_key, status.pods)
        ready, wanted = status.readyReplicas, server.spec.replicas
        if ready:
            set_condition(status.conditions, "Ready", "True", "ReplicasReady", f"{ready} of {wanted} replicas ready")
        else:
            reason = "ScaledToZero" if wanted == 0 else "NoReadyReplica"
            set_condition(status.conditions, "Ready", "False", reason, f"0 of {wanted} replicas ready")
        if failures or skipped:
            reason = "LoadFailed" if failures else "AdaptersSkipped"
            text = "; ".join(failures + skipped)[:_MESSAGE_LIMIT]
            set_condition(status.conditions, "AdaptersLoaded", "False", reason, text)
        else:
            text = f"{len(desired)} adapter(s) loaded on every ready replica"
            set_condition(status.conditions, "AdaptersLoaded", "True", "Loaded", text)
        status.message = f"{ready} of {wanted} replicas ready; {text}"[:_MESSAGE_LIMIT]
        return status

    def _deeper_validation(self, server: ModelServer, api_key: str | None) -> tuple[str, str] | None:
        """What the schema cannot check: names and Secrets. None when all is well, else (reason, message)."""
        namespace, spec = server.metadata.namespace, server.spec
        if not _SERVICE_NAME.match(server.metadata.name):
            return (
                "InvalidSpec",
                f"metadata.name {server.metadata.name!r} must be a DNS-1035 label (a lowercase letter first, then "
                "letters, digits and '-', at most 63): it names the Service",
            )
        secret = spec.storage.credentialsSecret
        if secret and read_secret(self.core, namespace, secret) is None:
            return (
                "SecretNotFound",
                f"spec.storage.credentialsSecret: Secret {namespace}/{secret} does not exist; create it with keys "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            )
        if spec.apiKeySecret and api_key is None:
            return (
                "SecretNotFound",
                f"spec.apiKeySecret: Secret {namespace}/{spec.apiKeySecret.name} with key {spec.apiKeySecret.key} "
                "does not exist; create it, or remove spec.apiKeySecret to serve without authentication",
            )
        return None

    def _api_key(self, server: ModelServer) -> str | None:
        ref = server.spec.apiKeySecret
        if ref is None:
            return None
        return (read_secret(self.core, server.metadata.namespace, ref.name) or {}).get(ref.key)

    # -- Deployment and Service ------------------------------------------------------------------

    def _ensure(
        self,
        server: ModelServer,
        desired: dict[str, Any],
        read: Callable[..., Any],
        create: Callable[..., Any],
        update: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any] | None],
    ) -> dict[str, Any]:
        """Creates `desired`, or brings the existing object (ours only) up to date with it."""
        name, namespace, kind = desired["metadata"]["name"], desired["metadata"]["namespace"], desired["kind"]
        serialize = self.core.api_client.sanitize_for_serialization
        try:
            existing = serialize(read(name, namespace))
        except ApiException as exc:
            if exc.status != 404:
                raise
            log.info("creating %s %s/%s", kind, namespace, name)
            return serialize(create(namespace, desired))
        owners = existing["metadata"].get("ownerReferences") or []
        if not any(ref.get("uid") == server.metadata.uid for ref in owners):
            raise _NameTaken(
                f"a {kind} named {name} exists and does not belong to this ModelServer; rename one of them"
            )
        return update(existing, desired) or existing

    def _update_deployment(self, existing: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any] | None:
        """Replicas and the pod template are updated separately: only a template change rolls pods."""
        annotations = existing["metadata"].get("annotations") or {}
        wanted_hash = desired["metadata"]["annotations"][ANNOTATION_TEMPLATE_HASH]
        same_template = annotations.get(ANNOTATION_TEMPLATE_HASH) == wanted_hash
        if same_template and existing["spec"].get("replicas") == desired["spec"]["replicas"]:
            return None
        existing["spec"]["replicas"] = desired["spec"]["replicas"]
        if not same_template:
            existing["spec"]["template"] = desired["spec"]["template"]
            existing["metadata"]["annotations"] = {**annotations, ANNOTATION_TEMPLATE_HASH: wanted_hash}
        meta = existing["metadata"]
        log.info(
            "updating Deployment %s/%s (%s)", meta["namespace"], meta["name"], "replicas" if same_template else "pods"
        )
        # A replace carrying the resourceVersion read: a concurrent change makes it fail (409) and
        # the next pass starts over from what is stored.
        replaced = self.apps.replace_namespaced_deployment(meta["name"], meta["namespace"], existing)
        return self.apps.api_client.sanitize_for_serialization(replaced)

    def _update_service(self, existing: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any] | None:
        def ports(spec: dict[str, Any]) -> list[tuple[Any, ...]]:
            return [(p.get("name"), p.get("port"), str(p.get("targetPort")), p.get("protocol")) for p in spec["ports"]]

        spec, wanted = existing["spec"], desired["spec"]
        if spec.get("selector") == wanted["selector"] and ports(spec) == ports(wanted):
            return None
        spec.update(selector=wanted["selector"], ports=wanted["ports"])
        meta = existing["metadata"]
        replaced = self.core.replace_namespaced_service(meta["name"], meta["namespace"], existing)
        return self.core.api_client.sanitize_for_serialization(replaced)

    # -- adapters --------------------------------------------------------------------------------

    def _desired_adapters(self, server: ModelServer) -> tuple[list[str], list[str]]:
        """The model ids to preload, and why any named or selected Adapter is left out."""
        namespace, spec = server.metadata.namespace, server.spec
        allowed = spec.allowedNamespaces or [namespace]
        found: dict[tuple[str, str], dict[str, Any]] = {}
        skipped: list[str] = []
        for entry in spec.preload.adapters:
            adapter_namespace, _, name = entry.rpartition("/")
            adapter_namespace = adapter_namespace or namespace
            if adapter_namespace not in allowed:
                skipped.append(f"{entry}: namespace {adapter_namespace} is not in spec.allowedNamespaces")
                continue
            body = read_custom(self.custom, ADAPTERS, adapter_namespace, name)
            if body is None:
                skipped.append(f"{entry}: no such Adapter")
                continue
            found[(adapter_namespace, name)] = body
        if spec.preload.selector is not None:
            selector = format_label_selector(spec.preload.selector)
            for adapter_namespace in allowed:
                listed = self.custom.list_namespaced_custom_object(
                    API_GROUP, API_VERSION, adapter_namespace, ADAPTERS, label_selector=selector
                )
                for body in listed["items"]:
                    found[(adapter_namespace, body["metadata"]["name"])] = body
        models = []
        for (adapter_namespace, name), body in sorted(found.items()):
            status = read_status(AdapterStatus, body)
            label = f"{adapter_namespace}/{name}"
            base = (body.get("spec") or {}).get("baseModel", "")
            if status.phase is not AdapterPhase.ready or not status.model:
                ready = condition_of(status.conditions, "Ready")
                reason = ready.reason if ready is not None and ready.reason else "not checked yet"
                skipped.append(f"{label}: not Ready ({reason})")
            elif status.promoted is False and not spec.allowUnpromoted:
                skipped.append(
                    f"{label}: version {status.version} was not promoted ({'; '.join(status.promotionReasons)})"
                )
            elif not adapters.same_base_model(base, spec.baseModel):
                skipped.append(f"{label}: trained on {base}, not this server's base model {spec.baseModel}")
            elif (status.rank or 0) > spec.maxLoraRank:
                skipped.append(f"{label}: LoRA rank {status.rank} is above spec.maxLoraRank {spec.maxLoraRank}")
            else:
                models.append(status.model)
        return models, skipped

    def _sync_pods(
        self, server: ModelServer, desired: list[str], api_key: str | None, before: list[ServerPod]
    ) -> tuple[list[ServerPod], list[str]]:
        """Loads the desired adapters on every ready pod and unloads those the operator preloaded
        that are no longer desired; returns each pod's adapters (as `before`, the last pass's, for a
        pod not reached), and the failures."""
        meta = server.metadata
        listed = self.core.list_namespaced_pod(meta.namespace, label_selector=pod_selector(meta.name)).items
        earlier = {pod.name: pod for pod in before}
        failures: list[str] = []
        pods = []
        for pod in sorted(listed, key=lambda p: p.metadata.name):
            if pod.status.phase in ("Succeeded", "Failed"):
                continue
            name, ip = pod.metadata.name, pod.status.pod_ip
            last = earlier.get(name)
            ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
            entry = ServerPod(
                name=name,
                ready=ready,
                adapters=last.adapters if last else [],
                preloaded=last.preloaded if last else [],
            )
            if ready and ip:
                self._sync_pod(ServerClient(ip, SERVER_PORT, api_key), desired, entry, failures)
            pods.append(entry)
        return pods, failures

    @staticmethod
    def _sync_pod(client: ServerClient, desired: list[str], entry: ServerPod, failures: list[str]) -> None:
        pod = entry.name
        try:
            loaded = client.loaded()
        except ServerError as exc:
            failures.append(f"pod {pod}: {exc}")
            return
        plan = plan_preload(desired, loaded, entry.preloaded)
        for model in plan.unload:
            try:
                client.unload(model)
                loaded.discard(model)
            except ServerError as exc:
                failures.append(f"pod {pod}: unloading {model}: {exc}")
        for model in plan.load:
            try:
                client.load(model)
                loaded.add(model)
                log.info("pod %s: loaded %s", pod, model)
            except ServerError as exc:
                failures.append(f"pod {pod}: loading {model}: {exc}")
        # Ours: what is wanted and there, and what could not be unloaded yet (tried again next pass).
        ours = (set(desired) | set(plan.unload)) & loaded
        entry.adapters, entry.preloaded = sorted(loaded), sorted(ours)

    def _publish_loaded_on(self, body: dict[str, Any], old: ModelServerStatus, new: ModelServerStatus) -> None:
        """Writes this server's entry into the status.loadedOn of every Adapter whose pods changed."""

        def by_adapter(status: ModelServerStatus) -> dict[tuple[str, str], list[str]]:
            pods: dict[tuple[str, str], list[str]] = {}
            for pod in status.pods:
                for model in pod.adapters:
                    adapter = AdapterId.parse_served(model)
                    if adapter is not None:
                        pods.setdefault((adapter.namespace, adapter.name), []).append(pod.name)
            return pods

        meta = body["metadata"]
        before, after = by_adapter(old), by_adapter(new)
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                adapters.set_loaded_on(self.custom, *key, meta["namespace"], meta["name"], after.get(key, []))


def _not_ready(status: ModelServerStatus, reason: str, message: str) -> ModelServerStatus:
    status.message = message
    set_condition(status.conditions, "Ready", "False", reason, message)
    return status
