"""The upload phase: model card, only-what-is-missing, failures that must not pass silently;
against the Hub stand-in and the S3 server on 127.0.0.1."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import yaml
from upload_helpers import fake_checkpoint, load, smoke_spec_data, tree

from job.errors import StorageError
from job.upload import upload_phase
from job.upload.checkpoints import CheckpointUploader
from job.upload.resume import fetch_newer_remote_checkpoint

BASE = "Efficient-Large-Model/SANA-Video_2B_480p_diffusers"


def finished_job(ws, steps: int = 6) -> None:
    """What a completed train phase leaves: final model, validation videos, metrics, a checkpoint."""
    final = ws.final_dir
    (final / "transformer").mkdir(parents=True)
    (final / "transformer" / "config.json").write_text('{"_class_name": "SanaVideoTransformer3DModel"}')
    (final / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"w" * 4096)
    (final / "training_summary.json").write_text(json.dumps({"status": "completed", "final_step": steps, "samples_seen": 12, "last_loss": 0.5}))
    step_dir = ws.validation_dir / f"step_{steps:06d}"
    step_dir.mkdir(parents=True)
    (step_dir / "validation.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"v" * 100)
    (step_dir / "manifest.json").write_text(json.dumps({"step": steps, "videos": [
        {"nickname": "square", "prompt": "a red square | moving", "file": "validation.mp4", "width": 64, "height": 64}]}))
    (ws.validation_dir / "index.html").write_text("<html></html>")
    ws.logs_dir.mkdir(parents=True, exist_ok=True)
    (ws.logs_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-3}) + "\n" for s in range(1, steps + 1)))
    fake_checkpoint(ws, steps)


def test_hub_card_final_model_and_remote_resume(tmp_path, hub_env, fast_push):
    loaded, ws = load(smoke_spec_data(tmp_path / "ws", "hf://tester/sana-ft", **{"model.pretrained_model_name_or_path": BASE}))
    finished_job(ws)
    upload_phase(loaded, ws)

    files = hub_env.head("tester/sana-ft").files
    for path in ("final/transformer/config.json", "final/transformer/diffusion_pytorch_model.safetensors",
                 "validation/step_000006/validation.mp4", "validation/index.html", "logs/metrics.jsonl",
                 "spec.yaml", "README.md", "training_loss.svg", "checkpoints/step_000006/COMPLETE"):
        assert path in files, sorted(files)
    card = files["README.md"].decode()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == BASE and front["base_model_relation"] == "finetune"
    assert front["library_name"] == "diffusers" and front["pipeline_tag"] == "text-to-video"
    assert {"sana-video", "text-to-video", "full-finetune", "diffusers-training"} <= set(front["tags"])
    assert 'src="validation/step_000006/validation.mp4"' in card and "a red square \\| moving" in card
    assert 'subfolder="final/transformer"' in card and "SanaVideoPipeline" in card
    assert "| 6 | 0.16667 |" in card  # the loss table
    ET.fromstring(files["training_loss.svg"])  # well-formed SVG
    from huggingface_hub import ModelCard

    assert ModelCard.load("tester/sana-ft").data.library_name == "diffusers"  # the Hub client reads it too

    # A second run sends nothing: every file is there with the same content.
    commits = hub_env.count("POST", "/commit/")
    upload_phase(loaded, ws)
    assert hub_env.count("POST", "/commit/") == commits

    # A fresh machine resumes from the Hub copy of the checkpoint.
    _, fresh = load(smoke_spec_data(tmp_path / "fresh", "hf://tester/sana-ft"))
    got = fetch_newer_remote_checkpoint(loaded.spec, fresh)
    assert got is not None and got.name == "step_000006"
    local = tree(ws.checkpoints_dir / "step_000006")
    assert {k: v for k, v in tree(got).items() if k != "COMPLETE"} == {k: v for k, v in local.items() if k != "COMPLETE"}

    # Background uploads to the Hub rotate old checkpoints away once a newer one is complete.
    limited, _ = load(smoke_spec_data(tmp_path / "ws", "hf://tester/sana-ft", **{"checkpoints.total_limit": 1}))
    uploader = CheckpointUploader(limited.spec)
    uploader.submit(fake_checkpoint(ws, 9), 9)
    assert uploader.drain(timeout=60)
    uploader.close()
    remaining = {p.split("/")[1] for p in hub_env.head("tester/sana-ft").files if p.startswith("checkpoints/")}
    assert remaining == {"step_000009"}


def test_lora_card_says_how_to_load_the_adapter(tmp_path, s3_bucket, s3_options, fast_push):
    from job.upload.card import card_text

    loaded, ws = load(smoke_spec_data(tmp_path / "ws", f"s3://{s3_bucket}/lora", s3_options.endpoint_url,
                                      **{"model.type": "lora", "model.pretrained_model_name_or_path": BASE}))
    text = card_text(loaded.spec, ws, has_figure=False, validation_uploaded=True)
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model_relation"] == "adapter" and "lora" in front["tags"]
    assert "load_lora_weights" in text and f"s3://{s3_bucket}/lora" in text


def test_only_missing_files_are_sent_again(tmp_path, s3_bucket, s3_options, fast_push, s3_env):
    loaded, ws = load(smoke_spec_data(tmp_path / "ws", f"s3://{s3_bucket}/run", s3_options.endpoint_url))
    finished_job(ws)
    upload_phase(loaded, ws)
    s3_env.clear_requests()
    upload_phase(loaded, ws)
    assert s3_env.count("PUT") == 0
    with open(ws.logs_dir / "metrics.jsonl", "a") as f:  # a log that grew
        f.write(json.dumps({"step": 7, "loss": 0.1}) + "\n")
    (ws.validation_dir / "index.html").write_text("<HTML></HTML>")  # same size, other content
    s3_env.clear_requests()
    upload_phase(loaded, ws)
    puts = sorted(r.path.split("/run/", 1)[1] for r in s3_env.requests if r.method == "PUT")
    # the card and its figure change with the metrics; nothing else is sent again
    assert puts == ["README.md", "logs/metrics.jsonl", "training_loss.svg", "validation/index.html"], puts


def test_final_model_not_uploaded_is_exit_4_naming_the_files(tmp_path, s3_bucket, s3_proxy, fast_push, monkeypatch):
    import job.upload.phase as phase

    loaded, ws = load(smoke_spec_data(tmp_path / "ws", f"s3://{s3_bucket}/run", s3_proxy.url))
    finished_job(ws)
    parts_tried = []  # each part's upload starts by listing what the store has under its prefix
    real_list = phase.list_or_empty
    monkeypatch.setattr(phase, "list_or_empty", lambda store, prefix: parts_tried.append(prefix) or real_list(store, prefix))
    s3_proxy.set_up(False)
    with pytest.raises(StorageError) as failure:
        upload_phase(loaded, ws)
    assert failure.value.exit_code == 4
    assert "final model" in str(failure.value) and "diffusion_pytorch_model.safetensors" in str(failure.value)
    # The newest checkpoint found the store down after its retries: no other part waits out its own
    # retries against it (with real timeouts, 15 minutes each), and every part is named as not uploaded.
    assert parts_tried == [], parts_tried
    for label in ("newest checkpoint", "validation videos", "logs", "final model", "model card"):
        assert label in str(failure.value), str(failure.value)
    assert (ws.final_dir / "transformer" / "diffusion_pytorch_model.safetensors").is_file()  # kept
    # Once the store is back, `trainer upload` sends it.
    s3_proxy.set_up(True)
    upload_phase(loaded, ws)


def test_upload_events_reach_the_webhooks(tmp_path, s3_bucket, s3_proxy, fast_push):
    """`uploaded` and `upload_failed` come from inside the upload code (the event log) and reach a
    webhook that takes them; a webhook that does not take them gets nothing."""
    from job.report.webhooks import Webhooks
    from job.spec.validation import WebhookSpec
    from tests.validate.conftest import Receiver

    receiver = Receiver()
    hooks = Webhooks([WebhookSpec(url=receiver.url("/uploads")),
                      WebhookSpec(url=receiver.url("/started-only"), events=["job_started"])], job_name="t")
    stop_forwarding = hooks.follow_event_log()
    try:
        loaded, ws = load(smoke_spec_data(tmp_path / "ws", f"s3://{s3_bucket}/run", s3_proxy.url))
        finished_job(ws)
        s3_proxy.set_up(False)
        with pytest.raises(StorageError):
            upload_phase(loaded, ws)
        s3_proxy.set_up(True)
        upload_phase(loaded, ws)
        stop_forwarding()
        hooks.close()
        bodies = [(r["path"], json.loads(r["body"])) for r in receiver.requests]
        assert {path for path, _ in bodies} == {"/uploads"}, bodies
        events = [body["event"] for _, body in bodies]
        assert "upload_failed" in events and events[-1] == "uploaded", events
        done = bodies[-1][1]
        assert done["final_model"] and done["target"] == f"s3://{s3_bucket}/run", done
    finally:
        stop_forwarding()
        hooks.close()
        receiver.close()
