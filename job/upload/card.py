"""The model card (`README.md` at the root of `output.push_to`) and its training figure.

    write_card(spec, ws, folder) -> [README.md, training_loss.svg]

The YAML front matter is what the Hub reads to list the repo: `library_name: diffusers`,
`pipeline_tag: text-to-video`, `base_model` (+ `base_model_relation`: `adapter` for a LoRA,
`finetune` for a full fine-tune) and the tags. The body has a spec summary (values secrets are
scrubbed from), the newest validation videos with their prompts, a loss curve drawn as a small
SVG from `logs/metrics.jsonl` (no plotting dependency) with a table of the loss by step, and how
to load the result with `SanaVideoPipeline`. The text depends only on its inputs (no time stamps),
so an unchanged card is not uploaded again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from job.report import scrub
from job.storage import parse_uri
from job.workspace import atomic_write_text

CARD = "README.md"
FIGURE = "training_loss.svg"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def read_losses(metrics_file: Path) -> list[tuple[int, float]]:
    """(step, loss) from metrics.jsonl; a resumed run logs some steps twice: the last one wins."""
    losses: dict[int, float] = {}
    try:
        lines = metrics_file.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
            step, loss = int(record["step"]), float(record["loss"])
        except (ValueError, KeyError, TypeError):
            continue
        if loss == loss and abs(loss) != float("inf"):
            losses[step] = loss
    return sorted(losses.items())


def loss_svg(losses: list[tuple[int, float]], width: int = 640, height: int = 240) -> str:
    """A loss curve as a self-contained SVG (renders on the Hub and in any browser)."""
    left, right, top, bottom = 56, 12, 14, 34
    steps = [s for s, _ in losses]
    values = [v for _, v in losses]
    s0, s1 = min(steps), max(steps)
    v0, v1 = min(values), max(values)
    if v1 == v0:
        v0, v1 = v0 - 0.5, v1 + 0.5
    sx = (width - left - right) / max(1, s1 - s0)
    sy = (height - top - bottom) / (v1 - v0)
    points = " ".join(f"{left + (s - s0) * sx:.1f},{top + (v1 - v) * sy:.1f}" for s, v in losses)
    x_axis, y_axis = height - bottom, left
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'font-family="sans-serif" font-size="11">\n'
        f'<rect width="{width}" height="{height}" fill="white"/>\n'
        f'<line x1="{y_axis}" y1="{top}" x2="{y_axis}" y2="{x_axis}" stroke="#444"/>\n'
        f'<line x1="{y_axis}" y1="{x_axis}" x2="{width - right}" y2="{x_axis}" stroke="#444"/>\n'
        f'<text x="{y_axis - 4}" y="{top + 4}" text-anchor="end">{v1:.4g}</text>\n'
        f'<text x="{y_axis - 4}" y="{x_axis}" text-anchor="end">{v0:.4g}</text>\n'
        f'<text x="{y_axis}" y="{x_axis + 14}" text-anchor="middle">{s0}</text>\n'
        f'<text x="{width - right}" y="{x_axis + 14}" text-anchor="end">{s1}</text>\n'
        f'<text x="{(width + left) / 2:.0f}" y="{height - 4}" text-anchor="middle">optimizer step</text>\n'
        f'<text x="12" y="{(top + x_axis) / 2:.0f}" transform="rotate(-90 12 {(top + x_axis) / 2:.0f})" '
        f'text-anchor="middle">training loss</text>\n'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{points}"/>\n'
        f"</svg>\n"
    )


def latest_samples(validation_dir: Path) -> tuple[int, list[dict]] | None:
    """(step, videos) of the newest validation manifest; video paths relative to validation/."""
    manifests = sorted(validation_dir.glob("step_*/manifest.json"))
    for manifest in reversed(manifests):
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        videos = [{**v, "path": f"{manifest.parent.name}/{v['file']}"} for v in data.get("videos", [])
                  if isinstance(v, dict) and v.get("file") and (manifest.parent / v["file"]).is_file()]
        if videos:
            return int(data.get("step", 0)), videos
    return None


def _hub_base_model(location: str, ws) -> str | None:
    """The base model as a Hub repo id, when it is one (the Hub rejects local paths there)."""
    if location.startswith("hf://"):
        location = location.removeprefix("hf://").removeprefix("models/").split("@")[0]
    elif ws.resolve(location).exists():  # a local folder that happens to look like owner/name
        return None
    return location if _HUB_ID.match(location) else None


def _summary_rows(spec) -> list[tuple[str, str]]:
    m, t, d = spec.model, spec.train, spec.data
    rows = [
        ("base model", m.pretrained_model_name_or_path),
        ("training", "LoRA" + f" (rank {m.lora.rank}, alpha {m.lora.alpha or m.lora.rank})" if m.type == "lora" else "full fine-tune"),
        ("steps", str(t.max_train_steps) if t.max_train_steps else f"{t.num_train_epochs} epochs"),
        ("batch", f"{t.train_batch_size} x {t.gradient_accumulation_steps} accumulation per process"),
        ("optimizer", f"{t.optimizer}, learning rate {t.learning_rate:g}, {t.lr_scheduler} schedule, {t.lr_warmup_steps} warmup steps"),
        ("precision", f"mixed precision {t.mixed_precision}, base weights {m.base_model_precision}"),
        ("EMA", f"decay {t.ema.decay}" if t.use_ema else "no"),
        ("seed", str(t.seed)),
    ]
    for ds in d.active():
        rows.append((f"dataset {ds.id}", f"{ds.video.num_frames} frames at {ds.resolution} ({ds.resolution_type}), repeats {ds.repeats}"))
    return rows


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def card_text(spec, ws, *, has_figure: bool, validation_uploaded: bool) -> str:
    lora = spec.model.type == "lora"
    base = _hub_base_model(spec.model.pretrained_model_name_or_path, ws)
    front = ["---"]
    if base:
        front += [f"base_model: {base}", f"base_model_relation: {'adapter' if lora else 'finetune'}"]
    front += ["library_name: diffusers", "pipeline_tag: text-to-video", "tags:", "- sana-video", "- text-to-video",
              f"- {'lora' if lora else 'full-finetune'}", "- diffusers-training", "---", ""]
    what = "LoRA adapter" if lora else "full fine-tune"
    body = [f"# {spec.name}", "",
            f"A SANA-Video {what} of `{spec.model.pretrained_model_name_or_path}`, trained with `trainer` "
            "from one job spec (`spec.yaml` in this repo, secrets redacted).", "",
            "## Training", "", "| setting | value |", "|---|---|"]
    body += [f"| {_cell(k)} | {_cell(v)} |" for k, v in _summary_rows(spec)]
    body.append("")
    summary_file = ws.final_dir / "training_summary.json"
    try:
        summary = json.loads(summary_file.read_text())
        last = summary.get("last_loss")
        body += [f"Trained {summary['final_step']} steps ({summary.get('samples_seen', '?')} clips seen)"
                 + (f"; last loss {last:.5f}." if isinstance(last, (int, float)) else "."), ""]
    except (OSError, ValueError, KeyError):
        pass
    losses = read_losses(ws.logs_dir / "metrics.jsonl")
    if losses:
        body += ["## Loss", ""]
        if has_figure:
            body += [f"![training loss]({FIGURE})", ""]
        every = max(1, len(losses) // 10)
        picked = losses[::every] + ([losses[-1]] if (len(losses) - 1) % every else [])
        body += ["| step | loss |", "|---|---|"] + [f"| {s} | {v:.5f} |" for s, v in picked] + [""]
    samples = latest_samples(ws.validation_dir) if validation_uploaded else None
    if samples:
        step, videos = samples
        body += ["## Samples", "", f"Validation videos at step {step} (all steps: `validation/index.html`).", ""]
        for v in videos:
            body += [f"**{_cell(v.get('nickname') or v['file'])}** — {_cell(v.get('prompt', ''))}", "",
                     f'<video src="validation/{v["path"]}" controls loop muted width="{v.get("width", 480)}"></video>', ""]
    body += ["## Use it", "", "```python", "import torch"]
    target = parse_uri(spec.output.push_to) if spec.output.push_to else None
    repo = target.repo_id if target is not None and target.scheme == "hf" else "PATH/TO/THIS/FOLDER"
    sub = f"{target.prefix}/final" if target is not None and target.scheme == "hf" and target.prefix else "final"
    base_ref = spec.model.pretrained_model_name_or_path
    if lora:
        body += ["from diffusers import SanaVideoPipeline", "",
                 f'pipe = SanaVideoPipeline.from_pretrained("{base_ref}", torch_dtype=torch.bfloat16).to("cuda")',
                 f'pipe.load_lora_weights("{repo}", subfolder="{sub}", weight_name="pytorch_lora_weights.safetensors")']
    else:
        body += ["from diffusers import SanaVideoPipeline, SanaVideoTransformer3DModel", "",
                 f'transformer = SanaVideoTransformer3DModel.from_pretrained("{repo}", subfolder="{sub}/transformer", torch_dtype=torch.bfloat16)',
                 f'pipe = SanaVideoPipeline.from_pretrained("{base_ref}", transformer=transformer, torch_dtype=torch.bfloat16).to("cuda")']
    body += ['video = pipe(prompt="...", num_frames=81, height=480, width=832).frames[0]', "```", ""]
    if target is not None and target.scheme != "hf":
        body += [f"Download `final/` from `{target}` first and pass its local path instead of `PATH/TO/THIS/FOLDER`.", ""]
    return scrub("\n".join(front + body))


def write_card(spec, ws, folder: Path, *, validation_uploaded: bool) -> list[Path]:
    """Write README.md (and the loss figure when there are metrics) into `folder`."""
    losses = read_losses(ws.logs_dir / "metrics.jsonl")
    written = []
    if len(losses) >= 2:
        atomic_write_text(folder / FIGURE, loss_svg(losses))
        written.append(folder / FIGURE)
    else:
        (folder / FIGURE).unlink(missing_ok=True)
    atomic_write_text(folder / CARD, card_text(spec, ws, has_figure=len(losses) >= 2, validation_uploaded=validation_uploaded))
    written.insert(0, folder / CARD)
    return written
