"""The data module: worker count, every image every epoch, loader settings."""

from __future__ import annotations

import os

import pytest

from cellseg_pl.data.datamodule import CellSegDataModule
from cellseg_pl.errors import UsageError


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 2), (4, 3), (16, 8)])
def test_num_workers_auto_fits_the_node(tiny_data, monkeypatch, cores, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert CellSegDataModule(str(tiny_data), num_workers="auto").num_workers == expected
    assert CellSegDataModule(str(tiny_data), num_workers=3).num_workers == 3


@pytest.mark.parametrize("cores, expected", [(1, 0), (2, 0), (4, 0), (8, 2), (64, 8)])
def test_num_workers_auto_on_the_cpu_leaves_the_cores_to_the_step(tiny_data, monkeypatch, cores, expected):
    import lightning as L
    import torch

    import cellseg_pl
    from cellseg_pl.train.callbacks import share_cpu

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(cellseg_pl, "USER_OMP_NUM_THREADS", None)
    dm = CellSegDataModule(str(tiny_data), num_workers="auto")
    dm.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    assert dm.num_workers == expected
    before = torch.get_num_threads()
    try:
        share_cpu(dm.trainer, dm.num_workers)
        assert torch.get_num_threads() == cores  # no core held back for the workers
        monkeypatch.setattr(cellseg_pl, "USER_OMP_NUM_THREADS", "1")  # the user's OMP_NUM_THREADS wins
        torch.set_num_threads(1)
        share_cpu(dm.trainer, dm.num_workers)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


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
    """The data module takes every augmentation knob as a flag for LightningCLI: same names, types and defaults."""
    import inspect

    from cellseg_pl.data.transforms import AUGMENTATION_KNOBS, Augmentation

    ours = inspect.signature(CellSegDataModule).parameters
    theirs = inspect.signature(Augmentation).parameters
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
    from cellseg_pl.data.transforms import AUGMENTATION_KNOBS
    from cellseg_pl.train.yolo_arg_table import BY_KEY

    for name in AUGMENTATION_KNOBS:
        assert BY_KEY[name].option == f"--data.{name}", name


# ---------------------------------------------------------------------------------------------- sampler, close_mosaic, flags, loaders


def test_epoch_shuffle_is_a_pure_function_of_seed_and_epoch():
    from cellseg_pl.data.datamodule import EpochShuffleSampler

    sampler = EpochShuffleSampler(50, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and len(sampler) == 50
    assert list(EpochShuffleSampler(50, seed=3)) == first  # a resumed run sees the same order
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(50)) and second != first
    assert list(EpochShuffleSampler(50, seed=4)) != first


def test_close_mosaic_turns_mosaic_off_for_the_last_epochs(tiny_data, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="cellseg_pl.data.datamodule")
    dm = CellSegDataModule(str(tiny_data), imgsz=128, mosaic=1.0, close_mosaic=2)
    states = []
    for epoch in range(5):
        dm.set_epoch(epoch, 5)
        states.append(dm.train_transform.mosaic_enabled)
    assert states == [True, True, True, False, False]  # as Ultralytics: epoch >= epochs - close_mosaic
    assert [r.getMessage() for r in caplog.records] == ["mosaic off (close_mosaic) from epoch 4"]
    dm.set_epoch(3, -1)  # unknown length (max_epochs -1): mosaic stays on
    assert dm.train_transform.mosaic_enabled
    never = CellSegDataModule(str(tiny_data), imgsz=128, mosaic=1.0, close_mosaic=0)
    never.set_epoch(4, 5)
    assert never.train_transform.mosaic_enabled
    off = CellSegDataModule(str(tiny_data), imgsz=128, mosaic=0.0)
    off.set_epoch(0, 5)
    assert not off.train_transform.mosaic_enabled


@pytest.mark.parametrize("kwargs, flag", [({"imgsz": 100}, "--data.imgsz"), ({"imgsz": 0}, "--data.imgsz"),
                                          ({"batch_size": 0}, "--data.batch_size"), ({"cache": "gpu"}, "--data.cache")])  # fmt: skip
def test_bad_settings_name_the_flag(tiny_data, kwargs, flag):
    with pytest.raises(ValueError, match=f"^{flag}: "):
        CellSegDataModule(str(tiny_data), **kwargs)


def test_classes_and_val_loader(tiny_data):
    import torch

    dm = CellSegDataModule(str(tiny_data), imgsz=128, batch_size=2, num_workers=0, cache="none")
    assert dm.num_classes == 1 and dm.class_names == {0: "cell"}
    dm.setup("validate")
    loader = dm.val_dataloader()
    assert loader.batch_size == 4  # twice the training batch, as Ultralytics validates
    batches = list(loader)
    assert [b["img"].shape for b in batches] == [(4, 3, 128, 128)]  # the 4 val images, letterboxed
    assert batches[0]["img"].dtype == torch.uint8  # (scaled to 0..1 on the device: CellSegModule)
    again = next(iter(dm.val_dataloader()))
    assert torch.equal(again["img"], batches[0]["img"])  # no shuffling, no augmentation


def test_predict_images_folder_errors(tmp_path):
    from jsonargparse import Namespace

    from cellseg_pl.infer.predict import predict_output

    def cfg(images):
        return Namespace(predictions=None, data=Namespace(predict_images=images))

    with pytest.raises(UsageError, match="^--data.predict_images: give the folder"):
        predict_output(cfg(None), tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        predict_output(cfg(str(tmp_path / "missing")), tmp_path)
    (tmp_path / "notes.txt").write_text("no images")
    with pytest.raises(UsageError, match="is not a folder"):
        predict_output(cfg(str(tmp_path / "notes.txt")), tmp_path)
    (tmp_path / "predictions.json").write_text("{}")
    with pytest.raises(UsageError, match="exists; give another file"):
        predict_output(cfg(str(tmp_path)), tmp_path)


