"""torch's CUDA runtime vs the driver: the minor-version-compatibility rules."""

import pytest

from job.preflight.cuda import MINOR_COMPAT_MIN_DRIVER, check_driver, cuda_from_int, ga_driver_for, parse_version


def test_new_enough_driver_is_ok():
    status, detail, fix = check_driver("12.8", "570.86.15", "12.8")
    assert status == "ok" and fix is None
    assert check_driver("12.4", "580.95.05", "13.0")[0] == "ok"  # backward compatibility


def test_driver_of_an_older_major_version_fails_with_the_exact_fix():
    status, detail, fix = check_driver("13.0", "550.54.14", "12.4")
    assert status == "fail"
    assert "no compatibility across CUDA major versions" in detail
    assert "580.65.06" in fix  # CUDA 13.0 GA driver
    assert "cu124" in fix      # or a torch built for what the driver supports


def test_minor_version_compatibility_warns_and_names_the_full_support_driver():
    status, detail, fix = check_driver("12.8", "535.104.05", "12.2")
    assert status == "warn"
    assert "minor-version compatibility" in detail
    assert ">= 570.26" in fix


def test_driver_below_the_family_minimum_fails():
    status, detail, fix = check_driver("12.1", "470.82.01", None)
    assert status == "fail"
    assert MINOR_COMPAT_MIN_DRIVER[12] in detail and MINOR_COMPAT_MIN_DRIVER[12] in fix


def test_blackwell_needs_the_570_driver():
    status, detail, fix = check_driver("12.8", "560.35.03", "12.6", capability=(12, 0))
    assert status == "fail" and "570.26" in fix and "sm120" in detail


def test_cpu_only_torch_and_unknown_driver():
    assert check_driver(None, "580.95.05", "13.0")[0] == "fail"
    status, detail, fix = check_driver("12.8", None, None)
    assert status == "warn" and "nvidia-ml-py" in fix


@pytest.mark.parametrize("text,expected", [("550.54.14", (550, 54, 14)), ("12.4", (12, 4)), ("", None), (None, None), ("n/a", None)])
def test_parse_version(text, expected):
    assert parse_version(text) == expected


def test_helpers():
    assert cuda_from_int(12040) == "12.4" and cuda_from_int(13000) == "13.0"
    assert ga_driver_for((12, 7)) == "570.26"  # no 12.7 toolkit: the next one's driver
    assert ga_driver_for((12, 4)) == "550.54.14"
