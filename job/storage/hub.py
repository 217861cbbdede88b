"""`hf://[datasets/|models/]owner/repo[@revision][/sub/folder]`: a Hugging Face Hub repo.

Reads pin the revision to one commit (resolved once, on first use) so a folder is
never a mix of two commits. Listing uses the repo tree (sizes, git blob ids, LFS
sha256), which is what lets a second pull skip files without downloading them;
files are fetched with `hf_hub_download` (so hf_xet is used where installed) into a
staging folder next to the destination, then checked and renamed into place.
Uploads create the repo (private) when missing and commit a whole folder at once.

The token comes from the environment variable named by `token_env` (HF_TOKEN by
default), read when the Storage is opened; no token means anonymous, never a token
saved on disk by `hf auth login`. The endpoint is $HF_ENDPOINT, also read then.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
from pathlib import Path
from typing import Any

from job.errors import InputError, StorageError
from job.storage.base import (
    Advance, Problem, RemoteFile, RemoteNotFound, Storage, StorageURI, iter_chunks, join,
    relative_to, safe_text, under,
)

DEFAULT_ENDPOINT = "https://huggingface.co"
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
#: Files per commit when uploading a folder (the Hub advises against huge commits).
COMMIT_BATCH = 500


def _progress_class(advance: Advance) -> type:
    """A minimal tqdm stand-in for huggingface_hub's `tqdm_class`: forwards bytes to our bar."""

    class _Bar:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.n = kwargs.get("initial", 0) or 0

        def update(self, n: float | None = 1) -> None:
            if n:
                self.n += int(n)
                advance(int(n))

        def close(self) -> None:
            pass

        def refresh(self, *args: Any, **kwargs: Any) -> None:
            pass

        def set_description(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __enter__(self) -> "_Bar":
            return self

        def __exit__(self, *exc: object) -> bool:
            return False

    return _Bar


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport-level exception types of whichever HTTP client huggingface_hub uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout", "ChunkedEncodingError"))):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(found)


class HubStorage(Storage):
    scheme = "hf"

    def __init__(self, uri: StorageURI, *, token_env: str = "HF_TOKEN", **kwargs):
        super().__init__(uri, **kwargs)
        assert uri.repo_id and uri.repo_type
        self.repo_id: str = uri.repo_id
        self.repo_type: str = uri.repo_type
        self.revision: str | None = uri.revision
        self.root: str = uri.prefix
        self.token_env = token_env
        self.endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        self._token: str | None = os.environ.get(token_env) or None
        if self._token:
            from job.report import register_secrets

            register_secrets([self._token])
        self._api: Any = None
        self._sha: str | None = None
        self._writable = False

    # ----- setup

    @property
    def repo_display(self) -> str:
        return ("datasets/" if self.repo_type == "dataset" else "") + self.repo_id

    def describe(self) -> str:
        auth = f"token from ${self.token_env}" if self._token else f"anonymous: ${self.token_env} is not set"
        return f"{self.display()} on {self.endpoint} ({auth})"

    @property
    def api(self) -> Any:
        if self._api is None:
            from huggingface_hub import HfApi

            self._api = HfApi(endpoint=self.endpoint, token=self._tok, library_name="trainer")
        return self._api

    @property
    def _tok(self) -> str | bool:
        # False, not None: never fall back to a token saved on disk by `hf auth login`.
        return self._token if self._token else False

    def _commit_sha(self, fresh: bool = False) -> str:
        """The commit reads go to. Listing and stat resolve it afresh (`fresh`), and the
        downloads that follow reuse it, so one folder download never mixes two commits."""
        if self.revision and _COMMIT_SHA.match(self.revision):
            return self.revision
        if self._sha is None or fresh:
            info = self.api.repo_info(self.repo_id, repo_type=self.repo_type, revision=self.revision,
                                      token=self._tok)
            self._sha = info.sha
        return self._sha

    def _branch(self) -> str | None:
        return self.revision

    def _prepare_upload(self) -> None:
        self._retrying(self._ensure_writable, f"prepare {self.display()} for upload")

    def _ensure_writable(self) -> None:
        if self._writable:
            return
        if not self._token:
            raise StorageError(
                f"writing to {self.display()} needs a Hub token, and ${self.token_env} is not set",
                fix=f"export {self.token_env}=<a token with write access> (create one at {self.endpoint}/settings/tokens)",
            )
        if self.revision and _COMMIT_SHA.match(self.revision):
            raise InputError(
                f"cannot write to {self.display()}: @{self.revision} is a commit, not a branch",
                fix="write to a branch: drop the @revision or use @<branch-name>",
            )
        # Raw calls: the caller runs this inside its retry loop.
        self.api.create_repo(self.repo_id, repo_type=self.repo_type, private=True, exist_ok=True, token=self._tok)
        if self.revision and self.revision != "main":
            self.api.create_branch(self.repo_id, branch=self.revision, repo_type=self.repo_type, exist_ok=True,
                                   token=self._tok)
        self._writable = True

    # ----- records

    def _full(self, path: str) -> str:
        return join(self.root, path)

    def _record(self, item: Any) -> RemoteFile:
        lfs = getattr(item, "lfs", None)
        if lfs is not None:
            sha256 = lfs.sha256 if hasattr(lfs, "sha256") else lfs["sha256"]
            etag, checksum = sha256, f"sha256:{sha256}"
        else:
            etag = item.blob_id
            checksum = f"git-sha1:{item.blob_id}" if item.blob_id else None
        return RemoteFile(path=relative_to(item.path, self.root) if self.root else item.path,
                          size=int(item.size), etag=etag, checksum=checksum)

    def _paths_info(self, full: str) -> list[Any]:
        return list(self.api.get_paths_info(self.repo_id, [full], revision=self._commit_sha(fresh=True),
                                            repo_type=self.repo_type, token=self._tok))

    # ----- operations

    def _list(self, prefix: str) -> list[RemoteFile]:
        from huggingface_hub.hf_api import RepoFile

        full = self._full(prefix)
        sha = self._commit_sha(fresh=True)
        try:
            items = list(self.api.list_repo_tree(self.repo_id, path_in_repo=full or None, recursive=True,
                                                 revision=sha, repo_type=self.repo_type, token=self._tok))
        except Exception as e:
            if not _is_remote_entry_not_found(e):
                raise
            items = [i for i in self._paths_info(full) if isinstance(i, RepoFile)] if full else []
        return [self._record(i) for i in items
                if isinstance(i, RepoFile) and under(i.path, full) and under(i.path, self.root)]

    def _stat(self, path: str) -> RemoteFile | None:
        from huggingface_hub.hf_api import RepoFile

        for item in self._paths_info(self._full(path)):
            if isinstance(item, RepoFile):
                return self._record(item)
        return None

    def _exists(self, path: str) -> bool:
        return bool(self._paths_info(self._full(path)))

    def _fetch(self, remote: RemoteFile, tmp: Path, advance: Advance) -> None:
        from huggingface_hub import hf_hub_download

        staging = tmp.with_name(tmp.name + ".d")
        kwargs: dict[str, Any] = dict(repo_type=self.repo_type, revision=self._commit_sha(),
                                      local_dir=staging, token=self._tok, endpoint=self.endpoint)
        if "tqdm_class" in inspect.signature(hf_hub_download).parameters:
            kwargs["tqdm_class"] = _progress_class(advance)
        try:
            got = hf_hub_download(self.repo_id, self._full(remote.path), **kwargs)
            os.replace(got, tmp)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _commit(self, operations: list[Any], message: str) -> None:
        self.api.create_commit(self.repo_id, operations=operations, commit_message=message,
                               repo_type=self.repo_type, revision=self._branch(), token=self._tok)
        self._sha = None  # the branch moved: later reads see the new commit

    def _put(self, src: Path, path: str, advance: Advance) -> None:
        from huggingface_hub import CommitOperationAdd

        self._ensure_writable()
        full = self._full(path)
        self._commit([CommitOperationAdd(path_in_repo=full, path_or_fileobj=str(src))],
                     f"Upload {full} with trainer")
        advance(src.stat().st_size)

    def _put_many(self, items: list[tuple[Path, str]], advance: Advance) -> None:
        """One commit per batch of files (a checkpoint lands whole or not at all)."""
        from huggingface_hub import CommitOperationAdd

        self._prepare_upload()
        for batch in iter_chunks(items, COMMIT_BATCH):
            # Operations are rebuilt for every attempt: huggingface_hub refuses to reuse committed ones.
            self._retrying(
                lambda b=batch: self._commit(
                    [CommitOperationAdd(path_in_repo=self._full(p), path_or_fileobj=str(s)) for s, p in b],
                    f"Upload {len(b)} file(s) to {self._full('') or '/'} with trainer"),
                f"upload {len(batch)} file(s) to {self.display()}")
            advance(sum(s.stat().st_size for s, _ in batch))

    def _delete(self, path: str) -> None:
        from huggingface_hub import CommitOperationDelete
        from huggingface_hub.hf_api import RepoFile

        self._ensure_writable()
        full = self._full(path)
        items = self._paths_info(full)
        if not items:
            return
        is_folder = not isinstance(items[0], RepoFile)
        target = full + "/" if is_folder else full
        self._commit([CommitOperationDelete(path_in_repo=target, is_folder=is_folder)], f"Delete {full} with trainer")

    # ----- errors

    def _classify(self, exc: BaseException, what: str) -> Problem:
        from huggingface_hub import errors as he

        repo = self.repo_display
        env = self.token_env
        tokens_page = f"{self.endpoint}/settings/tokens"
        if isinstance(exc, he.LocalEntryNotFoundError):
            # hf_hub_download's wrapper for "the HEAD call failed": judge the cause.
            cause = exc.__cause__ or exc.__context__
            if cause is not None and cause is not exc:
                return self._classify(cause, what)
            return Problem(StorageError(f"{what}: cannot reach {self.endpoint}",
                                        fix="check the network and HF_ENDPOINT"), transient=True)
        if isinstance(exc, he.OfflineModeIsEnabled):
            return Problem(StorageError(f"{what}: HF_HUB_OFFLINE is set, so the Hub may not be contacted",
                                        fix="unset HF_HUB_OFFLINE, or point the spec at a local copy"))
        if isinstance(exc, he.RevisionNotFoundError):
            return Problem(RemoteNotFound(
                f"{what}: revision '{self.revision}' does not exist in {repo}",
                fix="use an existing branch, tag or full commit hash after '@' in the URI"))
        if isinstance(exc, he.GatedRepoError):
            return Problem(StorageError(
                f"{what}: {repo} is gated and the account of ${env} has not been granted access",
                fix=f"accept the conditions at {self.endpoint}/{repo} with that account, then run again"))
        if isinstance(exc, he.RepositoryNotFoundError):
            if self._token:
                return Problem(RemoteNotFound(
                    f"{what}: {repo} does not exist, or the token in ${env} cannot read it",
                    fix="check the owner/name and the type (hf://datasets/... for datasets) and the token's access"))
            return Problem(RemoteNotFound(
                f"{what}: {repo} does not exist, or it is private and ${env} is not set",
                fix=f"export {env}=<a token with read access> (create one at {tokens_page}), or fix the name"))
        if _is_remote_entry_not_found(exc):
            return Problem(RemoteNotFound(f"{what}: not found in {repo}", fix="check the path"))
        if isinstance(exc, he.HfHubHTTPError):
            response = getattr(exc, "response", None)
            status = getattr(response, "status_code", None)
            if status == 401:
                detail = (f"the Hub rejected the token in ${env} (invalid or expired)" if self._token
                          else f"the Hub requires a token and ${env} is not set")
                return Problem(StorageError(f"{what}: {detail}",
                                            fix=f"create a token at {tokens_page} and export it as {env}"))
            if status == 403:
                return Problem(StorageError(
                    f"{what}: the token in ${env} is not allowed to do this on {repo}",
                    fix=f"use a token with write access to {repo.rsplit('/', 1)[0]} ({tokens_page})"))
            if status in (408, 429) or (status is not None and status >= 500):
                return Problem(StorageError(f"{what}: {self.endpoint} answered {status}",
                                            fix="wait and run again"), transient=True)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return Problem(StorageError(f"{what}: {safe_text(first)}", fix=f"check {repo} on {self.endpoint}"))
        if isinstance(exc, _network_errors()):
            return Problem(StorageError(f"{what}: cannot reach {self.endpoint} ({type(exc).__name__})",
                                        fix="check the network and HF_ENDPOINT"), transient=True)
        if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
            return Problem(StorageError(f"{what}: the download was cut short", fix="run again"), transient=True)
        return super()._classify(exc, what)


def _is_remote_entry_not_found(exc: BaseException) -> bool:
    from huggingface_hub import errors as he

    remote_cls = getattr(he, "RemoteEntryNotFoundError", None)
    if remote_cls is not None and isinstance(exc, remote_cls):
        return True
    return isinstance(exc, he.EntryNotFoundError) and not isinstance(exc, he.LocalEntryNotFoundError)
