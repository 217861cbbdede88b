"""The Storage interface shared by every remote: a local path, `hf://` and `s3://`.

Everything the job reads from or writes to a remote goes through one `Storage`
chosen by URI (`open_storage`). The public methods live here, once, so the three
backends behave the same way:

- paths are relative to the storage root, `/`-separated, never absolute and never
  containing `..`; a *prefix* has folder semantics (`a/b` covers `a/b` itself and
  everything under `a/b/`, never `a/bc`);
- a download is written to a temporary name in the destination folder, checked
  (size, and the remote checksum where one is known and the file is not huge),
  fsynced and renamed into place: a file under its final name is always whole;
- a folder download lists once and skips local files that already match (size, and
  checksum where cheap), so a second run with everything present does only a listing;
- transient failures (network, 5xx, throttling) are retried with exponential backoff
  and jitter, bounded in count and in time (`RetryPolicy`);
- every failure ends as one `TrainerError` naming the resource and the fix:
  `StorageError` (exit 4) for the remote, `EnvironmentProblem` (exit 3) for a full
  disk, `InputError` (exit 2) for a malformed URI. Secrets never appear in messages.

Backends implement the small `_list/_stat/_exists/_fetch/_put/_delete/_classify` set.
"""

from __future__ import annotations

import abc
import errno
import fnmatch
import hashlib
import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator, Literal, TypeVar
from urllib.parse import quote, unquote, urlsplit

from job.workspace import fsync_dir
from job.errors import EnvironmentProblem, InputError, StorageError, TrainerError

log = logging.getLogger("trainer.storage")

T = TypeVar("T")
Advance = Callable[[int], None]

#: Temporary files written next to their destination carry this marker, so listings of a
#: local tree skip them and a crashed run's leftovers can be recognised.
TMP_MARKER = ".trainer-partial"

#: Files up to this size are compared and verified by checksum; above it, by size only
#: (hashing a multi-GB checkpoint on every resume would cost more than it saves).
DEFAULT_HASH_LIMIT = 256 * 1024 * 1024


# --------------------------------------------------------------------------- errors


class RemoteNotFound(StorageError):
    """The file, folder, repo or bucket asked for does not exist (exit 4, like any remote problem)."""


class StorageURIError(ValueError):
    """A malformed storage URI. A `ValueError`, so spec validators report it on the field."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message if not fix else f"{message} (fix: {fix})")
        self.message = message
        self.fix = fix


@dataclass
class Problem:
    """What a backend makes of an exception: the user-facing error, and whether to retry."""

    error: TrainerError
    transient: bool = False


class TransientFailure(Exception):
    """Raised inside an attempt to ask for a retry (size or checksum mismatch, ...)."""


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class S3Options:
    """How to reach an S3-compatible endpoint. Credentials are never here: they come
    from the environment / the standard AWS chain (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)."""

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"

    def __post_init__(self) -> None:
        if self.addressing_style not in ("auto", "path", "virtual"):
            raise ValueError(
                f"addressing_style must be one of auto, path, virtual (got {self.addressing_style!r})"
            )
        if self.endpoint_url is not None:
            parts = urlsplit(self.endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"endpoint_url must look like https://host[:port] (got {_redact_url(self.endpoint_url)!r})"
                )
            if parts.username or parts.password:
                raise ValueError(
                    "endpoint_url must not contain credentials; set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY in the environment instead"
                )


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of one operation: at most `attempts` tries and `deadline` seconds in all,
    waiting `base_delay * 2**n` (capped at `max_delay`) with full jitter in between."""

    attempts: int = 6
    base_delay: float = 1.0
    max_delay: float = 30.0
    deadline: float = 900.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be >= 1")
        if self.base_delay < 0 or self.max_delay < 0 or self.deadline < 0:
            raise ValueError("RetryPolicy delays must be >= 0")

    def delay(self, attempt: int) -> float:
        """The wait after failed try number `attempt` (1-based): half fixed, half jitter."""
        cap = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return cap / 2 + random.uniform(0, cap / 2)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RemoteFile:
    """One file in a store. `path` is relative to the storage root.

    `etag` is what the server calls the version (S3 ETag, Hub blob id or LFS sha256);
    `checksum` is `"<algo>:<hex>"` when the content hash is known and can be recomputed
    locally (`md5`, `sha256`, `git-sha1`), else None."""

    path: str
    size: int
    etag: str | None = None
    checksum: str | None = None


@dataclass(frozen=True)
class StorageURI:
    """A validated storage URI. `scheme` is `file`, `hf` or `s3`."""

    scheme: Literal["file", "hf", "s3"]
    path: Path | None = None  # file
    repo_type: Literal["model", "dataset"] | None = None  # hf
    repo_id: str | None = None  # hf
    revision: str | None = None  # hf (None = the default branch)
    bucket: str | None = None  # s3
    prefix: str = ""  # hf: folder inside the repo; s3: key prefix (no leading/trailing "/")

    def __str__(self) -> str:
        if self.scheme == "file":
            return str(self.path)
        if self.scheme == "s3":
            return f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        kind = "datasets/" if self.repo_type == "dataset" else ""
        rev = ""
        if self.revision:
            special = _HF_SPECIAL_REV.match(self.revision)
            rev = "@" + (self.revision if special and special.end() == len(self.revision)
                         else quote(self.revision, safe=""))
        return f"hf://{kind}{self.repo_id}{rev}" + (f"/{self.prefix}" if self.prefix else "")


# --------------------------------------------------------------------------- URIs

_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HF_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_HF_SPECIAL_REV = re.compile(r"^(refs/pr/\d+|refs/convert/[A-Za-z0-9_-]+)(?=/|$)")
_HF_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{6,}")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _redact_url(text: str) -> str:
    """`scheme://user:pass@host` -> `scheme://***@host`; Hub-token-looking strings -> `***`."""
    text = re.sub(r"(://)[^/@\s]*@", r"\1***@", text)
    return _HF_TOKEN_LIKE.sub("***", text)


def _clean_key_path(raw: str, what: str, uri_for_msg: str) -> str:
    """Normalise a `/`-separated path inside a bucket or repo; refuse `..`, `.` and `//`."""
    stripped = raw.strip("/")
    if not stripped:
        return ""
    parts = stripped.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise StorageURIError(
                f"{what} in {uri_for_msg!r} contains an empty, '.' or '..' segment",
                fix="write the path without '//', './' or '../'",
            )
        if "\\" in part or "\x00" in part:
            raise StorageURIError(f"{what} in {uri_for_msg!r} contains a backslash or NUL")
    return "/".join(parts)


def parse_uri(uri: str) -> StorageURI:
    """Validate a storage URI. Raises `StorageURIError` (a `ValueError`) naming the problem.

    Accepted forms:
      /abs/path, rel/path, ~/path, file:///abs/path
      hf://[datasets/|models/]owner/repo[@revision][/sub/folder]
      s3://bucket[/prefix]
    """
    if not isinstance(uri, str) or not uri.strip():
        raise StorageURIError("empty storage URI", fix="give a local path, hf://owner/repo or s3://bucket/prefix")
    uri = uri.strip()
    shown = _redact_url(uri)
    m = _SCHEME.match(uri)
    if not m:
        if "://" in uri or uri.startswith(("s3:", "hf:")):
            raise StorageURIError(f"malformed storage URI {shown!r}", fix="write s3://bucket/prefix or hf://owner/repo")
        return StorageURI(scheme="file", path=Path(uri).expanduser().absolute())
    scheme = m.group(1).lower()
    rest = uri[m.end():]
    if scheme == "file":
        return _parse_file(rest, shown)
    if scheme == "s3":
        return _parse_s3(rest, shown)
    if scheme == "hf":
        return _parse_hf(rest, shown)
    raise StorageURIError(
        f"unsupported storage scheme {scheme + '://'!r} in {shown!r}",
        fix="use a local path, file:///abs/path, hf://owner/repo or s3://bucket/prefix",
    )


def _parse_file(rest: str, shown: str) -> StorageURI:
    if rest.startswith("localhost/"):
        rest = rest[len("localhost"):]
    if not rest.startswith("/"):
        raise StorageURIError(
            f"file URI {shown!r} must be absolute", fix="write file:///absolute/path or a plain path"
        )
    if "?" in rest or "#" in rest:
        raise StorageURIError(f"file URI {shown!r} must not have a query or fragment")
    return StorageURI(scheme="file", path=Path(unquote(rest)))


def _parse_s3(rest: str, shown: str) -> StorageURI:
    if "?" in rest or "#" in rest:
        raise StorageURIError(f"S3 URI {shown!r} must not have a query or fragment", fix="write s3://bucket/prefix")
    bucket, _, prefix = rest.partition("/")
    if "@" in bucket or ":" in bucket:
        raise StorageURIError(
            f"S3 URI {shown!r} must not contain credentials or a port",
            fix="write s3://bucket/prefix; set credentials with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "and the endpoint in the spec's S3 settings",
        )
    if not bucket:
        raise StorageURIError(f"S3 URI {shown!r} has no bucket", fix="write s3://bucket/prefix")
    if not _S3_BUCKET.match(bucket) or ".." in bucket:
        raise StorageURIError(
            f"{bucket!r} in {shown!r} is not a valid bucket name",
            fix="bucket names are 3-63 characters: lowercase letters, digits, '.' and '-'",
        )
    return StorageURI(scheme="s3", bucket=bucket, prefix=_clean_key_path(prefix, "the key prefix", shown))


def _parse_hf(rest: str, shown: str) -> StorageURI:
    if "?" in rest or "#" in rest:
        raise StorageURIError(f"Hub URI {shown!r} must not have a query or fragment")
    repo_type: Literal["model", "dataset"] = "model"
    if rest.startswith("datasets/"):
        repo_type, rest = "dataset", rest[len("datasets/"):]
    elif rest.startswith("models/"):
        rest = rest[len("models/"):]
    elif rest.startswith("spaces/"):
        raise StorageURIError(f"{shown!r}: Spaces are not supported", fix="use a model or dataset repo")
    owner, _, remainder = rest.partition("/")
    name, has_rev, after = remainder.partition("@")
    if has_rev and "/" in name:  # the "@" belongs to the subfolder, not to a revision
        name, has_rev, after = remainder, "", ""
    if has_rev:
        # A revision may itself contain "/" (refs/pr/1): take it whole before the subfolder.
        special = _HF_SPECIAL_REV.match(after)
        rev, tail = (special.group(1), after[special.end():]) if special else after.partition("/")[::2]
        rev = unquote(rev)
        if not rev or any(c in rev for c in " \t\n\\") or ".." in rev:
            raise StorageURIError(
                f"Hub URI {shown!r} has an empty or invalid revision",
                fix="write @<branch>, @<tag> or @<full commit hash> after the repo name",
            )
    else:
        name, _, tail = name.partition("/")
        rev = ""
    if not owner or not name:
        raise StorageURIError(
            f"Hub URI {shown!r} must name owner/repo",
            fix="write hf://owner/repo, hf://datasets/owner/repo, optionally @revision and /sub/folder",
        )
    if "@" in owner or ":" in owner:
        raise StorageURIError(
            f"Hub URI {shown!r} must not contain a token", fix="export HF_TOKEN instead of putting it in the URI"
        )
    for label, value in (("owner", owner), ("repo name", name)):
        if not _HF_NAME.match(value) or "--" in value or ".." in value:
            raise StorageURIError(
                f"{value!r} in {shown!r} is not a valid Hub {label}",
                fix="Hub names use letters, digits, '-', '_' and '.', at most 96 characters",
            )
    return StorageURI(
        scheme="hf",
        repo_type=repo_type,
        repo_id=f"{owner}/{name}",
        revision=rev or None,
        prefix=_clean_key_path(tail, "the folder", shown),
    )


# --------------------------------------------------------------------------- helpers


def clean_path(path: str, *, allow_empty: bool = True) -> str:
    """Validate a relative store path (`a/b/c`). Raises `ValueError` on `..`, absolute paths, `//`."""
    if not isinstance(path, str):
        raise ValueError(f"store paths are strings (got {type(path).__name__})")
    p = path.replace("\\", "/")
    if p.startswith("/"):
        raise ValueError(f"store path {path!r} must be relative to the storage root")
    p = p.strip("/")
    if not p:
        if allow_empty:
            return ""
        raise ValueError("empty store path")
    parts = p.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"store path {path!r} must not contain '//', '.' or '..' segments")
    return "/".join(parts)


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def under(path: str, prefix: str) -> bool:
    """Folder semantics: `a/b` is under `a/b` and `a`, not under `a/bc`."""
    return not prefix or path == prefix or path.startswith(prefix + "/")


def relative_to(path: str, prefix: str) -> str:
    if not prefix:
        return path
    if path == prefix:
        return PurePosixPath(path).name
    return path[len(prefix) + 1:]


def _normalise_pattern(pattern: str) -> str:
    pattern = pattern.replace("\\", "/").lstrip("/")
    if pattern.startswith("./"):
        pattern = pattern[2:]
    return pattern + "*" if pattern.endswith("/") else pattern


def matches(path: str, include: list[str] | None, exclude: list[str] | None) -> bool:
    """fnmatch on the path relative to the folder (`*` also crosses `/`, as in the Hub's
    allow/ignore patterns; a pattern ending in `/` means the whole folder). Kept when it
    matches an include (or there is none) and no exclude."""
    if include and not any(fnmatch.fnmatchcase(path, _normalise_pattern(p)) for p in include):
        return False
    if exclude and any(fnmatch.fnmatchcase(path, _normalise_pattern(p)) for p in exclude):
        return False
    return True


def file_digest(path: Path, algo: str) -> str:
    """Hex digest of a local file: `md5`, `sha256`, `sha1` or `git-sha1` (git blob id)."""
    if algo == "git-sha1":
        h = hashlib.sha1()
        h.update(b"blob %d\0" % path.stat().st_size)
    else:
        h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def is_disk_full(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def temp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}{TMP_MARKER}")


def is_temp_name(name: str) -> bool:
    return name.endswith(TMP_MARKER) or TMP_MARKER + "." in name


# --------------------------------------------------------------------------- progress


class _Progress:
    """Bytes and rate through rich, shared by all files of one transfer; a no-op when off."""

    def __init__(self, enabled: bool, label: str, total: int):
        self._bar = None
        self._lock = threading.Lock()
        if not enabled:
            return
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        from job.report import console

        self._bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False,
        )
        self._task = self._bar.add_task(label, total=total or None)
        self._bar.start()

    def advance(self, n: int) -> None:
        if self._bar is not None and n:
            with self._lock:
                self._bar.advance(self._task, n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _progress_enabled(progress: bool) -> bool:
    if not progress:
        return False
    from job.report import is_interactive

    return is_interactive()


# --------------------------------------------------------------------------- Storage


class Storage(abc.ABC):
    """One remote store rooted at a URI. See the module docstring for the guarantees."""

    scheme: str = ""

    def __init__(self, uri: StorageURI, *, retry: RetryPolicy | None = None, workers: int = 4,
                 hash_limit: int = DEFAULT_HASH_LIMIT):
        self.uri = uri
        self.retry = retry or RetryPolicy()
        self.workers = max(1, workers)
        self.hash_limit = hash_limit
        #: paths whose remote checksum proved not to describe the content (see `_download_one`)
        self._untrusted: set[str] = set()

    # ----- what backends implement

    @abc.abstractmethod
    def describe(self) -> str:
        """A display string for logs and reports; never contains a secret."""

    @abc.abstractmethod
    def _list(self, prefix: str) -> list[RemoteFile]:
        """Every file under `prefix` (folder semantics; "" = all), paths relative to the root."""

    @abc.abstractmethod
    def _stat(self, path: str) -> RemoteFile | None:
        """The file at `path`, or None if there is no file there."""

    def _exists(self, path: str) -> bool:
        return self._stat(path) is not None or bool(self._list(path))

    @abc.abstractmethod
    def _fetch(self, remote: RemoteFile, tmp: Path, advance: Advance) -> None:
        """Write the content of `remote` to `tmp` (a fresh path in the destination folder)."""

    @abc.abstractmethod
    def _put(self, src: Path, path: str, advance: Advance) -> None:
        """Store the local file `src` at `path`, atomically on the remote side."""

    def _put_many(self, items: list[tuple[Path, str]], advance: Advance) -> None:
        """Store several files; backends with atomic multi-file commits override this."""
        self._run_parallel(
            [(f"upload {path}", (lambda s=src, p=path: self._retrying(
                lambda: self._put(s, p, advance), f"upload {self.display(p)}"))) for src, path in items]
        )

    @abc.abstractmethod
    def _delete(self, path: str) -> None:
        """Remove the file at `path` or everything under the folder `path`; missing is fine."""

    def _prepare_upload(self) -> None:
        """Called once before an upload (the Hub creates the repo and branch here)."""

    def _classify(self, exc: BaseException, what: str) -> Problem:
        """Turn a backend exception into the user-facing error; say whether to retry."""
        return Problem(StorageError(f"{what} failed: {safe_text(str(exc)) or type(exc).__name__}"))

    def _local_matches(self, local: Path, remote: RemoteFile) -> bool | None:
        """Whether a local file has the remote content: True/False when a checksum could be
        compared, None when only the size is known (or the file is above `hash_limit`)."""
        if not remote.checksum or remote.size > self.hash_limit:
            return None
        algo, _, expected = remote.checksum.partition(":")
        if algo not in ("md5", "sha256", "sha1", "git-sha1"):
            return None
        return file_digest(local, algo) == expected

    # ----- public API

    def display(self, path: str = "") -> str:
        """`path` as a full URI for messages (`s3://bucket/prefix/path`)."""
        base = str(self.uri).rstrip("/")
        return f"{base}/{path}" if path else base

    def list(self, prefix: str = "") -> list[RemoteFile]:
        prefix = self._arg(prefix)
        files = self._retrying(lambda: self._list(prefix), f"list {self.display(prefix)}")
        return sorted(files, key=lambda f: f.path)

    def exists(self, path: str) -> bool:
        """True if a file exists at `path` or any file under the folder `path`."""
        path = self._arg(path)
        return bool(self._retrying(lambda: self._exists(path), f"check {self.display(path)}"))

    def stat(self, path: str) -> RemoteFile | None:
        path = self._arg(path, allow_empty=False)
        return self._retrying(lambda: self._stat(path), f"check {self.display(path)}")

    def download_file(self, path: str, dest: Path, *, progress: bool = True) -> Path:
        """Download one file to `dest` (atomically). Raises `RemoteNotFound` if absent."""
        path = self._arg(path, allow_empty=False)
        dest = Path(dest)
        remote = self.stat(path)
        if remote is None:
            raise RemoteNotFound(
                f"{self.display(path)} does not exist",
                fix=f"check the path; `{self.describe()}` is where it was looked for",
            )
        self._check_disk(dest.parent, remote.size, self.display(path))
        bar = _Progress(_progress_enabled(progress), PurePosixPath(path).name, remote.size)
        try:
            self._download_one(remote, dest, bar.advance)
        finally:
            bar.close()
        return dest

    def download_folder(self, prefix: str, dest: Path, include: list[str] | None = None,
                        exclude: list[str] | None = None, progress: bool = True) -> list[Path]:
        """Mirror the files under `prefix` (filtered by include/exclude patterns on their path
        relative to `prefix`) into `dest`; returns every matched local path, downloaded or
        already present. Files already present with the right size (and checksum, where
        cheap) are not downloaded again. Raises `RemoteNotFound` if nothing matches."""
        prefix = self._arg(prefix)
        dest = Path(dest)
        remote = self.list(prefix)
        plan: list[tuple[RemoteFile, Path]] = []
        for rf in remote:
            rel = relative_to(rf.path, prefix)
            if not matches(rel, include, exclude):
                continue
            plan.append((rf, self._local_target(dest, rel, rf.path)))
        if not plan:
            what = f"{len(remote)} file(s) there, none matching include={include} exclude={exclude}" \
                if remote else "no files there"
            raise RemoteNotFound(
                f"nothing to download from {self.display(prefix)}: {what}",
                fix="check the URI, the folder and the include/exclude patterns",
            )
        todo = [(rf, local) for rf, local in plan if not self._is_current(local, rf)]
        total = sum(rf.size for rf, _ in todo)
        log.info("%s: %d file(s), %d already present, %s to download", self.display(prefix),
                 len(plan), len(plan) - len(todo), human_bytes(total))
        started = time.monotonic()
        if todo:
            self._check_disk(dest, total, self.display(prefix))
            bar = _Progress(_progress_enabled(progress), f"download {self.display(prefix)}", total)
            try:
                self._run_parallel([(f"download {self.display(rf.path)}",
                                     (lambda r=rf, l=local: self._download_one(r, l, bar.advance)))
                                    for rf, local in todo])
            finally:
                bar.close()
        _event("storage.download", source=self.display(prefix), dest=str(dest), files=len(plan),
               downloaded=len(todo), bytes=total, seconds=round(time.monotonic() - started, 3))
        return [local for _, local in plan]

    def upload_file(self, src: Path, path: str, *, progress: bool = True) -> None:
        src = Path(src)
        path = self._arg(path, allow_empty=False)
        if not src.is_file():
            raise InputError(f"cannot upload {src}: not a file", fix="check the local path")
        self._prepare_upload()
        bar = _Progress(_progress_enabled(progress), f"upload {PurePosixPath(path).name}", src.stat().st_size)
        try:
            self._retrying(lambda: self._put(src, path, bar.advance), f"upload {self.display(path)}")
        finally:
            bar.close()

    def upload_folder(self, src: Path, prefix: str = "", include: list[str] | None = None,
                      exclude: list[str] | None = None, progress: bool = True) -> list[str]:
        """Upload the files under `src` (filtered by patterns on their path relative to `src`)
        to `prefix`. Files already there with the same size and checksum are skipped.
        Returns the store paths of every matched file. Not atomic across files on S3 or a
        local path: write a completion marker last (one more `upload_file`) when it matters."""
        src = Path(src)
        prefix = self._arg(prefix)
        if not src.is_dir():
            raise InputError(f"cannot upload {src}: not a folder", fix="check the local path")
        local: list[tuple[Path, str]] = []
        for root, dirs, files in os.walk(src):
            dirs[:] = sorted(d for d in dirs if not is_temp_name(d))
            for name in sorted(files):
                if is_temp_name(name):
                    continue
                p = Path(root) / name
                rel = p.relative_to(src).as_posix()
                if matches(rel, include, exclude):
                    local.append((p, join(prefix, rel)))
        if not local:
            log.warning("nothing to upload from %s (include=%s exclude=%s)", src, include, exclude)
            return []
        self._prepare_upload()
        existing = {rf.path: rf for rf in self.list(prefix)}
        todo = [(p, path) for p, path in local
                if not (path in existing and self._is_current(p, existing[path]))]
        total = sum(p.stat().st_size for p, _ in todo)
        log.info("%s -> %s: %d file(s), %d already there, %s to upload", src, self.display(prefix),
                 len(local), len(local) - len(todo), human_bytes(total))
        started = time.monotonic()
        if todo:
            bar = _Progress(_progress_enabled(progress), f"upload {self.display(prefix)}", total)
            try:
                self._put_many(todo, bar.advance)
            finally:
                bar.close()
        _event("storage.upload", source=str(src), dest=self.display(prefix), files=len(local),
               uploaded=len(todo), bytes=total, seconds=round(time.monotonic() - started, 3))
        return [path for _, path in local]

    def delete(self, path: str) -> None:
        """Delete the file at `path`, or every file under the folder `path`. Missing is not
        an error (rotation and markers can be retried). Deleting the root is refused."""
        path = self._arg(path, allow_empty=False)
        self._retrying(lambda: self._delete(path), f"delete {self.display(path)}")

    def close(self) -> None:
        """Release clients and connections (optional)."""

    def __enter__(self) -> "Storage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    # ----- shared machinery

    def _arg(self, path: str, allow_empty: bool = True) -> str:
        try:
            return clean_path(path, allow_empty=allow_empty)
        except ValueError as e:
            raise InputError(f"{e} (in {self.display()})", fix="use a relative path such as 'checkpoints/step-100'")

    def _local_target(self, dest: Path, rel: str, remote_path: str) -> Path:
        try:
            rel = clean_path(rel, allow_empty=False)
        except ValueError:
            raise StorageError(
                f"refusing to download {self.display(remote_path)}: its name would write outside {dest}",
                fix="rename the remote file",
            ) from None
        return dest.joinpath(*rel.split("/"))

    def _is_current(self, local: Path, remote: RemoteFile) -> bool:
        try:
            st = local.stat()
        except OSError:
            return False
        if not local.is_file() or st.st_size != remote.size:
            return False
        if remote.path in self._untrusted:
            return True
        same = self._local_matches(local, remote)
        return same is not False

    def _check_disk(self, folder: Path, needed: int, what: str) -> None:
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            free = shutil.disk_usage(probe).free
        except OSError:
            return
        if needed > free:
            raise EnvironmentProblem(
                f"not enough disk space for {what}: {human_bytes(needed)} needed, "
                f"{human_bytes(free)} free at {probe}",
                fix="free space on that volume or point the workspace at a larger one",
            )

    def _download_one(self, remote: RemoteFile, dest: Path, advance: Advance) -> None:
        what = f"download {self.display(remote.path)}"
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._disk_error(e, what, dest) if is_disk_full(e) else InputError(
                f"cannot create {dest.parent}: {e.strerror or e}", fix="check the destination folder") from e
        if dest.is_dir():
            raise InputError(f"cannot download {self.display(remote.path)} to {dest}: a folder is there",
                             fix="remove the folder or choose another destination")
        done = [0]
        mismatched: set[str] = set()  # sha256 of downloads that did not match the remote checksum

        def counted(n: int) -> None:
            done[0] += n
            advance(n)

        def attempt() -> None:
            if done[0]:
                advance(-done[0])  # a retry starts over: take the failed bytes back off the bar
                done[0] = 0
            tmp = temp_name(dest)
            try:
                self._fetch(remote, tmp, counted)
                size = tmp.stat().st_size
                if size != remote.size:
                    raise TransientFailure(f"got {size} bytes, expected {remote.size}")
                if remote.path not in self._untrusted and self._local_matches(tmp, remote) is False:
                    got = file_digest(tmp, "sha256")
                    if got not in mismatched:
                        mismatched.add(got)
                        raise TransientFailure(f"checksum mismatch (expected {remote.checksum})")
                    # Two downloads gave the same bytes: the remote checksum does not describe the
                    # content (e.g. the ETag of an encrypted object), the transfer is fine.
                    log.warning("%s: the store's checksum (%s) does not match the content; two identical "
                                "downloads agree, keeping it", self.display(remote.path), remote.checksum)
                    self._untrusted.add(remote.path)
                publish(tmp, dest)
            finally:
                _unlink_quiet(tmp)

        self._retrying(attempt, what, dest=dest)

    def _disk_error(self, exc: BaseException, what: str, dest: Path | None) -> EnvironmentProblem:
        where = f" at {dest.parent}" if dest is not None else ""
        return EnvironmentProblem(
            f"disk full during {what}{where}; the partial file was removed",
            fix="free space on that volume or point the workspace at a larger one, then run again",
        )

    def _retrying(self, fn: Callable[[], T], what: str, dest: Path | None = None) -> T:
        """Run `fn`, retrying transient failures under `self.retry`; translate the rest."""
        policy = self.retry
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except TrainerError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is classified below
                if is_disk_full(exc):
                    raise self._disk_error(exc, what, dest) from exc
                if isinstance(exc, TransientFailure):
                    problem = Problem(StorageError(f"{what} failed: {exc}", fix="run again; if it keeps failing, "
                                                   "the remote copy may be changing or damaged"), transient=True)
                else:
                    problem = self._classify(exc, what)
                delay = policy.delay(attempt)
                out_of_time = time.monotonic() - start + delay > policy.deadline
                if not problem.transient or attempt >= policy.attempts or out_of_time:
                    err = problem.error
                    if problem.transient and attempt > 1:
                        err.message += f" (gave up after {attempt} attempts)"
                        err.args = (err.message,)
                    if problem.transient and isinstance(err, StorageError):
                        err.gave_up = True
                    raise err from exc
                log.warning("%s failed (%s); retry %d/%d in %.1fs", what, _short(exc), attempt,
                            policy.attempts - 1, delay)
                time.sleep(delay)

    def _run_parallel(self, jobs: list[tuple[str, Callable[[], object]]]) -> None:
        """Run jobs on `self.workers` threads; on the first failure, cancel what has not
        started, wait for the rest, and raise that failure."""
        if len(jobs) <= 1 or self.workers == 1:
            for _, job in jobs:
                job()
            return
        first: BaseException | None = None
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="storage") as pool:
            futures = [pool.submit(job) for _, job in jobs]
            for fut in as_completed(futures):
                exc = fut.exception()
                if exc is not None and first is None:
                    first = exc
                    for other in futures:
                        other.cancel()
        if first is not None:
            raise first


def _event(name: str, **fields: object) -> None:
    from job.report import event

    event(name, **fields)


def safe_text(text: str) -> str:
    """An exception's text made fit for a message: credentials in URLs and registered
    secrets (tokens) replaced by `***`."""
    from job.report import scrub

    return scrub(_redact_url(text)).strip()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return safe_text(text[:200])


def _unlink_quiet(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(path, ignore_errors=True)
    except OSError as e:  # pragma: no cover - best effort cleanup
        log.debug("could not remove %s: %s", path, e)


@contextmanager
def atomic_target(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to `dest`; on success fsync it and rename it to `dest`;
    on failure remove it. Used by the local backend for uploads."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(dest)
    try:
        yield tmp
        publish(tmp, dest)
    finally:
        _unlink_quiet(tmp)


def publish(tmp: Path, dest: Path) -> None:
    """Make a fully written temporary file `dest`: fsync it, rename it, fsync the folder."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def copy_stream(src, dst_path: Path, advance: Advance, chunk: int = 1024 * 1024) -> None:
    """Copy a readable binary stream into a new file at `dst_path`, reporting bytes."""
    with open(dst_path, "wb") as out:
        while True:
            block = src.read(chunk)
            if not block:
                break
            out.write(block)
            advance(len(block))
        out.flush()


def iter_chunks(items: list[T], size: int) -> Iterable[list[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


# --------------------------------------------------------------------------- factory


def open_storage(uri: str, s3: S3Options | None = None, hf_token_env: str = "HF_TOKEN", *,
                 retry: RetryPolicy | None = None, workers: int = 4,
                 hash_limit: int = DEFAULT_HASH_LIMIT) -> Storage:
    """The `Storage` for `uri`. A malformed URI raises `InputError` (exit 2). Nothing is
    contacted here: the first operation reports unreachable endpoints or bad credentials.

    `s3` applies to `s3://` URIs (endpoint, region, addressing style); `hf_token_env` names
    the environment variable that holds the Hub token (read now, never logged); the Hub
    endpoint is `$HF_ENDPOINT` (read now) or https://huggingface.co."""
    try:
        parsed = parse_uri(uri)
    except StorageURIError as e:
        raise InputError(f"bad storage URI: {e.message}", fix=e.fix) from None
    common = dict(retry=retry, workers=workers, hash_limit=hash_limit)
    if parsed.scheme == "file":
        from job.storage.local import LocalStorage

        return LocalStorage(parsed, **common)
    if parsed.scheme == "s3":
        from job.storage.s3 import S3Storage

        return S3Storage(parsed, s3 or S3Options(), **common)
    from job.storage.hub import HubStorage

    return HubStorage(parsed, token_env=hf_token_env, **common)


__all__ = [
    "DEFAULT_HASH_LIMIT", "Problem", "RemoteFile", "RemoteNotFound", "RetryPolicy", "S3Options",
    "Storage", "StorageURI", "StorageURIError", "TransientFailure", "clean_path", "file_digest",
    "matches", "open_storage", "parse_uri",
]
