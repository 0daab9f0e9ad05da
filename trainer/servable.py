"""Checkpoints published as servable adapters (spec.checkpointing.adapterName).

A checkpoint under `checkpoints/...` holds what a run needs to resume (weights, optimizer, loop
state) and is deleted once `checkpointing.keep` newer ones exist. When the spec names a checkpoint
adapter, each checkpoint's LoRA weights are also committed to the registry as
`<adapterName>@<step>`: an immutable version like any other, numbered by its optimizer step rather
than by release, so a checkpoint id names one version for good and the bare name serves the newest
checkpoint. The final adapter keeps its own name and release numbering.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from torch import nn

from tuneloom.api import FineTuneJob
from tuneloom.registry import publish_adapter
from tuneloom.storage import ObjectExistsError, ObjectStore
from tuneloom.trainer.checkpoint import LoopState, checkpoint_metrics
from tuneloom.trainer.modeling import save_adapter

log = logging.getLogger("tuneloom.trainer")


class CheckpointAdapters:
    def __init__(self, store: ObjectStore, job: FineTuneJob, model: nn.Module, base_config_sha256: str | None):
        self.store, self.job, self.model = store, job, model
        self.base_model = {"name": job.spec.baseModel, "configSha256": base_config_sha256}

    @property
    def name(self) -> str:
        return str(self.job.spec.checkpointing.adapterName)

    def publish(self, state: LoopState) -> None:
        """Commits the model's adapter as `<name>@<step>`, with the run's figures at that step (as the
        checkpoint's own manifest has them); a step already published (by a run that was stopped
        after it) keeps its version."""
        namespace, step = self.job.metadata.namespace, state.step
        manifest = {
            "kind": "lora",
            "baseModel": self.base_model,
            "metrics": {"steps": step, **checkpoint_metrics(state)},
            "checkpoint": {"step": step, "adapterName": self.job.spec.output.adapterName},
            "job": {"namespace": namespace, "name": self.job.metadata.name, "uid": self.job.metadata.uid},
        }
        with tempfile.TemporaryDirectory(prefix="tuneloom-ckpt-adapter-") as tmp:
            out = Path(tmp)
            save_adapter(self.model, self.job.spec.baseModel, out)
            files = {path.name: path for path in sorted(out.iterdir()) if path.is_file()}
            try:
                adapter = publish_adapter(self.store, namespace, self.name, files, manifest, version=str(step))
            except ObjectExistsError:
                log.info("checkpoint adapter %s@%d was published by an earlier run; kept", self.name, step)
                return
        log.info("checkpoint adapter published: %s", adapter.uri)
