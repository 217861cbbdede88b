"""The whole job spec: the single source of truth for a job."""

from __future__ import annotations

from pydantic import Field

from .base import SafeName, Section
from .checkpoints import CheckpointSpec
from .data import DataSpec
from .memory import MemorySpec
from .model import ModelSpec
from .output import OutputSpec, StorageSpec, TrackingSpec
from .speed import SpeedSpec
from .train import TrainSpec
from .validation import ValidationSpec, WebhookSpec

SPEC_VERSION = 1


class JobSpec(Section):
    """A SANA-Video fine-tuning job. Validated before anything expensive happens."""

    version: int = Field(SPEC_VERSION, ge=1, le=SPEC_VERSION, description="Spec format version.")
    name: SafeName = Field("sanavideo-finetune", description="Job name: used for run names and default repo names.")
    workspace: str = Field("/workspace", description="Folder the job owns: model and dataset downloads, caches, checkpoints, outputs, logs. Relative paths elsewhere in the spec are under it.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The model and how it is trained.")
    data: DataSpec = Field(description="Datasets and caches.")
    train: TrainSpec = Field(description="Optimisation.")
    memory: MemorySpec = Field(default_factory=MemorySpec, description="Memory savers.")
    speed: SpeedSpec = Field(default_factory=SpeedSpec, description="Speed-ups of the transformer (compile, fused attention, selective checkpointing).")
    checkpoints: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoints and resume.")
    validation: ValidationSpec = Field(default_factory=ValidationSpec, description="Validation renders, eval loss, previews.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where results go.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="How remote stores are reached.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Experiment trackers.")
    webhooks: list[WebhookSpec] = Field(default_factory=list, description="Webhooks for job events and validation previews.")
