"""The per-step manifest and the run's HTML index page `validation/index.html`.

Each validation writes `step_NNNNNN/manifest.json` (what was rendered, with which prompt and
settings); the index is rebuilt from every manifest in the folder, so it covers the whole run,
also across restarts, and is written atomically after each validation. Links are relative (the
folder can be uploaded or copied as is) and every user string is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from job.report import scrub
from job.workspace import atomic_write_text

log = logging.getLogger("trainer.validate")

MANIFEST = "manifest.json"
INDEX = "index.html"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step_{int(step):06d}"


def write_manifest(step_dir: Path, manifest: dict[str, Any]) -> Path:
    path = step_dir / MANIFEST
    # scrub: a secret the CLI registered (a ${VAR} in the name or a prompt) stays out of uploaded files
    atomic_write_text(path, scrub(json.dumps(manifest, indent=2, ensure_ascii=False)) + "\n")
    return path


def read_manifests(validation_dir: Path) -> list[dict[str, Any]]:
    """Every step's manifest, oldest step first; unreadable ones are skipped with a warning."""
    found: list[tuple[int, dict]] = []
    if not validation_dir.is_dir():
        return []
    for folder in validation_dir.iterdir():
        match = _STEP_DIR.match(folder.name)
        if not match or not (folder / MANIFEST).is_file():
            continue
        try:
            data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("skipping %s in the validation index: %s", folder / MANIFEST, exc)
            continue
        data["_dir"] = folder.name
        found.append((int(match.group(1)), data))
    return [data for _, data in sorted(found, key=lambda item: item[0])]


def _href(*parts: str) -> str:
    return "/".join(quote(p) for p in parts)


_CSS = """
body { font-family: system-ui, sans-serif; background: #111; color: #ddd; margin: 1.5em; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 2em; border-bottom: 1px solid #333; }
a { color: #8cf; } code { color: #fc8; }
table.prompts td { vertical-align: top; padding: 0.2em 0.8em 0.2em 0; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figcaption { font-size: 0.85em; color: #aaa; }
video { max-width: 100%; background: #000; }
"""


def render_index(manifests: list[dict[str, Any]], title: str = "Validation") -> str:
    e = html.escape
    prompts: dict[str, str] = {}
    for m in manifests:  # the newest text wins if a nickname's prompt changed between runs
        for item in m.get("videos", []):
            prompts[item["nickname"]] = item.get("prompt", "")
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    if not manifests:
        out.append("<p>No validation has run yet.</p>")
    if prompts:
        out.append('<h2>Prompts</h2><table class="prompts">')
        out.extend(f"<tr><td><code>{e(n)}</code></td><td>{e(p)}</td></tr>" for n, p in prompts.items())
        out.append("</table>")
    for m in reversed(manifests):  # newest step first
        folder = m["_dir"]
        details = [f"weights: {m.get('weights', 'training')}", f"{m.get('fps', '?')} fps",
                   f"{m.get('num_inference_steps', '?')} steps", f"guidance {m.get('guidance', '?')}",
                   f"seed {m.get('seed', '?')}"]
        out.append(f'<h2 id="{e(folder)}">Step {int(m.get("step", 0))}</h2>')
        out.append(f"<p>{e(' · '.join(str(d) for d in details))}")
        if m.get("contact_sheet"):
            out.append(f' · <a href="{e(_href(folder, m["contact_sheet"]))}">contact sheet</a>')
        out.append("</p><div class=\"grid\">")
        for item in m.get("videos", []):
            src = _href(folder, item["file"])
            caption = f"{item['nickname']} · {item.get('width')}x{item.get('height')}"
            if item.get("layout") == "comparison":
                caption += " · left: training, right: EMA"
            out.append(
                f'<figure><video controls loop muted playsinline preload="metadata" src="{e(src)}" '
                f'title="{e(item.get("prompt", ""))}"></video>'
                f'<figcaption><a href="{e(src)}">{e(caption)}</a></figcaption></figure>'
            )
        out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_index(validation_dir: Path, title: str = "Validation") -> Path:
    """Rebuild `validation/index.html` from all step manifests (atomic write)."""
    path = validation_dir / INDEX
    atomic_write_text(path, scrub(render_index(read_manifests(validation_dir), title)))
    return path
