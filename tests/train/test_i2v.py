"""Image-to-video training (`video.is_i2v`): the first latent frame is the clean condition, as
`SanaImageToVideoPipeline` feeds the transformer; on the tiny model, from the real cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from job.cache.reader import collate_cached
from job.models.sanavideo.latents import encode_videos
from job.models.sanavideo.objective import FlowMatchingObjective
from job.train import run_train
from job.train.session import build_session
from job.workspace import Workspace
from pipeline_helpers import cache, loaded, loss_with_changed_prediction, pipeline_spec, write_clips

I2V = {"video": {"num_frames": 5, "is_i2v": True}}


@pytest.fixture
def i2v_job(tmp_path, tiny_model):
    write_clips(tmp_path / "ws" / "clips")
    spec, ws = pipeline_spec(tmp_path / "ws", tiny_model, dataset=I2V)
    result = cache(spec, ws)
    assert result.latents.failed == 0 and result.latents.cached == 2
    return spec, ws


def _tiny(tiny_model):
    from diffusers import SanaVideoTransformer3DModel

    return SanaVideoTransformer3DModel.from_pretrained(tiny_model, subfolder="transformer").eval()


def test_per_token_timesteps_equal_to_the_scalar_one_give_the_same_prediction(tiny_model):
    model = _tiny(tiny_model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, model.config.in_channels, 2, 8, 8, generator=g)
    text = torch.randn(2, 8, model.config.caption_channels, generator=g)
    t = torch.tensor([300.0, 800.0])
    per_token = t.view(2, 1, 1, 1, 1).expand(2, 1, 2, 4, 4)
    with torch.no_grad():
        scalar = model(x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
        tokens = model(x, encoder_hidden_states=text, timestep=per_token, return_dict=False)[0]
    torch.testing.assert_close(tokens, scalar, rtol=1e-5, atol=1e-5)


def test_conditioning_matches_what_the_i2v_pipeline_feeds_the_transformer(tiny_model):
    """The pipeline's first transformer call: frame 0 = the image's normalised VAE mode, timestep 0 on
    frame 0's tokens and t elsewhere. Ours, for the same image and t, is the same."""
    from diffusers import SanaImageToVideoPipeline
    from PIL import Image

    pipe = SanaImageToVideoPipeline.from_pretrained(tiny_model, torch_dtype=torch.float32)
    seen = {}

    def capture(module, args, kwargs):
        seen.setdefault("hidden", kwargs.get("hidden_states", args[0] if args else None).clone())
        seen.setdefault("timestep", kwargs["timestep"].clone())

    pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    pipe(image=image, prompt="a red square", frames=5, height=64, width=64, num_inference_steps=2, use_resolution_binning=False,
         guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(0))
    hidden, timestep = seen["hidden"], seen["timestep"]
    assert tuple(timestep.shape) == (1, 1, 2, 4, 4)

    video = pipe.video_processor.preprocess(image, height=64, width=64).unsqueeze(2)  # [1, 3, 1, H, W] in [-1, 1]
    first = encode_videos(pipe.vae, video, sample=False)  # what the cache phase stores for i2v
    torch.testing.assert_close(hidden[:, :, :1], first.to(hidden), rtol=1e-5, atol=1e-5)

    t0 = float(timestep.max())
    objective = FlowMatchingObjective(None)
    sigma = t0 / 1000.0
    noise = hidden / sigma  # x0 = 0: x_t = sigma * noise is the pipeline's starting latent
    inputs = objective.make_inputs(torch.zeros_like(hidden), torch.tensor([sigma]), noise)
    ours = objective.condition_on_first_frame(inputs, first, torch.tensor([True]), pipe.transformer.config.patch_size)
    torch.testing.assert_close(ours.timesteps, timestep.float(), rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(ours.noisy[:, :, :1], first.float())
    torch.testing.assert_close(ours.noisy[:, :, 1:], hidden[:, :, 1:].float(), rtol=1e-5, atol=1e-6)
    assert ours.loss_mask[:, :, 0].sum() == 0 and bool(torch.all(ours.loss_mask[:, :, 1:] == 1))


def test_text_to_video_rows_of_a_mixed_batch_are_left_as_they_were():
    objective = FlowMatchingObjective(None)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 4, 3, 8, 8, generator=g)
    inputs = objective.make_inputs(x0, torch.tensor([0.3, 0.7]), noise)
    first = torch.randn(2, 4, 1, 8, 8, generator=g)
    out = objective.condition_on_first_frame(inputs, first, torch.tensor([False, True]), (1, 2, 2))
    assert torch.equal(out.noisy[0], inputs.noisy[0]) and torch.equal(out.noisy[1, :, 1:], inputs.noisy[1, :, 1:])
    assert torch.equal(out.noisy[1, :, :1], first[1])
    assert bool(torch.all(out.timesteps[0] == 300.0)) and bool(torch.all(out.timesteps[1, :, 0] == 0))
    assert bool(torch.all(out.timesteps[1, :, 1:] == 700.0))
    assert bool(torch.all(out.loss_mask[0] == 1)) and out.loss_mask[1, :, 0].sum() == 0


def test_a_bucket_mixing_i2v_and_t2v_clips_collates_with_flags():
    def item(first):
        return {"latents": torch.zeros(4, 2, 8, 8), "prompt_embeds": torch.zeros(8, 16), "prompt_attention_mask": torch.ones(8),
                "mask": None, "first_frame_latents": first, "crepa_features": None, "sample_key": "k", "caption_key": "c",
                "bucket": "64x64@5", "dataset": "d"}

    batch = collate_cached([item(None), item(torch.ones(4, 1, 8, 8))])
    assert batch["i2v"].tolist() == [False, True]
    assert batch["first_frame_latents"][0].abs().sum() == 0 and bool(torch.all(batch["first_frame_latents"][1] == 1))
    assert collate_cached([item(None)])["first_frame_latents"] is None


def test_the_loss_ignores_the_condition_frame_and_trains_the_rest(i2v_job):
    spec, ws = i2v_job
    s = build_session(spec, ws)
    batch = next(iter(s.loader))
    assert batch["first_frame_latents"] is not None and batch["i2v"].all()
    seen = {}

    def loss(frame: int | None) -> float:
        def bump(pred):
            pred = pred.clone()
            pred[:, :, frame] += 5.0
            return pred
        return loss_with_changed_prediction(s, batch, None if frame is None else bump, seen)

    base = loss(None)
    assert loss(0) == pytest.approx(base, rel=1e-6, abs=1e-7)  # frame 0: the condition, not scored
    assert loss(1) > base + 1.0
    assert bool(torch.all(seen["timestep"][:, :, 0] == 0)) and bool(torch.all(seen["timestep"][:, :, 1:] > 0))
    torch.testing.assert_close(seen["noisy"][:, :, :1].float(), batch["first_frame_latents"].float())


def test_i2v_training_runs_from_the_cache_and_refuses_scheduled_sampling(i2v_job, tmp_path, tiny_model):
    from job.errors import SpecError

    spec, ws = i2v_job
    result = run_train(spec, ws)
    assert result.status == "completed" and result.step == 2
    with pytest.raises(SpecError) as err:
        loaded(tmp_path / "other", tiny_model, dataset=I2V, train={"scheduled_sampling": {"probability": 0.5}})
    assert [p.path for p in err.value.problems] == ["data.datasets[0].video.is_i2v"]


def test_eval_loss_scores_i2v_clips_without_their_condition_frame(tiny_model):
    from job.validate.eval_loss import EvalLoss

    model = _tiny(tiny_model)
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(4, 2, 8, 8, generator=g)
    item = {"latents": latents, "prompt_embeds": torch.randn(8, model.config.caption_channels, generator=g),
            "prompt_attention_mask": torch.ones(8), "first_frame_latents": latents[:, :1].clone()}
    spec = {"enabled": True, "timesteps": [0.5], "max_samples": 1, "step_interval": 1}
    from job.spec.validation import EvalLossSpec

    evaluator = EvalLoss(EvalLossSpec(**spec), [item])
    i2v = evaluator(model, device="cpu", dtype=torch.float32).overall
    t2v = EvalLoss(EvalLossSpec(**spec), [{k: v for k, v in item.items() if k != "first_frame_latents"}])(
        model, device="cpu", dtype=torch.float32).overall
    assert np.isfinite(i2v) and i2v != pytest.approx(t2v)


def test_validation_renders_image_to_video_from_the_first_cached_frame(tmp_path, tiny_model, monkeypatch, caplog):
    import job.models.sanavideo.validation as validation
    from PIL import Image

    write_clips(tmp_path / "ws" / "clips")
    render_with = {"enabled": True, "step_interval": 2, "resolutions": ["64x64"], "num_video_frames": 5,
                   "num_inference_steps": 2, "guidance": 1.0}
    job_spec = loaded(tmp_path / "ws", tiny_model, dataset=I2V, validation=render_with,
                      memory={"gradient_checkpointing": False, "drop_vae_encoder": True})
    spec, ws = job_spec.spec, Workspace.for_spec(job_spec.spec)
    cache(spec, ws)
    calls = []
    real = validation.render

    def spy(pipe, *args, **kwargs):
        calls.append((type(pipe).__name__, kwargs.get("image")))
        return real(pipe, *args, **kwargs)

    monkeypatch.setattr(validation, "render", spy)
    from job.phases import train

    train(job_spec, ws)
    assert calls and all(name == "SanaImageToVideoPipeline" for name, _ in calls)
    image = calls[0][1]
    assert isinstance(image, Image.Image) and image.size == (64, 64)
    assert list(ws.validation_dir.glob("step_*/validation.mp4"))
    assert "keeping the VAE encoder" in caplog.text  # i2v validation encodes its condition image

    # an explicit condition image wins; an unreadable one is a clear error
    Image.new("RGB", (64, 64), (200, 30, 30)).save(ws.root / "cond.png")
    from job.validate.render import i2v_condition_image

    chosen = i2v_condition_image(spec.model_copy(update={"validation": spec.validation.model_copy(update={"image": "cond.png"})}), ws, None)
    assert chosen.getpixel((0, 0)) == (200, 30, 30)
    from job.errors import InputError

    (ws.root / "broken.png").write_bytes(b"not an image")
    with pytest.raises(InputError):
        i2v_condition_image(spec.model_copy(update={"validation": spec.validation.model_copy(update={"image": "broken.png"})}), ws, None)


def test_an_unreadable_validation_image_stops_the_job_before_training(tmp_path, tiny_model):
    from job.errors import InputError
    from job.phases import train

    write_clips(tmp_path / "ws" / "clips")
    job_spec = loaded(tmp_path / "ws", tiny_model, dataset=I2V,
                      validation={"enabled": True, "step_interval": 2, "resolutions": ["64x64"], "num_video_frames": 5,
                                  "num_inference_steps": 2, "guidance": 1.0, "image": "missing.png"})
    ws = Workspace.for_spec(job_spec.spec)
    with pytest.raises(InputError, match="validation.image"):
        train(job_spec, ws)
    assert not ws.checkpoints_dir.exists() or not any(ws.checkpoints_dir.iterdir())
