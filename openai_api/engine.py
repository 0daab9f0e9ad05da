"""What the API does, behind its HTTP routes: files, jobs, events, checkpoints, models and the
inference targets, each scoped to the caller's project. Returns OpenAI objects as dicts."""

from __future__ import annotations

from typing import Any

from tuneloom.storage import open_store

from . import jobs as mapping
from .errors import ApiError, found, not_found
from .files import FileService
from .inference import ServeManager, Target, adapter_served_name
from .interface import MAX_PAGE, Engine, Forwarded, model_missing_message, page_limit, requested_model
from .keys import KeyRing, RefreshingKeys, keys_file_version
from .metrics import ApiMetrics
from .models import OWNED_BY_BASE, prepared_base_models, resolve_base_model
from .objects import checkpoint_object, event_object, event_seq, job_object, listing, model_object
from .runner import LocalRunner
from .settings import ApiSettings
from .state import JobRecord, NewEvent, State


class ApiEngine(Engine):
    """Local mode: SQLite state, jobs trained on this machine, a `tuneloom serve` per base model."""

    def __init__(self, settings: ApiSettings):
        self.settings = settings
        self.keys = RefreshingKeys(
            lambda: KeyRing.load(settings.api_key_env, settings.keys_file),
            lambda: keys_file_version(settings.keys_file),
        )
        root = settings.state_path()
        self.state = State(root / "state.sqlite3")
        self.store = open_store(settings.store)
        self.file_index = self.state
        self.files = FileService(self.state, self.store, root / "tmp", settings.validation_problems_listed)
        self.runner = LocalRunner(
            self.state, self.files, self.store, root / "jobs", settings.max_running, settings.max_seq_length
        )
        self.serving = ServeManager(
            self.store.uri,
            root / "serve",
            lambda: self.keys.projects,
            settings.serve_max_model_len,
            settings.serve_startup_timeout_s,
        )
        self.metrics = ApiMetrics(self.state.job_counts)

    def start(self) -> None:
        self.runner.start()

    async def close(self) -> None:
        self.runner.close()
        self.serving.close()
        await self.serving.client.aclose()
        self.files.close()
        self.state.close()

    # jobs

    def create_job(self, project: str, request: mapping.CreateJobRequest) -> dict[str, Any]:
        base = resolve_base_model(request.model)
        training, _ = self.training_files(project, request)
        job = self.new_job(project, request, base.id, training)
        self.state.add_job(job, NewEvent(message=f"Created fine-tuning job: {job.id}"))
        notice = mapping.integrations_notice(job.integrations)
        if notice:
            self.state.update_job(job, [NewEvent(message=notice, level="warn")])
        self.runner.submit(job)
        return job_object(job)

    def job_record(self, project: str, job_id: str) -> JobRecord:
        return found(self.state.job(job_id, project), "job", job_id, "fine_tuning_job_id")

    def job(self, project: str, job_id: str) -> dict[str, Any]:
        return job_object(self.job_record(project, job_id))

    def list_jobs(self, project: str, after: str | None, limit: int | None, metadata: dict[str, str]):
        records, more = self.state.jobs(project, after=after, limit=page_limit(limit), metadata=metadata)
        return listing([job_object(r) for r in records], more)

    def job_action(self, project: str, job_id: str, action: str) -> dict[str, Any]:
        """cancel, pause or resume, as the job backend carries them out."""
        job = self.job_record(project, job_id)
        return job_object(getattr(self.runner, action)(job.id))

    def events(self, project: str, job_id: str, after: str | None, limit: int | None) -> dict[str, Any]:
        job = self.job_record(project, job_id)
        records, more = self.state.events(job.id, after=event_seq(after) if after else None, limit=page_limit(limit))
        return listing([event_object(r) for r in records], more)

    def checkpoints(self, project: str, job_id: str, after: str | None, limit: int | None) -> dict[str, Any]:
        job = self.job_record(project, job_id)
        step = int(after.rsplit("-", 1)[-1]) if after and after.rsplit("-", 1)[-1].isdigit() else None
        records, more = self.state.checkpoints(job.id, after=step, limit=page_limit(limit, 10))
        return listing([checkpoint_object(job, r) for r in records], more)

    # models

    def _fine_tuned(self, project: str) -> list[JobRecord]:
        finished, more, after = [], True, None
        while more:
            page, more = self.state.jobs(project, after=after, limit=MAX_PAGE, metadata={})
            finished += page
            after = page[-1].id if page else None
        return [j for j in finished if j.model_created and not self.state.model_deleted(j.fine_tuned_model)]

    def list_models(self, project: str) -> dict[str, Any]:
        tuned = self._fine_tuned(project)
        bases = {m.id: 0 for m in prepared_base_models()} | {j.base_model: 0 for j in tuned}
        items = [model_object(base, created, OWNED_BY_BASE) for base, created in sorted(bases.items())]
        items += [model_object(j.fine_tuned_model, j.finished_at or j.created_at, project) for j in tuned]
        return {"object": "list", "data": items, "has_more": False}

    def model(self, project: str, model_id: str) -> dict[str, Any]:
        served = self._fine_tuned_target(project, model_id)
        if served is not None:
            job, _ = served
            return model_object(model_id, job.finished_at or job.created_at, project)
        return model_object(resolve_base_model(model_id).id, 0, OWNED_BY_BASE)

    def delete_model(self, project: str, model_id: str) -> dict[str, Any]:
        if self._fine_tuned_target(project, model_id) is None:
            raise not_found("model", model_id, "model")
        self.state.delete_model(project, model_id)
        return {"id": model_id, "object": "model", "deleted": True}

    def _fine_tuned_target(self, project: str, model_id: str) -> tuple[JobRecord, str] | None:
        """The job behind a fine-tuned model or checkpoint id and the name vLLM serves it by (the
        registry's pinned `namespace/name@version`); None when it is no such id (a base model)."""
        if not model_id.startswith("ft:"):
            return None
        if self.state.model_deleted(model_id):
            raise not_found("model", model_id, "model")
        checkpoint = mapping.split_checkpoint_model_id(model_id)
        if checkpoint is not None:
            return self._checkpoint_target(project, model_id, *checkpoint)
        job = found(self.state.job_for_model(project, model_id), "model", model_id, "model")
        if not job.model_created:
            raise ApiError(404, model_missing_message(model_id, job), param="model", code="model_not_found")
        return job, adapter_served_name(job.project, job.adapter_name, job.adapter_version or "")

    def _checkpoint_target(
        self, project: str, model_id: str, fine_tuned_model: str, step: int
    ) -> tuple[JobRecord, str]:
        """A checkpoint serves the adapter published at its step (its job's final version at the last)."""
        job = found(self.state.job_for_model(project, fine_tuned_model), "model", model_id, "model")
        records, _ = self.state.checkpoints(job.id, after=step + 1, limit=1)  # the newest at or below `step`
        if not records or records[0].step != step:
            raise not_found("model", model_id, "model")
        if step == job.final_step:
            return job, adapter_served_name(job.project, job.adapter_name, job.adapter_version or "")
        return job, adapter_served_name(job.project, mapping.checkpoint_adapter_name(job.id), str(step))

    async def forward(self, project: str, path: str, body: dict[str, Any]) -> Forwarded:
        model = requested_model(body)
        return await self.serving.forward(self.target(project, model), path, body, model)

    def target(self, project: str, model: str) -> Target:
        served = self._fine_tuned_target(project, model)
        if served is None:
            return Target(resolve_base_model(model), resolve_base_model(model).id)
        job, name = served
        return Target(resolve_base_model(job.base_model), name, job.project)
