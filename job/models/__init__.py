"""Model families trainer can fine-tune. One sub-package per family (today: `sanavideo`).

Keep this package import-light: importing `job.models` must not import torch, so the spec
validation and the preflight estimator can use the pure geometry helpers cheaply.
"""
