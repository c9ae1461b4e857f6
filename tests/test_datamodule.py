"""The data module: worker count, every image every epoch, loader settings."""

from __future__ import annotations

import os

import pytest

from cellseg_pl.datamodule import CellSegDataModule


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 2), (4, 3), (16, 8)])
def test_num_workers_auto_fits_the_node(tiny_data, monkeypatch, cores, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert CellSegDataModule(str(tiny_data), num_workers="auto").num_workers == expected
    assert CellSegDataModule(str(tiny_data), num_workers=3).num_workers == 3


def test_bad_num_workers_names_the_flag(tiny_data):
    with pytest.raises(ValueError, match="--data.num_workers"):
        CellSegDataModule(str(tiny_data), num_workers=-1)


def test_train_loader_keeps_a_final_batch_of_one_image(tiny_data):
    # 8 training images in batches of 7: Ultralytics trains on all 8 every epoch, so do we
    dm = CellSegDataModule(str(tiny_data), imgsz=128, batch_size=7, num_workers=0)
    dm.setup("fit")
    sizes = [b["img"].shape[0] for b in dm.train_dataloader()]
    assert sizes == [7, 1]


def test_augmentation_knobs_are_train_transforms_parameters():
    """The data module repeats TrainTransform's knobs for LightningCLI: same names, types and defaults."""
    import inspect

    from cellseg_pl.transforms import AUGMENTATION_KNOBS, TrainTransform

    ours = inspect.signature(CellSegDataModule).parameters
    theirs = inspect.signature(TrainTransform).parameters
    assert "degrees" in AUGMENTATION_KNOBS and "copy_paste_mode" in AUGMENTATION_KNOBS
    for name in AUGMENTATION_KNOBS:
        assert name in ours, name
        assert ours[name].default == theirs[name].default, name
        assert ours[name].annotation == theirs[name].annotation, name


def test_augmentation_knobs_reach_the_train_transform(tiny_data):
    dm = CellSegDataModule(str(tiny_data), imgsz=64, batch_size=2, num_workers=0, degrees=33.0, copy_paste=0.2,
                           copy_paste_mode="free", hsv_v=0.1)
    tf = dm.train_transform
    assert (tf.degrees, tf.copy_paste_p, tf.copy_paste_mode) == (33.0, 0.2, "free")


def test_every_augmentation_knob_has_its_yolo_argument():
    """``yolo segment train`` users write the same knob names: each one maps to its ``--data.*`` flag."""
    from cellseg_pl.transforms import AUGMENTATION_KNOBS
    from cellseg_pl.yolo_arg_table import BY_KEY

    for name in AUGMENTATION_KNOBS:
        assert BY_KEY[name].option == f"--data.{name}", name
