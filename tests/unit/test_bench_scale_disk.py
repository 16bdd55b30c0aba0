"""``bench scale`` refuses a zoo size the scratch disk cannot hold, from the bytes per model it has measured,
instead of failing with ENOSPC an hour into the largest size."""
from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from mzsane.bench import scale
from mzsane.errors import MzsaneError

Usage = namedtuple("Usage", "total used free")


def _measured(zoo_models: int = 100, zoo_dtype: str = "float16") -> dict:
    """What the benchmark knows after its 100-model size: 22 MB of zoo and 42 MB of shards per model."""
    return {"zoo": [{"models": zoo_models}], "zoo_bytes_per_model": 22_000_000, "zoo_dtype": zoo_dtype,
            "build_local": [{"bytes_per_model": 42_000_000}]}


def _free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**13, 0, free))


def test_a_size_that_does_not_fit_is_one_line_naming_both_figures_and_the_fixes(monkeypatch, tmp_path):
    _free(monkeypatch, 50 * 10**9)  # 1,000 models: 900 more in the zoo (19.8 GB) + 42 GB of shards = 61.8 GB
    with pytest.raises(MzsaneError) as err:
        scale._check_disk(str(tmp_path / "mzsane-bench-scale-x"), _measured(), 1000, copies=1)
    msg = str(err.value)
    assert "\n" not in msg and "1000 models needs ~62 GB" in msg and "50 GB is free" in msg
    assert "--sizes" in msg and "TMPDIR" in msg and "--zoo-dtype" not in msg  # already float16: no such advice
    with pytest.raises(MzsaneError, match="--zoo-dtype float16"):  # a float32 zoo: halving it is a fix
        scale._check_disk(str(tmp_path / "s"), _measured(zoo_dtype="float32"), 1000, copies=1)


def test_a_size_that_fits_passes_and_copies_count(monkeypatch, tmp_path):
    _free(monkeypatch, 70 * 10**9)
    scale._check_disk(str(tmp_path / "s"), _measured(), 1000, copies=1)  # 61.8 GB of 70: fits
    with pytest.raises(MzsaneError):  # the S3 copy of the same shards as well: 103.8 GB
        scale._check_disk(str(tmp_path / "s"), _measured(), 1000, copies=2)


def test_the_first_size_is_not_checked(monkeypatch, tmp_path):
    _free(monkeypatch, 0)
    scale._check_disk(str(tmp_path / "s"), {"zoo": [], "build_local": []}, 10, copies=4)
