"""`speed.trim_text_padding`: the prompt padding after the batch's longest prompt is cut before the
transformer, which leaves its output unchanged (up to summation order) because diffusers masks padded
keys with a -10000 bias."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from job.models.sanavideo.speed import trim_text_padding
from job.train.step import caption_dropout


def _mask(lengths: list[int], total: int = 300) -> torch.Tensor:
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return mask


@pytest.mark.parametrize(("lengths", "kept"), [([1], 64), ([64], 64), ([65, 3], 128), ([120, 200], 256),
                                               ([257], 300), ([300, 10], 300)])
def test_the_cut_is_the_longest_prompt_rounded_up_to_64(lengths, kept):
    mask = _mask(lengths)
    embeds = torch.randn(len(lengths), 300, 8)
    cut_embeds, cut_mask = trim_text_padding(embeds, mask)
    assert cut_embeds.shape == (len(lengths), kept, 8) and cut_mask.shape == (len(lengths), kept)
    assert torch.equal(cut_embeds, embeds[:, :kept]) and int(cut_mask.sum()) == int(mask.sum())  # no valid token lost


def test_nothing_is_cut_when_a_prompt_has_no_valid_token_or_there_is_no_mask():
    embeds = torch.randn(2, 300, 8)
    mask = _mask([10, 0])  # an all-masked row attends to all 300 keys equally: cutting would change it
    assert trim_text_padding(embeds, mask)[0] is embeds
    assert trim_text_padding(embeds, None)[0] is embeds


def test_a_mask_with_gaps_keeps_up_to_its_last_valid_token():
    mask = _mask([5])
    mask[0, 130] = 1
    assert trim_text_padding(torch.randn(1, 300, 8), mask)[1].shape[1] == 192


def test_the_transformer_gives_the_same_output_on_the_cut_prompt():
    from diffusers import SanaVideoTransformer3DModel

    from job.models.sanavideo.tiny import TINY_TRANSFORMER_CONFIG

    torch.manual_seed(0)
    model = SanaVideoTransformer3DModel(**TINY_TRANSFORMER_CONFIG).double().eval()
    g = torch.Generator().manual_seed(1)
    mask = _mask([40, 90], total=300)
    embeds = torch.randn(2, 300, TINY_TRANSFORMER_CONFIG["caption_channels"], generator=g, dtype=torch.float64)
    inputs = dict(hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g, dtype=torch.float64), timestep=torch.tensor([300.0, 700.0]),
                  return_dict=False)
    cut_embeds, cut_mask = trim_text_padding(embeds, mask)
    assert cut_embeds.shape[1] == 128
    with torch.no_grad():
        full = model(encoder_hidden_states=embeds, encoder_attention_mask=mask, **inputs)[0]
        cut = model(encoder_hidden_states=cut_embeds, encoder_attention_mask=cut_mask, **inputs)[0]
        without_mask = model(encoder_hidden_states=embeds, encoder_attention_mask=torch.ones_like(mask), **inputs)[0]
    assert float((cut - full).abs().max()) < 1e-12 * float(full.abs().max())
    assert float((without_mask - full).abs().max()) > 1e-3  # the padding would matter if it were not masked


def _session(trim: bool, empty_prompt=None):
    spec = SimpleNamespace(speed=SimpleNamespace(trim_text_padding=trim),
                           train=SimpleNamespace(caption_dropout_probability=1.0 if empty_prompt is not None else 0.0))
    return SimpleNamespace(spec=spec, world=1, rank=0, generator=torch.Generator().manual_seed(0), empty_prompt=empty_prompt,
                           weight_dtype=torch.float32)


def test_the_training_step_cuts_after_caption_dropout_and_only_when_asked():
    batch = {"prompt_embeds": torch.randn(2, 300, 8), "prompt_attention_mask": _mask([30, 70])}
    embeds, mask = caption_dropout(_session(True), batch, torch.device("cpu"))
    assert embeds.shape[1] == 128 and mask.shape[1] == 128
    embeds, mask = caption_dropout(_session(False), batch, torch.device("cpu"))
    assert embeds.shape[1] == 300 and mask.shape[1] == 300
    # the empty prompt that caption dropout puts in is cut with the batch (its length counts too)
    empty = (torch.randn(300, 8), _mask([150])[0])
    embeds, mask = caption_dropout(_session(True, empty), batch, torch.device("cpu"))
    assert embeds.shape[1] == 192 and torch.equal(mask, _mask([150, 150])[:, :192])
