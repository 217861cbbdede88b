"""Bad input and hostile conditions: malformed URIs, a full disk, no space, progress on a TTY."""

from __future__ import annotations

import errno
import os
import pathlib
from pathlib import Path
from typing import Callable

import pytest

from job.errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EnvironmentProblem, InputError, StorageError
from job.storage import RetryPolicy, open_storage, parse_uri
from job.storage.base import TMP_MARKER, StorageURIError, matches


# --------------------------------------------------------------------------- URIs


@pytest.mark.parametrize("uri, expected", [
    ("hf://owner/repo", ("hf", "model", "owner/repo", None, "")),
    ("hf://models/owner/repo/sub", ("hf", "model", "owner/repo", None, "sub")),
    ("hf://datasets/o-1/r.2@v1.0/a/b/", ("hf", "dataset", "o-1/r.2", "v1.0", "a/b")),
    ("hf://o/r@refs/pr/7/x", ("hf", "model", "o/r", "refs/pr/7", "x")),
    ("hf://o/r@release%2F1", ("hf", "model", "o/r", "release/1", "")),
    ("s3://my-bucket", ("s3", None, None, None, "")),
    ("s3://my.bucket-1/a/b/", ("s3", None, None, None, "a/b")),
])
def test_valid_uris(uri, expected):
    p = parse_uri(uri)
    got = (p.scheme, p.repo_type, p.repo_id, p.revision, p.prefix)
    assert got == expected
    assert parse_uri(str(p)) == p  # the display form parses back to the same thing


def test_local_uris(tmp_path: Path):
    assert parse_uri(str(tmp_path)).path == tmp_path
    assert parse_uri(f"file://{tmp_path}").path == tmp_path
    assert parse_uri("relative/dir").path == Path.cwd() / "relative/dir"
    assert parse_uri("~/x").path == Path.home() / "x"


@pytest.mark.parametrize("uri, words", [
    ("gs://bucket/x", "unsupported storage scheme"),
    ("", "empty"),
    ("s3://", "no bucket"),
    ("s3://Bad_Bucket/x", "not a valid bucket name"),
    ("s3://b/x?versionId=1", "query"),
    ("s3://AKIAXXXX:supersecret@bucket/x", "must not contain credentials"),
    ("hf://just-one-part", "must name owner/repo"),
    ("hf://o/r@", "empty or invalid revision"),
    ("hf://o/r/../x", "'..'"),
    ("hf://o--x/r", "not a valid Hub owner"),
    ("hf://spaces/o/r", "Spaces are not supported"),
    ("hf://hf_abcdefghijklmnop@o/r", "must not contain a token"),
    ("file://relative/path", "must be absolute"),
    ("s3:/bucket", "malformed"),
])
def test_malformed_uris(uri, words):
    with pytest.raises(StorageURIError, match=words) as e:
        parse_uri(uri)
    assert isinstance(e.value, ValueError)  # spec validators turn it into a field problem
    assert "supersecret" not in str(e.value) and "hf_abcdefghijklmnop" not in str(e.value)
    with pytest.raises(InputError) as e2:
        open_storage(uri)
    assert e2.value.exit_code == EXIT_BAD_INPUT
    assert "supersecret" not in str(e2.value) and "hf_abcdefghijklmnop" not in str(e2.value)


def test_patterns():
    assert matches("a/b.json", None, None)
    assert matches("a/b.json", ["*.json"], None)  # `*` crosses folders, as on the Hub
    assert not matches("a/b.json", ["b/*"], None)
    assert matches("vae/x.bin", ["vae/"], None)  # a trailing slash means the whole folder
    assert not matches("vae/x.bin", None, ["vae/"])
    assert not matches("a/b.json", ["*.json"], ["a/*"])


def test_retry_delays_are_bounded():
    policy = RetryPolicy(attempts=10, base_delay=1, max_delay=8)
    for attempt in range(1, 12):
        d = policy.delay(attempt)
        cap = min(8, 2 ** (attempt - 1))
        assert cap / 2 <= d <= cap
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


# --------------------------------------------------------------------------- disk


class _FullDisk:
    """A file whose writes fail with ENOSPC after writing half of the first block."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(bytes(data[: len(data) // 2]))
        self._f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False


def _writes_fail(monkeypatch, module, name="open", when=lambda path: True):
    real = getattr(module, name)

    if module is pathlib.Path:
        def fake(self, mode="r", *args, **kwargs):
            f = real(self, mode, *args, **kwargs)
            return _FullDisk(f) if ("w" in mode or "a" in mode) and when(str(self)) else f
    else:
        def fake(file, mode="r", *args, **kwargs):
            f = real(file, mode, *args, **kwargs)
            return _FullDisk(f) if ("w" in mode or "a" in mode) and when(str(file)) else f
    monkeypatch.setattr(module, name, fake, raising=False)


@pytest.fixture(params=["local", "s3", "hf"])
def filled_store(request, tmp_path: Path, fast_retry):
    """A store holding one 200 kB file `data/blob.bin`, and how to make local writes fail."""
    data = os.urandom(200_000)
    src = tmp_path / "blob.bin"
    src.write_bytes(data)
    if request.param == "local":
        store = open_storage(str(tmp_path / "remote"), retry=fast_retry)
        import builtins

        import job.storage.base as base_module

        def break_disk(mp):
            mp.setattr(base_module, "open", builtins.open, raising=False)
            _writes_fail(mp, base_module, when=lambda p: TMP_MARKER in p)
    elif request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        store = open_storage(f"s3://{bucket}", s3=request.getfixturevalue("s3_options"), retry=fast_retry)
        import builtins

        import s3transfer.utils as s3utils

        def break_disk(mp):
            mp.setattr(s3utils, "open", builtins.open, raising=False)
            _writes_fail(mp, s3utils)
    else:
        request.getfixturevalue("hub_env")
        store = open_storage("hf://tester/disk", retry=fast_retry)

        def break_disk(mp):
            _writes_fail(mp, pathlib.Path, when=lambda p: p.endswith(".incomplete"))
    store.upload_file(src, "data/blob.bin")
    return store, data, break_disk


def test_disk_full_during_download(filled_store, tmp_path: Path, monkeypatch):
    store, data, break_disk = filled_store
    dest = tmp_path / "ws" / "blob.bin"
    dest.parent.mkdir()
    with monkeypatch.context() as mp:
        break_disk(mp)
        with pytest.raises(EnvironmentProblem) as e:
            store.download_file("data/blob.bin", dest)
    assert "disk full" in str(e.value) and "data/blob.bin" in str(e.value)
    assert "free space" in e.value.fix
    assert e.value.exit_code == EXIT_ENVIRONMENT
    assert list(dest.parent.iterdir()) == []  # no partial file, no temp file, no staging folder

    # with room again, the same call works and the file is whole
    store.download_file("data/blob.bin", dest)
    assert dest.read_bytes() == data


def test_not_enough_space_is_caught_before_downloading(filled_store, tmp_path: Path, monkeypatch):
    store, _, _ = filled_store
    import job.storage.base as base_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(base_module.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(EnvironmentProblem, match="not enough disk space.*1000 B free"):
        store.download_folder("data", tmp_path / "ws")
    assert not (tmp_path / "ws").exists() or not any((tmp_path / "ws").iterdir())


def test_destination_is_a_folder(tmp_path: Path):
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "f.txt").write_text("x")
    (tmp_path / "dest").mkdir()
    store = open_storage(str(tmp_path / "remote"))
    with pytest.raises(InputError, match="a folder is there"):
        store.download_file("f.txt", tmp_path / "dest")


def test_uploading_something_missing(tmp_path: Path):
    store = open_storage(str(tmp_path / "remote"))
    with pytest.raises(InputError, match="not a file"):
        store.upload_file(tmp_path / "nope.bin", "x.bin")
    with pytest.raises(InputError, match="not a folder"):
        store.upload_folder(tmp_path / "nope", "x")


def test_progress_bars_on_a_terminal(tmp_path: Path, monkeypatch, s3_bucket, s3_options):
    """With a TTY the rich progress path runs (bytes, rate); the data is unaffected."""
    import job.report

    monkeypatch.setattr(job.report, "is_interactive", lambda: True)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.bin").write_bytes(os.urandom(100_000))
    for uri, kw in ((str(tmp_path / "remote"), {}), (f"s3://{s3_bucket}/p", {"s3": s3_options})):
        store = open_storage(uri, **kw)
        store.upload_folder(src, "x")
        store.download_folder("x", tmp_path / "dst" / uri[:2])
        assert sorted(p.read_bytes() for p in (tmp_path / "dst" / uri[:2]).iterdir()) == \
            sorted(p.read_bytes() for p in src.iterdir())


# --------------------------------------------------------------------------- checksums


def _store_with_checksum(tmp_path: Path, checksum: Callable[[Path], str], fast_retry):
    """A local store whose listing claims `checksum(file)` for every file (as a remote would)."""
    from job.storage.base import RemoteFile, Storage
    from job.storage.local import LocalStorage

    class Claiming(LocalStorage):
        def _record(self, p, rel):
            st = p.stat()
            return RemoteFile(path=rel, size=st.st_size, etag=None, checksum=checksum(p))

        _local_matches = Storage._local_matches  # compare with the claimed checksum, like S3/Hub

    return Claiming(parse_uri(str(tmp_path / "remote")), retry=fast_retry)


def test_checksum_that_never_matches_is_accepted_after_two_identical_downloads(tmp_path, fast_retry, storage_log):
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "enc.bin").write_bytes(b"encrypted object" * 100)
    store = _store_with_checksum(tmp_path, lambda p: "md5:" + "0" * 32, fast_retry)  # e.g. an SSE-KMS ETag

    store.download_folder("", tmp_path / "d")

    assert (tmp_path / "d" / "enc.bin").read_bytes() == b"encrypted object" * 100
    assert "two identical downloads agree" in storage_log.text
    ino = (tmp_path / "d" / "enc.bin").stat().st_ino
    store.download_folder("", tmp_path / "d")  # and it is not fetched again
    assert (tmp_path / "d" / "enc.bin").stat().st_ino == ino


def test_content_that_keeps_changing_fails_cleanly(tmp_path, fast_retry):
    (tmp_path / "remote").mkdir()
    target = tmp_path / "remote" / "moving.bin"
    target.write_bytes(b"a" * 1000)
    counter = iter(range(1000))

    def claim(p: Path) -> str:
        return "md5:" + "0" * 32

    store = _store_with_checksum(tmp_path, claim, fast_retry)
    real_fetch = store._fetch

    def fetch_then_change(remote, tmp, advance):  # another writer rewrites the file every time
        real_fetch(remote, tmp, advance)
        target.write_bytes(bytes([next(counter) % 256]) * 1000)

    store._fetch = fetch_then_change
    with pytest.raises(StorageError, match="checksum mismatch.*gave up after 4 attempts"):
        store.download_file("moving.bin", tmp_path / "d" / "moving.bin")
    assert list((tmp_path / "d").iterdir()) == []


def test_local_symlinked_folders(tmp_path: Path):
    real = tmp_path / "elsewhere" / "clips"
    real.mkdir(parents=True)
    (real / "a.mp4").write_bytes(b"video")
    root = tmp_path / "dataset"
    root.mkdir()
    (root / "clips").symlink_to(real)
    (root / "loop").symlink_to(root)  # a cycle must not hang the listing
    (root / "caption.txt").write_text("hi")
    store = open_storage(str(root))
    assert [f.path for f in store.list()] == ["caption.txt", "clips/a.mp4"]
