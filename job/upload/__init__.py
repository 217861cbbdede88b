"""Publishing to `output.push_to` and resuming from it: the upload phase, background checkpoint
uploads during training, remote resume, and the model card.

    from job.upload import TrainUploads, upload_phase

See `remote.py` for the layout in the store, `checkpoints.py` for the background uploader,
`resume.py` for remote resume, `card.py` for the model card, `phase.py` for the entry points.
"""

from .phase import TrainUploads, upload_phase

__all__ = ["TrainUploads", "upload_phase"]
