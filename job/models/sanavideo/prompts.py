"""Gemma2 prompt embeddings exactly as `SanaVideoPipeline.encode_prompt` makes them.

What the pipeline does (diffusers 0.42, `_get_gemma_prompt_embeds` + `encode_prompt`), and so
what `encode_prompts` does:

1. the tokenizer pads on the RIGHT;
2. each caption is lower-cased and stripped (`clean_caption=False`, the default; with
   `clean_caption=True` the pipeline's own bs4/ftfy cleaner is used);
3. with a complex human instruction (CHI), the lines are joined with "\\n" and prefixed to every
   caption, and the token budget becomes `len(tokenizer.encode(chi)) + max_sequence_length - 2`
   (the CHI's own token count includes `<bos>`);
4. tokenise with `padding="max_length"`, `truncation=True`, `<bos>` prepended, no `<eos>`;
5. run Gemma2 with the attention mask; take `last_hidden_state`;
6. keep position 0 (`<bos>`) plus the LAST `max_sequence_length - 1` positions (paper, sec. 3.1),
   for both the embeddings and the mask. Because padding is on the right, these are the
   caption's own tokens (computed with the CHI in context: Gemma is causal) followed by padding.

Result: embeddings [B, max_sequence_length, hidden] in the text encoder's dtype and an int64
mask [B, max_sequence_length] with 1 = real token, 0 = padding (the transformer turns it into
an additive -10000 bias itself). Negative prompts are encoded WITHOUT the CHI
(`encode_negative_prompts`), as the pipeline does; without a CHI step 6 selects every position.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence

import torch
from diffusers import SanaVideoPipeline

_CALL_DEFAULTS = inspect.signature(SanaVideoPipeline.__call__).parameters

#: The pipeline's default complex human instruction, read from diffusers itself (not retyped).
COMPLEX_HUMAN_INSTRUCTION: tuple[str, ...] = tuple(_CALL_DEFAULTS["complex_human_instruction"].default)
#: The pipeline's default token budget per prompt.
DEFAULT_MAX_SEQUENCE_LENGTH: int = _CALL_DEFAULTS["max_sequence_length"].default

# `_text_preprocessing` / `_clean_caption` only use class attributes, so an uninitialised
# instance lets us call the pipeline's own caption preprocessing without building a pipeline.
_PREPROCESSOR = SanaVideoPipeline.__new__(SanaVideoPipeline)

_MOTION_SCORE_RE = re.compile(r"\s*motion score:\s*\d+(?:\.\d+)?\.\s*$")


def motion_score(caption: str, score: int) -> str:
    """Append SANA-Video's motion-score suffix: `"<caption> motion score: 30."`.

    This is the format of the SANA-Video model card and the diffusers example
    (`prompt + f" motion score: {score}."`). An existing trailing motion score is replaced, so
    the helper is idempotent. Higher scores ask for more motion; the model card uses 30.
    """
    if isinstance(score, bool) or not isinstance(score, int) or score < 0:
        raise ValueError(f"motion score must be a non-negative integer, got {score!r}")
    base = _MOTION_SCORE_RE.sub("", caption).rstrip()
    return f"{base} motion score: {score}."


def instruction_from_spec(value: Sequence[str] | None) -> tuple[str, ...] | None:
    """Map the spec's `model.prompt.complex_human_instruction` (None = the pipeline default,
    [] = none) to what `encode_prompts` takes (the lines, or None for none)."""
    if value is None:
        return COMPLEX_HUMAN_INSTRUCTION
    return tuple(value) or None


def preprocess_captions(prompts: Sequence[str], clean_caption: bool = False) -> list[str]:
    """The pipeline's caption preprocessing: lower-case + strip (or its full cleaner)."""
    return _PREPROCESSOR._text_preprocessing(list(prompts), clean_caption=clean_caption)


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def encode_prompts(
    text_encoder,
    tokenizer,
    prompts: Sequence[str],
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    complex_human_instruction: Sequence[str] | None = COMPLEX_HUMAN_INSTRUCTION,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    clean_caption: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode `prompts` as `SanaVideoPipeline.encode_prompt(prompts, ...)` does.

    Returns `(prompt_embeds [B, max_sequence_length, hidden], attention_mask [B,
    max_sequence_length] int64)`. `complex_human_instruction=None` (or []) disables the CHI.
    `device` defaults to the text encoder's device, `dtype` to its dtype (the pipeline's
    choice). Captions longer than `max_sequence_length - 1` tokens lose their END (the tokenizer
    truncates on the right before the last-N selection).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
    device = torch.device(device) if device is not None else _module_device(text_encoder)
    dtype = dtype or text_encoder.dtype

    tokenizer.padding_side = "right"  # the pipeline sets this too
    texts = preprocess_captions(prompts, clean_caption=clean_caption)
    if complex_human_instruction:
        chi = "\n".join(complex_human_instruction)
        texts = [chi + t for t in texts]
        max_length_all = len(tokenizer.encode(chi)) + max_sequence_length - 2
    else:
        max_length_all = max_sequence_length

    tokens = tokenizer(
        texts,
        padding="max_length",
        max_length=max_length_all,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    mask = tokens.attention_mask.to(device)
    embeds = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].to(dtype=dtype, device=device)

    select = [0] + list(range(-max_sequence_length + 1, 0))
    return embeds[:, select], mask[:, select]


def encode_negative_prompts(
    text_encoder,
    tokenizer,
    prompts: Sequence[str],
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    clean_caption: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative prompts as the pipeline encodes them: never with the complex human instruction."""
    return encode_prompts(
        text_encoder,
        tokenizer,
        prompts,
        max_sequence_length=max_sequence_length,
        complex_human_instruction=None,
        device=device,
        dtype=dtype,
        clean_caption=clean_caption,
    )
