"""One contract, three backends: a local folder, S3 (moto over HTTP) and the Hub (stand-in over HTTP).

Every test here runs against each backend through the public `Storage` API only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from job.errors import InputError
from job.storage import RemoteNotFound, Storage, open_storage
from job.storage.base import TMP_MARKER


@dataclass
class Backend:
    kind: str
    store: Storage
    #: GET/HEAD requests for file bodies seen by the server so far (None: not observable)
    body_requests: Callable[[], int] | None
    #: write `data` at `path` behind the Storage's back (as another writer would)
    put_raw: Callable[[str, bytes], None]


@pytest.fixture(params=["local", "s3", "hf"])
def backend(request, tmp_path, fast_retry) -> Backend:
    kind = request.param
    if kind == "local":
        root = tmp_path / "remote" / "root"

        def put_raw(path: str, data: bytes) -> None:
            p = root / path
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)

        yield Backend(kind, open_storage(str(root), retry=fast_retry), None, put_raw)
    elif kind == "s3":
        import boto3

        bucket = request.getfixturevalue("s3_bucket")
        server = request.getfixturevalue("s3_env")
        options = request.getfixturevalue("s3_options")
        client = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1")

        def put_raw(path: str, data: bytes) -> None:
            client.put_object(Bucket=bucket, Key=f"root/{path}", Body=data)

        store = open_storage(f"s3://{bucket}/root", s3=options, retry=fast_retry)
        yield Backend(kind, store, lambda: server.count("GET", path_contains=f"/{bucket}/")
                      + server.count("HEAD", path_contains=f"/{bucket}/"), put_raw)
        store.close()
        client.close()
    else:
        server = request.getfixturevalue("hub_env")
        server.create_repo("tester/contract", repo_type="dataset", private=True)

        def put_raw(path: str, data: bytes) -> None:
            server.commit_files("tester/contract", {f"root/{path}": data}, repo_type="dataset")

        store = open_storage("hf://datasets/tester/contract/root", retry=fast_retry)
        yield Backend(kind, store, lambda: server.count(contains="/resolve/"), put_raw)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _make_folder(root: Path) -> dict[str, bytes]:
    files = {
        "model_index.json": b'{"_class_name": "SanaVideoPipeline"}\n',
        "transformer/config.json": b"{}",
        "transformer/diffusion_pytorch_model.safetensors": os.urandom(300_000),
        "vae/weights.bin": os.urandom(70_000),
        "vae/nested/deep/notes ü+%.txt": "ünïcødé ✓\n".encode(),
        "empty.txt": b"",
        "logs/train.log": b"step 1\n",
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if TMP_MARKER in p.name]


def test_file_roundtrip_byte_for_byte(backend: Backend, tmp_path: Path):
    store = backend.store
    data = bytes(range(256)) * 1000 + b"\x00\r\n tail"
    src = tmp_path / "src.bin"
    src.write_bytes(data)

    store.upload_file(src, "dir/blob.bin")

    listed = store.list()
    assert [f.path for f in listed] == ["dir/blob.bin"]
    assert listed[0].size == len(data)
    assert store.exists("dir/blob.bin")
    assert store.exists("dir")  # a folder exists when something is under it
    assert not store.exists("dir/other.bin")
    assert not store.exists("di")  # prefixes are folders, not string prefixes

    out = store.download_file("dir/blob.bin", tmp_path / "out" / "blob.bin")
    assert out.read_bytes() == data
    assert _no_temp_files(tmp_path / "out")


def test_folder_roundtrip_with_nested_prefixes(backend: Backend, tmp_path: Path):
    store = backend.store
    files = _make_folder(tmp_path / "src")

    uploaded = store.upload_folder(tmp_path / "src", "checkpoints/step-100")
    assert sorted(uploaded) == sorted(f"checkpoints/step-100/{rel}" for rel in files)

    # listing honours folder semantics at every depth
    assert {f.path for f in store.list("checkpoints/step-100/vae")} == {
        "checkpoints/step-100/vae/weights.bin", "checkpoints/step-100/vae/nested/deep/notes ü+%.txt"}
    assert store.list("checkpoints/step-10") == []
    assert {f.path: f.size for f in store.list("checkpoints")} == {
        f"checkpoints/step-100/{rel}": len(data) for rel, data in files.items()}

    got = store.download_folder("checkpoints/step-100", tmp_path / "dst")
    assert sorted(got) == sorted(tmp_path / "dst" / rel for rel in files)
    assert _tree(tmp_path / "dst") == files
    assert _no_temp_files(tmp_path / "dst")


def test_include_exclude_patterns(backend: Backend, tmp_path: Path):
    store = backend.store
    files = _make_folder(tmp_path / "src")

    # upload side: patterns apply to paths relative to the local folder
    store.upload_folder(tmp_path / "src", "run", exclude=["logs/", "*.txt"])
    remote = {f.path for f in store.list("run")}
    assert remote == {f"run/{rel}" for rel in files if not rel.startswith("logs/") and not rel.endswith(".txt")}

    # download side: patterns apply to paths relative to the prefix
    got = store.download_folder("run", tmp_path / "a", include=["transformer/*", "*.json"],
                                exclude=["*.safetensors"])
    assert sorted(p.relative_to(tmp_path / "a").as_posix() for p in got) == [
        "model_index.json", "transformer/config.json"]
    assert _tree(tmp_path / "a") == {k: files[k] for k in ("model_index.json", "transformer/config.json")}

    with pytest.raises(RemoteNotFound, match="none matching"):
        store.download_folder("run", tmp_path / "b", include=["*.gguf"])


def test_second_download_only_lists(backend: Backend, tmp_path: Path):
    store = backend.store
    files = _make_folder(tmp_path / "src")
    store.upload_folder(tmp_path / "src", "m")
    store.download_folder("m", tmp_path / "dst")
    inodes = {rel: (tmp_path / "dst" / rel).stat().st_ino for rel in files}
    before = backend.body_requests() if backend.body_requests else None

    again = store.download_folder("m", tmp_path / "dst")

    assert len(again) == len(files)
    if backend.body_requests is not None:
        assert backend.body_requests() == before, "a present file was fetched again"
    # nothing was rewritten (a download replaces the file, so the inode would change)
    assert {rel: (tmp_path / "dst" / rel).stat().st_ino for rel in files} == inodes


def test_changed_or_missing_files_are_fetched_again(backend: Backend, tmp_path: Path):
    store = backend.store
    files = _make_folder(tmp_path / "src")
    store.upload_folder(tmp_path / "src", "m")
    store.download_folder("m", tmp_path / "dst")

    (tmp_path / "dst" / "vae/weights.bin").unlink()  # deleted locally
    (tmp_path / "dst" / "logs/train.log").write_bytes(b"trunc")  # wrong size locally
    backend.put_raw("m/model_index.json", files["model_index.json"].upper())  # same size, new content
    untouched = (tmp_path / "dst" / "transformer/config.json").stat().st_ino

    store.download_folder("m", tmp_path / "dst")

    expected = dict(files, **{"model_index.json": files["model_index.json"].upper()})
    assert _tree(tmp_path / "dst") == expected
    assert (tmp_path / "dst" / "transformer/config.json").stat().st_ino == untouched


def test_second_upload_skips_unchanged(backend: Backend, tmp_path: Path):
    store = backend.store
    _make_folder(tmp_path / "src")
    store.upload_folder(tmp_path / "src", "m")
    (tmp_path / "src" / "logs/train.log").write_bytes(b"step 1\nstep 2\n")
    before = {f.path: f for f in store.list("m")}

    store.upload_folder(tmp_path / "src", "m")

    after = {f.path: f for f in store.list("m")}
    changed = {p for p in after if after[p] != before.get(p)}
    assert changed == {"m/logs/train.log"}


def test_delete_file_and_folder(backend: Backend, tmp_path: Path):
    store = backend.store
    _make_folder(tmp_path / "src")
    store.upload_folder(tmp_path / "src", "ckpt")
    store.upload_folder(tmp_path / "src", "ckpt-2", include=["empty.txt"])

    store.delete("ckpt/model_index.json")
    assert not store.exists("ckpt/model_index.json")
    assert store.exists("ckpt/vae/weights.bin")

    store.delete("ckpt")  # a folder: everything under it, not its sibling ckpt-2
    assert not store.exists("ckpt")
    assert [f.path for f in store.list()] == ["ckpt-2/empty.txt"]

    store.delete("ckpt")  # idempotent
    store.delete("never/was")
    with pytest.raises(InputError):
        store.delete("")  # never the whole root


def test_missing_things_are_clear(backend: Backend, tmp_path: Path):
    store = backend.store
    with pytest.raises(RemoteNotFound) as e:
        store.download_file("nope/missing.bin", tmp_path / "x.bin")
    assert "nope/missing.bin" in str(e.value)
    assert not (tmp_path / "x.bin").exists()
    with pytest.raises(RemoteNotFound, match="no files there"):
        store.download_folder("nope", tmp_path / "d")
    assert store.list("nope") == []
    assert not store.exists("nope")
    for bad in ("../escape", "/abs/path", "a//b"):
        with pytest.raises(InputError):
            store.exists(bad)


def test_describe_is_a_plain_string(backend: Backend):
    text = backend.store.describe()
    assert isinstance(text, str) and text
    for secret in ("testing-secret-key", "hf_testwritetoken"):
        assert secret not in text
