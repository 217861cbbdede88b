"""LoRA: only the adapter trains, and SanaVideoPipeline.load_lora_weights reproduces the trained adapter."""

from __future__ import annotations

import torch

from job.train import TrainHooks, run_train
from train_helpers import CAPTION_DIM, LATENT_SHAPE, SEQ_LEN, make_job


def _fixed_inputs():
    g = torch.Generator().manual_seed(123)
    return dict(
        hidden_states=torch.randn(1, *LATENT_SHAPE, generator=g),
        encoder_hidden_states=torch.randn(1, SEQ_LEN, CAPTION_DIM, generator=g),
        encoder_attention_mask=torch.ones(1, SEQ_LEN, dtype=torch.int64),
        timestep=torch.tensor([500.0]),
        return_dict=False,
    )


@torch.no_grad()
def _run(model) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(**_fixed_inputs())[0]
    finally:
        model.train(was_training)


def test_lora_weights_load_into_the_pipeline_unchanged(tmp_path, tiny_model):
    from diffusers import SanaVideoPipeline

    spec, ws = make_job(
        tmp_path, tiny_model,
        model={"pretrained_model_name_or_path": str(tiny_model), "type": "lora", "prompt": {"max_sequence_length": 8},
               "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}},
        train={"max_train_steps": 5, "learning_rate": 2e-2},
    )
    captured = {}

    def capture(info):
        if info.step == info.total_steps:
            captured["out"] = _run(info.session.model)
            captured["trainable"] = sorted(n for n, p in info.session.model.named_parameters() if p.requires_grad)

    result = run_train(spec, ws, TrainHooks(on_step_end=[capture]))
    assert result.status == "completed"
    assert captured["trainable"] and all("lora_" in n for n in captured["trainable"])
    assert (ws.final_dir / "pytorch_lora_weights.safetensors").is_file()

    pipe = SanaVideoPipeline.from_pretrained(tiny_model)
    base_out = _run(pipe.transformer)
    pipe.load_lora_weights(ws.final_dir)
    lora_out = _run(pipe.transformer)
    assert not torch.allclose(base_out, lora_out, atol=1e-4), "the adapter changed nothing"
    torch.testing.assert_close(lora_out, captured["out"], rtol=1e-5, atol=1e-6)
    # the checkpoint's LoRA file loads the same way
    pipe2 = SanaVideoPipeline.from_pretrained(tiny_model)
    pipe2.load_lora_weights(result.checkpoint)
    torch.testing.assert_close(_run(pipe2.transformer), captured["out"], rtol=1e-5, atol=1e-6)
