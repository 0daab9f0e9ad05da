"""ObjectStore behaviour, identical for a local directory and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuneloom.net import free_ports
from tuneloom.storage import (
    TEMP_MARKER,
    InvalidKeyError,
    LocalStore,
    ObjectExistsError,
    ObjectNotFoundError,
    ObjectStore,
    S3Store,
    StorageError,
    TransferProgress,
    open_store,
    sha256_file,
)
from tuneloom_dev.seaweedfs import SeaweedFS

MIB = 1024 * 1024


def _bucket(s3_root: str) -> str:
    return s3_root.removeprefix("s3://").split("/")[0]


def _random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def _temp_leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(TEMP_MARKER) or ".tmp-" in p.name]


# --- round trips --------------------------------------------------------------------------------


def test_bytes_round_trip(store: ObjectStore) -> None:
    store.put_bytes("a/b/c.txt", b"hello")
    assert store.get_bytes("a/b/c.txt") == b"hello"
    assert store.exists("a/b/c.txt")
    assert not store.exists("a/b/missing.txt")
    store.put_bytes("a/b/c.txt", b"replaced")
    assert store.get_bytes("a/b/c.txt") == b"replaced"


def test_a_range_of_an_object_and_its_size(store: ObjectStore) -> None:
    store.put_bytes("model/header.bin", b"0123456789")
    assert store.size("model/header.bin") == 10
    assert store.read_range("model/header.bin", 2, 3) == b"234"
    assert store.read_range("model/header.bin", 8, 100) == b"89"
    assert store.read_range("model/header.bin", 10, 4) == b""
    with pytest.raises(ObjectNotFoundError):
        store.size("model/missing.bin")


def test_small_file_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    source = _random_file(tmp_path / "small.bin", 1234)
    store.put_file("files/small.bin", source)
    dest = tmp_path / "out" / "small.bin"
    store.download_file("files/small.bin", dest)
    assert dest.read_bytes() == source.read_bytes()
    assert not _temp_leftovers(tmp_path / "out")


def test_large_file_round_trip_uses_multipart(store: ObjectStore, tmp_path: Path) -> None:
    source = _random_file(tmp_path / "large.bin", 8 * MIB + 4321)  # two parts at 8 MiB each
    store.put_file("files/large.bin", source)
    dest = tmp_path / "large.out"
    store.download_file("files/large.bin", dest)
    assert sha256_file(dest) == sha256_file(source)
    assert dest.stat().st_size == source.stat().st_size
    if isinstance(store, S3Store):
        head = store.client.head_object(Bucket=store.bucket, Key=f"{store.prefix}/files/large.bin")
        assert head["ETag"].strip('"').endswith("-2")  # a multipart object's ETag counts its parts


def test_missing_object(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFoundError, match="nothing/here"):
        store.get_bytes("nothing/here")
    dest = tmp_path / "dest.bin"
    dest.write_bytes(b"previous")
    with pytest.raises(ObjectNotFoundError, match="nothing/here"):
        store.download_file("nothing/here", dest)
    assert dest.read_bytes() == b"previous"
    assert not _temp_leftovers(tmp_path)


def _stage_growing(store: ObjectStore, key: str, source: bytes, growing: Path, *, if_absent: bool = False):
    """Stages `key` while `growing` is written with `source` in 3 MiB pieces, as an upload arrives."""
    existed = store.exists(key)
    staged = store.stage_file(key, growing, if_absent=if_absent)
    with growing.open("wb", buffering=0) as handle:
        for start in range(0, len(source), 3 * MIB):
            handle.write(source[start : start + 3 * MIB])
            staged.grown(handle.tell())
            assert store.exists(key) == existed  # nothing is visible before the commit
    return staged


@pytest.mark.parametrize("size", [1000, 8 * MIB, 20 * MIB + 7], ids=["single-put", "one-part", "three-parts"])
def test_a_file_staged_while_it_grows_appears_whole_at_commit(store: ObjectStore, tmp_path: Path, size: int) -> None:
    source = os.urandom(size)
    staged = _stage_growing(store, "files/growing.bin", source, tmp_path / "growing.bin", if_absent=True)
    staged.commit()
    assert store.get_bytes("files/growing.bin") == source
    if isinstance(store, S3Store) and size > 8 * MIB:
        head = store.client.head_object(Bucket=store.bucket, Key=f"{store.prefix}/files/growing.bin")
        assert head["ETag"].strip('"').endswith("-3")  # sent in parts as the file grew


def test_an_aborted_staged_upload_leaves_nothing(store: ObjectStore, tmp_path: Path) -> None:
    staged = _stage_growing(store, "files/refused.bin", os.urandom(20 * MIB), tmp_path / "refused.bin")
    staged.abort()
    staged.abort()  # as a caller's cleanup may, after its own
    assert list(store.list()) == []
    if isinstance(store, S3Store):
        assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []
    else:
        assert not _temp_leftovers(tmp_path / "store")


def test_a_staged_upload_onto_an_existing_key_is_refused(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("files/taken.bin", b"original")
    with pytest.raises(ObjectExistsError):
        _stage_growing(store, "files/taken.bin", os.urandom(10), tmp_path / "taken.bin", if_absent=True).commit()
    assert store.get_bytes("files/taken.bin") == b"original"


@pytest.mark.parametrize("size", [1000, 8 * MIB + 1], ids=["single-put", "multipart"])
def test_s3_staged_upload_conditional_commit_is_enforced_by_the_server(s3_root: str, tmp_path: Path, size: int) -> None:
    bucket, _, prefix = s3_root.removeprefix("s3://").partition("/")
    store = _RacingS3Store(bucket, prefix)
    staged = _stage_growing(store, "obj", os.urandom(size), tmp_path / "f.bin", if_absent=True)
    store.put_bytes("obj", b"original")  # another writer, between the start and the commit
    with pytest.raises(ObjectExistsError, match="PreconditionFailed"):
        staged.commit()
    staged.abort()
    assert store.get_bytes("obj") == b"original"
    assert store.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# --- listing and deleting -----------------------------------------------------------------------


def test_list_is_recursive_sorted_and_relative(store: ObjectStore) -> None:
    keys = [f"d/{i:02d}/f" for i in range(11)] + ["d/z", "da/x", "e"]
    for key in reversed(keys):
        store.put_bytes(key, b"")
    assert list(store.list("d/")) == keys[:12]
    assert list(store.list("d")) == keys[:13]  # a plain string prefix, as in S3
    assert list(store.list()) == keys
    assert list(store.list("nope/")) == []


def test_list_pages_through_many_keys(s3_root: str) -> None:
    store = open_store(s3_root, page_size=7)
    keys = sorted(f"many/{i:03d}" for i in range(50))
    for key in keys:
        store.put_bytes(key, b"x")
    assert list(store.list("many/")) == keys


def test_delete_and_delete_prefix(store: ObjectStore) -> None:
    for key in ["v/1/a", "v/1/b/c", "v/10/a", "v/2/a"]:
        store.put_bytes(key, b"x")
    store.delete("v/2/a")
    store.delete("v/2/a")  # deleting a missing key is not an error
    store.delete_prefix("v/1")  # a folder: v/10 stays
    assert list(store.list()) == ["v/10/a"]
    with pytest.raises(InvalidKeyError):
        store.delete_prefix("")


# --- conditional writes -------------------------------------------------------------------------


def test_if_absent_refuses_existing_key(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("k", b"first", if_absent=True)
    with pytest.raises(ObjectExistsError, match="already exists"):
        store.put_bytes("k", b"second", if_absent=True)
    source = _random_file(tmp_path / "f.bin", 100)
    with pytest.raises(ObjectExistsError):
        store.put_file("k", source, if_absent=True)
    assert store.get_bytes("k") == b"first"
    assert list(store.list()) == ["k"]


class _RacingS3Store(S3Store):
    """Skips the fail-fast existence check, as if another writer created the key just after it."""

    def exists(self, key: str) -> bool:
        return False


@pytest.mark.parametrize("size", [1000, 8 * MIB + 1], ids=["single-put", "multipart"])
def test_s3_conditional_write_is_enforced_by_the_server(s3_root: str, tmp_path: Path, size: int) -> None:
    bucket, _, prefix = s3_root.removeprefix("s3://").partition("/")
    store = _RacingS3Store(bucket, prefix)
    store.put_bytes("obj", b"original")
    with pytest.raises(ObjectExistsError, match="PreconditionFailed"):
        store.put_file("obj", _random_file(tmp_path / "f.bin", size), if_absent=True)
    assert store.get_bytes("obj") == b"original"
    uploads = store.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert uploads == []  # the refused multipart upload was aborted


def test_local_if_absent_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("x/y", b"1")
    with pytest.raises(ObjectExistsError):
        store.put_bytes("x/y", b"2", if_absent=True)
    assert not _temp_leftovers(tmp_path)


# --- keys and URIs ------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../etc/passwd", "a/../../b", "/abs", "a//b", "./a", "a/.", ""])
def test_unsafe_keys_are_rejected(store: ObjectStore, key: str) -> None:
    with pytest.raises(InvalidKeyError):
        store.put_bytes(key, b"x")
    with pytest.raises(InvalidKeyError):
        store.get_bytes(key)


def test_list_rejects_traversal(store: ObjectStore) -> None:
    with pytest.raises(InvalidKeyError):
        list(store.list("../"))


def test_describe_and_open_store(tmp_path: Path) -> None:
    local = open_store(f"file://{tmp_path}/root")
    assert isinstance(local, LocalStore)
    assert local.describe("a/b") == f"file://{tmp_path}/root/a/b"
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    s3 = open_store("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Store)
    assert s3.uri == "s3://bucket/some/prefix"
    assert s3.describe("k/v") == "s3://bucket/some/prefix/k/v"
    with pytest.raises(StorageError, match="unsupported"):
        open_store("gs://bucket/x")
    with pytest.raises(StorageError, match="no bucket"):
        open_store("s3:///x")


# --- S3 errors ----------------------------------------------------------------------------------


def test_wrong_secret_is_reported_without_the_secret(
    s3_root: str, monkeypatch: pytest.MonkeyPatch, seaweedfs: SeaweedFS
) -> None:
    wrong = "wrong-secret-9f8e7d6c5b4a"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    store = open_store(s3_root)
    failures = []
    for attempt in (
        lambda: store.put_bytes("k", b"x"),
        lambda: store.get_bytes("k"),
        lambda: store.exists("k"),
    ):
        with pytest.raises(StorageError, match="check the S3 credentials") as caught:
            attempt()
        failures.append(str(caught.value))
    for message in failures:
        assert wrong not in message
        assert seaweedfs.secret_key not in message
        assert _bucket(s3_root) in message


def test_unknown_access_key(s3_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StorageError, match=r"InvalidAccessKeyId.*check the S3 credentials"):
        open_store(s3_root).get_bytes("k")


def test_missing_bucket_is_named(s3_env: SeaweedFS) -> None:
    store = open_store("s3://no-such-bucket-tl/prefix")
    for attempt in (
        lambda: store.get_bytes("k"),
        lambda: list(store.list()),
        lambda: store.put_bytes("k", b""),
    ):
        with pytest.raises(StorageError, match="NoSuchBucket: bucket 'no-such-bucket-tl' does not exist"):
            attempt()


def test_unreachable_endpoint_is_named(s3_env: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
    monkeypatch.setenv("TUNELOOM_S3_ENDPOINT", endpoint)
    store = S3Store("some-bucket", "p", max_attempts=2)  # one retry keeps the test quick
    with pytest.raises(StorageError) as caught:
        store.get_bytes("k")
    message = str(caught.value)
    assert endpoint in message
    assert "TUNELOOM_S3_ENDPOINT" in message
    assert "s3://some-bucket/p/k" in message
    assert s3_env.secret_key not in message


def test_standard_aws_endpoint_variable(s3_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = os.environ["TUNELOOM_S3_ENDPOINT"]
    monkeypatch.delenv("TUNELOOM_S3_ENDPOINT")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    store = open_store(s3_root)
    store.put_bytes("k", b"via AWS_ENDPOINT_URL_S3")
    assert store.get_bytes("k") == b"via AWS_ENDPOINT_URL_S3"


# --- progress -----------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_are_throttled(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tuneloom.storage")
    clock = _Clock()
    progress = TransferProgress("uploading", "s3://b/k", 50_000_000, clock=clock)
    for _ in range(10):
        clock.now += 0.5
        progress(1_200_000)
    progress.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "uploading s3://b/k: 4.8/50.0 MB (9%)",
        "uploading s3://b/k: 9.6/50.0 MB (19%)",
        "uploading s3://b/k: 12.0/50.0 MB (24%)",
    ]


def test_small_transfers_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tuneloom.storage")
    progress = TransferProgress("uploading", "s3://b/k", 1000)
    progress(1000)
    progress.finish()
    assert caplog.records == []


def test_transfers_log_their_final_line(store: ObjectStore, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tuneloom.storage")
    source = _random_file(tmp_path / "two.bin", 2_000_000)
    store.put_file("p/two.bin", source)
    store.download_file("p/two.bin", tmp_path / "two.out")
    lines = [r.getMessage() for r in caplog.records]
    assert f"uploading {store.describe('p/two.bin')}: 2.0/2.0 MB (100%)" in lines
    assert f"downloading {store.describe('p/two.bin')}: 2.0/2.0 MB (100%)" in lines


# --- the SeaweedFS helper -----------------------------------------------------------------------


@pytest.fixture
def second_seaweedfs(tmp_path: Path) -> Iterator[SeaweedFS]:
    with SeaweedFS(tmp_path / "second", secret_key="second-secret") as server:
        yield server


def test_two_seaweedfs_instances_side_by_side(seaweedfs: SeaweedFS, second_seaweedfs: SeaweedFS) -> None:
    assert seaweedfs.endpoint != second_seaweedfs.endpoint
    assert not set(seaweedfs.ports.values()) & set(second_seaweedfs.ports.values())
    second_seaweedfs.create_bucket("only-in-second")
    names = {b["Name"] for b in seaweedfs.client().list_buckets()["Buckets"]}
    assert "only-in-second" not in names
    assert (second_seaweedfs.data_dir / "weed.log").is_file()


def test_seaweedfs_holds_more_buckets_than_a_test_session_makes(second_seaweedfs: SeaweedFS) -> None:
    # Each bucket takes volumes of its own; weed mini's default limit (50) ran out mid-suite once.
    client = second_seaweedfs.client()
    buckets = [f"many-{n}" for n in range(60)]
    for bucket in buckets:
        second_seaweedfs.create_bucket(bucket)
        client.put_object(Bucket=bucket, Key="k", Body=b"x")
    second_seaweedfs.delete_bucket(buckets[0])
    names = {b["Name"] for b in client.list_buckets()["Buckets"]}
    assert names == set(buckets[1:])
    assert client.get_object(Bucket=buckets[-1], Key="k")["Body"].read() == b"x"


def test_download_onto_a_directory_is_a_storage_error(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("k", b"x")
    (tmp_path / "taken").mkdir()
    with pytest.raises(StorageError, match="cannot write the download"):
        store.download_file("k", tmp_path / "taken")
    assert not _temp_leftovers(tmp_path)
