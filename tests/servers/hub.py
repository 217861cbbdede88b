"""A small stand-in for the Hugging Face Hub HTTP API, for tests (127.0.0.1 only).

Why a stand-in: the PyPI package `hf-local-hub` (3.0.0) is only a CLI/client around a
Go server binary that its wheel does not ship, so it cannot serve anything here.

This server keeps repos in memory as real commits (each commit a full snapshot) and
speaks the subset of the Hub API that huggingface_hub uses for:

  create_repo / create_branch / repo_info (model_info, dataset_info)
  list_repo_tree, list_repo_files, get_paths_info
  preupload + commit (files are always "regular": sent base64 inside the commit, no LFS)
  hf_hub_download / snapshot_download (`resolve/{rev}/{path}` with ETag, X-Repo-Commit,
  Content-Length and Range), validate-yaml (accepts everything), whoami-v2

Errors are the Hub's: 401/404 with `X-Error-Code: RepoNotFound` for missing or private
repos, `RevisionNotFound`, `EntryNotFound`, and 401 with `X-Error-Message: Invalid
credentials in Authorization header` for an unknown token, so huggingface_hub raises the
same exception classes as against the real Hub. Content round-trips byte for byte.

Test hooks: `requests` (every request seen), `fail_next(n, status, match)` for
transient failures, `tokens` (token -> write allowed).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_TOKEN = "hf_testwritetoken0123456789"
READ_TOKEN = "hf_testreadtoken0123456789"
INITIAL_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    message: str
    parent: str | None


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    owner_token: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        return None


@dataclass
class Seen:
    method: str
    path: str
    query: str
    status: int = 0


class HubServer:
    """Start with `start()`; `url` is the endpoint to give HF_ENDPOINT. Stop with `stop()`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self.tokens: dict[str, bool] = {DEFAULT_TOKEN: True, READ_TOKEN: False}  # token -> may write
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[Seen] = []
        #: files at least this big are described as LFS files (tree `lfs` info with sha256,
        #: `X-Linked-Etag`), as the Hub does for large files; None: all files are plain git blobs
        self.lfs_threshold: int | None = None
        self._failures: list[tuple[int, str | None, str | None]] = []  # (status, path substring, method)
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----- lifecycle

    def start(self) -> "HubServer":
        server = ThreadingHTTPServer((self.host, self.port), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ----- test hooks

    def reset(self) -> None:
        with self._lock:
            self.repos.clear()
            self.requests.clear()
            self.lfs_threshold = None
            self._failures.clear()

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def count(self, method: str | None = None, contains: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests
                       if (method is None or r.method == method) and (contains is None or contains in r.path))

    def fail_next(self, n: int = 1, status: int = 503, match: str | None = None, method: str | None = None) -> None:
        """The next `n` requests (whose path contains `match`, with `method`) get `status`."""
        with self._lock:
            self._failures.extend([(status, match, method)] * n)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def commit_files(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model",
                     branch: str = "main", message: str = "direct commit") -> Commit:
        """Commit `files` directly (no HTTP), as another writer would."""
        with self._lock:
            return self._apply_commit(self.repos[(repo_type, repo_id)], branch, dict(files), set(), set(), message)

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False,
                    files: dict[str, bytes] | None = None, token: str = DEFAULT_TOKEN) -> Repo:
        """Make a repo directly (no HTTP), optionally with a first commit of `files`."""
        with self._lock:
            repo = self._new_repo(repo_type, repo_id, private, token)
            if files:
                self._apply_commit(repo, "main", {p: d for p, d in files.items()}, set(), set(), "seed")
            return repo

    def head(self, repo_id: str, repo_type: str = "model", branch: str = "main") -> Commit:
        repo = self.repos[(repo_type, repo_id)]
        return repo.commits[repo.branches[branch]]

    # ----- state changes (under the lock)

    def _new_repo(self, repo_type: str, repo_id: str, private: bool, token: str) -> Repo:
        repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, owner_token=token)
        first = Commit(oid=_oid(), files={".gitattributes": INITIAL_GITATTRIBUTES}, message="initial commit",
                       parent=None)
        repo.commits[first.oid] = first
        repo.branches["main"] = first.oid
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def _apply_commit(self, repo: Repo, branch: str, adds: dict[str, bytes], deleted_files: set[str],
                      deleted_folders: set[str], message: str) -> Commit:
        parent = repo.commits[repo.branches[branch]]
        files = dict(parent.files)
        for path in deleted_files:
            files.pop(path, None)
        for folder in deleted_folders:
            folder = folder.rstrip("/")
            for path in [p for p in files if p == folder or p.startswith(folder + "/")]:
                del files[path]
        files.update(adds)
        commit = Commit(oid=_oid(), files=files, message=message, parent=parent.oid)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit


def _oid() -> str:
    return hashlib.sha1(uuid.uuid4().bytes).hexdigest()


class _Reply(Exception):
    def __init__(self, status: int, body: object = None, headers: dict[str, str] | None = None):
        self.status, self.body, self.headers = status, body, headers or {}


def _error(status: int, code: str | None, message: str) -> _Reply:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return _Reply(status, {"error": message}, headers)


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "FakeHub/1.0"
        disable_nagle_algorithm = True  # headers and body go out in separate writes

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

        # ----- plumbing

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, body: object = None, headers: dict[str, str] | None = None,
                  head_only: bool = False) -> None:
            if isinstance(body, (bytes, bytearray)):
                data = bytes(body)
                ctype = "application/octet-stream"
            elif body is None:
                data, ctype = b"", "text/plain"
            else:
                data, ctype = json.dumps(body).encode(), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if not headers or "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head_only and data:
                self.wfile.write(data)

        def _handle(self, method: str) -> None:
            split = urlsplit(self.path)
            seen = Seen(method, split.path, split.query)
            with hub._lock:
                hub.requests.append(seen)
                injected = None
                for i, (status, match, meth) in enumerate(hub._failures):
                    if (match is None or match in split.path) and (meth is None or meth == method):
                        injected = status
                        del hub._failures[i]
                        break
            body = self._body() if method in ("POST", "PUT", "DELETE") else b""
            if injected is not None:
                seen.status = injected
                self._send(injected, {"error": "injected failure"}, head_only=method == "HEAD")
                return
            try:
                status, payload, headers = self._route(method, split.path, parse_qs(split.query), body)
            except _Reply as r:
                status, payload, headers = r.status, r.body, r.headers
            except Exception as e:  # a bug in the stand-in: say so loudly
                status, payload, headers = 500, {"error": f"fake hub bug: {e!r}"}, {}
            seen.status = status
            self._send(status, payload, headers, head_only=method == "HEAD")

        def do_GET(self) -> None:
            self._handle("GET")

        def do_HEAD(self) -> None:
            self._handle("HEAD")

        def do_POST(self) -> None:
            self._handle("POST")

        def do_PUT(self) -> None:
            self._handle("PUT")

        def do_DELETE(self) -> None:
            self._handle("DELETE")

        # ----- auth

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization") or ""
            if not auth.lower().startswith("bearer "):
                return None
            token = auth[7:].strip()
            if token not in hub.tokens:
                raise _error(401, None, "Invalid credentials in Authorization header")
            return token

        def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> Repo:
            token = self._token()
            repo = hub.repos.get((repo_type, repo_id))
            if repo is None or (repo.private and token is None):
                raise _error(401 if token is None else 404, "RepoNotFound", "Repository not found")
            if write:
                if token is None:
                    raise _error(401, None, "You must be authenticated to write")
                if not hub.tokens[token]:
                    raise _error(403, None, "You don't have the rights to write to this repo (read-only token)")
            return repo

        def _commit_for(self, repo: Repo, revision: str) -> Commit:
            commit = repo.resolve(revision)
            if commit is None:
                raise _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return commit

        # ----- routes

        def _route(self, method: str, path: str, query: dict, body: bytes):
            parts = path.split("/")[1:]  # raw (still %-encoded) segments
            with hub._lock:
                if parts[:2] == ["api", "whoami-v2"]:
                    token = self._token()
                    if token is None:
                        raise _error(401, None, "Invalid credentials in Authorization header")
                    return 200, {"type": "user", "name": "tester", "auth": {"type": "access_token"}}, {}
                if parts[:2] == ["api", "validate-yaml"] and method == "POST":
                    return 200, {"errors": [], "warnings": []}, {}
                if parts[:3] == ["api", "repos", "create"] and method == "POST":
                    return self._create_repo(json.loads(body or b"{}"))
                if len(parts) >= 4 and parts[0] == "api" and parts[1] in ("models", "datasets"):
                    repo_type = parts[1][:-1]
                    repo_id = f"{unquote(parts[2])}/{unquote(parts[3])}"
                    return self._api(method, repo_type, repo_id, parts[4:], query, body)
                # /{datasets/}owner/name/resolve/{rev}/{path...}
                repo_type = "model"
                if parts and parts[0] == "datasets":
                    repo_type, parts = "dataset", parts[1:]
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo = self._repo(repo_type, f"{unquote(parts[0])}/{unquote(parts[1])}")
                    commit = self._commit_for(repo, unquote(parts[3]))
                    return self._resolve(method, repo, commit, unquote("/".join(parts[4:])))
            raise _error(404, None, f"no route for {method} {path}")

        def _create_repo(self, payload: dict):
            token = self._token()
            if token is None:
                raise _error(401, None, "You must be authenticated to create a repo")
            if not hub.tokens[token]:
                raise _error(403, None, "read-only token")
            name, org = payload.get("name"), payload.get("organization")
            repo_type = payload.get("type") or "model"
            repo_id = f"{org or 'tester'}/{name}"
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            url = f"{hub.url}/{prefix}{repo_id}"
            if (repo_type, repo_id) in hub.repos:
                # like the Hub: 409, with the repo's url in the body (create_repo(exist_ok=True) reads it)
                return 409, {"error": "You already created this repo", "url": url}, {
                    "X-Error-Message": "You already created this repo"}
            private = bool(payload.get("private")) or payload.get("visibility") in ("private", "protected")
            hub._new_repo(repo_type, repo_id, private, token)
            return 200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex}, {}

        def _api(self, method: str, repo_type: str, repo_id: str, rest: list[str], query: dict, body: bytes):
            if not rest and method == "GET":
                repo = self._repo(repo_type, repo_id)
                return 200, self._info(repo, self._commit_for(repo, "main")), {}
            action = rest[0] if rest else ""
            if action == "revision" and len(rest) >= 2 and method == "GET":
                repo = self._repo(repo_type, repo_id)
                return 200, self._info(repo, self._commit_for(repo, unquote("/".join(rest[1:])))), {}
            if action == "tree" and len(rest) >= 2 and method == "GET":
                repo = self._repo(repo_type, repo_id)
                commit = self._commit_for(repo, unquote(rest[1]))
                folder = unquote("/".join(rest[2:])).strip("/")
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return 200, self._tree(commit, folder, recursive), {}
            if action == "paths-info" and len(rest) >= 2 and method == "POST":
                repo = self._repo(repo_type, repo_id)
                commit = self._commit_for(repo, unquote(rest[1]))
                form = parse_qs(body.decode())
                paths = form.get("paths", [])
                return 200, [e for p in paths if (e := self._entry(commit, p.strip("/"))) is not None], {}
            if action == "preupload" and len(rest) >= 2 and method == "POST":
                repo = self._repo(repo_type, repo_id, write=True)
                commit = self._commit_for(repo, unquote(rest[1]))
                files = json.loads(body)["files"]
                return 200, {"files": [{
                    "path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                    "oid": git_blob_sha1(commit.files[f["path"]]) if f["path"] in commit.files else None,
                } for f in files]}, {}
            if action == "commit" and len(rest) >= 2 and method == "POST":
                repo = self._repo(repo_type, repo_id, write=True)
                return self._commit(repo, unquote(rest[1]), body)
            if action == "branch" and len(rest) >= 2 and method == "POST":
                repo = self._repo(repo_type, repo_id, write=True)
                branch = unquote("/".join(rest[1:]))
                if branch in repo.branches:
                    raise _error(409, None, f"Branch {branch} already exists")
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                repo.branches[branch] = self._commit_for(repo, start).oid
                return 200, {}, {}
            if action == "refs" and method == "GET":
                repo = self._repo(repo_type, repo_id)
                return 200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o}
                                          for b, o in repo.branches.items()], "tags": [], "converts": []}, {}
            raise _error(404, None, f"no route for {method} api/{repo_type}s/{repo_id}/{'/'.join(rest)}")

        # ----- views

        def _info(self, repo: Repo, commit: Commit) -> dict:
            return {
                "id": repo.repo_id, "_id": uuid.uuid5(uuid.NAMESPACE_URL, repo.repo_id).hex,
                "author": repo.repo_id.split("/")[0], "sha": commit.oid, "private": repo.private,
                "gated": False, "disabled": False, "lastModified": "2025-01-01T00:00:00.000Z",
                "tags": [], "downloads": 0, "likes": 0,
                "siblings": [{"rfilename": p, "size": len(d)} for p, d in sorted(commit.files.items())],
            }

        def _entry(self, commit: Commit, path: str) -> dict | None:
            if path in commit.files:
                data = commit.files[path]
                entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
                if self._is_lfs(data):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                return entry
            if any(p.startswith(path + "/") for p in commit.files):
                return {"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0}
            return None

        def _is_lfs(self, data: bytes) -> bool:
            return hub.lfs_threshold is not None and len(data) >= hub.lfs_threshold

        def _tree(self, commit: Commit, folder: str, recursive: bool) -> list[dict]:
            if folder and not any(p.startswith(folder + "/") for p in commit.files):
                raise _error(404, "EntryNotFound", f"{folder} does not exist on this revision")
            entries: dict[str, dict] = {}
            base = folder + "/" if folder else ""
            for path in sorted(commit.files):
                if not path.startswith(base):
                    continue
                rel_parts = path[len(base):].split("/")
                # every intermediate folder (recursive) or just the first level
                depth = len(rel_parts) if recursive else 1
                for i in range(1, min(depth, len(rel_parts) - 1) + 1):
                    d = base + "/".join(rel_parts[:i])
                    entries.setdefault(d, self._entry(commit, d))  # type: ignore[arg-type]
                if recursive or len(rel_parts) == 1:
                    entries[path] = self._entry(commit, path)  # type: ignore[assignment]
            return list(entries.values())

        def _resolve(self, method: str, repo: Repo, commit: Commit, path: str):
            if path not in commit.files:
                raise _error(404, "EntryNotFound", f"{path} does not exist on this revision")
            data = commit.files[path]
            headers = {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": commit.oid,
                       "Accept-Ranges": "bytes"}
            if self._is_lfs(data):  # the Hub names LFS content by its sha256
                headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
                headers["X-Linked-Size"] = str(len(data))
            rng = self.headers.get("Range")
            if method == "GET" and rng and rng.startswith("bytes="):
                start_s, _, end_s = rng[len("bytes="):].partition("-")
                start = int(start_s or 0)
                end = int(end_s) if end_s else len(data) - 1
                part = data[start:end + 1]
                headers["Content-Range"] = f"bytes {start}-{start + len(part) - 1}/{len(data)}"
                return 206, part, headers
            if method == "HEAD":
                headers["Content-Length"] = str(len(data))
                return 200, None, headers
            return 200, data, headers

        def _commit(self, repo: Repo, revision: str, body: bytes):
            branch = revision
            if branch not in repo.branches:
                raise _error(404, "RevisionNotFound", f"Invalid rev id: {revision} (commits go to branches)")
            adds: dict[str, bytes] = {}
            deleted_files: set[str] = set()
            deleted_folders: set[str] = set()
            summary = ""
            current = repo.commits[repo.branches[branch]]
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    summary = value.get("summary", "")
                    parent = value.get("parentCommit")
                    if parent and parent != current.oid:
                        raise _error(412, None, "parent commit is not the head of the branch")
                elif key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise _error(400, None, "only base64 file content is supported")
                    adds[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if value["path"] not in current.files:
                        raise _error(404, "EntryNotFound", f"A file with this name doesn't exist: {value['path']}")
                    deleted_files.add(value["path"])
                elif key == "deletedFolder":
                    deleted_folders.add(value["path"])
                else:  # lfsFile, copies: this stand-in never asks for LFS
                    raise _error(400, None, f"unsupported commit operation {key!r} in the fake hub")
            commit = hub._apply_commit(repo, branch, adds, deleted_files, deleted_folders, summary)
            prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
            return 200, {"success": True, "commitOid": commit.oid,
                         "commitUrl": f"{hub.url}/{prefix}{repo.repo_id}/commit/{commit.oid}",
                         "hookOutput": ""}, {}

    return Handler


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll `predicate` until true or `timeout` seconds (bounded; for tests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


__all__ = ["DEFAULT_TOKEN", "READ_TOKEN", "HubServer", "git_blob_sha1", "wait_until"]
