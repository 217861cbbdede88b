"""Fetch a spec given as a URL (`s3://`, `hf://`, `https://`) to a local file: used by entrypoint.sh.

    python -m job.fetch s3://bucket/specs/job.yaml /workspace/.trainer-spec.yaml
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

from job.errors import InputError, StorageError, TrainerError
from job.report import console
from job.workspace import atomic_write_bytes


def fetch(uri: str, dest: Path) -> Path:
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri, timeout=60) as response:  # noqa: S310 - the user's own spec URL
                atomic_write_bytes(dest, response.read())
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise StorageError(f"could not fetch the spec from {uri.split('?', 1)[0]}: {reason}",
                               "check the URL is reachable from this machine") from None
        return dest
    if uri.startswith(("s3://", "hf://")):
        from job.storage import open_storage

        parent, _, name = uri.rstrip("/").rpartition("/")
        if not name or parent.endswith(":/"):
            raise InputError(f"{uri!r} does not name a spec file", "give the URL of a .yaml file")
        with open_storage(parent) as store:
            store.download_file(name, dest, progress=False)
        return dest
    raise InputError(f"{uri!r} is not a URL trainer can fetch", "use s3://, hf:// or https://, or a path")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        console.print("usage: python -m job.fetch URL DEST")
        return 2
    try:
        fetch(argv[0], Path(argv[1]))
    except TrainerError as exc:
        console.print(f"[bold red]error[/bold red] {exc}")
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
