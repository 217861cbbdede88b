"""`s3://bucket/prefix` on AWS or any S3-compatible endpoint (MinIO, R2, B2, Ceph, ...).

Credentials come only from the standard AWS chain (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE, instance roles); nothing here
accepts or prints a key. Transfers go through boto3's transfer manager: multipart (and
parallel ranged GETs) above `multipart_threshold`, so multi-GB checkpoints upload in
parts and appear only once whole. botocore retries a request a few times itself
(`botocore_attempts`); the Storage retry policy retries whole operations on top.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

from job.errors import StorageError
from job.storage.base import (
    Advance, Problem, RemoteFile, RemoteNotFound, S3Options, Storage, StorageURI, iter_chunks, join,
    relative_to, safe_text, under,
)

MB = 1024 * 1024

_TRANSIENT_CODES = {
    "500", "502", "503", "504", "429", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestThrottled", "TooManyRequests",
    "BandwidthLimitExceeded", "OperationAborted",
}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "InvalidClientTokenId", "AuthorizationHeaderMalformed", "InvalidSecurity", "UnrecognizedClientException",
    "401",
}
_CREDENTIAL_FIX = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary "
                   "credentials) or AWS_PROFILE in the container's environment to keys valid for this endpoint")


class _Subscriber:
    """s3transfer subscriber: gives the known size/etag up front (no extra HEAD) and reports bytes."""

    def __init__(self, advance: Advance, size: int | None = None, etag: str | None = None):
        self._advance, self._size, self._etag = advance, size, etag

    def on_queued(self, future, **kwargs):
        if self._size is not None:
            future.meta.provide_transfer_size(self._size)
        if self._etag is not None:
            future.meta.provide_object_etag(f'"{self._etag}"')

    def on_progress(self, future, bytes_transferred, **kwargs):
        self._advance(bytes_transferred)

    def on_done(self, future, **kwargs):
        pass


class S3Storage(Storage):
    scheme = "s3"

    def __init__(self, uri: StorageURI, options: S3Options, *, multipart_threshold: int = 8 * MB,
                 multipart_chunksize: int = 64 * MB, max_concurrency: int = 8, botocore_attempts: int = 3,
                 connect_timeout: float = 10.0, read_timeout: float = 60.0, **kwargs):
        super().__init__(uri, **kwargs)
        assert uri.bucket is not None
        self.bucket: str = uri.bucket
        self.root: str = uri.prefix
        self.options = options
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self.max_concurrency = max_concurrency
        self.botocore_attempts = max(1, min(botocore_attempts, self.retry.attempts))
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._region: str | None = None
        # boto3 also honours AWS_ENDPOINT_URL(_S3) when no endpoint is given: say where we really go.
        self.endpoint: str | None = (options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                                     or os.environ.get("AWS_ENDPOINT_URL") or None)
        self._not_md5: set[str] = set()  # keys whose ETag turned out not to be an MD5 (SSE-KMS, SSE-C)

    # ----- setup

    def describe(self) -> str:
        where = self.endpoint or "AWS"
        region = self._region or self.options.region or "default region"
        return f"{self.display()} at {where} ({region}, {self.options.addressing_style} addressing)"

    @property
    def client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        session = boto3.session.Session()
        region = self.options.region or session.region_name or "us-east-1"
        self._region = region
        extra: dict[str, Any] = {}
        if self.endpoint:
            # Third-party S3 servers often reject the newer default integrity headers
            # (aws-chunked CRC trailers): only send/verify checksums when an API requires it.
            extra = dict(request_checksum_calculation="when_required",
                         response_checksum_validation="when_required")
        config = Config(
            region_name=region,
            retries={"mode": "standard", "total_max_attempts": self.botocore_attempts},
            s3={"addressing_style": self.options.addressing_style},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_pool_connections=max(10, self.max_concurrency * 2, self.workers * 2),
            **extra,
        )
        return session.client("s3", endpoint_url=self.options.endpoint_url, config=config)

    def transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
            num_download_attempts=2,
            use_threads=True,
            preferred_transfer_client="classic",
        )

    def _transfer_manager(self):
        from boto3.s3.transfer import create_transfer_manager

        return create_transfer_manager(self.client, self.transfer_config())

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # ----- operations

    def _key(self, path: str) -> str:
        return join(self.root, path)

    def _rel(self, key: str) -> str:
        return relative_to(key, self.root) if self.root else key

    def _record(self, key: str, size: int, etag: str | None) -> RemoteFile:
        etag = etag.strip('"') if etag else None
        checksum = None
        if etag:
            if "-" not in etag and len(etag) == 32:
                checksum = f"md5:{etag}"
            elif "-" in etag:
                checksum = f"s3-multipart:{etag}"
        return RemoteFile(path=self._rel(key), size=int(size), etag=etag, checksum=checksum)

    def _iter_objects(self, key_prefix: str):
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=key_prefix):
            yield from page.get("Contents", [])

    def _list(self, prefix: str) -> list[RemoteFile]:
        full = self._key(prefix)
        out = []
        for obj in self._iter_objects(full):
            key = obj["Key"]
            if key.endswith("/") or not under(key, full):
                continue  # folder markers made by consoles; siblings such as `ckpt-2` of `ckpt`
            if self.root and not under(key, self.root):
                continue
            out.append(self._record(key, obj["Size"], obj.get("ETag")))
        return out

    def _stat(self, path: str) -> RemoteFile | None:
        from botocore.exceptions import ClientError

        key = self._key(path)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                self._check_bucket()
                return None
            raise
        return self._record(key, head["ContentLength"], head.get("ETag"))

    def _check_bucket(self) -> None:
        """A HEAD 404 does not say whether the key or the bucket is missing: ask."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if _code(e) in ("404", "NoSuchBucket", "NotFound"):
                raise self._no_bucket() from e
            if _code(e) in ("403", "AccessDenied"):
                return  # may not list/head the bucket; the key is what is missing
            raise

    def _exists(self, path: str) -> bool:
        full = self._key(path)
        r = self.client.list_objects_v2(Bucket=self.bucket, Prefix=full, MaxKeys=1)
        if any(o["Key"] == full for o in r.get("Contents", [])):
            return True
        # Under the folder: any object but a console's folder marker ("dir/") counts.
        return any(not o["Key"].endswith("/") for o in self._iter_objects(full + "/"))

    def _fetch(self, remote: RemoteFile, tmp: Path, advance: Advance) -> None:
        with self._transfer_manager() as tm:
            fut = tm.download(self.bucket, self._key(remote.path), str(tmp),
                              subscribers=[_Subscriber(advance, remote.size, remote.etag)])
            fut.result()

    def _put(self, src: Path, path: str, advance: Advance) -> None:
        with self._transfer_manager() as tm:
            tm.upload(str(src), self.bucket, self._key(path), subscribers=[_Subscriber(advance)]).result()

    def _put_many(self, items: list[tuple[Path, str]], advance: Advance) -> None:
        # One transfer manager for the whole folder: its thread pool parallelises files and parts.
        failed: list[tuple[Path, str]] = []
        with self._transfer_manager() as tm:
            futures = [(src, path, tm.upload(str(src), self.bucket, self._key(path),
                                             subscribers=[_Subscriber(advance)]))
                       for src, path in items]
            for src, path, fut in futures:
                try:
                    fut.result()
                except Exception:  # noqa: BLE001 - retried (and classified) one by one below
                    failed.append((src, path))
        for src, path in failed:
            self._retrying(lambda s=src, p=path: self._put(s, p, advance), f"upload {self.display(path)}")

    def _delete(self, path: str) -> None:
        full = self._key(path)
        keys = [o["Key"] for o in self._iter_objects(full) if under(o["Key"].rstrip("/"), full)]
        for batch in iter_chunks(keys, 1000):
            r = self.client.delete_objects(Bucket=self.bucket,
                                           Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            errors = r.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"could not delete {len(errors)} object(s) under {self.display(path)}: "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}".rstrip(),
                    fix="check that the credentials may delete objects in this bucket",
                )

    # ----- checksums

    def _local_matches(self, local: Path, remote: RemoteFile) -> bool | None:
        if not remote.checksum or remote.size > self.hash_limit or remote.path in self._not_md5:
            return None
        algo, _, value = remote.checksum.partition(":")
        if algo == "md5":
            same = _md5(local) == value
            if not same and self._etag_not_md5(remote):
                return None
            return same
        if algo == "s3-multipart":
            # The part size is not recorded; try the ones we (and common tools) use. Only a match
            # proves anything: a miss may just be another part size.
            return True if self._multipart_etag_matches(local, value) else None
        return None

    def _etag_not_md5(self, remote: RemoteFile) -> bool:
        """SSE-KMS and SSE-C objects (on AWS) and encrypted objects on other S3 servers (MinIO
        with SSE-S3, ...) have ETags that are not the MD5 of the content."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(remote.path))
        except Exception:  # noqa: BLE001 - best effort; the mismatch then stands
            return False
        sse = head.get("ServerSideEncryption") or ""
        if sse.startswith("aws:kms") or head.get("SSECustomerAlgorithm") or (sse and self.endpoint):
            self._not_md5.add(remote.path)
            return True
        return False

    def _multipart_etag_matches(self, local: Path, etag: str) -> bool:
        from s3transfer.utils import ChunksizeAdjuster

        digest, _, parts = etag.rpartition("-")
        try:
            n_parts = int(parts)
        except ValueError:
            return False
        size = local.stat().st_size
        candidates = {ChunksizeAdjuster().adjust_chunksize(self.multipart_chunksize, size)}
        candidates.update(c * MB for c in (5, 8, 16, 64, 100, 128))
        for chunk in sorted(candidates):
            if chunk <= 0 or -(-size // chunk) != n_parts:
                continue
            md5s = []
            with open(local, "rb") as f:
                while block := f.read(chunk):
                    md5s.append(hashlib.md5(block).digest())
            if hashlib.md5(b"".join(md5s)).hexdigest() == digest:
                return True
        return False

    # ----- errors

    def _no_bucket(self) -> RemoteNotFound:
        return RemoteNotFound(
            f"bucket '{self.bucket}' does not exist at {self.endpoint or 'AWS'}",
            fix="create the bucket, or fix the bucket name, endpoint_url or region in the spec",
        )

    def _classify(self, exc: BaseException, what: str) -> Problem:
        from botocore import exceptions as bx

        try:
            from s3transfer.exceptions import RetriesExceededError
        except ImportError:  # pragma: no cover
            RetriesExceededError = ()  # type: ignore[assignment]
        endpoint = self.endpoint or "AWS"
        if isinstance(exc, RetriesExceededError) and getattr(exc, "last_exception", None) is not None:
            return self._classify(exc.last_exception, what)
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return Problem(StorageError(f"{what}: no S3 credentials found in the environment", fix=_CREDENTIAL_FIX))
        if isinstance(exc, bx.ClientError):
            code = _code(exc)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return Problem(self._no_bucket())
            if code in ("NoSuchKey", "404", "NotFound"):
                return Problem(RemoteNotFound(f"{what}: not found", fix="check the path and the URI"))
            if code in _CREDENTIAL_CODES:
                return Problem(StorageError(
                    f"{what}: {endpoint} rejected the S3 credentials ({code})", fix=_CREDENTIAL_FIX))
            if code in ("AccessDenied", "403", "AllAccessDisabled", "AccountProblem"):
                return Problem(StorageError(
                    f"{what}: access denied to bucket '{self.bucket}' ({code})",
                    fix="use credentials allowed to read/write this bucket and prefix, or fix the bucket name"))
            if code in ("PermanentRedirect", "301", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
                return Problem(StorageError(
                    f"{what}: bucket '{self.bucket}' is in another region ({code})",
                    fix="set the bucket's region in the spec's S3 settings"))
            if code in _TRANSIENT_CODES or (status and int(status) >= 500):
                return Problem(StorageError(f"{what}: {endpoint} is failing ({code})",
                                           fix="wait and run again; check the endpoint's status"), transient=True)
            if code == "PreconditionFailed":
                return Problem(StorageError(f"{what}: the object changed while it was being downloaded",
                                            fix="run again once the remote copy is stable"), transient=True)
            message = safe_text(exc.response.get("Error", {}).get("Message", ""))
            return Problem(StorageError(f"{what}: S3 error {code}: {message}".rstrip(": "),
                                        fix=f"check the bucket, prefix and permissions at {endpoint}"))
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ConnectTimeoutError,
                            bx.ReadTimeoutError, bx.ResponseStreamingError, bx.IncompleteReadError,
                            bx.HTTPClientError, ConnectionError, TimeoutError)):
            return Problem(StorageError(f"{what}: cannot reach {endpoint} ({type(exc).__name__})",
                                        fix="check the network and the endpoint_url"), transient=True)
        if isinstance(exc, bx.ParamValidationError):
            return Problem(StorageError(f"{what}: invalid request: {safe_text(str(exc))}"))
        return super()._classify(exc, what)


def _code(exc) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()
