"""The train phase's side of uploading: a stop signal while the stop checkpoint is being pushed."""

from __future__ import annotations

import os
import signal
import threading
import time

from upload_helpers import fake_checkpoint, load, smoke_spec_data

import job.upload.remote
from job.storage import RetryPolicy, open_storage
from job.train.checkpoints import COMPLETE
from job.train.hooks import TrainHooks, TrainResult
from job.upload.phase import TrainUploads
from job.upload.remote import remote_checkpoints


def test_a_second_signal_during_the_grace_upload_leaves_at_once(tmp_path, s3_bucket, s3_proxy, s3_options, monkeypatch):
    # Retries that would go on for minutes: only the signal can end the wait early.
    monkeypatch.setattr(job.upload.remote, "retry_policy",
                        lambda: RetryPolicy(attempts=100000, base_delay=0.02, max_delay=0.02, deadline=600))
    loaded, ws = load(smoke_spec_data(tmp_path / "ws", f"s3://{s3_bucket}/run", s3_proxy.url,
                                      **{"output.upload.grace_seconds": 600}))
    hooks = TrainHooks()
    uploads = TrainUploads.start(loaded.spec, ws, hooks)
    s3_proxy.set_up(False)
    folder = fake_checkpoint(ws, 4)
    for callback in hooks.on_checkpoint:
        callback(folder, 4)

    def second_signal():
        deadline = time.monotonic() + 60
        while s3_proxy.refused < 1 and time.monotonic() < deadline:  # the upload is failing and retrying
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=second_signal, daemon=True)
    sender.start()
    uploads.finish(TrainResult("stopped_early", 4, 10, folder, None, "stopped"))
    sender.join()
    assert uploads.uploader.busy  # the upload was still retrying: finish() did not wait for it
    assert (folder / COMPLETE).is_file()  # the local checkpoint is intact
    with open_storage(f"s3://{s3_bucket}/run", s3_options) as store:  # straight to the server, not the proxy
        assert not [c for c in remote_checkpoints(store) if c.complete]  # nothing half-uploaded counts
    s3_proxy.set_up(True)  # let the worker thread finish (in a real job the process has exited)
    assert uploads.uploader.drain(timeout=60)
