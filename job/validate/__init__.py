"""Validation during training: videos, contact sheets, the HTML index, previews, eval loss.

- `render`     `run_validation(spec, ws, components, step, embeddings_for, ema=None, *, webhooks=None)`,
               `validation_due`, `ema_weights`, `embeddings_from_text_encoder`.
- `eval_loss`  `EvalLoss(spec, holdout_items)(transformer) -> EvalLossResult`.
- `video`      H.264/yuv420p MP4 through PyAV, written atomically (`write_mp4`, `read_mp4`).
- `sheet`      contact sheet and frame-strip PNGs.
- `index`      per-step `manifest.json` and `validation/index.html`.
- `preview`    the linear latent -> RGB preview decoder and the preview callback.
- `prompts`    `validation.prompt` + the prompt library.

Webhooks live in `job.report.webhooks`. Import the submodule you need (this package imports
nothing heavy).
"""
