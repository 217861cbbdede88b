"""Video data: discovery, captions, decoding, frame windows, buckets, and the data plan.

The cache phase calls two things:

    plan = plan_dataset(spec, ws)        # every sample, the problem report, counts (InputError if unusable)
    video = load_sample(sample, spec)    # float [C, F, H, W] in [-1, 1]; stateless, picklable

Training draws batches with `BucketBatchSampler(plan.epoch_samples(), batch_size, seed, epoch)`.
See the module docs of `geometry` (sizes, buckets, windows), `decode` (frame picking),
`captions`, `probe` (metadata cache) and `report` (broken clips, quarantine).
"""

from .captions import with_motion_score
from .decode import DecodeError, Window, decode_window, frames_to_tensor
from .discovery import VIDEO_EXTENSIONS, discover_videos
from .geometry import bucket_key, native_area, parse_bucket_key, target_size
from .plan import (DataPlan, Sample, SampleDataset, collate_samples, first_frame, holdout_score, load_frames,
                   load_i2v_sample, load_sample, plan_dataset, record_decode_failure)
from .probe import MetadataCache, probe_video
from .report import DataReport, Problem, Skip, report_path
from .sampler import BucketBatchSampler

__all__ = [
    "plan_dataset", "load_sample", "load_frames", "load_i2v_sample", "first_frame", "record_decode_failure",
    "DataPlan", "Sample", "SampleDataset", "collate_samples", "BucketBatchSampler", "DataReport", "Problem", "Skip",
    "DecodeError", "Window", "decode_window", "frames_to_tensor", "probe_video", "MetadataCache", "discover_videos",
    "VIDEO_EXTENSIONS", "target_size", "native_area", "bucket_key", "parse_bucket_key", "holdout_score",
    "with_motion_score", "report_path",
]
