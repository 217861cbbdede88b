"""The background checkpoint uploader and remote resume, against a real S3 server on 127.0.0.1."""

from __future__ import annotations

import time

import pytest
from upload_helpers import fake_checkpoint, load, smoke_spec_data, tree

from job.storage import open_storage
from job.train.checkpoints import COMPLETE, CheckpointStore
from job.upload.checkpoints import CheckpointUploader, upload_checkpoint
from job.upload.remote import newest_complete, open_push_store, remote_checkpoints
from job.upload.resume import fetch_newer_remote_checkpoint


def _job(tmp_path, s3_bucket, endpoint, **overrides):
    return load(smoke_spec_data(tmp_path / "ws", f"s3://{s3_bucket}/run", endpoint, **overrides))


def _wait_for(condition, what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def test_checkpoints_upload_marker_last_and_rotate(tmp_path, s3_bucket, s3_options, fast_push, s3_env):
    loaded, ws = _job(tmp_path, s3_bucket, s3_options.endpoint_url, **{"checkpoints.total_limit": 2})
    uploader = CheckpointUploader(loaded.spec)
    for step in (3, 6, 9):
        uploader.submit(fake_checkpoint(ws, step), step)
        assert uploader.drain(timeout=30)
    uploader.close()
    assert uploader.uploaded == [3, 6, 9]
    with open_push_store(loaded.spec) as store:
        found = remote_checkpoints(store)
        assert [(c.step, c.complete) for c in found] == [(6, True), (9, True)]  # total_limit 2, oldest removed
        store.download_folder("checkpoints/step_000009", tmp_path / "back", progress=False)
    assert tree(tmp_path / "back") == tree(ws.checkpoints_dir / "step_000009")
    # The marker was the last object written for each checkpoint.
    puts = [r.path for r in s3_env.requests if r.method == "PUT" and "step_000009" in r.path]
    assert len(puts) == 4 and puts[-1].endswith("step_000009/COMPLETE"), puts


def test_store_down_newest_wins_and_catches_up(tmp_path, s3_bucket, s3_proxy, fast_push, s3_env):
    loaded, ws = _job(tmp_path, s3_bucket, s3_proxy.url)
    uploader = CheckpointUploader(loaded.spec, retry_interval=0.2)
    s3_proxy.set_up(False)
    for step in (1, 2, 3):
        uploader.submit(fake_checkpoint(ws, step), step)
        _wait_for(lambda: step in uploader.failed, f"the failed upload of step {step}")
    assert uploader.uploaded == [] and s3_proxy.refused > 0
    s3_proxy.set_up(True)
    # No drain: the failed newest checkpoint is retried on its own once the store is back.
    _wait_for(lambda: uploader.uploaded == [3], "the retried upload")
    assert uploader.drain(timeout=30) and uploader.outstanding() is None
    uploader.close()
    assert uploader.uploaded == [3]  # 1 and 2 were replaced by newer ones while the store was down
    with open_push_store(loaded.spec) as store:
        assert [(c.step, c.complete) for c in remote_checkpoints(store)] == [(3, True)]


def test_a_failed_upload_is_reported_and_drain_does_not_hang(tmp_path, s3_bucket, s3_proxy, fast_push):
    loaded, ws = _job(tmp_path, s3_bucket, s3_proxy.url)
    uploader = CheckpointUploader(loaded.spec, retry_interval=3600)
    s3_proxy.set_up(False)
    folder = fake_checkpoint(ws, 5)
    uploader.submit(folder, 5)
    assert uploader.drain(timeout=60) is False  # one more try, then it gives up (no 1-hour wait)
    uploader.close()
    assert "checkpoint step 5 was not uploaded" in uploader.outstanding()
    assert (folder / COMPLETE).is_file()  # the local checkpoint is kept


def test_incomplete_remote_checkpoint_is_never_used_for_resume(tmp_path, s3_bucket, s3_options, fast_push):
    loaded, ws = _job(tmp_path, s3_bucket, s3_options.endpoint_url)
    source = load(smoke_spec_data(tmp_path / "other", None))[1]
    with open_push_store(loaded.spec) as store:
        upload_checkpoint(store, fake_checkpoint(source, 4), 4)
        # step 8: every file, but the marker never arrived (the upload was cut off)
        store.upload_folder(fake_checkpoint(source, 8), "checkpoints/step_000008", exclude=[COMPLETE], progress=False)
        assert newest_complete(store).step == 4
    got = fetch_newer_remote_checkpoint(loaded.spec, ws)
    assert got == ws.checkpoints_dir / "step_000004"
    assert CheckpointStore(ws.checkpoints_dir).latest() == got
    assert tree(got) == {k: v for k, v in tree(source.checkpoints_dir / "step_000004").items() if k != COMPLETE} | {COMPLETE: (got / COMPLETE).read_bytes()}
    assert not (ws.checkpoints_dir / "step_000008").exists()
    # A newer complete local checkpoint wins over the remote one: nothing is downloaded.
    fake_checkpoint(ws, 6)
    assert fetch_newer_remote_checkpoint(loaded.spec, ws) is None


def test_resume_none_never_looks_at_the_store(tmp_path, s3_bucket, s3_proxy, fast_push):
    loaded, ws = _job(tmp_path, s3_bucket, s3_proxy.url, **{"checkpoints.resume_from_checkpoint": "none"})
    s3_proxy.set_up(False)
    assert fetch_newer_remote_checkpoint(loaded.spec, ws) is None
    assert s3_proxy.refused == 0


def test_a_killed_remote_download_leaves_no_complete_local_checkpoint(tmp_path, s3_bucket, s3_options, fast_push, s3_env):
    loaded, ws = _job(tmp_path, s3_bucket, s3_options.endpoint_url)
    source = load(smoke_spec_data(tmp_path / "other", None))[1]
    with open_storage(f"s3://{s3_bucket}/run", s3_options) as store:
        upload_checkpoint(store, fake_checkpoint(source, 7), 7)
    s3_env.fail_next(20, status=500, code="InternalError", match="optimizer.pt", method="GET")
    with pytest.raises(Exception):
        fetch_newer_remote_checkpoint(loaded.spec, ws)
    assert CheckpointStore(ws.checkpoints_dir).latest() is None  # only a .tmp- folder, never read
    s3_env.clear_failures()
    assert fetch_newer_remote_checkpoint(loaded.spec, ws) == ws.checkpoints_dir / "step_000007"
