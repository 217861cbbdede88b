"""Parameter arithmetic of `SanaVideoTransformer3DModel`, from its config alone.

Nothing here builds a model: the 2B transformer is never instantiated to count it. The
counts follow the module definitions in diffusers (`transformer_sana_video.py`, 0.36-0.42)
and are checked by tests against real (tiny and meta-device 2B) instances.

`linear_modules()` lists the layers LoRA can target (name suffix, in, out, kernel size and
how many tokens flow through it), so the LoRA parameter count follows from rank and
`target_modules` the way peft matches them (a name equal to the target or ending in
`.target`).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

#: The released 2B 480p transformer config (= the class defaults of diffusers 0.42).
SANA_VIDEO_2B_CONFIG: dict[str, Any] = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=20,
    attention_head_dim=112,
    num_layers=20,
    num_cross_attention_heads=20,
    cross_attention_head_dim=112,
    cross_attention_dim=2240,
    caption_channels=2304,
    mlp_ratio=2.5,
    attention_bias=False,
    sample_size=30,
    patch_size=(1, 2, 2),
    norm_elementwise_affine=False,
    guidance_embeds=False,
    qk_norm="rms_norm_across_heads",
)


@lru_cache(maxsize=1)
def library_defaults() -> dict[str, Any]:
    """`inspect.signature(SanaVideoTransformer3DModel.__init__)` defaults (the 2B config), or the
    copy above when diffusers is not importable. Never instantiates the model."""
    try:
        from diffusers import SanaVideoTransformer3DModel
    except Exception:  # noqa: BLE001 - diffusers missing or broken: use the known config
        return dict(SANA_VIDEO_2B_CONFIG)
    out = {}
    for name, p in inspect.signature(SanaVideoTransformer3DModel.__init__).parameters.items():
        if name != "self" and p.default is not inspect.Parameter.empty:
            out[name] = p.default
    return out


def load_transformer_config(model_dir: Path | None) -> tuple[dict[str, Any], str]:
    """(config, where it came from): `<model_dir>/transformer/config.json` when it exists,
    else the library defaults (the released 2B model)."""
    config = library_defaults()
    if model_dir is not None:
        path = Path(model_dir) / "transformer" / "config.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                return dict(config), "library defaults (unreadable transformer/config.json)"
            merged = dict(config)
            merged.update({k: v for k, v in data.items() if not k.startswith("_")})
            return merged, str(path)
    return dict(config), "library defaults (SanaVideoTransformer3DModel, the 2B config)"


@dataclass(frozen=True)
class LinearModule:
    """One weight layer inside a transformer block (or at the top level)."""

    name: str          # dotted path inside the block, e.g. "attn1.to_q"
    in_features: int
    out_features: int
    kernel: int = 1    # spatial kernel numel for convolutions (LoRA on a conv: r*(in*k + out))
    groups: int = 1
    bias: bool = False
    token_input: bool = True  # False: its input is the 300-token caption, not the video tokens

    @property
    def params(self) -> int:
        return self.in_features // self.groups * self.out_features * self.kernel + (self.out_features if self.bias else 0)

    def lora_params(self, rank: int) -> int:
        if self.groups != 1:
            return 0  # peft does not put LoRA on grouped (depthwise) convolutions
        return rank * (self.in_features * self.kernel + self.out_features)


@dataclass(frozen=True)
class TransformerDims:
    inner_dim: int
    num_layers: int
    cross_inner_dim: int
    cross_attention_dim: int
    caption_channels: int
    mlp_hidden: int
    in_channels: int
    out_channels: int
    patch: tuple[int, int, int]
    attention_bias: bool
    qk_norm: str | None
    guidance_embeds: bool
    heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> "TransformerDims":
        c = dict(library_defaults())
        if config:
            c.update({k: v for k, v in dict(config).items() if v is not None or k in ("qk_norm", "cross_attention_dim")})
        heads, head_dim = int(c["num_attention_heads"]), int(c["attention_head_dim"])
        inner = heads * head_dim
        cross_dim = c.get("cross_attention_dim")
        cross_heads = c.get("num_cross_attention_heads") or heads
        cross_head_dim = c.get("cross_attention_head_dim") or head_dim
        patch = c.get("patch_size", (1, 2, 2))
        if isinstance(patch, int):
            patch = (1, patch, patch)
        in_ch = int(c.get("in_channels", 16))
        return cls(
            inner_dim=inner,
            num_layers=int(c["num_layers"]),
            cross_inner_dim=int(cross_heads) * int(cross_head_dim) if cross_dim is not None else 0,
            cross_attention_dim=int(cross_dim) if cross_dim is not None else 0,
            caption_channels=int(c.get("caption_channels", 2304)),
            mlp_hidden=int(float(c.get("mlp_ratio", 2.5)) * inner),
            in_channels=in_ch,
            out_channels=int(c.get("out_channels") or in_ch),
            patch=tuple(int(p) for p in patch),
            attention_bias=bool(c.get("attention_bias", False)),
            qk_norm=c.get("qk_norm"),
            guidance_embeds=bool(c.get("guidance_embeds", False)),
            heads=heads,
            head_dim=head_dim,
        )


def block_modules(d: TransformerDims) -> list[LinearModule]:
    """The weight layers of one `SanaVideoTransformerBlock`."""
    D, H = d.inner_dim, d.mlp_hidden
    mods = [
        LinearModule("attn1.to_q", D, D, bias=d.attention_bias),
        LinearModule("attn1.to_k", D, D, bias=d.attention_bias),
        LinearModule("attn1.to_v", D, D, bias=d.attention_bias),
        LinearModule("attn1.to_out.0", D, D, bias=True),
    ]
    if d.cross_attention_dim:
        C, Dc = d.cross_attention_dim, d.cross_inner_dim
        mods += [
            LinearModule("attn2.to_q", D, Dc, bias=True),
            LinearModule("attn2.to_k", C, Dc, bias=True, token_input=False),
            LinearModule("attn2.to_v", C, Dc, bias=True, token_input=False),
            LinearModule("attn2.to_out.0", Dc, D, bias=True),
        ]
    mods += [
        LinearModule("ff.conv_inverted", D, 2 * H, bias=True),
        LinearModule("ff.conv_depth", 2 * H, 2 * H, kernel=9, groups=2 * H, bias=True),
        LinearModule("ff.conv_point", H, D, bias=False),
        LinearModule("ff.conv_temp", D, D, kernel=3, bias=False),
    ]
    return mods


def _qk_norm_params(kind: str | None, width_q: int, width_k: int, head_dim: int) -> int:
    if kind is None or kind == "l2" or kind == "fp32_layer_norm":
        return 0
    if kind == "rms_norm_across_heads":
        return width_q + width_k
    if kind == "layer_norm_across_heads":
        return 2 * (width_q + width_k)
    if kind == "layer_norm":
        return 4 * head_dim
    return 2 * head_dim  # rms_norm


def top_modules(d: TransformerDims) -> list[LinearModule]:
    """Weight layers outside the blocks (patch embedding, timestep / caption embedders, output)."""
    D = d.inner_dim
    p = math.prod(d.patch)
    mods = [
        LinearModule("patch_embedding", d.in_channels, D, kernel=p, bias=True),
        LinearModule("time_embed.emb.timestep_embedder.linear_1", 256, D, bias=True, token_input=False),
        LinearModule("time_embed.emb.timestep_embedder.linear_2", D, D, bias=True, token_input=False),
        LinearModule("time_embed.linear", D, 6 * D, bias=True, token_input=False),
        LinearModule("caption_projection.linear_1", d.caption_channels, D, bias=True, token_input=False),
        LinearModule("caption_projection.linear_2", D, D, bias=True, token_input=False),
        LinearModule("proj_out", D, p * d.out_channels, bias=True),
    ]
    if d.guidance_embeds:
        mods += [
            LinearModule("time_embed.guidance_embedder.linear_1", 256, D, bias=True, token_input=False),
            LinearModule("time_embed.guidance_embedder.linear_2", D, D, bias=True, token_input=False),
        ]
    return mods


def block_params(d: TransformerDims) -> int:
    D = d.inner_dim
    n = sum(m.params for m in block_modules(d))
    n += _qk_norm_params(d.qk_norm, D, D, d.head_dim)
    if d.cross_attention_dim:
        n += _qk_norm_params(d.qk_norm, d.cross_inner_dim, d.cross_inner_dim, d.head_dim)
    n += 6 * D  # scale_shift_table
    return n


def top_params(d: TransformerDims) -> int:
    D = d.inner_dim
    return sum(m.params for m in top_modules(d)) + D + 2 * D  # caption_norm weight, final scale_shift_table


@dataclass(frozen=True)
class ParamCounts:
    total: int
    per_block: int
    top: int
    num_layers: int


def param_counts(config: Mapping[str, Any] | None = None) -> ParamCounts:
    """Parameters of the transformer described by `config` (None: the 2B model, 1.906B)."""
    d = TransformerDims.from_config(config)
    per_block, top = block_params(d), top_params(d)
    return ParamCounts(total=per_block * d.num_layers + top, per_block=per_block, top=top, num_layers=d.num_layers)


def _peft_match(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def lora_param_count(config: Mapping[str, Any] | None, rank: int, target_modules: list[str]) -> int:
    """Trainable parameters of a LoRA adapter of `rank` on the modules peft would match."""
    d = TransformerDims.from_config(config)
    n = 0
    for i in range(d.num_layers):
        for m in block_modules(d):
            full = f"transformer_blocks.{i}.{m.name}"
            if any(_peft_match(full, t) for t in target_modules):
                n += m.lora_params(rank)
    for m in top_modules(d):
        if any(_peft_match(m.name, t) for t in target_modules):
            n += m.lora_params(rank)
    return n


def lora_token_width(config: Mapping[str, Any] | None, target_modules: list[str]) -> float:
    """Sum over one block's LoRA-adapted, token-fed layers of in_features / inner_dim: the
    activation cost of the adapters in units of one token x channel tensor (to_q: 1,
    ff.conv_point: mlp_ratio)."""
    d = TransformerDims.from_config(config)
    return sum(m.in_features / d.inner_dim for m in lora_token_modules_per_block(config, target_modules))


def lora_token_modules_per_block(config: Mapping[str, Any] | None, target_modules: list[str]) -> list[LinearModule]:
    """The LoRA-targeted layers of one block whose input is the video token sequence (these
    add activation memory; caption-side ones are negligible)."""
    d = TransformerDims.from_config(config)
    return [m for m in block_modules(d) if m.token_input and m.groups == 1
            and any(_peft_match(f"transformer_blocks.0.{m.name}", t) for t in target_modules)]
