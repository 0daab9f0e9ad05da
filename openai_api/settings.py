"""The API server's settings, typed, with their defaults in one place."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tuneloom.models import cache_dir
from tuneloom.storage import LocalStore, open_store


class ApiSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    store: str = Field(description="object store root: files, checkpoints and adapters (s3://, file:// or a path)")
    host: str = "127.0.0.1"
    port: int = 8080
    api_key_env: str | None = Field(default=None, description="variable holding one key for project `default`")
    keys_file: Path | None = Field(default=None, description="JSON {project: [sha256 of a key, ...]}")
    state_dir: Path | None = Field(default=None, description="SQLite state and job work folders; see state_path")
    max_running: int = Field(default=1, ge=1, description="jobs training at once")
    max_seq_length: int = Field(default=1024, ge=16, description="tokens per training example (longer: truncated)")
    serve_max_model_len: int | None = Field(default=None, description="vLLM's --max-model-len for inference")
    serve_startup_timeout_s: float = 600.0
    validation_problems_listed: int = Field(default=20, ge=1, description="problems named in a refused upload")
    kubernetes: bool = Field(default=False, description="jobs as FineTuneJobs on the cluster (kubeengine.py)")
    keys_secret: str | None = Field(
        default=None, description="Kubernetes mode: NAMESPACE/NAME of the Secret whose `keys.json` maps keys"
    )
    keys_refresh_s: float = Field(
        default=30.0, gt=0, description="Kubernetes mode: seconds between reads of the keys' Secret"
    )  # a keys file is read again whenever it changes
    job_s3_endpoint: str | None = Field(
        default=None, description="Kubernetes mode: each FineTuneJob's spec.storage.endpoint; unset: AWS"
    )
    job_storage_secret: str | None = Field(
        default=None,
        description="Kubernetes mode: each FineTuneJob's spec.storage.credentialsSecret, a Secret in the project's "
        "namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; unset: the training pod's own identity",
    )

    modelserver_key_env: str | None = Field(
        default=None,
        description="Kubernetes mode: variable holding the key the API sends to ModelServers that set "
        "spec.apiKeySecret (their Secrets hold the same key); unset: such ModelServers are not reachable",
    )

    def state_path(self) -> Path:
        """Where the state lives: --state-dir; else `api-state/` beside a local store (so the two
        move together); else `$TUNELOOM_CACHE_DIR/api`."""
        if self.state_dir is not None:
            return self.state_dir
        store = open_store(self.store)
        if isinstance(store, LocalStore):
            return store.root.parent / f"{store.root.name}-api-state"
        return cache_dir() / "api"
