"""S3 specifics, against moto's S3 server over HTTP on 127.0.0.1."""

from __future__ import annotations

import os
import time
from pathlib import Path

import boto3
import pytest

from job.errors import EXIT_REMOTE, StorageError
from job.storage import RemoteNotFound, RetryPolicy, S3Options, open_storage
from job.storage.base import TMP_MARKER
from job.storage.s3 import MB, S3Storage
from tests.servers.moto_s3 import FAKE_KEY_ID, FAKE_SECRET, REGION, free_port


@pytest.fixture
def client(s3_env):
    c = boto3.client("s3", endpoint_url=s3_env.url, region_name=REGION)
    yield c
    c.close()


def _s3(uri: str, options: S3Options, **kwargs) -> S3Storage:
    store = open_storage(uri, s3=options, retry=kwargs.pop("retry", None))
    assert isinstance(store, S3Storage)
    for k, v in kwargs.items():
        setattr(store, k, v)
    return store


def test_large_file_goes_multipart(s3_env, s3_bucket, s3_options, tmp_path: Path):
    big = tmp_path / "big.safetensors"
    big.write_bytes(os.urandom(9 * MB + 123))
    small = tmp_path / "small.json"
    small.write_bytes(b"{}")

    store = _s3(f"s3://{s3_bucket}/ckpt", s3_options, multipart_chunksize=5 * MB)
    assert store.transfer_config().multipart_threshold == 8 * MB  # the default threshold

    store.upload_file(small, "small.json")
    assert s3_env.count("POST", query_contains="uploads") == 0

    store.upload_file(big, "big.safetensors")
    assert s3_env.count("POST", query_contains="uploads") == 1  # CreateMultipartUpload
    assert s3_env.count("PUT", query_contains="partNumber") == 2  # 5 MB + 4 MB
    remote = {f.path: f for f in store.list()}
    assert remote["big.safetensors"].etag.endswith("-2")

    out = store.download_file("big.safetensors", tmp_path / "dl" / "big.safetensors")
    assert out.read_bytes() == big.read_bytes()

    # the multipart ETag is recognised locally, so a second upload of the folder is a no-op
    (tmp_path / "up").mkdir()
    os.replace(big, tmp_path / "up" / "big.safetensors")
    s3_env.clear_requests()
    store.upload_folder(tmp_path / "up", "")
    assert s3_env.count("PUT") == 0 and s3_env.count("POST") == 0


def test_listing_with_prefixes(s3_bucket, s3_options, client):
    for key in ("runs/a", "runs/a/1.bin", "runs/a/2/x.bin", "runs/ab/1.bin", "runs/a-b/1.bin",
                "other/1.bin", "runs/dir/"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())

    store = _s3(f"s3://{s3_bucket}/runs", s3_options)
    assert [f.path for f in store.list("a")] == ["a", "a/1.bin", "a/2/x.bin"]  # not ab/, not a-b/
    assert [f.path for f in store.list()] == ["a", "a-b/1.bin", "a/1.bin", "a/2/x.bin", "ab/1.bin"]
    assert {f.path: f.size for f in store.list("a/2")} == {"a/2/x.bin": len(b"runs/a/2/x.bin")}
    assert store.exists("a") and store.exists("a/2") and not store.exists("a/2/x")
    assert not store.exists("dir")  # a console's folder marker alone is not a file

    whole = _s3(f"s3://{s3_bucket}", s3_options)
    assert {f.path for f in whole.list("other")} == {"other/1.bin"}


def test_retries_while_server_is_briefly_down(s3_env, s3_bucket, s3_options, tmp_path: Path, storage_log):
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(50_000))
    store = _s3(f"s3://{s3_bucket}/r", s3_options,
                retry=RetryPolicy(attempts=20, base_delay=0.1, max_delay=0.3, deadline=15), botocore_attempts=1)
    store.upload_folder(src, "m")

    start = time.monotonic()
    restart = s3_env.restart_after(0.8)  # stop now, back on the same port in 0.8 s
    got = store.download_folder("m", tmp_path / "dst")
    restart.join(timeout=10)

    assert time.monotonic() - start >= 0.7
    assert (tmp_path / "dst" / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
    assert got == [tmp_path / "dst" / "weights.bin"]
    assert any("retry" in r.getMessage() for r in storage_log.records)


def test_retries_transient_errors(s3_env, s3_bucket, s3_options, tmp_path: Path, fast_retry):
    f = tmp_path / "x.bin"
    f.write_bytes(b"payload" * 100)
    store = _s3(f"s3://{s3_bucket}", s3_options, retry=fast_retry, botocore_attempts=1)

    s3_env.fail_next(2, status=503, code="SlowDown", method="PUT")
    store.upload_file(f, "x.bin")
    s3_env.fail_next(2, status=500, code="InternalError", method="GET", match="/x.bin")
    store.download_file("x.bin", tmp_path / "back.bin")

    assert (tmp_path / "back.bin").read_bytes() == f.read_bytes()
    assert s3_env.count("PUT", path_contains="/x.bin") == 3
    assert s3_env.count("GET", path_contains="/x.bin") == 3

    # a folder upload retries just the file that failed
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("a.bin", "b.bin", "c.bin"):
        (folder / name).write_bytes(name.encode() * 10)
    s3_env.clear_requests()
    s3_env.fail_next(1, status=503, code="SlowDown", method="PUT", match="/b.bin")
    store.upload_folder(folder, "f")
    assert s3_env.count("PUT", path_contains="/b.bin") == 2
    assert s3_env.count("PUT", path_contains="/a.bin") == 1
    assert {x.path for x in store.list("f")} == {"f/a.bin", "f/b.bin", "f/c.bin"}


def test_gives_up_in_bounded_time_when_unreachable(s3_env, tmp_path: Path):
    port = free_port()  # nothing listens there
    options = S3Options(endpoint_url=f"http://127.0.0.1:{port}", region=REGION, addressing_style="path")
    store = _s3("s3://some-bucket/p", options,
                retry=RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.1, deadline=5), botocore_attempts=1)
    start = time.monotonic()
    with pytest.raises(StorageError) as e:
        store.list()
    assert time.monotonic() - start < 5
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "cannot reach" in msg and "gave up after 3 attempts" in msg
    assert e.value.exit_code == EXIT_REMOTE


def test_missing_bucket_is_named(s3_env, s3_options, tmp_path: Path, fast_retry):
    store = _s3("s3://no-such-bucket-here/runs", s3_options, retry=fast_retry)
    for action in (lambda: store.list(),
                   lambda: store.download_file("a.bin", tmp_path / "a.bin"),
                   lambda: store.download_folder("", tmp_path / "d")):
        with pytest.raises(RemoteNotFound) as e:
            action()
        assert "bucket 'no-such-bucket-here' does not exist" in str(e.value)
        assert "create the bucket" in e.value.fix
    src = tmp_path / "up.bin"
    src.write_bytes(b"x")
    with pytest.raises(StorageError, match="no-such-bucket-here"):
        store.upload_file(src, "up.bin")
    assert not (tmp_path / "a.bin").exists()


def test_bad_credentials_are_named_not_printed(s3_env, s3_bucket, s3_options, tmp_path: Path, fast_retry):
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights")
    store = _s3(f"s3://{s3_bucket}/ckpt", s3_options, retry=fast_retry)
    s3_env.set_auth(True)  # moto now checks keys against its IAM: ours are unknown

    with pytest.raises(StorageError) as e:
        store.upload_file(src, "step-1/w.bin")
    msg = str(e.value)
    assert f"s3://{s3_bucket}/ckpt/step-1/w.bin" in msg
    assert "rejected the S3 credentials" in msg and "InvalidAccessKeyId" in msg
    assert "AWS_ACCESS_KEY_ID" in e.value.fix
    assert FAKE_SECRET not in msg and FAKE_KEY_ID not in msg

    with pytest.raises(StorageError, match=f"list s3://{s3_bucket}/ckpt.*rejected"):
        store.list()


def test_no_credentials(s3_env, s3_bucket, s3_options, monkeypatch, fast_retry):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = _s3(f"s3://{s3_bucket}", s3_options, retry=fast_retry)
    with pytest.raises(StorageError, match="no S3 credentials found") as e:
        store.list()
    assert "AWS_SECRET_ACCESS_KEY" in e.value.fix


def test_keys_that_would_escape_the_destination_are_refused(s3_bucket, s3_options, client, tmp_path: Path):
    client.put_object(Bucket=s3_bucket, Key="data/ok.txt", Body=b"ok")
    client.put_object(Bucket=s3_bucket, Key="data/../../evil.txt", Body=b"evil")
    store = _s3(f"s3://{s3_bucket}/data", s3_options)
    with pytest.raises(StorageError, match="outside"):
        store.download_folder("", tmp_path / "dst" / "inner")
    assert not list(tmp_path.rglob("evil.txt"))


def test_describe_and_options(s3_options):
    store = _s3("s3://bucket-x/some/prefix", s3_options)
    text = store.describe()
    assert "s3://bucket-x/some/prefix" in text and s3_options.endpoint_url in text
    assert FAKE_SECRET not in text and FAKE_SECRET not in repr(store)
    with pytest.raises(ValueError):
        S3Options(addressing_style="sideways")
    with pytest.raises(ValueError, match="credentials"):
        S3Options(endpoint_url="http://key:secret@minio:9000")
    with pytest.raises(ValueError):
        S3Options(endpoint_url="minio:9000")


def test_no_partial_file_after_interrupted_download(s3_env, s3_bucket, s3_options, tmp_path: Path):
    f = tmp_path / "x.bin"
    f.write_bytes(os.urandom(20_000))
    store = _s3(f"s3://{s3_bucket}", s3_options, retry=RetryPolicy(attempts=1), botocore_attempts=1)
    store.upload_file(f, "x.bin")
    s3_env.fail_next(1, status=503, code="ServiceUnavailable", method="GET", match="/x.bin")
    with pytest.raises(StorageError, match="ServiceUnavailable"):
        store.download_file("x.bin", tmp_path / "out" / "x.bin")
    assert not (tmp_path / "out" / "x.bin").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if TMP_MARKER in p.name]
