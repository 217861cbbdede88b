"""Storage: one small interface over a local path, `hf://` Hub repos and `s3://` buckets.

    from job.storage import open_storage, S3Options
    store = open_storage("s3://bucket/runs/a", s3=S3Options(endpoint_url=..., region=...))
    store.download_folder("checkpoints/latest", workspace / "ckpt")
    store.upload_folder(out_dir, "checkpoints/step-100")

See `job.storage.base` for the guarantees (atomic downloads, skip-if-present, retries).
"""

from job.storage.base import (
    DEFAULT_HASH_LIMIT,
    RemoteFile,
    RemoteNotFound,
    RetryPolicy,
    S3Options,
    Storage,
    StorageURI,
    StorageURIError,
    matches,
    open_storage,
    parse_uri,
)

__all__ = [
    "DEFAULT_HASH_LIMIT", "RemoteFile", "RemoteNotFound", "RetryPolicy", "S3Options", "Storage",
    "StorageURI", "StorageURIError", "matches", "open_storage", "parse_uri",
]
