"""Kubernetes mode (`tuneloom api --kubernetes`): jobs are FineTuneJob objects in the namespace the
caller's key maps to (its project), run by the operator; files and their records are in the object
store; keys come from a Secret; inference goes to the Service of the namespace's ModelServer for
the model's base. The API keeps no state of its own, so a restarted pod loses nothing."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from tuneloom.api import API_GROUP, API_VERSION, FineTuneJobStatus, ModelServer
from tuneloom.operator.common import MODELSERVERS, api_client, call_json, read_custom, read_secret, read_status
from tuneloom.operator.serverbuilder import SERVER_PORT
from tuneloom.registry import (
    LOSS_HISTORY_FILE,
    AdapterVersion,
    checkpoint_manifest,
    committed_steps,
    list_versions,
    read_adapter,
    read_version_file,
    run_prefix,
)
from tuneloom.serving.server import default_served_name
from tuneloom.storage import ObjectExistsError, ObjectNotFoundError, open_store

from . import jobs as mapping
from . import kubejobs
from .errors import ApiError, not_found
from .files import RESULTS, FileService
from .inference import PROXY_TIMEOUT, adapter_served_name, proxy
from .interface import Engine, Forwarded, model_missing_message, page_limit, requested_model
from .keys import KeyRing, KeysFileError, RefreshingKeys, parse_keys
from .metrics import ApiMetrics
from .models import OWNED_BY_BASE
from .objects import checkpoint_object, job_object, listing, model_object, page_after
from .progress import checkpoint_metrics, history_csv
from .settings import ApiSettings
from .state import CheckpointRecord, JobRecord
from .storefiles import StoreFileIndex

log = logging.getLogger("tuneloom.api")

FINETUNEJOBS = "finetunejobs"
KEYS_ENTRY = "keys.json"  # the Secret's data key: the keys file's JSON, {namespace: [sha256, ...]}


def read_secret_keys(core: k8s.CoreV1Api, secret: str) -> KeyRing:
    """The keys in the Secret `secret` (NAMESPACE/NAME), from its `keys.json`."""
    namespace, _, name = secret.partition("/")
    source = f"Secret {namespace}/{name}"
    try:
        data = read_secret(core, namespace, name)
    except ApiException as exc:
        raise KeysFileError(f"{source} (--keys-secret) cannot be read: {exc.status} {exc.reason}") from None
    if data is None or KEYS_ENTRY not in data:
        raise KeysFileError(
            f"{source} has no {KEYS_ENTRY!r}; create it from a keys file made by `tuneloom api new-key`: "
            f"kubectl create secret generic {name} -n {namespace} --from-file={KEYS_ENTRY}=KEYS_FILE"
        )
    return KeyRing.of(parse_keys(data[KEYS_ENTRY], source))


class KubeEngine(Engine):
    def __init__(self, settings: ApiSettings, client: k8s.ApiClient | None = None):
        if not settings.keys_secret or settings.keys_secret.count("/") != 1:
            raise KeysFileError("--kubernetes needs --keys-secret NAMESPACE/NAME (the API keys' Secret)")
        self.settings = settings
        # The key for ModelServers with spec.apiKeySecret, from a Secret the chart maps into the environment.
        variable = settings.modelserver_key_env
        self.modelserver_key = (os.environ.get(variable) if variable else None) or None
        try:
            self.client = client or api_client()
        except k8s_config.ConfigException as exc:
            raise KeysFileError(
                f"--kubernetes: no cluster to talk to ({exc}); run in a pod or set KUBECONFIG"
            ) from None
        self.core, self.custom = k8s.CoreV1Api(self.client), k8s.CustomObjectsApi(self.client)
        # A watch would need `list` and `watch` on Secrets; a read every keys_refresh_s needs `get` on one.
        self.keys = RefreshingKeys(
            lambda: read_secret_keys(self.core, settings.keys_secret),
            lambda: int(time.monotonic() // settings.keys_refresh_s),
        )
        self.store = open_store(settings.store)
        self.file_index = StoreFileIndex(self.store)
        work = settings.state_path() / "tmp"
        self.files = FileService(self.file_index, self.store, work, settings.validation_problems_listed)
        self.metrics = ApiMetrics(self._job_counts)
        self.http = httpx.AsyncClient(timeout=PROXY_TIMEOUT)

    async def close(self) -> None:
        await self.http.aclose()
        self.client.close()
        self.files.close()

    # jobs

    def create_job(self, project: str, request: mapping.CreateJobRequest) -> dict[str, Any]:
        training, validation = self.training_files(project, request)
        job = self.new_job(project, request, kubejobs.cluster_base_model(request.model), training)
        storage = {"endpoint": self.settings.job_s3_endpoint, "credentialsSecret": self.settings.job_storage_secret}
        document = kubejobs.build_finetune_job(
            job,
            train_uri=self.files.uri(training),
            validation_uri=self.files.uri(validation) if validation else None,
            train_count=mapping.train_examples(training.examples, validation is not None),
            store=self.store.uri,
            max_seq_length=self.settings.max_seq_length,
            storage={key: value for key, value in storage.items() if value},
        )
        try:
            created = call_json(
                self.custom.create_namespaced_custom_object, API_GROUP, API_VERSION, project, FINETUNEJOBS, document
            )
        except ApiException as exc:
            if exc.status == 404:  # no such namespace: the keys name a project the cluster lacks
                raise ApiError(
                    503,
                    f"project {project!r} has no namespace on the cluster; an administrator creates it",
                    type="server_error",
                    code="project_unavailable",
                ) from None
            raise
        return job_object(kubejobs.job_record(created))

    def _object(self, project: str, job_id: str) -> dict[str, Any]:
        body = read_custom(self.custom, FINETUNEJOBS, project, job_id) if _is_job_name(job_id) else None
        if body is None or kubejobs.LABEL_JOB_ID not in (body["metadata"].get("labels") or {}):
            raise not_found("job", job_id, "fine_tuning_job_id")
        return body

    def job(self, project: str, job_id: str) -> dict[str, Any]:
        return job_object(kubejobs.job_record(self._object(project, job_id)))

    def _job_objects(self, project: str) -> list[dict[str, Any]]:
        """The FineTuneJobs this API created in the project's namespace."""
        listed = call_json(
            self.custom.list_namespaced_custom_object,
            API_GROUP,
            API_VERSION,
            project,
            FINETUNEJOBS,
            label_selector=kubejobs.LABEL_JOB_ID,
        )
        return listed["items"]

    def _records(self, project: str) -> list[JobRecord]:
        """The project's jobs, newest first."""
        records = [kubejobs.job_record(body) for body in self._job_objects(project)]
        return sorted(records, key=lambda r: (r.created_at, r.id), reverse=True)

    def list_jobs(self, project: str, after: str | None, limit: int | None, metadata: dict[str, str]):
        records = [r for r in self._records(project) if metadata.items() <= (r.metadata or {}).items()]
        page, more = page_after(records, after, page_limit(limit), lambda record: record.id)
        return listing([job_object(r) for r in page], more)

    def job_action(self, project: str, job_id: str, action: str) -> dict[str, Any]:
        """cancel sets spec.cancel, pause and resume set spec.suspend; the operator carries them out."""
        body = self._object(project, job_id)
        suspended = bool((body.get("spec") or {}).get("suspend"))
        change = kubejobs.action_patch(job_id, kubejobs.job_record(body).status, suspended, action)
        patched = call_json(
            self.custom.patch_namespaced_custom_object,
            API_GROUP,
            API_VERSION,
            project,
            FINETUNEJOBS,
            job_id,
            {"spec": change},
        )
        return job_object(kubejobs.job_record(patched))

    def events(self, project: str, job_id: str, after: str | None, limit: int | None) -> dict[str, Any]:
        body = self._object(project, job_id)
        selector = f"involvedObject.kind=FineTuneJob,involvedObject.name={job_id}"
        kube = call_json(self.core.list_namespaced_event, project, field_selector=selector)["items"]
        uid = body["metadata"]["uid"]  # Events of an earlier object of the same name are not this job's
        mine = [item for item in kube if (item.get("involvedObject") or {}).get("uid") in (uid, None)]
        page, more = page_after(kubejobs.job_events(body, mine), after, page_limit(limit), lambda e: e["id"])
        return listing(page, more)

    def checkpoints(self, project: str, job_id: str, after: str | None, limit: int | None) -> dict[str, Any]:
        """Every checkpoint the trainer published as a servable adapter (one an epoch at least), and
        the final version at the last step; for jobs from before checkpoints were published, the
        resume checkpoints the store still keeps."""
        body = self._object(project, job_id)
        record = kubejobs.job_record(body)
        created = record.finished_at or record.created_at
        figures = self._resume_checkpoint_figures(project, job_id, body["metadata"]["uid"])
        figures |= self._published_checkpoint_figures(project, job_id)
        if (final := self._final_version(record)) is not None:
            metrics = final.manifest.metrics
            # The training loss beside it: the last evaluation's (the mean of the steps it followed).
            last_evaluation = ((metrics.model_extra or {}).get("history") or [{}])[-1]
            figures[metrics.steps] = {"trainLoss": last_evaluation.get("trainLoss"), **metrics.adapter.model_dump()}
        checkpoints = [
            CheckpointRecord(
                seq=step, job_id=job_id, step=step, created_at=created, metrics=checkpoint_metrics(step, figures[step])
            )
            for step in sorted(figures, reverse=True)
        ]
        items = [checkpoint_object(record, c) for c in checkpoints]
        page, more = page_after(items, after, page_limit(limit, 10), lambda item: item["id"])
        return listing(page, more)

    def _resume_checkpoint_figures(self, project: str, job_id: str, uid: str) -> dict[int, dict[str, Any]]:
        prefix = run_prefix(project, job_id, uid)
        figures = {}
        for step in committed_steps(self.store, prefix):
            with contextlib.suppress(ObjectNotFoundError):  # deleted since listed: the trainer keeps its latest few
                figures[step] = checkpoint_manifest(self.store, prefix, step).get("metrics") or {}
        return figures

    def _published_checkpoint_figures(self, project: str, job_id: str) -> dict[int, dict[str, Any]]:
        name = mapping.checkpoint_adapter_name(job_id)
        return {
            int(version): read_adapter(self.store, project, name, version).manifest.metrics.model_dump()
            for version in list_versions(self.store, project, name)
        }

    def _final_version(self, record: JobRecord) -> AdapterVersion | None:
        """The version a succeeded job published (promoted or not: its checkpoints stay servable)."""
        if record.status != "succeeded" or record.adapter_version is None:
            return None
        return read_adapter(self.store, record.project, record.adapter_name, record.adapter_version)

    # result files: made on first read, or on the first listing after the job succeeded

    def list_files(self, project: str, purpose: str | None, after: str | None, limit: int | None, order: str):
        if purpose in (None, RESULTS):
            for body in self._job_objects(project):
                self._make_result_file_of(project, body)
        return super().list_files(project, purpose, after, limit, order)

    def file(self, project: str, file_id: str) -> dict[str, Any]:
        self._make_result_file(project, file_id)
        return super().file(project, file_id)

    def file_content(self, project: str, file_id: str) -> tuple[Path, str]:
        self._make_result_file(project, file_id)
        return super().file_content(project, file_id)

    def _make_result_file(self, project: str, file_id: str) -> None:
        """A succeeded job's step-metrics CSV, from the loss history its published version holds, the
        first time its id (in the job's result_files) is read; any other id is left to the file index."""
        job_id = kubejobs.result_file_job(file_id)
        if job_id is None or self.file_index.file(project, file_id) is not None:
            return  # no kube call for a result file that exists: most reads
        try:
            body = self._object(project, job_id)
        except ApiError:
            return  # no job of this project's: the index's 404 for the file
        self._make_result_file_of(project, body)

    def _make_result_file_of(self, project: str, body: dict[str, Any]) -> None:
        """The CSV of the FineTuneJob `body`, if it succeeded and has none yet."""
        file_id = kubejobs.result_file_id(body["metadata"]["name"])
        adapter = read_status(FineTuneJobStatus, body).adapter
        if adapter is None or kubejobs.job_record(body).status != "succeeded":
            return
        if self.file_index.file(project, file_id) is not None:
            return
        version = read_adapter(self.store, project, adapter.name, adapter.version)
        history = read_version_file(self.store, version, LOSS_HISTORY_FILE)
        content = history_csv(json.loads(history) if history is not None else {})
        with contextlib.suppress(ObjectExistsError):  # another API pod made it at the same moment
            self.files.add_result(project, kubejobs.RESULT_FILENAME, content, file_id)

    def _job_counts(self) -> dict[str, int]:
        """Jobs by OpenAI status across the cluster, at each scrape (none kept here)."""
        try:
            listed = call_json(
                self.custom.list_cluster_custom_object,
                API_GROUP,
                API_VERSION,
                FINETUNEJOBS,
                label_selector=kubejobs.LABEL_JOB_ID,
            )
        except ApiException as exc:
            log.warning("cannot count jobs for the metrics: %s", exc.reason)
            return {}
        counts: dict[str, int] = {}
        for body in listed["items"]:
            status = kubejobs.job_record(body).status
            counts[status] = counts.get(status, 0) + 1
        return counts

    # models and inference

    def _fine_tuned(self, project: str) -> list[tuple[JobRecord, dict[str, Any]]]:
        pairs = [(kubejobs.job_record(body), body) for body in self._job_objects(project)]
        return [(r, body) for r, body in pairs if r.model_created and not kubejobs.model_deleted(body)]

    def _servers(self, project: str) -> list[ModelServer]:
        listed = call_json(self.custom.list_namespaced_custom_object, API_GROUP, API_VERSION, project, MODELSERVERS)
        return [
            ModelServer.model_validate({k: v for k, v in item.items() if k != "status"}) for item in listed["items"]
        ]

    def list_models(self, project: str) -> dict[str, Any]:
        bases = sorted({default_served_name(server.spec.baseModel) for server in self._servers(project)})
        items = [model_object(base, 0, OWNED_BY_BASE) for base in bases]
        tuned = sorted(self._fine_tuned(project), key=lambda pair: pair[0].created_at)
        items += [model_object(r.fine_tuned_model, r.finished_at or r.created_at, project) for r, _ in tuned]
        return {"object": "list", "data": items, "has_more": False}

    def _job_of_model(self, project: str, model_id: str) -> JobRecord:
        """The job whose fine_tuned_model is `model_id` (made or not); 404 for any other id."""
        job_id = model_id.rsplit(":", 1)[-1]
        try:
            body = self._object(project, job_id)
        except ApiError:
            raise not_found("model", model_id, "model") from None
        record = kubejobs.job_record(body)
        if record.fine_tuned_model != model_id or kubejobs.model_deleted(body):
            raise not_found("model", model_id, "model")
        return record

    def _tuned_model(self, project: str, model_id: str) -> JobRecord | None:
        if not model_id.startswith("ft:"):
            return None
        record = self._job_of_model(project, model_id)
        if not record.model_created:
            raise ApiError(404, model_missing_message(model_id, record), param="model", code="model_not_found")
        return record

    def _served_target(self, project: str, model_id: str) -> tuple[JobRecord, str] | None:
        """The job behind a fine-tuned model or checkpoint id and the name its ModelServer serves it
        by (the registry's `namespace/name@version`); None for a base model."""
        checkpoint = mapping.split_checkpoint_model_id(model_id)
        if checkpoint is None:
            record = self._tuned_model(project, model_id)
            if record is None:
                return None
            return record, adapter_served_name(project, record.adapter_name, record.adapter_version or "")
        fine_tuned_model, step = checkpoint
        record = self._job_of_model(project, fine_tuned_model)
        name = mapping.checkpoint_adapter_name(record.id)
        if str(step) in list_versions(self.store, project, name):
            return record, adapter_served_name(project, name, str(step))
        final = self._final_version(record)
        if final is not None and final.manifest.metrics.steps == step:
            return record, adapter_served_name(project, record.adapter_name, final.version)
        raise not_found("model", model_id, "model")

    def model(self, project: str, model_id: str) -> dict[str, Any]:
        record = self._tuned_model(project, model_id)
        if record is not None:
            return model_object(record.fine_tuned_model, record.finished_at or record.created_at, project)
        self._server_for(project, model_id, model_id)
        return model_object(model_id, 0, OWNED_BY_BASE)

    def delete_model(self, project: str, model_id: str) -> dict[str, Any]:
        record = self._tuned_model(project, model_id)
        if record is None:
            raise not_found("model", model_id, "model")
        patch = {"metadata": {"annotations": {kubejobs.MODEL_DELETED: str(int(time.time()))}}}
        call_json(
            self.custom.patch_namespaced_custom_object, API_GROUP, API_VERSION, project, FINETUNEJOBS, record.id, patch
        )
        return {"id": model_id, "object": "model", "deleted": True}

    def _server_for(self, project: str, base_model: str, client_model: str) -> ModelServer:
        """The project's ModelServer whose baseModel is `base_model`, or the 404 that says none is."""
        for server in self._servers(project):
            if kubejobs.same_base_model(server.spec.baseModel, base_model) or (
                default_served_name(server.spec.baseModel) == base_model
            ):
                return server
        raise ApiError(
            404,
            f"model {client_model!r}: no ModelServer in project {project!r} serves its base model {base_model!r}; "
            "create a ModelServer with that spec.baseModel in this namespace",
            param="model",
            code="model_not_found",
        )

    async def forward(self, project: str, path: str, body: dict[str, Any]) -> Forwarded:
        model = requested_model(body)
        target = self._served_target(project, model)
        record = target[0] if target else None
        server = self._server_for(project, record.base_model if record else model, model)
        name, namespace = server.metadata.name, server.metadata.namespace
        key = self._modelserver_key(server)
        try:
            self.core.read_namespaced_service(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise
            raise ApiError(
                503, f"ModelServer {name} has no Service yet; retry in a minute", type="server_error"
            ) from None
        served = target[1] if target else default_served_name(server.spec.baseModel)
        url = f"http://{name}.{namespace}.svc:{SERVER_PORT}"
        try:
            answer = await proxy(self.http, url, key, served, path, body, model)
        except httpx.TransportError:
            raise ApiError(503, f"ModelServer {name} did not answer; retry in a minute", type="server_error") from None
        if answer[0] == 401:
            raise _modelserver_key_error(name, f"refused the key in ${self.settings.modelserver_key_env}")
        return answer

    def _modelserver_key(self, server: ModelServer) -> str | None:
        """The key for a ModelServer that requires one (spec.apiKeySecret): the API's own, never
        read from the ModelServer's Secret."""
        if server.spec.apiKeySecret is None:
            return None
        if self.modelserver_key is None:
            raise _modelserver_key_error(server.metadata.name, "requires an API key and this API was given none")
        return self.modelserver_key


def _modelserver_key_error(name: str, what: str) -> ApiError:
    return ApiError(
        503,
        f"ModelServer {name} {what}: put the same key in the API's api.modelServerKeySecret (the chart's value; "
        "--modelserver-key-env) and in the ModelServer's spec.apiKeySecret, or unset spec.apiKeySecret",
        type="server_error",
        code="server_unavailable",
    )


def _is_job_name(job_id: str) -> bool:
    """Whether `job_id` can be an object name at all (else it is a 404 without asking the cluster)."""
    return job_id.startswith("ftjob-") and job_id.replace("-", "").isalnum() and job_id == job_id.lower()
