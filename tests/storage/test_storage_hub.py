"""Hub specifics, against the Hub stand-in (tests/servers/hub.py) over HTTP on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from job.errors import EXIT_BAD_INPUT, EXIT_REMOTE, InputError, StorageError
from job.storage import RemoteNotFound, open_storage
from job.storage.base import TMP_MARKER
from job.storage.hub import HubStorage
from tests.servers.hub import DEFAULT_TOKEN, READ_TOKEN

FILES = {"config.json": b'{"a": 1}', "weights/model.safetensors": bytes(range(256)) * 40}


def _hub(uri: str, fast_retry) -> HubStorage:
    store = open_storage(uri, retry=fast_retry)
    assert isinstance(store, HubStorage)
    return store


def test_public_model_repo_anonymously(hub_env, monkeypatch, tmp_path: Path, fast_retry):
    hub_env.create_repo("org/public-model", files=FILES)
    monkeypatch.delenv("HF_TOKEN")
    store = _hub("hf://org/public-model", fast_retry)
    assert "anonymous" in store.describe()
    got = store.download_folder("", tmp_path / "m", exclude=[".gitattributes"])
    assert {p.relative_to(tmp_path / "m").as_posix(): p.read_bytes() for p in got} == FILES
    # hf://models/... is the same repo
    assert [f.path for f in _hub("hf://models/org/public-model/weights", fast_retry).list()] == ["model.safetensors"]


def test_private_repo_without_token(hub_env, monkeypatch, tmp_path: Path, fast_retry):
    hub_env.create_repo("org/secret", repo_type="dataset", private=True, files=FILES)
    monkeypatch.delenv("HF_TOKEN")
    store = _hub("hf://datasets/org/secret", fast_retry)
    with pytest.raises(RemoteNotFound) as e:
        store.download_folder("", tmp_path / "d")
    msg = str(e.value)
    assert "datasets/org/secret" in msg and "private" in msg and "$HF_TOKEN is not set" in msg
    assert "export HF_TOKEN" in e.value.fix
    assert e.value.exit_code == EXIT_REMOTE
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())

    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)  # with a token it works
    assert len(_hub("hf://datasets/org/secret", fast_retry).list()) == 3


def test_bad_token_is_named_not_printed(hub_env, monkeypatch, fast_retry):
    hub_env.create_repo("org/public-model", files=FILES)
    bad = "hf_thisTokenIsWrong123456"
    monkeypatch.setenv("HF_TOKEN", bad)
    store = _hub("hf://org/public-model", fast_retry)
    with pytest.raises(StorageError) as e:
        store.list()
    msg = str(e.value)
    assert "rejected the token in $HF_TOKEN" in msg and "settings/tokens" in e.value.fix
    assert bad not in msg and bad not in store.describe()


def test_custom_token_variable(hub_env, monkeypatch, fast_retry):
    hub_env.create_repo("org/secret", private=True, files=FILES)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("MY_HUB_TOKEN", READ_TOKEN)
    store = open_storage("hf://org/secret", hf_token_env="MY_HUB_TOKEN", retry=fast_retry)
    assert "$MY_HUB_TOKEN" in store.describe() and READ_TOKEN not in store.describe()
    assert store.exists("config.json")


def test_missing_repo_and_wrong_type(hub_env, fast_retry):
    hub_env.create_repo("org/only-a-model", files=FILES)
    with pytest.raises(RemoteNotFound, match="datasets/org/only-a-model does not exist") as e:
        _hub("hf://datasets/org/only-a-model", fast_retry).list()
    assert "hf://datasets/" in e.value.fix


def test_unknown_revision(hub_env, tmp_path: Path, fast_retry):
    hub_env.create_repo("org/m", files=FILES)
    store = _hub("hf://org/m@does-not-exist", fast_retry)
    for action in (store.list, lambda: store.download_folder("", tmp_path / "x"),
                   lambda: store.download_file("config.json", tmp_path / "c.json")):
        with pytest.raises(RemoteNotFound) as e:
            action()
        assert "revision 'does-not-exist' does not exist in org/m" in str(e.value)
    assert not (tmp_path / "c.json").exists()


def test_revisions_pin_reads(hub_env, tmp_path: Path, fast_retry):
    repo = hub_env.create_repo("org/m", files={"a.txt": b"v1"})
    first = repo.branches["main"]
    repo.branches["v1"] = first
    hub_env.commit_files("org/m", {"a.txt": b"v2", "b.txt": b"new"})

    def read(uri: str) -> dict[str, bytes]:
        dest = tmp_path / uri.replace("/", "_").replace(":", "")
        return {p.name: p.read_bytes()
                for p in _hub(uri, fast_retry).download_folder("", dest, exclude=[".gitattributes"])}

    assert read("hf://org/m") == {"a.txt": b"v2", "b.txt": b"new"}
    assert read("hf://org/m@v1") == {"a.txt": b"v1"}
    assert read(f"hf://org/m@{first}") == {"a.txt": b"v1"}


def test_upload_creates_a_private_repo_and_branch(hub_env, tmp_path: Path, fast_retry):
    src = tmp_path / "ckpt"
    (src / "transformer").mkdir(parents=True)
    (src / "transformer" / "w.safetensors").write_bytes(b"\x00" * 1000)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# model card\n")

    store = _hub("hf://tester/new-model/checkpoints", fast_retry)
    store.upload_folder(src, "step-10")
    repo = hub_env.repos[("model", "tester/new-model")]
    assert repo.private
    head = hub_env.head("tester/new-model")
    assert head.files["checkpoints/step-10/transformer/w.safetensors"] == b"\x00" * 1000
    assert hub_env.count("POST", "/commit/") == 1  # the whole folder in one commit

    on_branch = _hub("hf://tester/new-model@experiments/checkpoints", fast_retry)
    on_branch.upload_file(src / "README.md", "README.md")
    assert "experiments" in repo.branches
    assert "checkpoints/README.md" in hub_env.head("tester/new-model", branch="experiments").files
    assert "checkpoints/README.md" not in hub_env.head("tester/new-model").files


def test_upload_needs_a_write_token(hub_env, monkeypatch, tmp_path: Path, fast_retry):
    src = tmp_path / "f.txt"
    src.write_text("x")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(StorageError, match="needs a Hub token") as e:
        _hub("hf://tester/repo", fast_retry).upload_file(src, "f.txt")
    assert "HF_TOKEN" in e.value.fix

    hub_env.create_repo("tester/repo", files=FILES)
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    with pytest.raises(StorageError, match="not allowed") as e:
        _hub("hf://tester/repo", fast_retry).upload_file(src, "f.txt")
    assert "write access" in e.value.fix
    assert READ_TOKEN not in str(e.value)


def test_upload_to_a_commit_is_refused(hub_env, tmp_path: Path, fast_retry):
    src = tmp_path / "f.txt"
    src.write_text("x")
    with pytest.raises(InputError, match="is a commit, not a branch") as e:
        _hub("hf://tester/repo@" + "a" * 40, fast_retry).upload_file(src, "f.txt")
    assert e.value.exit_code == EXIT_BAD_INPUT


def test_transient_failures_are_retried(hub_env, tmp_path: Path, fast_retry):
    hub_env.create_repo("org/m", files=FILES)
    store = _hub("hf://org/m", fast_retry)
    hub_env.fail_next(2, status=503, match="/resolve/", method="GET")
    got = store.download_folder("weights", tmp_path / "w")
    assert got[0].read_bytes() == FILES["weights/model.safetensors"]
    assert not [p for p in (tmp_path / "w").rglob("*") if TMP_MARKER in p.name]

    src = tmp_path / "n.txt"
    src.write_text("new")
    hub_env.fail_next(1, status=502, match="/commit/")
    store.upload_file(src, "n.txt")
    assert hub_env.head("org/m").files["n.txt"] == b"new"


def test_endpoint_is_read_when_opened(hub_env, monkeypatch, fast_retry):
    """huggingface_hub fixes its endpoint at import; the Storage reads HF_ENDPOINT itself."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        "https://huggingface.co/{repo_id}/resolve/{revision}/{filename}")
    hub_env.create_repo("org/m", files=FILES)
    store = _hub("hf://org/m", fast_retry)
    assert hub_env.url in store.describe()
    assert store.exists("config.json")
    assert DEFAULT_TOKEN not in store.describe()


def test_lfs_files_are_checked_by_sha256(hub_env, tmp_path: Path, fast_retry):
    hub_env.lfs_threshold = 1000  # files >= 1000 bytes are described as LFS, like weights on the Hub
    big = bytes(range(256)) * 20
    hub_env.create_repo("org/lfs", files={"w.safetensors": big, "small.json": b"{}"})
    store = _hub("hf://org/lfs", fast_retry)
    listed = {f.path: f for f in store.list()}
    assert listed["w.safetensors"].checksum.startswith("sha256:")
    assert listed["small.json"].checksum.startswith("git-sha1:")

    store.download_folder("", tmp_path / "d")
    assert (tmp_path / "d" / "w.safetensors").read_bytes() == big
    hub_env.clear_requests()
    store.download_folder("", tmp_path / "d")
    assert hub_env.count(contains="/resolve/") == 0

    hub_env.commit_files("org/lfs", {"w.safetensors": big[::-1]})
    store.download_folder("", tmp_path / "d")
    assert (tmp_path / "d" / "w.safetensors").read_bytes() == big[::-1]
