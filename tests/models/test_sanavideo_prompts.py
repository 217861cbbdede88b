"""encode_prompts must equal SanaVideoPipeline.encode_prompt bit for bit."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import SanaVideoPipeline

from job.models.sanavideo.prompts import (
    COMPLEX_HUMAN_INSTRUCTION,
    DEFAULT_MAX_SEQUENCE_LENGTH,
    encode_negative_prompts,
    encode_prompts,
    instruction_from_spec,
    motion_score,
)

PROMPTS = [
    "  A Cat sleeping on a warm sunny windowsill. motion score: 30.  ",
    "The camera slowly pans across a calm blue lake while birds fly over the water, "
    "a red car drives along a winding mountain road in the rain. Ünïcode 猫",
]
LONG = " ".join(["a busy city street at dusk with glowing street lamps"] * 12)


def _reference(pipe, prompts, **kwargs):
    return pipe.encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt="", device="cpu", **kwargs)


def test_default_instruction_is_the_pipelines():
    default = inspect.signature(SanaVideoPipeline.__call__).parameters["complex_human_instruction"].default
    assert list(COMPLEX_HUMAN_INSTRUCTION) == default
    assert COMPLEX_HUMAN_INSTRUCTION[0].startswith("Given a user prompt")
    assert DEFAULT_MAX_SEQUENCE_LENGTH == 300


def test_matches_pipeline_with_default_instruction(tiny_pipeline):
    # the pipeline's __call__ passes its default CHI to encode_prompt; compare with that path
    ref_embeds, ref_mask, neg_embeds, neg_mask = _reference(
        tiny_pipeline, PROMPTS, complex_human_instruction=list(COMPLEX_HUMAN_INSTRUCTION)
    )
    embeds, mask = encode_prompts(tiny_pipeline.text_encoder, tiny_pipeline.tokenizer, PROMPTS)
    assert embeds.shape == (2, 300, 32) and mask.shape == (2, 300)
    assert embeds.dtype == ref_embeds.dtype and mask.dtype == ref_mask.dtype
    assert torch.equal(embeds, ref_embeds) and torch.equal(mask, ref_mask)
    assert mask[:, 0].all() and mask.sum(1).min() > 3  # <bos> + the caption's tokens
    plain, _ = encode_prompts(tiny_pipeline.text_encoder, tiny_pipeline.tokenizer, PROMPTS, complex_human_instruction=None)
    assert not torch.equal(plain, embeds)  # the instruction really is in context

    nembeds, nmask = encode_negative_prompts(tiny_pipeline.text_encoder, tiny_pipeline.tokenizer, ["", ""])
    assert torch.equal(nembeds, neg_embeds) and torch.equal(nmask, neg_mask)


@pytest.mark.parametrize("chi", [None, [], ["Describe the video:", "User Prompt: "]])
@pytest.mark.parametrize("max_len", [16, 300])
def test_matches_pipeline_other_settings(tiny_pipeline, chi, max_len):
    prompts = PROMPTS + [LONG]  # LONG overflows 16 tokens: truncation must match too
    ref_embeds, ref_mask, _, _ = _reference(
        tiny_pipeline, prompts, complex_human_instruction=chi, max_sequence_length=max_len
    )
    embeds, mask = encode_prompts(
        tiny_pipeline.text_encoder,
        tiny_pipeline.tokenizer,
        prompts,
        max_sequence_length=max_len,
        complex_human_instruction=chi,
    )
    assert embeds.shape == (3, max_len, 32)
    assert torch.equal(embeds, ref_embeds) and torch.equal(mask, ref_mask)


def test_negative_with_other_length(tiny_pipeline):
    _, _, neg_embeds, neg_mask = tiny_pipeline.encode_prompt(
        ["x"], do_classifier_free_guidance=True, negative_prompt="Blurry, LOW quality", device="cpu", max_sequence_length=24
    )
    nembeds, nmask = encode_negative_prompts(
        tiny_pipeline.text_encoder, tiny_pipeline.tokenizer, ["Blurry, LOW quality"], max_sequence_length=24
    )
    assert torch.equal(nembeds, neg_embeds) and torch.equal(nmask, neg_mask)


def test_dtype_and_no_grad(tiny_pipeline):
    embeds, mask = encode_prompts(tiny_pipeline.text_encoder, tiny_pipeline.tokenizer, ["a cat"], dtype=torch.bfloat16)
    assert embeds.dtype == torch.bfloat16 and not embeds.requires_grad
    assert mask.dtype == torch.long


def test_motion_score():
    assert motion_score("A cat sleeping.", 30) == "A cat sleeping. motion score: 30."
    assert motion_score("A cat sleeping.  ", 0) == "A cat sleeping. motion score: 0."
    once = motion_score("A cat.", 30)
    assert motion_score(once, 50) == "A cat. motion score: 50."  # replaced, not appended twice
    for bad in (-1, 2.5, True, "30"):
        with pytest.raises(ValueError):
            motion_score("x", bad)


def test_instruction_from_spec():
    assert instruction_from_spec(None) == COMPLEX_HUMAN_INSTRUCTION
    assert instruction_from_spec([]) is None
    assert instruction_from_spec(["a", "b"]) == ("a", "b")
