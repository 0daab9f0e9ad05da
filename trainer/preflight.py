"""Checks that fail a run in seconds, before it reads data or loads a model, when an input or the
output cannot work: S3 credentials missing, a dataset or base model not there, an output store that
refuses writes. Each problem names the FineTuneJob field and what to do about it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

from tuneloom.api import FineTuneJobSpec
from tuneloom.inputs import BaseModelUnavailableError, check_base_model, local_path, split_s3
from tuneloom.storage import ObjectStore, StorageError, StorageUnreachableError, open_store

# On a cluster the Secret's keys become these variables in the training pod.
_CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or give the workload an IAM role); "
    "on Kubernetes, name a Secret holding those two keys in spec.storage.credentialsSecret"
)


class PreflightError(ValueError):
    """Inputs or output that cannot work; `problems` holds one 'field: what, and what to do' each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("the job cannot run:\n  " + "\n  ".join(problems))


def check_before_running(spec: FineTuneJobSpec, probe_prefix: str) -> None:
    """Raises PreflightError naming every problem found; StorageUnreachableError when an S3
    endpoint does not answer (that may pass, so it is not called the spec's fault).

    The output store gets a small object written and deleted under `probe_prefix`.
    """
    problems = _credential_problems(spec)
    if not problems:  # without credentials every S3 check below would fail the same way
        problems = [
            *_dataset_problems(spec),
            *_problems_of("spec.baseModel", lambda: check_base_model(spec.baseModel)),
            *_problems_of("spec.output.uri", lambda: _probe_write(open_store(spec.output.uri), probe_prefix)),
        ]
    if problems:
        raise PreflightError(problems)


def _dataset_fields(spec: FineTuneJobSpec) -> dict[str, str | None]:
    """Every data file of the job, by the field that names it."""
    mix = {f"spec.dataset.mix[{index}].train": entry.train for index, entry in enumerate(spec.dataset.mix)}
    return {"spec.dataset.train": spec.dataset.train, "spec.dataset.validation": spec.dataset.validation, **mix}


def _s3_fields(spec: FineTuneJobSpec) -> Iterator[str]:
    fields = {"spec.baseModel": spec.baseModel, **_dataset_fields(spec), "spec.output.uri": spec.output.uri}
    return (name for name, uri in fields.items() if uri and uri.startswith("s3://"))


def _credential_problems(spec: FineTuneJobSpec) -> list[str]:
    """Whether boto3 finds credentials, when any field is on S3. Never shows a value."""
    fields = list(_s3_fields(spec))
    if not fields:
        return []
    import boto3
    from botocore.exceptions import PartialCredentialsError

    where = ", ".join(fields)
    try:
        found = boto3.session.Session().get_credentials()
    except PartialCredentialsError as exc:
        missing = exc.kwargs.get("cred_var", "a credential variable")
        return [f"{where}: S3 credentials are incomplete ({missing} is missing); {_CREDENTIALS_HINT}"]
    if found is None:
        return [f"{where}: on S3, but no S3 credentials were found; {_CREDENTIALS_HINT}"]
    return []


def _dataset_problems(spec: FineTuneJobSpec) -> Iterator[str]:
    for field, uri in _dataset_fields(spec).items():
        if uri:
            yield from _problems_of(field, lambda uri=uri: _require_file(uri))


def _require_file(uri: str) -> None:
    if uri.startswith("s3://"):
        parent, name = split_s3(uri)
        if not open_store(parent).exists(name):
            raise FileNotFoundError(f"{uri} does not exist (or its bucket does not); check the URI")
        return
    path = local_path(uri)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; check the path (relative paths start at {path.cwd()})")
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a directory; give the JSONL file")


def _probe_write(store: ObjectStore, prefix: str) -> None:
    """Writes and deletes a small object where the run writes first: refusals show now, not
    after hours of training. A probe a failed delete leaves behind is ignored by every reader."""
    key = f"{prefix}/write-probe-{uuid.uuid4().hex}"
    try:
        store.put_bytes(key, b"tuneloom write probe\n")
        store.delete(key)
    except StorageUnreachableError:
        raise
    except StorageError as exc:
        raise StorageError(f"cannot write to {store.describe()}: {exc}") from None


def _problems_of(field: str, check: Callable[[], object]) -> list[str]:
    """The check's refusal as '<field>: <why>', or nothing; an unreachable endpoint is raised."""
    try:
        check()
    except BaseModelUnavailableError as exc:
        return [str(exc)]  # already names its field
    except StorageUnreachableError as exc:
        raise StorageUnreachableError(f"{field}: {exc}") from None
    except (StorageError, FileNotFoundError) as exc:
        return [f"{field}: {exc}"]
    return []
