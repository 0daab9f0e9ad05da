"""One small object-store interface over S3 and local directories.

The trainer, the operator and the serving side all move the same things (datasets, checkpoints,
adapters) and must agree on what "written" means. Both backends therefore offer the same
guarantees: a reader never sees a half-written object, `if_absent` writes are refused atomically
when the key exists (the basis of immutable, committed versions), and every failure surfaces as a
`StorageError` whose message names the object, the reason and what to do, and never a secret.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

log = logging.getLogger("tuneloom.storage")

MB = 1_000_000
CHUNK = 1024 * 1024
PROGRESS_MIN_BYTES = MB
PROGRESS_INTERVAL_S = 2.0
DEFAULT_REGION = "us-east-1"
ENDPOINT_ENV = "TUNELOOM_S3_ENDPOINT"
# Temp files live next to their target so the final rename is atomic; listings hide them.
TEMP_MARKER = ".tuneloom-tmp-"


class StorageError(Exception):
    """A permanent storage failure (transient ones were already retried)."""


class ObjectNotFoundError(StorageError):
    """The object (or version) does not exist."""


class ObjectExistsError(StorageError):
    """A conditional (`if_absent`) write was refused because the key already exists."""


class CorruptObjectError(StorageError):
    """Stored content that exists but cannot be trusted: unreadable, or not what was committed."""


class ChecksumMismatchError(CorruptObjectError):
    """Downloaded content differs from what the manifest recorded."""


class StorageUnreachableError(StorageError):
    """The store's endpoint did not answer, after retries: maybe a passing outage, maybe a wrong endpoint."""


class InvalidKeyError(StorageError, ValueError):
    """A key or prefix that could escape the store's root or is otherwise malformed."""


def validate_key(key: str) -> str:
    """Returns `key` if it is a safe, '/'-separated relative key; raises InvalidKeyError otherwise.

    Rejecting '..', '.', empty segments and absolute keys keeps LocalStore inside its root and
    makes both backends address exactly the same objects.
    """
    if not key:
        raise InvalidKeyError("empty key; give a '/'-separated path relative to the store root")
    _check_segments(key, key.split("/"))
    return key


def validate_prefix(prefix: str) -> str:
    """Like validate_key, but "" (the whole root) and a trailing '/' are allowed."""
    if prefix:
        segments = prefix.split("/")
        _check_segments(prefix, segments[:-1] if segments[-1] == "" else segments)
    return prefix


def _check_segments(key: str, segments: list[str]) -> None:
    if key.startswith("/"):
        raise InvalidKeyError(f"key {key!r} starts with '/'; keys are relative to the store root")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise InvalidKeyError(f"key {key!r} has an empty, '.' or '..' segment; path traversal refused")
        if segment.startswith(TEMP_MARKER) or "\x00" in segment or "\\" in segment:
            raise InvalidKeyError(f"key {key!r} has a reserved character or name")


def join_key(*parts: str) -> str:
    """Joins key parts with '/', ignoring empty parts and stray slashes at their ends."""
    return "/".join(part.strip("/") for part in parts if part.strip("/"))


def sha256_file(path: Path, chunk_size: int = CHUNK) -> str:
    """The hex SHA-256 of a file, read in chunks so multi-GB weights never sit in memory."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


class TransferProgress:
    """Logs `<verb> <target>: 12.0/50.0 MB (24%)` at most every few seconds and once at the end.

    Used as a boto3 transfer callback (called from worker threads with byte increments) and by
    local copies, so long transfers look the same in logs whichever backend is in use.
    """

    def __init__(
        self,
        verb: str,
        target: str,
        total: int,
        *,
        interval: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.verb = verb
        self.target = target
        self.total = total
        self.done_bytes = 0
        self.interval = interval
        self._clock = clock
        self._last_log = clock()
        self._lock = threading.Lock()
        self._enabled = total >= PROGRESS_MIN_BYTES

    def __call__(self, increment: int) -> None:
        with self._lock:
            self.done_bytes += increment
            now = self._clock()
            if self._enabled and now - self._last_log >= self.interval and self.done_bytes < self.total:
                self._last_log = now
                self._log()

    def finish(self) -> None:
        """Logs the final line (only for transfers large enough to report)."""
        with self._lock:
            if self._enabled:
                self._log()

    def _log(self) -> None:
        percent = 100 * self.done_bytes // self.total if self.total else 100
        log.info(
            "%s %s: %.1f/%.1f MB (%d%%)",
            self.verb,
            self.target,
            self.done_bytes / MB,
            self.total / MB,
            percent,
        )


def copy_stream(source: IO[bytes], dest: IO[bytes], progress: TransferProgress) -> None:
    """Copies in chunks, reporting progress."""
    while block := source.read(CHUNK):
        dest.write(block)
        progress(len(block))
    progress.finish()


class ObjectStore(abc.ABC):
    """A flat namespace of immutable-by-convention objects under one root URI.

    Keys are '/'-separated and relative to the root. Writes are atomic; `if_absent=True` makes a
    write fail with ObjectExistsError instead of replacing an existing object.
    """

    uri: str

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        """Stores `data` at `key`."""

    @abc.abstractmethod
    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> None:
        """Uploads the file at `path` to `key`."""

    def stage_file(self, key: str, path: Path, *, if_absent: bool = False) -> StagedUpload:
        """An upload to `key` of the file at `path` while it is still being written (see
        StagedUpload). Here it is sent whole at commit; a store that can send it in parts as it
        grows does so."""
        return _PutAtCommit(self, key, Path(path), if_absent)

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The content of `key`; ObjectNotFoundError if missing."""

    @abc.abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Up to `length` bytes of `key` from byte `start` (fewer at its end): a file's header
        without the file."""

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """The bytes stored at `key`; ObjectNotFoundError if missing."""

    @abc.abstractmethod
    def download_file(self, key: str, dest: Path) -> None:
        """Writes `key` to `dest` via a temp file and a rename: `dest` is complete or untouched."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored at `key`."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with `prefix` (a plain string prefix, as in S3), recursively, sorted."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Deletes `key`; deleting a missing key is not an error (as in S3)."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Deletes everything under the folder `prefix` ("a/b" means "a/b/...", never "a/bc")."""

    @abc.abstractmethod
    def describe(self, key: str = "") -> str:
        """A human-readable URI for `key`, for messages and records."""


class StagedUpload(abc.ABC):
    """An object written from a local file that is still growing: `grown(size)` says its first
    `size` bytes are final (the store may send them now), `commit()` makes the object appear with
    put_file's guarantees (`if_absent` included), `abort()` leaves nothing behind. Until commit,
    readers never see the object."""

    @abc.abstractmethod
    def grown(self, size: int) -> None: ...

    @abc.abstractmethod
    def commit(self) -> None: ...

    @abc.abstractmethod
    def abort(self) -> None:
        """Drops whatever was sent; safe to call after a failed commit, or twice."""


class _PutAtCommit(StagedUpload):
    def __init__(self, store: ObjectStore, key: str, path: Path, if_absent: bool) -> None:
        self.store, self.key, self.path, self.if_absent = store, key, path, if_absent

    def grown(self, size: int) -> None:
        pass  # nothing is sent before the file is complete

    def commit(self) -> None:
        self.store.put_file(self.key, self.path, if_absent=self.if_absent)

    def abort(self) -> None:
        pass  # put_file wrote nothing, or all of it atomically


def _folder_prefix(prefix: str) -> str:
    """The folder form of a prefix for delete_prefix; the whole root is refused as too dangerous."""
    validate_prefix(prefix)
    if not prefix.strip("/"):
        raise InvalidKeyError("delete_prefix needs a non-empty prefix; refusing to delete the whole store")
    return prefix.rstrip("/") + "/"


class LocalStore(ObjectStore):
    """Objects as files under a root directory (file:// URIs, tests, single-node setups)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.uri = f"file://{self.root}"

    def describe(self, key: str = "") -> str:
        return f"file://{self.root / key}" if key else self.uri

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        target = self._path(key)
        self._write_atomic(key, target, lambda handle: handle.write(data), if_absent)

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> None:
        target = self._path(key)
        path = Path(path)
        try:
            source = path.open("rb")
        except OSError as exc:
            raise StorageError(f"{path}: cannot read the file to upload: {exc.strerror}") from exc
        with source:
            progress = TransferProgress("uploading", self.describe(key), os.fstat(source.fileno()).st_size)
            self._write_atomic(key, target, lambda handle: copy_stream(source, handle, progress), if_absent)

    def _write_atomic(self, key: str, target: Path, write: Callable[[IO[bytes]], object], if_absent: bool) -> None:
        """Writes a synced temp file beside `target`, then renames (or hard-links) it into place.

        os.link fails if the target exists, which makes `if_absent` atomic even between processes;
        os.replace gives readers either the old or the new object, never a partial one.
        """
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, temp_name = tempfile.mkstemp(prefix=TEMP_MARKER, dir=target.parent)
        except OSError as exc:
            raise self._os_error(key, exc) from exc
        temp = Path(temp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temp, 0o644)
            if if_absent:
                os.link(temp, target)
            else:
                os.replace(temp, target)
        except FileExistsError as exc:
            raise self._exists_error(key) from exc
        except OSError as exc:
            raise self._os_error(key, exc) from exc
        finally:
            with suppress(FileNotFoundError):
                temp.unlink()

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except OSError as exc:
            raise self._os_error(key, exc) from exc

    def read_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with self._path(key).open("rb") as handle:
                handle.seek(start)
                return handle.read(length)
        except OSError as exc:
            raise self._os_error(key, exc) from exc

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except OSError as exc:
            raise self._os_error(key, exc) from exc

    def download_file(self, key: str, dest: Path) -> None:
        try:
            source = self._path(key).open("rb")
        except OSError as exc:
            raise self._os_error(key, exc) from exc
        with source:
            progress = TransferProgress("downloading", self.describe(key), os.fstat(source.fileno()).st_size)

            def fetch(temp: Path) -> None:
                with temp.open("wb") as handle:
                    copy_stream(source, handle, progress)

            download_via_temp(dest, fetch)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        # Walk only the deepest folder the prefix fully names, then filter by the string prefix.
        folder = self.root / prefix.rpartition("/")[0]
        keys = []
        for dirpath, _dirnames, filenames in os.walk(folder):
            relative = Path(dirpath).relative_to(self.root).as_posix()
            for filename in filenames:
                if filename.startswith(TEMP_MARKER):
                    continue
                key = filename if relative == "." else f"{relative}/{filename}"
                if key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys))

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._os_error(key, exc) from exc

    def delete_prefix(self, prefix: str) -> None:
        folder = self.root / _folder_prefix(prefix)
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._os_error(prefix, exc) from exc

    def _exists_error(self, key: str) -> ObjectExistsError:
        return ObjectExistsError(
            f"{self.describe(key)}: already exists and the write was conditional (if_absent); "
            "objects are immutable, write a new key or version instead"
        )

    def _os_error(self, key: str, exc: OSError) -> StorageError:
        where = self.describe(key)
        if isinstance(exc, FileNotFoundError):
            return ObjectNotFoundError(f"{where}: no such object; check the key and the store root {self.uri}")
        if isinstance(exc, PermissionError):
            return StorageError(f"{where}: permission denied; check the ownership and mode of {self.root}")
        return StorageError(f"{where}: {exc.strerror or exc}; check the local filesystem at {self.root}")


def download_via_temp(dest: Path, fetch: Callable[[Path], None]) -> None:
    """Runs `fetch(temp)` on a temp file beside `dest`, then renames it over `dest`.

    Readers of `dest` see the old file or the complete new one, never a partial download, and a
    failed download leaves no temp file behind.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(prefix=TEMP_MARKER, dir=dest.parent)
        os.close(fd)
    except OSError as exc:
        raise _dest_error(dest, exc) from exc
    temp = Path(temp_name)
    try:
        fetch(temp)
        os.chmod(temp, 0o644)
        os.replace(temp, dest)
    except OSError as exc:
        raise _dest_error(dest, exc) from exc
    finally:
        with suppress(FileNotFoundError):
            temp.unlink()


def _dest_error(dest: Path, exc: OSError) -> StorageError:
    return StorageError(f"{dest}: cannot write the download ({exc.strerror or exc}); check the destination path")


# --- S3 -----------------------------------------------------------------------------------------

_CREDENTIAL_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "403",
        "Forbidden",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_EXISTS_CODES = frozenset({"PreconditionFailed", "412"})
_CREDENTIALS_HINT = (
    "check the S3 credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the "
    "workload's IAM role) and that they may access bucket {bucket!r}"
)
S3_MAX_PARTS = 10_000
S3_MIN_PART_SIZE = 5 * 1024 * 1024


def _endpoint_setting() -> tuple[str | None, str]:
    """The endpoint tuneloom passes to boto3 and a phrase saying where it came from, for messages."""
    if os.environ.get(ENDPOINT_ENV):
        return os.environ[ENDPOINT_ENV], ENDPOINT_ENV
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return None, name  # boto3 reads these itself
    return None, f"the AWS default for the region (set {ENDPOINT_ENV} for another S3 service)"


@dataclass(frozen=True)
class S3Connection:
    """Explicit connection settings, for a caller (the operator) that reads them from a Secret
    rather than from its own environment. Unset fields fall back to the environment."""

    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)


def make_s3_client(
    *,
    max_attempts: int = 5,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
    connection: S3Connection | None = None,
) -> tuple[Any, str]:
    """A boto3 S3 client configured from `connection` and the environment, and where its endpoint
    came from.

    Path-style addressing works with every S3-compatible service (SeaweedFS, MinIO, Ceph);
    "standard" retries back off on throttling, 5xx and connection errors.
    """
    import boto3
    from botocore.config import Config

    connection = connection or S3Connection()
    session = boto3.session.Session(
        aws_access_key_id=connection.access_key_id, aws_secret_access_key=connection.secret_access_key
    )
    endpoint, source = (
        (connection.endpoint, "the FineTuneJob's spec.storage.endpoint")
        if connection.endpoint
        else (_endpoint_setting())
    )
    region = (
        connection.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or session.region_name
        or DEFAULT_REGION
    )
    config = Config(
        s3={"addressing_style": "path"},
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    client = session.client("s3", endpoint_url=endpoint, region_name=region, config=config)
    return client, source


class S3Store(ObjectStore):
    """Objects under `s3://bucket/prefix`.

    Uploads of files at or above `multipart_threshold` go through our own multipart loop rather
    than boto3's `upload_file`: s3transfer (0.19) does not pass `IfNoneMatch` through, and a single
    PUT is capped at 5 GB and cannot be parallelised. CompleteMultipartUpload accepts
    `IfNoneMatch='*'` on AWS and SeaweedFS, so conditional writes hold for files of any size.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        connection: S3Connection | None = None,
        max_attempts: int = 5,
        multipart_threshold: int = 8 * 1024 * 1024,
        part_size: int = 8 * 1024 * 1024,
        max_concurrency: int = 4,
        page_size: int = 1000,
    ) -> None:
        if not bucket:
            raise StorageError("S3 URI has no bucket; use s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        validate_prefix(self.prefix)
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        if client is None:
            client, self._endpoint_source = make_s3_client(max_attempts=max_attempts, connection=connection)
        else:
            self._endpoint_source = "the client passed to S3Store"
        self.client = client
        self.multipart_threshold = multipart_threshold
        self.part_size = max(part_size, S3_MIN_PART_SIZE)
        self.max_concurrency = max_concurrency
        self.page_size = page_size

    def describe(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{join_key(self.prefix, key)}"

    def _full(self, key: str) -> str:
        return join_key(self.prefix, validate_key(key))

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        full = self._full(key)
        with self._errors(full):
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data, **_only_if_absent(if_absent))

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> None:
        full = self._full(key)
        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise StorageError(f"{path}: cannot read the file to upload: {exc.strerror}") from exc
        if if_absent and self.exists(key):
            raise self._exists_error(full)  # fail fast; the conditional write below is the guarantee
        progress = TransferProgress("uploading", self.describe(key), size)
        with self._errors(full):
            if size < self.multipart_threshold:
                with path.open("rb") as body:
                    self.client.put_object(Bucket=self.bucket, Key=full, Body=body, **_only_if_absent(if_absent))
                progress(size)
            else:
                self._put_multipart(full, path, size, if_absent, progress)
        progress.finish()

    def _put_multipart(self, full: str, path: Path, size: int, if_absent: bool, progress: TransferProgress) -> None:
        """Uploads parts in parallel, completes conditionally, and aborts on any failure."""
        part_size = max(self.part_size, math.ceil(size / S3_MAX_PARTS))
        count = math.ceil(size / part_size)
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=full)["UploadId"]

        def upload_part(index: int) -> dict[str, Any]:
            start = index * part_size
            part = self._upload_part_of(full, upload_id, path, index + 1, start, min(part_size, size - start))
            progress(min(part_size, size - start))
            return part

        try:
            with ThreadPoolExecutor(max_workers=min(self.max_concurrency, count)) as pool:
                parts = list(pool.map(upload_part, range(count)))
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **_only_if_absent(if_absent),
            )
        except BaseException:
            self._abort_multipart(full, upload_id)
            raise

    def _upload_part_of(self, full: str, upload_id: str, path: Path, number: int, start: int, length: int) -> dict:
        """Part `number` of a multipart upload: `length` bytes of the file at `path` from `start`."""
        with path.open("rb") as handle:
            data = os.pread(handle.fileno(), length, start)
        response = self.client.upload_part(
            Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=data
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    def _abort_multipart(self, full: str, upload_id: str) -> None:
        # Uploaded parts are billed until aborted; a failed abort only leaves garbage behind.
        with suppress(Exception):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)

    def stage_file(self, key: str, path: Path, *, if_absent: bool = False) -> StagedUpload:
        if if_absent and self.exists(key):
            raise self._exists_error(self._full(key))  # fail fast; the conditional commit is the guarantee
        return _S3StagedUpload(self, key, Path(path), if_absent)

    def get_bytes(self, key: str) -> bytes:
        full = self._full(key)
        with self._errors(full):
            response = self.client.get_object(Bucket=self.bucket, Key=full)
            return bytes(response["Body"].read())

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        full = self._full(key)
        with self._errors(full):
            try:
                wanted = f"bytes={start}-{start + length - 1}"
                response = self.client.get_object(Bucket=self.bucket, Key=full, Range=wanted)
            except self.client.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""  # starts past the end, as a file read there gives nothing
                raise
            return bytes(response["Body"].read())

    def size(self, key: str) -> int:
        full = self._full(key)
        with self._errors(full):
            return int(self.client.head_object(Bucket=self.bucket, Key=full)["ContentLength"])

    def download_file(self, key: str, dest: Path) -> None:
        from boto3.s3.transfer import TransferConfig

        full = self._full(key)
        dest = Path(dest)
        with self._errors(full):
            size = self.client.head_object(Bucket=self.bucket, Key=full)["ContentLength"]
        progress = TransferProgress("downloading", self.describe(key), size)
        config = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.part_size,
            max_concurrency=self.max_concurrency,
        )

        def fetch(temp: Path) -> None:
            with self._errors(full):
                self.client.download_file(self.bucket, full, str(temp), Callback=progress, Config=config)
            progress.finish()

        download_via_temp(dest, fetch)

    def exists(self, key: str) -> bool:
        full = self._full(key)
        try:
            with self._errors(full):
                self.client.head_object(Bucket=self.bucket, Key=full)
        except ObjectNotFoundError:
            # HEAD cannot tell a missing key from a missing bucket (both 404 without a code);
            # a missing bucket surfaces on the next write or listing instead.
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        return self._list_full(root + prefix, strip=len(root))

    def _list_full(self, full_prefix: str, strip: int) -> Iterator[str]:
        """Pages through ListObjectsV2; S3 returns keys in UTF-8 binary order, i.e. sorted."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix, "MaxKeys": self.page_size}
        while True:
            with self._errors(full_prefix):
                page = self.client.list_objects_v2(**kwargs)
            for item in page.get("Contents", []):
                yield item["Key"][strip:]
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def delete(self, key: str) -> None:
        full = self._full(key)
        with self._errors(full):
            self.client.delete_object(Bucket=self.bucket, Key=full)

    def delete_prefix(self, prefix: str) -> None:
        full_prefix = join_key(self.prefix, _folder_prefix(prefix)) + "/"
        batch: list[str] = []
        for full in self._list_full(full_prefix, strip=0):
            batch.append(full)
            if len(batch) == 1000:  # DeleteObjects takes at most 1000 keys
                self._delete_batch(full_prefix, batch)
                batch = []
        if batch:
            self._delete_batch(full_prefix, batch)

    def _delete_batch(self, full_prefix: str, keys: list[str]) -> None:
        with self._errors(full_prefix):
            response = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
            )
        errors = response.get("Errors", [])
        if errors:
            first = errors[0]
            raise StorageError(
                f"s3://{self.bucket}/{first.get('Key')}: {first.get('Code')}: {first.get('Message')}; "
                f"{len(errors)} objects under s3://{self.bucket}/{full_prefix} were not deleted, retry"
            )

    def _errors(self, full: str) -> _S3Errors:
        return _S3Errors(self, full)

    def _exists_error(self, full: str) -> ObjectExistsError:
        return ObjectExistsError(
            f"s3://{self.bucket}/{full}: PreconditionFailed: already exists and the write was "
            "conditional (if_absent); objects are immutable, write a new key or version instead"
        )

    def translate(self, exc: Exception, full: str) -> StorageError | None:
        """Maps a botocore/boto3 exception to a StorageError; None for exceptions not ours to map."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = f"s3://{self.bucket}/{full}"
        if isinstance(exc, ClientError):
            return self._client_error(exc, full)
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(
                f"{where}: no usable S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE / an IAM role for the workload)"
            )
        if isinstance(exc, (ConnectionError, HTTPClientError)):
            endpoint = getattr(self.client.meta, "endpoint_url", "?")
            return StorageUnreachableError(
                f"{where}: cannot reach the S3 endpoint {endpoint} ({type(exc).__name__}) after retries; "
                f"check that it is correct and reachable (it is set by {self._endpoint_source})"
            )
        if isinstance(exc, (BotoCoreError, Boto3Error)):
            return StorageError(f"{where}: {type(exc).__name__}: {exc}; check the S3 settings and retry")
        return None

    def _client_error(self, exc: Any, full: str) -> StorageError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        message = error.get("Message") or "no message"
        where = f"s3://{self.bucket}/{full}"
        if code in _EXISTS_CODES:
            return self._exists_error(full)
        if code == "NoSuchBucket":
            return StorageError(
                f"{where}: NoSuchBucket: bucket {self.bucket!r} does not exist; create it or fix the storage URI"
            )
        if code in _NOT_FOUND_CODES:
            return ObjectNotFoundError(
                f"{where}: {code}: no such object (or bucket {self.bucket!r} is missing); check the key"
            )
        if code in _CREDENTIAL_CODES:
            hint = _CREDENTIALS_HINT.format(bucket=self.bucket)
            return StorageError(f"{where}: {code}: {message}; {hint}")
        return StorageError(f"{where}: {code}: {message}; retry later or check the S3 service")


class _S3StagedUpload(StagedUpload):
    """Each `part_size` bytes of the growing file are sent as one part of a multipart upload as
    soon as they are final, `max_concurrency` at a time; commit sends the rest and completes the
    upload conditionally. A file that stays under one part is a single PUT at commit."""

    def __init__(self, store: S3Store, key: str, path: Path, if_absent: bool) -> None:
        self.store, self.key, self.path, self.if_absent = store, key, path, if_absent
        self.full = store._full(key)
        self._size = self._sent = 0
        self._pool = ThreadPoolExecutor(max_workers=store.max_concurrency)
        self._upload_id: Future[str] | None = None  # created with the first part
        self._parts: list[Future[dict[str, Any]]] = []

    def grown(self, size: int) -> None:
        self._size = size
        while self._size - self._sent >= self.store.part_size:
            self._send(self.store.part_size)

    def _send(self, length: int) -> None:
        if len(self._parts) == S3_MAX_PARTS:
            raise StorageError(
                f"{self.store.describe(self.key)}: more than {S3_MAX_PARTS} parts of {self.store.part_size} bytes; "
                "give the store a larger part_size for files this large"
            )
        if self._upload_id is None:
            create = self.store.client.create_multipart_upload
            self._upload_id = self._pool.submit(lambda: create(Bucket=self.store.bucket, Key=self.full)["UploadId"])
        number, start = len(self._parts) + 1, self._sent
        self._parts.append(self._pool.submit(self._upload_part, number, start, length))
        self._sent += length

    def _upload_part(self, number: int, start: int, length: int) -> dict[str, Any]:
        assert self._upload_id is not None
        upload_id = self._upload_id.result()  # submitted first, so it never waits on a part
        return self.store._upload_part_of(self.full, upload_id, self.path, number, start, length)

    def commit(self) -> None:
        extra = _only_if_absent(self.if_absent)
        with self.store._errors(self.full):
            if self._upload_id is None:
                with self.path.open("rb") as body:
                    self.store.client.put_object(Bucket=self.store.bucket, Key=self.full, Body=body, **extra)
            else:
                if self._size > self._sent:
                    self._send(self._size - self._sent)
                parts = [part.result() for part in self._parts]
                self.store.client.complete_multipart_upload(
                    Bucket=self.store.bucket,
                    Key=self.full,
                    UploadId=self._upload_id.result(),
                    MultipartUpload={"Parts": parts},
                    **extra,
                )
        self._pool.shutdown()

    def abort(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        if self._upload_id is not None:
            with suppress(Exception):  # the create itself may have failed
                self.store._abort_multipart(self.full, self._upload_id.result())


class _S3Errors:
    """A context manager turning botocore exceptions into StorageErrors with our messages."""

    def __init__(self, store: S3Store, full: str) -> None:
        self.store = store
        self.full = full

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, Exception) and not isinstance(exc, StorageError):
            mapped = self.store.translate(exc, self.full)
            if mapped is not None:
                raise mapped from exc


def open_store(uri: str, **s3_options: Any) -> ObjectStore:
    """The store for `s3://bucket/prefix`, `file:///abs/path` or a plain local path."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        return S3Store(parsed.netloc, parsed.path, **s3_options)
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise StorageError(f"{uri}: a file URI needs an absolute path, e.g. file:///data/store")
        return LocalStore(Path(unquote(parsed.path)))
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported storage URI; use s3://bucket/prefix, file:///abs/path or a path")
    return LocalStore(Path(uri))


def _only_if_absent(if_absent: bool) -> dict[str, str]:
    """The conditional-write argument of put_object and complete_multipart_upload."""
    return {"IfNoneMatch": "*"} if if_absent else {}
