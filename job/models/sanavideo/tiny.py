"""A tiny random SANA-Video model folder, built offline in well under a second.

`build_tiny_model(path)` writes the same diffusers layout as
`Efficient-Large-Model/SANA-Video_2B_480p_diffusers` (model_index.json, transformer/, vae/,
text_encoder/, tokenizer/, scheduler/) with the same classes and the same structural choices
as the real checkpoint, only small:

- transformer: `SanaVideoTransformer3DModel`, patch (1, 2, 2), sample_size 30 (the 480p value,
  which selects the pipeline's 480p aspect-ratio bins), 2 layers, 2 heads of 12.
- vae: `AutoencoderKLWan` with the real compression (temporal 4, spatial 8) but z_dim 4 and
  base_dim 8. z_dim is deliberately NOT 16 so code that hard-codes the real channel count fails
  on the tiny model instead of in production. latents_mean / latents_std are non-trivial so the
  normalisation convention is actually exercised.
- text_encoder: `Gemma2Model` (hidden 32 = the transformer's caption_channels).
- tokenizer: a Gemma-style BPE tokenizer (byte fallback, "▁" for spaces, `<bos>` prepended,
  no `<eos>`, right padding) trained with the `tokenizers` library on a few sentences,
  wrapped in transformers' `GemmaTokenizerFast`.
- scheduler: `DPMSolverMultistepScheduler(flow_shift=8.0, use_flow_sigmas=True,
  prediction_type="flow_prediction")`, the "flow-dpm_solver" scheduler diffusers' conversion
  script writes into the released checkpoint.

Used by the tests and by the CPU smoke job; never downloads anything.
"""

from __future__ import annotations

import inspect
from pathlib import Path

#: Configuration of the tiny transformer (everything else is the class default).
TINY_TRANSFORMER_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=12,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=12,
    cross_attention_dim=24,
    caption_channels=32,
    mlp_ratio=3.0,
    sample_size=30,
    patch_size=(1, 2, 2),
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=64,
)

#: Configuration of the tiny Wan VAE: real compression (4x time, 8x space), 4 latent channels.
TINY_VAE_CONFIG = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=[0.25, -0.5, 0.125, 1.0],
    latents_std=[1.5, 0.75, 2.0, 3.0],
    scale_factor_temporal=4,
    scale_factor_spatial=8,
)

#: Configuration of the tiny Gemma2 text encoder (vocab_size is filled in from the tokenizer).
TINY_TEXT_ENCODER_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=2048,
    sliding_window=512,
)

#: The scheduler of the released checkpoint (diffusers' convert_sana_video_to_diffusers.py,
#: scheduler_type "flow-dpm_solver", flow_shift 8.0).
SCHEDULER_CONFIG = dict(flow_shift=8.0, use_flow_sigmas=True, prediction_type="flow_prediction")

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # Gemma's ids 0..4

_CORPUS = [
    "A cat sleeping on a warm sunny windowsill.",
    "A busy city street at dusk with glowing street lamps and a double-decker bus.",
    "A young man stands in a forest, golden light glimmers on his hair.",
    "Evening, backlight, side lighting, soft light, high contrast, mid-shot, centered composition.",
    "A chaotic sequence with misshapen, deformed limbs in heavy motion blur, jump cuts, jitter.",
    "The camera slowly pans across a calm blue lake while birds fly over the water.",
    "A red car drives along a winding mountain road in the rain.",
    " motion score: 0. motion score: 10. motion score: 30. motion score: 50. motion score: 100.",
    "0 1 2 3 4 5 6 7 8 9",
]


def _training_corpus() -> list[str]:
    # The pipeline's own complex-human-instruction lines, so the tiny tokenizer has real
    # words for them; prompts are lower-cased by the pipeline, so train on both cases.
    from diffusers import SanaVideoPipeline

    chi = inspect.signature(SanaVideoPipeline.__call__).parameters["complex_human_instruction"].default
    lines = list(chi) + _CORPUS
    return lines + [line.lower() for line in lines]


def build_tiny_tokenizer(vocab_size: int = 512):
    """A Gemma-style BPE tokenizer trained offline; returns a `GemmaTokenizerFast`."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import GemmaTokenizerFast

    # 1. learn merges on whitespace-separated words written sentencepiece style ("▁word").
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizers.Replace(" ", "▁")
    learner.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    learner.train_from_iterator(
        _training_corpus(),
        trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[]),
    )
    learned = json.loads(learner.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    # 2. Gemma's id layout: specials, then the 256 byte-fallback tokens, then the learned pieces.
    vocab: dict[str, int] = {}
    for token in list(SPECIAL_TOKENS) + [f"<0x{b:02X}>" for b in range(256)]:
        vocab[token] = len(vocab)
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))

    # 3. the same pipeline as transformers' GemmaTokenizer: spaces -> "▁", BPE with byte
    #    fallback, <bos> prepended and no <eos>.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))

    tokenizer = GemmaTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        mask_token="<mask>",
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",  # what SANA-Video uses (the pipeline forces it too)
        model_max_length=4096,
    )
    tokenizer.padding_side = "right"
    return tokenizer


def build_tiny_components(seed: int = 0) -> dict:
    """The five pipeline components, tiny and random, in float32 on the CPU."""
    import torch
    from diffusers import AutoencoderKLWan, DPMSolverMultistepScheduler, SanaVideoTransformer3DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = build_tiny_tokenizer()
    # Leave the caller's global RNG untouched: module initialisers draw from it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SanaVideoTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(**TINY_VAE_CONFIG)
        torch.manual_seed(seed + 2)
        te_config = Gemma2Config(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **TINY_TEXT_ENCODER_CONFIG,
        )
        text_encoder = Gemma2Model(te_config)
    scheduler = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)
    for module in (transformer, vae, text_encoder):
        module.eval()
    return dict(
        transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
    )


def build_tiny_feedforward(residual: bool = False, norm_type=None, channels: int = 12, dtype=None):
    """A SANA-Video feed-forward (diffusers' `GLUMBTempConv`, expansion 2.5) with every parameter drawn from
    N(0, 0.3) after `torch.manual_seed(1)`: a non-trivial temporal conv and depthwise bias (diffusers' own init is
    random too). For the tests of the fused feed-forward; float64 unless `dtype` says otherwise."""
    import torch
    from diffusers.models.transformers.transformer_sana_video import GLUMBTempConv

    torch.manual_seed(1)
    ff = GLUMBTempConv(channels, channels, 2.5, norm_type=norm_type, residual_connection=residual)
    ff = ff.to(torch.float64 if dtype is None else dtype)
    with torch.no_grad():
        for p in ff.parameters():
            p.normal_(0, 0.3)
    return ff


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """Write a complete tiny SANA-Video diffusers folder at `path` and return `path`.

    It loads with `SanaVideoPipeline.from_pretrained(path)` and with
    `job.models.sanavideo.loading.load_components(path)`, and renders a few frames on a CPU
    in about a second. The same seed gives the same weights.
    """
    from diffusers import SanaVideoPipeline

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipe = SanaVideoPipeline(**build_tiny_components(seed))
    pipe.save_pretrained(path, safe_serialization=True)
    return path
