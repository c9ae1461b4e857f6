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


def test_an_image_replaced_by_another_of_the_same_size_and_time_is_not_served_stale(tmp_path):
    import cv2

    from cellseg_pl.data.images import load_resized

    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for _ in range(2))
    path = tmp_path / "img.bmp"  # BMP: two different images of one size are files of one size
    cv2.imwrite(str(path), a)
    stat = path.stat()
    first = ImageCache([path], 64, "disk", tmp_path / "c").get(0)[0]
    cv2.imwrite(str(path), b)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # a copy that keeps the times
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    again = ImageCache([path], 64, "disk", tmp_path / "c").get(0)[0]
    assert not np.array_equal(again, first)
    np.testing.assert_array_equal(again, load_resized(path, 64)[0])  # the new image's pixels


def test_unknown_cache_mode_names_the_flag(tiny_data):
    with pytest.raises(ValueError, match="--data.cache"):
        CellSegDataModule(str(tiny_data), cache="gpu")


def _local_images(tiny_data, tmp_path, n: int = 4) -> list:
    import shutil

    from cellseg_pl.data.dataset import load_dataset_yaml

    local = []
    for p in load_dataset_yaml(tiny_data).splits["train"][:n]:  # copies, so the shared fixture is not touched
        shutil.copy(p, tmp_path / p.name)
        local.append(tmp_path / p.name)
    return local


def test_damaged_disk_entries_are_logged_once_and_written_again(tiny_data, tmp_path, caplog):
    from cellseg_pl.data.images import load_resized

    local = _local_images(tiny_data, tmp_path)
    ImageCache(local, 128, "disk", tmp_path / "c")
    files = sorted((tmp_path / "c").rglob("*.npz"))
    data = files[0].read_bytes()
    files[0].write_bytes(data[:1000])  # truncated
    data = bytearray(files[1].read_bytes())
    data[len(data) // 2 : len(data) // 2 + 31] = b"\xff" * 31  # 31 bytes overwritten in the middle: a bad CRC
    files[1].write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="cellseg_pl.data.cache"):
        cache = ImageCache(local, 128, "disk", tmp_path / "c")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("cache: 2 damaged entries of train in ")
    for i, path in enumerate(local):  # every entry reads back as the decoded image
        np.testing.assert_array_equal(cache.get(i)[0], load_resized(path, 128)[0])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cellseg_pl.data.cache"):
        ImageCache(local, 128, "disk", tmp_path / "c")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # healed for good


def test_an_entry_damaged_during_the_run_is_decoded_instead(tiny_data, tmp_path, caplog):
    local = _local_images(tiny_data, tmp_path, 2)
    cache = ImageCache(local, 128, "disk", tmp_path / "c")
    for f in (tmp_path / "c").rglob("*.npz"):
        f.write_bytes(b"PK\x03\x04 not a zip any more")
    with caplog.at_level(logging.WARNING, logger="cellseg_pl.data.cache"):
        assert cache.get(0) is None and cache.get(1) is None  # the dataset decodes the image itself
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]  # (INFO too when a CLI test set it)
    assert len(warnings) == 1 and "no longer reads back" in warnings[0].getMessage()


def test_half_written_entries_of_killed_runs_are_removed(tiny_data, tmp_path):
    import subprocess
    import sys

    local = _local_images(tiny_data, tmp_path, 1)
    root = tmp_path / "c" / "imgsz128"
    root.mkdir(parents=True)
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    key = "a" * 40
    stale = [root / f".{key}.npz.partial-{dead}-3", root / f"{key}.partial-{dead}-3"]  # this scheme, the old one
    live = root / f".{key}.npz.partial-{os.getpid()}-3"  # a run still filling it
    for path in (*stale, live):
        path.write_bytes(b"half")
    ImageCache(local, 128, "disk", tmp_path / "c")
    assert not any(p.exists() for p in stale) and live.exists()


def test_an_unwritable_cache_costs_one_line_and_training_goes_on(tiny_data, tmp_path, caplog, monkeypatch):
    import errno

    local = _local_images(tiny_data, tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with caplog.at_level(logging.INFO, logger="cellseg_pl.data.cache"):
        cache = ImageCache(local, 128, "disk", tmp_path / "c")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cannot write 4 of 4 entries" in warnings[0] and "No space left" in warnings[0]
    assert all(cache.get(i) is None for i in range(4))  # decoded each time
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]  # nothing half-written left
