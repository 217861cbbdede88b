"""`output:`, `storage:` and `tracking:` where results go and how remotes are reached."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import Section


class UploadSpec(Section):
    """What is pushed to `output.push_to`, and when."""

    checkpoints: bool = Field(True, description="Upload each checkpoint as it is written (in the background; the newest wins).")
    validation: bool = Field(True, description="Upload validation videos and the HTML index.")
    final_model: bool = Field(True, description="Upload the final model (diffusers layout or LoRA weights) with a model card.")
    logs: bool = Field(True, description="Upload the JSON event log and metrics.")
    grace_seconds: float = Field(20.0, ge=0, description="On SIGTERM, how long to wait for the final checkpoint upload before exiting.")


class OutputSpec(Section):
    """Where the job's results go."""

    dir: str = Field("output", description="Local folder for checkpoints, validation videos and the final model (relative paths are under the workspace). Quickstart: `output_dir`.")
    push_to: str | None = Field(None, description="Remote to publish to: `hf://owner/repo` (a model repo) or `s3://bucket/prefix`. null keeps everything local. Quickstart: `push_to_hub`.")
    hub_private: bool = Field(True, description="Create the Hub repo as private.")
    upload: UploadSpec = Field(default_factory=UploadSpec, description="What to upload.")

    @field_validator("push_to")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        # `push_to: ${TRAINER_PUSH_TO:-}` with the variable unset means "keep results local".
        return value.strip() or None if value is not None else None


class S3Spec(Section):
    """How `s3://` URIs are reached. Credentials are never written here: they come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or the standard AWS chain."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (R2, MinIO, Backblaze...). null: AWS.")
    region: str | None = Field(None, description="Region name.")
    addressing_style: Literal["auto", "path", "virtual"] = Field("auto", description="Bucket addressing: `path` for most self-hosted servers.")


class StorageSpec(Section):
    """Remote store settings shared by pull, resume and upload."""

    s3: S3Spec = Field(default_factory=S3Spec, description="S3 settings.")


class TrackingSpec(Section):
    """Experiment trackers."""

    report_to: list[Literal["wandb", "tensorboard"]] | Literal["none", "wandb", "tensorboard"] = Field(
        "none", description="`none`, `wandb`, `tensorboard`, or a list. A tracker that cannot reach its service never stops training."
    )
    project_name: str = Field("sanavideo-training", description="Tracker project (quickstart: `tracker_project_name`).")
    run_name: str | None = Field(None, description="Tracker run name (quickstart: `tracker_run_name`). Default: the job name.")

    def trackers(self) -> list[str]:
        if isinstance(self.report_to, list):
            return list(self.report_to)
        return [] if self.report_to == "none" else [self.report_to]
