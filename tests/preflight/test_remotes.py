"""Remote stores: reachable, credentials working, sizes for the disk check; never a secret in the report."""

import os

import boto3
import pytest

from job.errors import EnvironmentProblem, StorageError
from job.preflight import run_preflight
from job.preflight.remotes import RemoteTarget, as_uri, probe, remote_targets
from job.storage import RemoteNotFound


def _s3_spec(make_spec, s3_env, bucket, push_prefix="runs/a"):
    return make_spec(
        model={"pretrained_model_name_or_path": "/nonexistent/local/model"},  # local: the real Hub is never contacted
        data={"datasets": [{"id": "clips", "source": f"s3://{bucket}/clips"}]},
        output={"push_to": f"s3://{bucket}/{push_prefix}"},
        storage={"s3": {"endpoint_url": s3_env.url, "region": "us-east-1", "addressing_style": "path"}},
    )


def test_s3_dataset_listed_and_push_target_reachable(make_spec, workspace, facts, s3_env, s3_bucket):
    client = boto3.client("s3", endpoint_url=s3_env.url, region_name="us-east-1")
    for i in range(3):
        client.put_object(Bucket=s3_bucket, Key=f"clips/c{i}.mp4", Body=b"x" * 1000)
        client.put_object(Bucket=s3_bucket, Key=f"clips/c{i}.txt", Body=b"a caption")
    spec = _s3_spec(make_spec, s3_env, s3_bucket)
    ws = workspace(spec)
    report = run_preflight(spec, ws, facts=facts(disk_paths=[str(ws.root)]),
                           storage_opener=None, check_remotes=True)
    ds = report.row("remote: dataset clips")
    assert ds.status == "ok" and ds.data["files"] == 6 and ds.data["size"] == 3 * 1000 + 3 * 9
    assert "3 video(s)" in ds.detail
    push = report.row("remote: output.push_to")
    assert push.status == "ok" and "first upload" in push.detail
    disk = report.row("disk (workspace)").data["parts"]
    assert disk["dataset_clips"] == 3027 and disk["latent_cache"] > 0  # the listing gave the clip count
    assert report.row("remote: model") is None
    text = report.to_json()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text


def test_missing_bucket_fails(make_spec, workspace, facts, s3_env):
    spec = _s3_spec(make_spec, s3_env, "no-such-bucket-here")
    ws = workspace(spec)
    report = run_preflight(spec, ws, facts=facts(disk_paths=[str(ws.root)]))
    assert report.row("remote: dataset clips").status == "fail"
    assert report.row("remote: output.push_to").status == "fail"
    assert "no-such-bucket-here" in report.row("remote: dataset clips").detail
    with pytest.raises(StorageError) as raised:  # exit 4, as when the store fails later in the job
        report.raise_if_failed()
    assert "no-such-bucket-here" in str(raised.value)


def test_a_remote_failure_beside_a_machine_problem_is_an_environment_problem(make_spec, workspace, facts, s3_env):
    spec = _s3_spec(make_spec, s3_env, "no-such-bucket-here")
    ws = workspace(spec)
    report = run_preflight(spec, ws, facts=facts(disk_paths=[str(ws.root)]))
    report.add("disk (workspace)", "fail", "needs 90 GiB, 10 GiB free", "free space")
    with pytest.raises(EnvironmentProblem) as raised:  # exit 3: the machine must change too
        report.raise_if_failed()
    assert "no-such-bucket-here" in str(raised.value) and "90 GiB" in str(raised.value)


def test_bad_credentials_fail_without_leaking_them(make_spec, workspace, facts, s3_env, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-1234")
    s3_env.set_auth(True)
    spec = _s3_spec(make_spec, s3_env, s3_bucket)
    ws = workspace(spec)
    report = run_preflight(spec, ws, facts=facts(disk_paths=[str(ws.root)]))
    assert report.row("remote: dataset clips").status == "fail"
    assert "wrong-secret-value-1234" not in report.to_json()


def test_hub_model_listed_with_its_size(make_spec, workspace, facts, hub_env):
    hub_env.create_repo("org/tiny-model", files={"model_index.json": b"{}", "transformer/config.json": b"{}",
                                                 "transformer/diffusion_pytorch_model.safetensors": b"w" * 5000})
    spec = make_spec(model={"pretrained_model_name_or_path": "hf://org/tiny-model"})
    ws = workspace(spec)
    report = run_preflight(spec, ws, facts=facts(disk_paths=[str(ws.root)]))
    row = report.row("remote: model")
    assert row.status == "ok", row.detail
    assert report.row("disk (workspace)").data["parts"]["model_download"] == row.data["size"]
    missing = make_spec(model={"pretrained_model_name_or_path": "hf://org/not-there"})
    report = run_preflight(missing, workspace(missing), facts=facts(disk_paths=[str(ws.root)]))
    assert report.row("remote: model").status == "fail"


def test_hub_push_needs_a_token_and_a_missing_repo_is_created_later(make_spec, workspace, monkeypatch):
    class Store:
        def __init__(self, exc=None):
            self.exc = exc

        def list(self, prefix=""):
            if self.exc:
                raise self.exc
            return []

        def close(self):
            pass

    target = RemoteTarget("output.push_to", "hf://me/out", "destination")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    result = probe(target, lambda uri: Store())
    assert result.status == "fail" and "HF_TOKEN" in result.fix
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    result = probe(target, lambda uri: Store(RemoteNotFound("hf://me/out does not exist")))
    assert result.status == "warn" and "created" in result.detail
    result = probe(target, lambda uri: Store())
    assert result.status == "ok"


def test_targets_and_local_paths(make_spec, workspace):
    spec = make_spec(model={"pretrained_model_name_or_path": "org/model"},
                     data={"datasets": [{"id": "a", "source": "local/clips"}, {"id": "b", "source": "hf://datasets/org/clips"}]},
                     output={"push_to": "s3://bucket/out"})
    targets = remote_targets(spec, workspace(spec))
    assert [(t.role, t.uri, t.kind) for t in targets] == [
        ("model", "hf://org/model", "source"),
        ("dataset b", "hf://datasets/org/clips", "source"),
        ("output.push_to", "s3://bucket/out", "destination"),
    ]
    assert as_uri("local/clips", False, allow_bare_repo=False) is None
    assert as_uri("org/model", True) is None  # an existing local folder wins


def test_check_remotes_false_contacts_nothing(make_spec, workspace, facts):
    def opener(uri):
        raise AssertionError("must not be called")

    spec = make_spec(output={"push_to": "s3://bucket/out"})
    ws = workspace(spec)
    report = run_preflight(spec, ws, facts=facts(disk_paths=[str(ws.root)]), check_remotes=False, storage_opener=opener)
    assert not [r for r in report.rows if r.check.startswith("remote")]
