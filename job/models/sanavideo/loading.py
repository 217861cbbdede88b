"""Load the parts of a SANA-Video model from a local diffusers-layout folder.

The folder is what `pull` leaves in the workspace (a snapshot of
`Efficient-Large-Model/SANA-Video_2B_480p_diffusers` or the tiny test model):

    model_index.json  transformer/  vae/  text_encoder/  tokenizer/  scheduler/

Everything a user can get wrong (a missing folder or part, unreadable weights, a VAE that does
not belong to the base model) ends in one `InputError` naming the thing and the fix. The configs
are checked before any weight is read, so a mismatch fails in milliseconds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from job.errors import InputError

ALL_PARTS = frozenset({"transformer", "vae", "text_encoder", "tokenizer", "scheduler"})
DEFAULT_PARTS = frozenset({"transformer", "vae", "text_encoder"})
EXPECTED_VAE_CLASS = "AutoencoderKLWan"
EXPECTED_TRANSFORMER_CLASS = "SanaVideoTransformer3DModel"

_FIX_FOLDER = (
    "point model.pretrained_model_name_or_path at a complete diffusers folder "
    "(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/), e.g. "
    "Efficient-Large-Model/SANA-Video_2B_480p_diffusers, and run the pull phase again"
)
_FIX_VAE = (
    "set model.pretrained_vae_model_name_or_path to the VAE this base model was trained with "
    "(SANA-Video 2B 480p: the Wan 2.1 VAE, 16 latent channels), or leave it unset to use the base "
    "model's own vae/"
)


@dataclass
class SanaVideoComponents:
    """The loaded parts; a part that was not asked for is None."""

    model_path: Path
    transformer: Any = None
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    scheduler: Any = None
    vae_path: Path | None = None
    configs: dict[str, dict] = field(default_factory=dict)  # the parsed config.json of each part


PULL_MARKER = ".trainer-pull.json"  # written by the pull phase into each folder it downloads
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
_WEIGHT_PARTS = ("transformer", "vae", "text_encoder")


def was_pulled(folder: Path) -> bool:
    """Whether `folder` is a copy the pull phase downloaded (its marker file, or a workspace
    `models/<name>-<hash>` folder that a pull left unfinished), rather than a local path of the spec."""
    folder = Path(folder)
    return (folder / PULL_MARKER).is_file() or (
        folder.parent.name == "models" and re.search(r"-[0-9a-f]{8}$", folder.name) is not None)


def damaged_fix(folder: Path) -> str:
    """The fix for an unreadable or truncated file of the model at `folder`."""
    if was_pulled(folder):
        return "re-download the model (run the pull phase again)"
    return (f"{folder} is a local path, which the pull phase does not download: replace the damaged files there with a "
            "complete copy of the model (copy it again), or use an hf:// id in the spec so pull downloads it")


def _read_json(path: Path, folder: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}", damaged_fix(folder)) from exc


def has_weights(folder: Path) -> bool:
    """Whether `folder` holds a weight file (*.safetensors or *.bin); none is read."""
    return any(next(folder.glob(pattern), None) is not None for pattern in _WEIGHT_PATTERNS)


def _part_present(root: Path, part: str) -> bool:
    folder = root / part
    if part == "tokenizer":
        return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    if part == "scheduler":
        return (folder / "scheduler_config.json").is_file()
    return (folder / "config.json").is_file()


def resolve_parts(parts: Iterable[str] | None) -> set[str]:
    """The parts to load: the tokenizer comes with the text encoder, the scheduler with the transformer."""
    wanted = set(DEFAULT_PARTS if parts is None else parts)
    unknown = wanted - ALL_PARTS
    if unknown:
        raise ValueError(f"unknown model parts {sorted(unknown)}; known: {sorted(ALL_PARTS)}")
    if "text_encoder" in wanted:
        wanted.add("tokenizer")
    if "transformer" in wanted:
        wanted.add("scheduler")
    return wanted


def locate_vae(vae_path: Path, weights: bool = False) -> tuple[Path, str | None]:
    """A VAE is either `<folder>/vae/config.json` (a full model folder) or `<folder>/config.json`.
    `weights`: also require a weight file next to the config (the pull phase's check of a local VAE)."""
    vae_path = Path(vae_path)
    if not vae_path.exists():
        raise InputError(f"the VAE path {vae_path} does not exist", _FIX_VAE)
    if (vae_path / "vae" / "config.json").is_file():
        found: tuple[Path, str | None] = (vae_path, "vae")
    elif (vae_path / "config.json").is_file():
        found = (vae_path, None)
    else:
        raise InputError(
            f"no VAE found at {vae_path}: expected {vae_path / 'config.json'} or {vae_path / 'vae' / 'config.json'}",
            _FIX_VAE,
        )
    folder = vae_path / found[1] if found[1] else vae_path
    if weights and not has_weights(folder):
        raise InputError(f"the VAE at {folder} has a config.json but no weight file (*.safetensors)", _FIX_VAE)
    return found


def check_model_folder(root: Path, parts: Iterable[str] | None = ALL_PARTS, *, separate_vae: bool = False,
                       weights: bool = False) -> set[str]:
    """Raise `InputError` unless `root` is a folder holding each wanted part (its config file).

    Returns the resolved parts. `separate_vae`: the VAE comes from elsewhere, `vae/` may be absent.
    `weights`: also require a weight file in transformer/, vae/ and text_encoder/ (no weight is read).
    Used by `load_components` and by the pull phase for a local model folder.
    """
    root = Path(root)
    wanted = resolve_parts(parts)
    if not root.is_dir():
        raise InputError(f"the model folder {root} does not exist", _FIX_FOLDER)
    try:
        empty = next(root.iterdir(), None) is None
    except OSError as exc:
        raise InputError(f"cannot read the model folder {root}: {exc}", "make the folder readable by this user") from exc
    if empty:
        raise InputError(f"the model folder {root} is empty", _FIX_FOLDER)
    needed_here = set(wanted)
    if separate_vae:
        needed_here.discard("vae")
    missing = sorted(p for p in needed_here if not _part_present(root, p))
    if missing:
        raise InputError(
            f"the model folder {root} is missing {', '.join(p + '/' for p in missing)}", _FIX_FOLDER
        )
    if weights:
        unweighted = sorted(p for p in needed_here & set(_WEIGHT_PARTS) if not has_weights(root / p))
        if unweighted:
            raise InputError(
                f"the model folder {root} has no weight file (*.safetensors) in {', '.join(p + '/' for p in unweighted)}",
                _FIX_FOLDER,
            )
    return wanted


def check_vae_matches(
    vae_config: dict, transformer_config: dict | None, base_vae_config: dict | None = None, where: str = "the VAE"
) -> None:
    """Raise `InputError` unless the VAE config fits the base model.

    Checks the class (Wan VAE), z_dim == transformer in_channels, one latents_mean/std value per
    latent channel, and (when the base model has its own VAE) the same compression and channels.
    """
    cls = vae_config.get("_class_name")
    if cls != EXPECTED_VAE_CLASS:
        raise InputError(f"{where} is a {cls or 'unknown'} model; SANA-Video needs an {EXPECTED_VAE_CLASS}", _FIX_VAE)
    z_dim = vae_config.get("z_dim", 16)
    if transformer_config is not None:
        in_channels = transformer_config.get("in_channels", 16)
        if z_dim != in_channels:
            raise InputError(
                f"{where} does not match the base model: it has {z_dim} latent channels (z_dim) but the base "
                f"model's transformer expects {in_channels} (in_channels)",
                _FIX_VAE,
            )
    for key in ("latents_mean", "latents_std"):
        values = vae_config.get(key)
        if values is None or len(values) != z_dim:
            n = "none" if values is None else len(values)
            raise InputError(f"{where} has {n} {key} values for {z_dim} latent channels", _FIX_VAE)
    if base_vae_config is not None:
        for key in ("z_dim", "scale_factor_temporal", "scale_factor_spatial"):
            mine, base = vae_config.get(key), base_vae_config.get(key)
            if mine != base:
                raise InputError(
                    f"{where} does not match the base model's own VAE: {key} is {mine}, the base model's is {base}",
                    _FIX_VAE,
                )


def _load(what: str, where: Path, loader, *args, **kwargs):
    try:
        return loader(*args, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot load the {what} from {where}: {exc}", damaged_fix(where)) from exc


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _transformers_dtype_kwarg(dtype: torch.dtype) -> dict:
    """transformers 5 takes `dtype`; 4.x wants `torch_dtype`."""
    import transformers

    return {"dtype": dtype} if _major_minor(transformers.__version__) >= (5, 0) else {"torch_dtype": dtype}


def _diffusers_dtype_kwarg(dtype: torch.dtype) -> dict:
    """diffusers 0.42 deprecates `torch_dtype` in favour of `dtype`; older releases only know `torch_dtype`."""
    import diffusers

    return {"dtype": dtype} if _major_minor(diffusers.__version__) >= (0, 42) else {"torch_dtype": dtype}


def load_components(
    model_path: str | Path,
    vae_path: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    parts: Iterable[str] | None = DEFAULT_PARTS,
    *,
    vae_dtype: torch.dtype = torch.float32,
    text_encoder_dtype: torch.dtype | None = None,
) -> SanaVideoComponents:
    """Load the requested parts of the SANA-Video model at `model_path` (a local folder).

    `dtype` is the transformer's dtype (and the text encoder's unless `text_encoder_dtype` is
    given); the VAE loads in `vae_dtype`, float32 by default as the model card asks. `parts` is a
    subset of {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"}; the tokenizer
    comes with the text encoder and the scheduler with the transformer. `vae_path`, if given,
    replaces the base model's `vae/` and must match the base model. Everything is left on the
    CPU, in eval mode.
    """
    from diffusers import AutoencoderKLWan, SanaVideoTransformer3DModel

    root = Path(model_path)
    wanted = check_model_folder(root, parts, separate_vae=vae_path is not None)

    out = SanaVideoComponents(model_path=root)
    transformer_config = None
    if _part_present(root, "transformer"):
        transformer_config = _read_json(root / "transformer" / "config.json", root)
        out.configs["transformer"] = transformer_config
        cls = transformer_config.get("_class_name")
        if "transformer" in wanted and cls != EXPECTED_TRANSFORMER_CLASS:
            raise InputError(
                f"{root / 'transformer'} holds a {cls or 'unknown'} model, not a {EXPECTED_TRANSFORMER_CLASS}",
                _FIX_FOLDER,
            )
    base_vae_config = _read_json(root / "vae" / "config.json", root) if _part_present(root, "vae") else None

    if "vae" in wanted:
        if vae_path is None:
            vae_root, vae_sub = root, "vae"
            vae_config = base_vae_config
            check_vae_matches(vae_config, transformer_config, None, where=f"the VAE in {root / 'vae'}")
        else:
            vae_root, vae_sub = locate_vae(Path(vae_path))
            vae_dir = vae_root / vae_sub if vae_sub else vae_root
            vae_config = _read_json(vae_dir / "config.json", vae_root)
            check_vae_matches(vae_config, transformer_config, base_vae_config, where=f"the VAE at {vae_path}")
            out.vae_path = Path(vae_path)
        out.configs["vae"] = vae_config
        out.vae = _load(
            "VAE", vae_root, AutoencoderKLWan.from_pretrained, vae_root, subfolder=vae_sub, **_diffusers_dtype_kwarg(vae_dtype)
        ).eval()

    if "text_encoder" in wanted:
        from transformers import Gemma2Model

        te_config = _read_json(root / "text_encoder" / "config.json", root)
        out.configs["text_encoder"] = te_config
        if transformer_config is not None:
            hidden, caption = te_config.get("hidden_size"), transformer_config.get("caption_channels", 2304)
            if hidden != caption:
                raise InputError(
                    f"the text encoder in {root / 'text_encoder'} has hidden size {hidden} but the transformer "
                    f"expects {caption} caption channels",
                    _FIX_FOLDER,
                )
        kwargs = _transformers_dtype_kwarg(text_encoder_dtype or dtype)
        out.text_encoder = _load(
            "text encoder", root, Gemma2Model.from_pretrained, root, subfolder="text_encoder", **kwargs
        ).eval()

    if "tokenizer" in wanted:
        from transformers import AutoTokenizer

        out.tokenizer = _load("tokenizer", root, AutoTokenizer.from_pretrained, root, subfolder="tokenizer")
        out.tokenizer.padding_side = "right"  # SANA-Video pads on the right (the pipeline forces it too)

    if "scheduler" in wanted:
        import diffusers

        sched_config = _read_json(root / "scheduler" / "scheduler_config.json", root)
        out.configs["scheduler"] = sched_config
        cls_name = sched_config.get("_class_name", "")
        sched_cls = getattr(diffusers, cls_name, None)
        if sched_cls is None or not hasattr(sched_cls, "from_pretrained"):
            raise InputError(f"{root / 'scheduler'} names an unknown scheduler class {cls_name!r}", _FIX_FOLDER)
        out.scheduler = _load("scheduler", root, sched_cls.from_pretrained, root, subfolder="scheduler")

    if "transformer" in wanted:
        out.transformer = _load(
            "transformer",
            root,
            SanaVideoTransformer3DModel.from_pretrained,
            root,
            subfolder="transformer",
            **_diffusers_dtype_kwarg(dtype),
        ).eval()
    return out


def drop_vae_encoder(vae) -> int:
    """Free the Wan VAE's encoder half (`memory.drop_vae_encoder`): validation only decodes, and the
    latents come from the cache. Returns the parameters freed. Encoding afterwards fails loudly
    (`encoder` is None), never silently."""
    freed = 0
    for name in ("encoder", "quant_conv"):
        module = getattr(vae, name, None)
        if isinstance(module, torch.nn.Module):
            freed += sum(p.numel() for p in module.parameters())
            setattr(vae, name, None)
    return freed
