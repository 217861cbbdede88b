"""A local folder as a Storage (plain path or file:// URI).

Used for datasets and weights already on the machine (or a mounted volume) and for
"uploading" to another folder. Writes are atomic (temporary name, fsync, rename).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from job.errors import StorageError
from job.storage.base import (
    Advance, Problem, RemoteFile, Storage, StorageURI, atomic_target, copy_stream, file_digest,
    is_temp_name, join,
)


class LocalStorage(Storage):
    scheme = "file"

    def __init__(self, uri: StorageURI, **kwargs):
        super().__init__(uri, **kwargs)
        assert uri.path is not None
        self.root: Path = uri.path

    def describe(self) -> str:
        return f"local folder {self.root}"

    def _abs(self, path: str) -> Path:
        return self.root.joinpath(*path.split("/")) if path else self.root

    def _record(self, p: Path, rel: str) -> RemoteFile:
        st = p.stat()
        return RemoteFile(path=rel, size=st.st_size, etag=f"{st.st_mtime_ns:x}-{st.st_size:x}")

    def _list(self, prefix: str) -> list[RemoteFile]:
        base = self._abs(prefix)
        if base.is_file():
            return [self._record(base, prefix)]
        if not base.is_dir():
            return []
        out = []
        # Follow symlinked folders (datasets are often assembled that way), but not a link
        # back to one of its own ancestors (that would loop forever).
        for root, dirs, files in os.walk(base, followlinks=True):
            here = os.path.realpath(root)
            keep = []
            for d in dirs:
                real = os.path.realpath(os.path.join(root, d))
                if not is_temp_name(d) and not (here == real or here.startswith(real + os.sep)):
                    keep.append(d)
            dirs[:] = keep
            for name in files:
                if is_temp_name(name):
                    continue
                p = Path(root) / name
                if p.is_file():
                    out.append(self._record(p, join(prefix, p.relative_to(base).as_posix())))
        return out

    def _stat(self, path: str) -> RemoteFile | None:
        p = self._abs(path)
        return self._record(p, path) if p.is_file() else None

    def _exists(self, path: str) -> bool:
        p = self._abs(path)
        if p.is_file():
            return True
        return p.is_dir() and any(True for _ in self._list(path))

    def _local_matches(self, local: Path, remote: RemoteFile) -> bool | None:
        # Both sides are local: compare content when small enough to be cheap.
        if remote.size > self.hash_limit:
            return None
        src = self._abs(remote.path)
        try:
            if os.path.samefile(src, local):
                return True
        except OSError:
            pass
        return file_digest(local, "sha256") == file_digest(src, "sha256")

    def _fetch(self, remote: RemoteFile, tmp: Path, advance: Advance) -> None:
        with open(self._abs(remote.path), "rb") as src:
            copy_stream(src, tmp, advance)
        shutil.copystat(self._abs(remote.path), tmp)

    def _put(self, src: Path, path: str, advance: Advance) -> None:
        dest = self._abs(path)
        if dest.is_dir():
            raise StorageError(f"cannot write {dest}: a folder is there", fix="choose another path")
        with atomic_target(dest) as tmp, open(src, "rb") as f:
            copy_stream(f, tmp, advance)
            shutil.copystat(src, tmp)

    def _delete(self, path: str) -> None:
        p = self._abs(path)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()

    def _classify(self, exc: BaseException, what: str) -> Problem:
        if isinstance(exc, FileNotFoundError):
            return Problem(StorageError(f"{what} failed: {exc.filename or exc} does not exist",
                                        fix="check the local path"))
        if isinstance(exc, PermissionError):
            return Problem(StorageError(f"{what} failed: permission denied on {exc.filename or self.root}",
                                        fix="check the folder's owner and permissions"))
        if isinstance(exc, OSError):
            return Problem(StorageError(f"{what} failed: {exc.strerror or exc}", fix="check the local path"))
        return super()._classify(exc, what)
