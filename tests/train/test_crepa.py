"""CREPA on the tiny model with a tiny random DINOv2 built offline: math, feature cache, gradients, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from job.cache import format as fmt
from job.errors import InputError
from job.train import run_train
from job.train.crepa import (PROJECTOR_FILE, alignment_loss, encode_frames, feature_grid, latent_frame_indices,
                             neighbour_weights)
from job.train.session import build_session
from job.workspace import Workspace
from pipeline_helpers import cache, pipeline_spec, write_clips

ENCODER_WIDTH = 16


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A random 1-layer DINOv2 (patch 14) saved with save_pretrained: the offline stand-in encoder."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=ENCODER_WIDTH, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                          patch_size=14, image_size=224)
    folder = tmp_path_factory.mktemp("dinov2") / "tiny-dinov2"
    Dinov2Model(config).save_pretrained(folder)
    return folder


def crepa_job(tmp_path, tiny_model, encoder, **crepa):
    write_clips(tmp_path / "ws" / "clips")
    settings = {"enabled": True, "block_index": 0, "encoder": "dinov2_vits14", "encoder_path": str(encoder), **crepa}
    return pipeline_spec(tmp_path / "ws", tiny_model, train={"crepa": settings})


# --- the math -----------------------------------------------------------------------------------


def test_neighbour_weights_decay_with_distance_and_sum_to_one():
    w = neighbour_weights(5, distance=1, decay=1.0)
    assert torch.allclose(w.sum(1), torch.ones(5))
    assert w[2, 2] > w[2, 1] > 0 and w[2, 1] == w[2, 3] and w[2, 0] == 0 and w[2, 4] == 0
    assert w[2, 1] / w[2, 2] == pytest.approx(torch.exp(torch.tensor(-1.0)).item())
    assert torch.equal(neighbour_weights(4, distance=0, decay=1.0), torch.eye(4))
    assert torch.equal(neighbour_weights(4, distance=3, decay=0.0), torch.eye(4))


def test_alignment_loss_is_zero_when_aligned_and_counts_neighbours():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 3, 2, 2, 8, generator=g)
    loss, sim = alignment_loss(feats * 3.0, feats, distance=0, decay=1.0)  # cosine ignores the scale
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and sim.item() == pytest.approx(1.0)
    with_neighbours, _ = alignment_loss(feats, feats, distance=1, decay=1.0)  # other frames' features differ
    assert with_neighbours.item() > 0.05
    still, _ = alignment_loss(feats[:, :1].expand(-1, 3, -1, -1, -1), feats[:, :1].expand(-1, 3, -1, -1, -1), distance=2, decay=1.0)
    assert still.item() == pytest.approx(0.0, abs=1e-6)  # a still clip: every neighbour agrees


def test_feature_grid_and_frames():
    assert feature_grid(60, 104) == (5, 8)  # 832x480 latents
    assert feature_grid(8, 8) == (8, 8)
    assert latent_frame_indices(81, 4) == [0] + [3 + 4 * k for k in range(20)]
    assert latent_frame_indices(5, 4) == [0, 3]


def test_encode_frames_gives_features_per_latent_frame(tiny_dinov2):
    from transformers import Dinov2Model

    encoder = Dinov2Model.from_pretrained(tiny_dinov2).eval()
    frames = torch.randint(0, 256, (2, 9, 48, 64, 3), dtype=torch.uint8)
    feats = encode_frames(encoder, frames, 224, 4, (3, 4))
    assert tuple(feats.shape) == (2, 3, 3, 4, ENCODER_WIDTH)
    single = encode_frames(encoder, frames[1:, 3:4], 224, 4, (3, 4))  # pixel frame 3 stands for latent frame 1
    torch.testing.assert_close(feats[1, 1], single[0, 0], atol=1e-5, rtol=1e-5)


# --- cache + train ------------------------------------------------------------------------------


def test_cache_stores_features_keyed_by_the_encoder(tmp_path, tiny_model, tiny_dinov2):
    spec, ws = crepa_job(tmp_path, tiny_model, tiny_dinov2)
    assert cache(spec, ws).latents.cached == 2
    folder = ws.latent_cache_dir(spec.data.datasets[0])
    manifest = fmt.read_manifest(folder)
    for key, entry in manifest.items():
        assert entry["key"]["crepa"].startswith("dinov2_vits14@224/")
        sample = fmt.read_sample(folder, key)
        assert tuple(sample.crepa_features.shape) == (2, 8, 8, ENCODER_WIDTH)
    # turning CREPA off reuses the files; turning it on again finds them current
    off, _ = pipeline_spec(tmp_path / "ws", tiny_model)
    assert cache(off, ws).latents.skipped == 2
    assert cache(spec, ws).latents.skipped == 2
    # another image size is another key: recomputed
    other, _ = crepa_job(tmp_path / "other", tiny_model, tiny_dinov2)
    other = other.model_copy(update={"workspace": spec.workspace})
    other.train.crepa.encoder_image_size = 518
    assert cache(other, ws).latents.stale == 2


@pytest.mark.parametrize("checkpointing", [False, True])
def test_crepa_gradients_reach_the_projector_and_early_blocks_only(tmp_path, tiny_model, tiny_dinov2, checkpointing):
    spec, ws = crepa_job(tmp_path, tiny_model, tiny_dinov2)
    spec.memory.gradient_checkpointing = checkpointing  # the hook also sees the block inside a checkpoint
    cache(spec, ws)
    s = build_session(spec, ws)
    assert s.model.gradient_checkpointing == checkpointing
    batch = next(iter(s.loader))
    x0 = batch["latents"]
    inputs = s.objective.training_inputs(x0, s.generator)
    with s.crepa.capture():
        s.transformer(inputs.noisy, encoder_hidden_states=batch["prompt_embeds"],
                      encoder_attention_mask=batch["prompt_attention_mask"], timestep=inputs.timesteps, return_dict=False)
    loss = s.crepa.loss(batch["crepa_features"], x0.shape)
    # the values the step reports stay on the device (a host read here would wait before backward is queued)
    assert isinstance(s.crepa.last_loss, torch.Tensor) and not s.crepa.last_loss.requires_grad
    assert loss.item() > 0 and loss.item() == pytest.approx(spec.train.crepa.weight * s.crepa.last_loss.item())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in s.crepa.parameters())
    model = s.model
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.transformer_blocks[0].parameters())
    later = list(model.transformer_blocks[1].parameters()) + list(model.proj_out.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in later)


def test_training_with_crepa_saves_the_projector_but_never_exports_it(tmp_path, tiny_model, tiny_dinov2):
    spec, ws = crepa_job(tmp_path, tiny_model, tiny_dinov2)
    cache(spec, ws)
    result = run_train(spec, ws)
    assert result.status == "completed" and result.step == 2
    assert (result.checkpoint / PROJECTOR_FILE).is_file()
    metrics = [json.loads(line) for line in (ws.logs_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(0 < m["crepa_loss"] <= 2 and -1 <= m["crepa_similarity"] <= 1 for m in metrics)
    final_files = [p.name for p in ws.final_dir.rglob("*") if p.is_file()]
    assert final_files and PROJECTOR_FILE not in final_files
    from safetensors.torch import load_file

    for f in ws.final_dir.rglob("*.safetensors"):
        assert not any("projector" in k for k in load_file(str(f)))


@pytest.mark.parametrize("variant", [
    {"model": {"type": "lora", "lora": {"rank": 4}}, "memory": {"gradient_checkpointing": True}},
    {"train": {"mixed_precision": "bf16", "gradient_accumulation_steps": 2}},
], ids=["lora-checkpointing", "bf16-accumulation"])
def test_crepa_trains_with_lora_checkpointing_and_bf16(tmp_path, tiny_model, tiny_dinov2, variant):
    write_clips(tmp_path / "ws" / "clips")
    crepa = {"enabled": True, "block_index": 0, "encoder": "dinov2_vits14", "encoder_path": str(tiny_dinov2)}
    sections = {k: dict(v) for k, v in variant.items()}
    sections.setdefault("train", {})["crepa"] = crepa
    spec, ws = pipeline_spec(tmp_path / "ws", tiny_model, **sections)
    cache(spec, ws)
    s = build_session(spec, ws)
    before = [p.detach().clone() for p in s.crepa.parameters()]
    from job.train.step import train_step

    seen = []
    loss_fn = s.crepa.loss

    def recording_loss(*args):
        out = loss_fn(*args)
        seen.append((s.crepa.last_loss.item(), s.crepa.last_similarity.item()))
        return out

    s.crepa.loss = recording_loss
    out = train_step(s, s.batches())
    assert not out.skipped and out.extras["crepa_loss"] > 0
    # the step reports the mean over its micro-batches
    assert len(seen) == spec.train.gradient_accumulation_steps
    assert out.extras["crepa_loss"] == pytest.approx(sum(v[0] for v in seen) / len(seen))
    assert out.extras["crepa_similarity"] == pytest.approx(sum(v[1] for v in seen) / len(seen))
    assert any(not torch.equal(a, p) for a, p in zip(before, s.crepa.parameters()))  # the projector learned


def test_resume_restores_the_projector(tmp_path, tiny_model, tiny_dinov2):
    spec, ws = crepa_job(tmp_path, tiny_model, tiny_dinov2)
    cache(spec, ws)
    spec.train.max_train_steps = 1
    first = run_train(spec, ws)
    saved = torch.load(first.checkpoint / PROJECTOR_FILE)
    spec.train.max_train_steps = 2
    s = build_session(spec, ws)
    assert s.step == 1
    for name, tensor in s.crepa.projector.state_dict().items():
        assert torch.equal(tensor, saved[name])
    # a checkpoint with a projector cannot be resumed without CREPA (its optimizer state holds it)
    off, _ = pipeline_spec(tmp_path / "ws", tiny_model, train={"max_train_steps": 2})
    with pytest.raises(InputError, match="trained with CREPA"):
        build_session(off, ws)


def test_clear_errors_for_a_missing_block_or_features(tmp_path, tiny_model, tiny_dinov2):
    spec, ws = crepa_job(tmp_path, tiny_model, tiny_dinov2, block_index=5)
    cache(spec, ws)
    with pytest.raises(InputError, match="block_index is 5, but the transformer has 2 blocks"):
        build_session(spec, ws)
    plain, _ = pipeline_spec(tmp_path / "plain", tiny_model)
    write_clips(tmp_path / "plain" / "clips")
    cache(plain, type(ws).for_spec(plain))
    on = plain.model_copy(deep=True)
    on.train.crepa.enabled, on.train.crepa.block_index = True, 0
    on.train.crepa.encoder, on.train.crepa.encoder_path = "dinov2_vits14", str(tiny_dinov2)
    with pytest.raises(InputError, match="no CREPA features"):
        build_session(on, type(ws).for_spec(on))


def test_a_missing_encoder_folder_is_a_clear_error(tmp_path, tiny_model):
    spec, ws = crepa_job(tmp_path, tiny_model, tmp_path / "no-such-encoder")
    with pytest.raises(InputError, match="no-such-encoder does not exist"):
        cache(spec, ws)


# --- spec rules ---------------------------------------------------------------------------------


def test_spec_rules_for_crepa_combinations(tmp_path, tiny_model):
    from job.errors import SpecError
    from pipeline_helpers import loaded

    def warned(**crepa):
        return {w.path for w in loaded(tmp_path, tiny_model, train={"crepa": crepa}).warnings}

    assert "train.crepa" in warned(block_index=3)  # options without enabled
    assert "train.crepa.weight" in warned(enabled=True, weight=0.0)
    assert "train.crepa.temporal_decay" in warned(enabled=True, temporal_decay=0.0)
    assert not {"train.crepa", "train.crepa.weight", "train.crepa.temporal_decay"} & warned(enabled=True)
    assert not {"train.crepa", "train.crepa.temporal_decay"} & warned(enabled=True, temporal_decay=0.0, adjacent_distance=0)
    with pytest.raises(SpecError) as err:  # the giant encoder at the small encoder's size
        loaded(tmp_path, tiny_model, train={"crepa": {"enabled": True, "encoder_image_size": 224}})
    assert [p.path for p in err.value.problems] == ["train.crepa.encoder_image_size"]
    small = loaded(tmp_path, tiny_model, train={"crepa": {"enabled": True, "encoder": "dinov2_vits14"}}).spec
    assert small.train.crepa.encoder_image_size == 224


def test_pull_fetches_the_default_hub_encoder_or_uses_a_local_folder(tmp_path, tiny_model, tiny_dinov2, monkeypatch):
    import job.phases as phases
    from pipeline_helpers import loaded

    pulled = []
    monkeypatch.setattr(phases, "_pull_one", lambda spec, uri, dest, include: pulled.append((uri, include)) or 1)
    (tmp_path / "clips").mkdir()  # the spec's local dataset folder: pull checks that it is there
    hub = loaded(tmp_path, tiny_model, train={"crepa": {"enabled": True, "encoder": "dinov2_vits14"}})
    phases.pull(hub, Workspace.for_spec(hub.spec))
    assert pulled == [("hf://facebook/dinov2-small", ["*.json", "*.safetensors"])]
    pulled.clear()
    local = loaded(tmp_path, tiny_model, train={"crepa": {"enabled": True, "encoder": "dinov2_vits14", "encoder_path": str(tiny_dinov2)}})
    phases.pull(local, Workspace.for_spec(local.spec))
    assert pulled == []


def test_preflight_counts_the_projector_it_builds(tmp_path, tiny_model):
    import json as _json

    from job.preflight.estimate import aux_bytes, inputs_from_spec
    from job.train.crepa import Projector
    from pipeline_helpers import loaded

    config = _json.loads((tiny_model / "transformer" / "config.json").read_text())
    spec = loaded(tmp_path, tiny_model, train={"crepa": {"enabled": True}}).spec
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    params = sum(p.numel() for p in Projector(inner, 1536).parameters())  # vitg14 is 1536 wide
    assert aux_bytes(inputs_from_spec(spec, config))["crepa_projector"] == 16 * params
    plain = loaded(tmp_path, tiny_model).spec
    assert "crepa_projector" not in aux_bytes(inputs_from_spec(plain, config))
