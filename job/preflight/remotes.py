"""Are the spec's remote stores reachable, and do the credentials work?

One cheap authenticated call per remote through `job.storage` (a listing of the source: it
also tells the download size for the disk check; an existence probe for `output.push_to`),
with a short retry policy so an unreachable endpoint costs seconds, not the storage layer's
default 15 minutes. Messages come from the storage layer, which never includes secrets.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

from job.errors import TrainerError

#: Retries for preflight probes: two attempts within about 20 seconds.
PROBE_ATTEMPTS = 2
PROBE_DEADLINE_S = 20.0


@dataclass
class RemoteTarget:
    role: str          # e.g. "model", "dataset clips", "output.push_to"
    uri: str
    kind: str          # "source" (read and download) or "destination" (write)


@dataclass
class RemoteResult:
    target: RemoteTarget
    status: str        # ok / warn / fail
    detail: str
    fix: str | None = None
    size: int | None = None   # bytes that a pull would download (sources, when listed)
    files: int | None = None
    clips: int | None = None  # video files among them


def as_uri(location: str, local_exists: bool, allow_bare_repo: bool = True) -> str | None:
    """The storage URI of a spec location, or None when it is local. A bare `owner/repo` that
    is not a local folder means the Hub where the spec allows it (models; as `Workspace` does)."""
    if location.startswith(("hf://", "s3://")):
        return location
    if allow_bare_repo and re.fullmatch(r"[\w.-]+/[\w.-]+", location) and not local_exists:
        return f"hf://{location}"  # a bare owner/repo means the Hub
    return None


def remote_targets(spec, ws) -> list[RemoteTarget]:
    out: list[RemoteTarget] = []
    seen: set[str] = set()

    def add(role: str, location: str | None, kind: str, bare: bool = True) -> None:
        if not location:
            return
        uri = as_uri(location, ws.resolve(location.removeprefix("file://")).exists(), bare)
        if uri is None or (uri, kind) in seen:
            return
        seen.add((uri, kind))
        out.append(RemoteTarget(role, uri, kind))

    add("model", spec.model.pretrained_model_name_or_path, "source")
    add("vae", spec.model.pretrained_vae_model_name_or_path, "source")
    for ds in spec.data.active():
        add(f"dataset {ds.id}", ds.source, "source", bare=False)
    if spec.train.crepa.enabled:
        add("crepa encoder", spec.train.crepa.encoder_path, "source")
    resume = spec.checkpoints.resume_from_checkpoint
    if resume not in ("latest", "none"):
        add("resume checkpoint", resume, "source", bare=False)
    add("output.push_to", spec.output.push_to, "destination", bare=False)
    return out


def _default_opener(spec) -> Callable:
    from job.storage import RetryPolicy, S3Options, open_storage

    s3 = spec.storage.s3
    options = S3Options(endpoint_url=s3.endpoint_url, region=s3.region, addressing_style=s3.addressing_style)
    policy = RetryPolicy(attempts=PROBE_ATTEMPTS, base_delay=0.5, max_delay=2.0, deadline=PROBE_DEADLINE_S)

    def opener(uri: str):
        return open_storage(uri, s3=options, retry=policy, workers=1)

    return opener


def probe(target: RemoteTarget, opener: Callable) -> RemoteResult:
    """One authenticated call. Sources are listed (size for the disk check); a destination is
    probed for existence (a missing Hub repo is created at the first upload, with a token)."""
    try:
        store = opener(target.uri)
    except TrainerError as exc:
        return RemoteResult(target, "fail", exc.message, exc.fix)
    try:
        if target.kind == "source":
            files = store.list("")
            if not files:
                return RemoteResult(target, "fail", f"{target.uri} is reachable but empty",
                                    "check the URI and the folder inside it")
            from .resources import VIDEO_EXTENSIONS

            size = sum(f.size for f in files)
            clips = sum(1 for f in files if os.path.splitext(f.path)[1].lower() in VIDEO_EXTENSIONS)
            shown = f"{len(files)} file(s)" + (f", {clips} video(s)" if target.role.startswith("dataset") else "")
            return RemoteResult(target, "ok", f"{target.uri}: {shown}, {size / 1024 ** 3:.1f} GiB",
                                size=size, files=len(files), clips=clips)
        # destination
        if target.uri.startswith("hf://") and not os.environ.get("HF_TOKEN"):
            return RemoteResult(target, "fail", f"publishing to {target.uri} needs a Hub token and $HF_TOKEN is not set",
                                "export HF_TOKEN=<a token with write access> (https://huggingface.co/settings/tokens)")
        # S3: one list call with MaxKeys=1. Hub: the repo tree (resolves the repo with the token).
        exists = bool(store.list("")) if target.uri.startswith("hf://") else store.exists("")
        detail = (f"{target.uri} is reachable" + ("" if exists else " (empty; it is filled at the first upload)")
                  + "; read access checked, write access is checked by the first upload")
        return RemoteResult(target, "ok", detail)
    except TrainerError as exc:
        from job.storage import RemoteNotFound

        if isinstance(exc, RemoteNotFound) and target.kind == "destination" and target.uri.startswith("hf://"):
            return RemoteResult(target, "warn", f"{target.uri} does not exist yet; it will be created (private) at the first upload",
                                "nothing to do if HF_TOKEN has write access to that namespace")
        return RemoteResult(target, "fail", exc.message, exc.fix)
    except Exception as exc:  # noqa: BLE001 - a storage bug must not kill preflight; say what happened
        return RemoteResult(target, "fail", f"{target.uri}: {type(exc).__name__}: {str(exc)[:200]}",
                            "check the URI, the network and the credentials")
    finally:
        try:
            store.close()
        except Exception:  # noqa: BLE001
            pass


def check_remotes(spec, ws, opener: Callable | None = None) -> list[RemoteResult]:
    opener = opener or _default_opener(spec)
    return [probe(t, opener) for t in remote_targets(spec, ws)]
