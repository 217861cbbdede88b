"""Sizes, buckets, windows and crop boxes: the pure arithmetic of the data plan."""

from __future__ import annotations

import math
import random

import pytest

from job.data.geometry import (bucket_key, crop_box, native_area, parse_bucket_key, plan_windows, resampled_frames, round16,
                               scaled_layout, target_size)
from job.spec.data import VideoDataset, VideoOptions


def ds(**kw) -> VideoDataset:
    return VideoDataset.model_validate({"id": "d", "source": "x", **kw})


def test_native_area_480_is_832x480():
    assert native_area(480) == 832 * 480 == 399_360
    assert native_area(720) == 1248 * 720


@pytest.mark.parametrize("size, expected", [
    ((832, 480), (832, 480)),      # the model's native frame stays exact
    ((1664, 960), (832, 480)),     # any scale of it too
    ((480, 832), (480, 832)),      # portrait: symmetric
    ((1280, 720), (848, 480)),     # 16:9 keeps its own aspect at ~the same area
    ((720, 720), (624, 624)),      # square stays square
    ((640, 480), (736, 544)),      # 4:3
])
def test_pixel_area_targets(size, expected):
    assert target_size(*size, ds(resolution=480)) == expected


def test_pixel_area_sides_are_multiples_of_16_near_the_native_area():
    d = ds(resolution=480, video={"bucket_strategy": "resolution_frames"})
    for w in range(200, 2000, 37):
        for h in (240, 480, 720, 1080):
            tw, th = target_size(w, h, d)
            assert tw % 16 == 0 and th % 16 == 0
            assert abs(tw * th / 399_360 - 1) < 0.12
            assert abs(math.log((tw / th) / (w / h))) < 0.2  # aspect kept (up to 16-px rounding)


def test_pixel_resolution_shorter_side():
    d = ds(resolution=480, resolution_type="pixel")
    assert target_size(1280, 720, d) == (848, 480)
    assert target_size(720, 1280, d) == (480, 848)
    assert target_size(500, 500, d) == (480, 480)


def test_aspect_ratio_buckets_round_the_aspect_resolution_frames_do_not():
    # 1.775 and 1.7777 round to the same 2-decimal aspect: one bucket size
    assert target_size(1775, 1000, ds()) == target_size(1920, 1080, ds())
    assert round16(15.9) == 16 and round16(24) == 32 and round16(23.9) == 16 and round16(1) == 16


def test_downsample_is_scale_invariant_for_pixel_area():
    big = ds(resolution=480, maximum_image_size=480, target_downsample_size=480)
    assert target_size(3840, 2160, big) == target_size(1280, 720, ds(resolution=480))


def test_bucket_keys_round_trip():
    assert bucket_key((832, 480), 81) == "832x480@81"
    assert parse_bucket_key("832x480@81") == (832, 480, 81)


def test_resampled_frame_counts():
    assert resampled_frames(120, 5.0, 24, 16) == 80   # 5 s at 16 fps
    assert resampled_frames(121, 121 / 24, 24, 16) == 81
    assert resampled_frames(150, 5.0, 30, 16) == 80
    assert resampled_frames(81, None, 16, 16) == 81
    assert resampled_frames(24, 2.0, 12, 16) == 32    # upsampling repeats frames
    assert resampled_frames(1, 1 / 24, 24, 16) == 1


def test_windows_one_all_max_and_min():
    opts = VideoOptions(num_frames=9)
    assert plan_windows(30, opts).starts == (0,)
    assert plan_windows(30, VideoOptions(num_frames=9, windows="all")).starts == (0, 9, 18)
    assert plan_windows(30, VideoOptions(num_frames=9, windows="all", max_frames=20)).starts == (0, 9)
    skipped = plan_windows(8, opts)
    assert skipped.skip_reason and not skipped.starts
    # shorter than num_frames but not below min_frames: the largest 4k+1 it holds
    short = plan_windows(15, VideoOptions(num_frames=17, min_frames=9))
    assert (short.length, short.starts) == (13, (0,))


def test_frame_interval_rounds_short_clips_down_then_to_4k_plus_1():
    opts = VideoOptions(num_frames=81, min_frames=9, bucket_strategy="resolution_frames", frame_interval=16)
    assert plan_windows(100, opts).length == 81           # full windows are num_frames
    assert plan_windows(47, opts).length == 29            # 47 -> 32 -> 29
    assert plan_windows(70, opts).length == 61            # 70 -> 64 -> 61
    assert plan_windows(12, opts).skip_reason              # 12 -> 0 < min_frames


def test_crop_boxes_center_and_seeded_random():
    assert crop_box(160, 96, (48, 48), crop=False) == (0, 0, 160, 96)
    assert crop_box(160, 96, (48, 48), crop=True) == (32, 0, 96, 96)
    assert crop_box(96, 160, (48, 48), crop=True) == (0, 32, 96, 96)
    a = crop_box(160, 96, (48, 48), True, "random", random.Random(7))
    b = crop_box(160, 96, (48, 48), True, "random", random.Random(7))
    assert a == b and a[2:] == (96, 96) and 0 <= a[0] <= 64
    lefts = {crop_box(160, 96, (48, 48), True, "random", random.Random(s))[0] for s in range(20)}
    assert len(lefts) > 5


def test_scaled_layout_maps_the_crop_to_a_slice():
    sw, sh, ox, oy = scaled_layout(160, 96, (32, 0, 96, 96), (48, 48))
    assert (sw, sh, ox, oy) == (80, 48, 16, 0)
    assert scaled_layout(160, 96, (0, 0, 160, 96), (112, 64)) == (112, 64, 0, 0)
