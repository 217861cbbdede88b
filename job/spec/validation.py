"""`validation:` sample videos, the prompt library, eval loss and live previews."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator

from .base import SAFE_NAME_HELP, Section, is_safe_name, parse_wxh

DEFAULT_VALIDATION_PROMPT = (
    "A short video of a small, fluffy animal exploring a sunny room with soft window light and gentle camera motion."
)
DEFAULT_NEGATIVE_PROMPT = "worst quality, inconsistent motion, blurry, jittery, distorted"


class PreviewSpec(Section):
    """Live previews of validation renders, sent to the webhooks while denoising."""

    enabled: bool = Field(False, description="Send a cheap decode of the current latents every `steps` denoising steps (needs a webhook).")
    steps: int = Field(5, ge=1, description="Denoising steps between previews (quickstart: `validation_preview_steps`). Higher = less overhead.")


class EvalLossSpec(Section):
    """Stable evaluation loss: fixed noise and timesteps on held-out clips."""

    enabled: bool = Field(False, description="Compute the stable evaluation loss (needs `data.holdout_fraction` > 0).")
    step_interval: int = Field(100, ge=1, description="Evaluate every N optimizer steps.")
    timesteps: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9], min_length=1, description="Fixed sigmas (0..1) evaluated for every held-out clip; loss is reported per sigma and overall.")
    max_samples: int = Field(16, ge=1, description="Held-out clips used per evaluation.")

    @field_validator("timesteps")
    @classmethod
    def _in_range(cls, values: list[float]) -> list[float]:
        bad = [v for v in values if not 0.0 < v < 1.0]
        if bad:
            raise ValueError(f"sigmas must be strictly between 0 and 1, got {bad}")
        return values


class ValidationSpec(Section):
    """Validation renders during training."""

    enabled: bool = Field(True, description="Render validation videos every `step_interval` steps and at the end.")
    step_interval: int = Field(200, ge=1, description="Render every N optimizer steps (quickstart: `validation_step_interval`).")
    prompt: str = Field(DEFAULT_VALIDATION_PROMPT, min_length=1, description="Primary validation prompt (file name: `validation`).")
    negative_prompt: str = Field(DEFAULT_NEGATIVE_PROMPT, description="Negative prompt for classifier-free guidance.")
    resolutions: list[str] = Field(default_factory=lambda: ["832x480"], min_length=1, description="`WxH` sizes to render (sides multiples of 32, as SanaVideoPipeline requires). Quickstart: `validation_resolution`.")
    num_video_frames: int = Field(81, ge=1, description="Frames per validation video; 4k+1.")
    guidance: float = Field(6.0, ge=1.0, le=30.0, description="Classifier-free guidance scale (SANA-Video default 6.0).")
    num_inference_steps: int = Field(50, ge=1, le=500, description="Denoising steps (SANA-Video default 50).")
    seed: int = Field(42, ge=0, description="Noise seed: the same every time, so videos are comparable across steps.")
    prompt_library: dict[str, str] | str | None = Field(
        None,
        description="Extra prompts as `{nickname: prompt}` inline, or the path of a JSON file with that mapping. Nicknames become file names.",
    )
    image: str | None = Field(
        None,
        description="Condition image (PNG/JPEG path; relative to the workspace) for image-to-video validation renders, "
                    "used when a dataset trains `video.is_i2v`. Default: the first frame of the first cached i2v training clip.",
    )
    preview: PreviewSpec = Field(default_factory=PreviewSpec, description="Live previews to webhooks.")
    eval_loss: EvalLossSpec = Field(default_factory=EvalLossSpec, description="Stable evaluation loss.")

    @field_validator("resolutions")
    @classmethod
    def _wxh(cls, values: list[str]) -> list[str]:
        for value in values:
            width, height = parse_wxh(value)
            # SanaVideoPipeline refuses sides that are not multiples of 32 (checked in diffusers 0.42.1).
            if width % 32 or height % 32 or width < 32 or height < 32:
                raise ValueError(f"{value}: both sides must be multiples of 32 (SanaVideoPipeline's rule); try {max(32, width // 32 * 32)}x{max(32, height // 32 * 32)}")
        return values

    @field_validator("prompt_library")
    @classmethod
    def _nicknames(cls, value: dict[str, str] | str | None) -> dict[str, str] | str | None:
        if isinstance(value, dict):
            bad = [name for name in value if not is_safe_name(name) or name == "validation"]
            if bad:
                raise ValueError(f"nicknames {bad} are not usable as file names ({SAFE_NAME_HELP}; 'validation' is reserved)")
            empty = [name for name, prompt in value.items() if not str(prompt).strip()]
            if empty:
                raise ValueError(f"nicknames {empty} have empty prompts")
        return value

    def sizes(self) -> list[tuple[int, int]]:
        return [parse_wxh(value) for value in self.resolutions]


#: Events a webhook can receive. The upload events come from the event log (`Webhooks.follow_event_log`):
#: `checkpoint_uploaded` (a training checkpoint is complete in the store), `upload_failed` (an upload
#: gave up for now; the job carries on or exits 4 as the upload phase says), `uploaded` (the upload
#: phase finished: what was sent, and whether the final model is there).
WEBHOOK_EVENTS = ("job_started", "phase_changed", "validation_ready", "checkpoint_saved", "job_finished", "job_failed", "preview",
                  "checkpoint_uploaded", "upload_failed", "uploaded")


class WebhookSpec(Section):
    """A webhook that receives job events (and previews)."""

    url: SecretStr = Field(description="Webhook URL. Treated as a secret: put it in the environment and write `${MY_WEBHOOK_URL}`.")
    kind: str = Field("json", pattern="^(json|discord)$", description="`json`: a generic JSON POST. `discord`: Discord's webhook format (with image attachments).")
    events: list[str] = Field(
        default_factory=lambda: list(WEBHOOK_EVENTS),
        description="Events sent to this webhook.",
    )

    @field_validator("url")
    @classmethod
    def _http(cls, value: SecretStr) -> SecretStr:
        # The value is secret: say what is wrong without echoing it.
        if not value.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL (value hidden: it is a secret)")
        return value

    @field_validator("events")
    @classmethod
    def _known_events(cls, values: list[str]) -> list[str]:
        unknown = sorted(set(values) - set(WEBHOOK_EVENTS))
        if unknown:
            raise ValueError(f"unknown events {unknown}; known: {list(WEBHOOK_EVENTS)}")
        return values
