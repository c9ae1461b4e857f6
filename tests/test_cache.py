"""--data.cache: decoded images kept in RAM or on disk give exactly the samples of decoding every time."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from cellseg_pl.data.cache import ImageCache
from cellseg_pl.data.datamodule import CellSegDataModule


def samples(tiny_data, cache: str, **kw) -> list:
    dm = CellSegDataModule(str(tiny_data), imgsz=128, batch_size=2, num_workers=0, degrees=180.0, mosaic=1.0,
                           copy_paste=0.5, cache=cache, **kw)
    ds = dm.split_dataset("train", train=True)
    return [ds[i] for i in range(len(ds))], ds


@pytest.mark.parametrize("mode", ["ram", "disk", "auto"])
def test_cached_samples_equal_uncached_ones(tiny_data, mode):
    ref, _ = samples(tiny_data, "none")
    got, ds = samples(tiny_data, mode)
    assert ds.cache.mode == ("ram" if mode == "auto" else mode)
    for a, b in zip(ref, got):
        assert (a["img"] == b["img"]).all() and (a["instances"] == b["instances"]).all()
        assert a["ori_shape"] == b["ori_shape"]


def test_ram_cache_over_budget_falls_back_with_one_log_line(tiny_data, caplog):
    from cellseg_pl.data.dataset import load_dataset_yaml

    images = load_dataset_yaml(tiny_data).splits["train"]
    with caplog.at_level(logging.INFO, logger="cellseg_pl.data.cache"):
        cache = ImageCache(images, 128, "ram", budget=1000, split="train")
    assert cache.mode == "none" and cache.get(0) is None
    lines = [r.getMessage() for r in caplog.records if r.name == "cellseg_pl.data.cache"]
    assert len(lines) == 1 and "over the RAM budget" in lines[0]


def test_disk_cache_is_reused_and_renewed_when_an_image_changes(tiny_data, tmp_path):
    import shutil

    from cellseg_pl.data.dataset import load_dataset_yaml

    images = load_dataset_yaml(tiny_data).splits["train"][:3]
    local = []
    for p in images:  # copies, so the shared fixture is not touched
        shutil.copy(p, tmp_path / p.name)
        local.append(tmp_path / p.name)
    first = ImageCache(local, 128, "disk", tmp_path / "c")
    files = sorted((tmp_path / "c").rglob("*.npz"))
    assert len(files) == 3
    stamp = [f.stat().st_mtime_ns for f in files]
    again = ImageCache(local, 128, "disk", tmp_path / "c")
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "c").rglob("*.npz"))] == stamp  # reused, not rewritten
    np.testing.assert_array_equal(again.get(1)[0], first.get(1)[0])
    os.utime(local[0], ns=(1, 1))  # the image "changed": a new entry is made for it
    ImageCache(local, 128, "disk", tmp_path / "c")
    assert len(list((tmp_path / "c").rglob("*.npz"))) == 4


def test_unknown_cache_mode_names_the_flag(tiny_data):
    with pytest.raises(ValueError, match="--data.cache"):
        CellSegDataModule(str(tiny_data), cache="gpu")
