"""Everything specific to SANA-Video 2B 480p (diffusers `SanaVideoPipeline`).

Modules (import the one you need; this package itself imports nothing heavy):

- `geometry`   pure frame/resolution/token arithmetic (no torch import).
- `loading`    load transformer / VAE / Gemma2 text encoder / tokenizer / scheduler from a
               local diffusers-layout folder, with clear `InputError`s.
- `prompts`    Gemma2 prompt embeddings exactly as `SanaVideoPipeline.encode_prompt` makes them.
- `latents`    Wan-VAE encode/decode with the pipeline's latents_mean / latents_std convention.
- `validation` build a pipeline from already-loaded parts and render from cached embeddings.
- `tiny`       build a tiny random model folder offline (tests, CI smoke job).
"""

MODEL_FAMILY = "sanavideo"
