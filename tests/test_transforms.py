"""Augmentations move masks with the image: affine, flips, mosaic, copy-paste; close_mosaic; determinism."""

from __future__ import annotations

import numpy as np
import pytest
import cv2

from cellseg_pl.data.dataset import finalize
from cellseg_pl.data.transforms import Augmentation, TrainTransform

SIZE = 128


class ColourCells:
    """A fake data set: image i holds disks whose colour encodes (image, instance) and whose class is i % 2."""

    def __init__(self, n: int = 4, cells: int = 5) -> None:
        self.samples = []
        rng = np.random.default_rng(0)
        for i in range(n):
            image = np.full((SIZE, SIZE, 3), 128, np.uint8)
            inst = np.zeros((SIZE, SIZE), np.uint16)
            for k in range(cells):
                cx, cy = 14 + 24 * k, int(rng.integers(20, SIZE - 20))
                cv2.circle(inst, (cx, cy), 9, k + 1, -1)
                image[inst == k + 1] = self.colour(i, k + 1)
            self.samples.append({"image": image, "instances": inst, "classes": np.full(cells, i % 2),
                                 "ori_shape": (SIZE, SIZE), "im_file": f"img{i}.png", "ratio_pad": (1.0, (0, 0))})

    @staticmethod
    def colour(i: int, k: int) -> tuple[int, int, int]:
        return (40 * i + 20, 30 * k + 20, 200 - 30 * i)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> dict:
        return {key: (v.copy() if isinstance(v, np.ndarray) else v) for key, v in self.samples[i].items()}


def plain(**kw) -> TrainTransform:
    base = dict(degrees=0.0, translate=0.0, scale=0.0, flipud=0.0, fliplr=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0,
                mosaic=0.0)
    return TrainTransform(SIZE, Augmentation(**{**base, **kw}), extras=0.0)


def owner_colours(sample: dict) -> dict[int, np.ndarray]:
    """Median colour of each instance's eroded mask (interior pixels keep their colour under interpolation)."""
    out = {}
    for k in np.unique(sample["instances"]):
        if k == 0:
            continue
        m = cv2.erode((sample["instances"] == k).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        if m.sum() >= 5:
            out[int(k)] = np.median(sample["image"][m], axis=0)
    return out


def known_colours(ds: ColourCells) -> set[tuple[int, int, int]]:
    return {ds.colour(i, k) for i in range(len(ds)) for k in range(1, 6)}


def assert_masks_follow_pixels(sample: dict, ds: ColourCells) -> None:
    colours = owner_colours(sample)
    assert colours, "no instance survived"
    palette = np.array(sorted(known_colours(ds)), float)
    for k, c in colours.items():
        nearest = palette[np.argmin(np.abs(palette - c).sum(1))]
        assert np.abs(nearest - c).max() <= 6, (k, c)  # the mask sits on that cell's pixels
        image_idx = int(round((nearest[0] - 20) / 40))
        assert sample["classes"][k - 1] == image_idx % 2  # and keeps its class


@pytest.mark.parametrize("kw", [dict(degrees=180.0, scale=0.5, translate=0.1), dict(flipud=1.0, fliplr=1.0),
                                dict(degrees=45.0, shear=10.0)])
def test_geometric_transforms_move_masks_with_pixels(kw):
    ds = ColourCells()
    tf = plain(**kw)
    for idx in range(4):
        rng = np.random.default_rng([1, 0, idx])
        out = tf(ds.load(idx), ds, rng)
        assert out["image"].shape == (SIZE, SIZE, 3) and out["instances"].shape == (SIZE, SIZE)
        assert_masks_follow_pixels(out, ds)


def test_boxes_are_recomputed_from_transformed_masks():
    ds = ColourCells()
    out = finalize({**plain(degrees=90.0, scale=0.3)(ds.load(0), ds, np.random.default_rng(3))})
    inst = out["instances"].numpy()
    for k, (x, y, w, h) in enumerate(out["bboxes"].numpy() * SIZE, start=1):
        ys, xs = np.nonzero(inst == k)
        assert abs(x - w / 2 - xs.min()) < 1e-3 and abs(x + w / 2 - xs.max() - 1) < 1e-3
        assert abs(y - h / 2 - ys.min()) < 1e-3 and abs(y + h / 2 - ys.max() - 1) < 1e-3


def test_mosaic_combines_four_images_with_unique_ids_and_right_classes():
    ds = ColourCells()
    tf = plain(mosaic=1.0)
    seen_images = set()
    for idx in range(4):
        out = tf(ds.load(idx), ds, np.random.default_rng([2, 0, idx]))
        assert_masks_follow_pixels(out, ds)
        palette = np.array(sorted(known_colours(ds)), float)
        for c in owner_colours(out).values():
            seen_images.add(int(round((palette[np.argmin(np.abs(palette - c).sum(1))][0] - 20) / 40)))
    assert len(seen_images) >= 3  # tiles really come from other images


def test_copy_paste_adds_cells_from_other_images_into_free_space():
    ds = ColourCells()
    tf = plain(copy_paste=1.0, copy_paste_mode="free")
    grew = 0
    for idx in range(4):
        original = ds.load(idx)
        out = tf(ds.load(idx), ds, np.random.default_rng([3, 0, idx]))
        assert_masks_follow_pixels(out, ds)
        before = len(np.unique(original["instances"])) - 1
        after = len(np.unique(out["instances"])) - 1
        grew += after > before
        # original cells are untouched: pasting never covers an existing cell
        for k in range(1, before + 1):
            assert np.array_equal(out["instances"] == k, original["instances"] == k)
    assert grew >= 3


def test_close_mosaic_switches_mosaic_off_for_the_last_epochs(tiny_data):
    from cellseg_pl.data.datamodule import CellSegDataModule

    dm = CellSegDataModule(str(tiny_data), imgsz=128, batch_size=2, num_workers=0, mosaic=1.0, close_mosaic=3)
    dm.set_epoch(6, max_epochs=10)
    assert dm.train_transform.mosaic_enabled
    dm.set_epoch(7, max_epochs=10)
    assert not dm.train_transform.mosaic_enabled


def test_augmentation_is_a_function_of_seed_epoch_and_index(tiny_data):
    from cellseg_pl.data.datamodule import CellSegDataModule

    dm = CellSegDataModule(str(tiny_data), imgsz=128, batch_size=2, num_workers=0, degrees=180.0, mosaic=1.0)
    ds = dm.split_dataset("train", train=True)
    a, b = ds[3], ds[3]
    assert (a["img"] == b["img"]).all() and (a["instances"] == b["instances"]).all()
    dm.set_epoch(1, max_epochs=100)
    c = ds[3]
    assert not (a["img"] == c["img"]).all()


def test_mosaic_builds_only_the_visible_canvas_and_warps_it_exactly_as_the_whole_canvas():
    from cellseg_pl.data.transforms import affine_matrix, mosaic_canvas, visible_region, warp

    ds = ColourCells()
    for seed in range(6):
        rng = np.random.default_rng(seed)
        tiles = [ds.load(i) for i in range(4)]
        centre = tuple(int(v) for v in rng.uniform(SIZE / 2, 3 * SIZE / 2, 2))
        matrix, _ = affine_matrix((2 * SIZE, 2 * SIZE), SIZE, rng, degrees=180, translate=0.1, scale=0.5)
        whole = warp(mosaic_canvas(tiles, SIZE, centre), matrix, SIZE)
        region = visible_region(matrix, (2 * SIZE, 2 * SIZE), SIZE)
        part = mosaic_canvas(tiles, SIZE, centre, region)
        shift = np.eye(3, dtype=np.float32)
        shift[:2, 2] = region[:2]
        cut = warp(part, matrix @ shift, SIZE)
        assert part["image"].shape[0] * part["image"].shape[1] <= (2 * SIZE) ** 2
        np.testing.assert_array_equal(cut["image"], whole["image"])
        np.testing.assert_array_equal(cut["instances"], whole["instances"])


def _disks(h: int, w: int, discs: list[tuple[int, int, int]]):
    """An image and instance map of filled discs ``(cx, cy, r)``, and their outline polygons."""
    image = np.full((h, w, 3), 40, np.uint8)
    image[:, : w // 2] = 90  # the left half differs from the right: mirrored pixels are recognisable
    instances = np.zeros((h, w), np.uint16)
    polygons = []
    for k, (cx, cy, r) in enumerate(discs, 1):
        cv2.circle(instances, (cx, cy), r, k, -1)
        cv2.circle(image, (cx, cy), r, (200, 60 + 20 * k, 30), -1)
        contours, _ = cv2.findContours((instances == k).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        polygons.append(contours[0][:, 0].astype(np.float32))
    return image, instances, polygons


@pytest.mark.parametrize("fraction", [0.3, 1.0])
def test_flip_copy_paste_pastes_what_ultralytics_pastes(fraction):
    """The same cells are chosen as by Ultralytics 8.4's ``CopyPaste(mode="flip")``, and land at the same place."""
    from ultralytics.data.augment import CopyPaste
    from ultralytics.utils.instance import Instances

    from cellseg_pl.data.transforms import flip_copy_paste

    # cells whose mirror image lands on background, on a cell (overlap > 30 %), half on a cell, and on itself
    discs = [(20, 20, 8), (30, 70, 10), (100, 70, 9), (60, 110, 7), (85, 25, 9), (40, 100, 6)]
    image, instances, polygons = _disks(128, 128, discs)
    n = len(discs)
    sample = {"image": image, "instances": instances, "classes": np.arange(n, dtype=np.int64) % 2}
    ours = flip_copy_paste(sample, fraction)

    from ultralytics.utils.ops import resample_segments

    segments = np.stack(resample_segments([p for p in polygons], n=200))
    boxes = np.array([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()] for p in polygons], np.float32)
    labels = {"img": image.copy(), "cls": (np.arange(n) % 2).reshape(-1, 1).astype(np.float32),
              "instances": Instances(boxes, segments, bbox_format="xyxy", normalized=False)}
    theirs = CopyPaste(p=fraction, mode="flip")(labels)
    pasted_theirs = len(theirs["cls"]) - n
    pasted_ours = len(ours["classes"]) - n
    assert pasted_ours == pasted_theirs >= 1
    assert list(ours["classes"][n:]) == list(theirs["cls"][n:, 0].astype(int))
    # each pasted cell: our mask vs their mirrored polygon, and the pixels are the mirrored image's
    for j in range(pasted_ours):
        mask = ours["instances"] == n + 1 + j
        poly = theirs["instances"].segments[n + j].astype(np.int32)
        ref = np.zeros_like(instances, np.uint8)
        cv2.fillPoly(ref, [poly], 1)
        assert (mask & ref.astype(bool)).sum() / (mask | ref.astype(bool)).sum() > 0.8
        assert np.array_equal(ours["image"][mask], image[:, ::-1][mask])
    untouched = ours["instances"] <= n
    assert np.array_equal(ours["image"][untouched], image[untouched])
    assert np.array_equal(ours["instances"][untouched], instances[untouched])
    # in place (a mosaic canvas): the same result, written into the sample's own arrays
    own = {**sample, "image": image.copy(), "instances": instances.astype(np.uint16)}
    canvas, instance_map = own["image"], own["instances"]
    inplace = flip_copy_paste(own, fraction, inplace=True)
    assert inplace["image"] is canvas and inplace["instances"] is instance_map
    assert np.array_equal(inplace["image"], ours["image"]) and np.array_equal(inplace["instances"], ours["instances"])


def test_flip_copy_paste_in_the_pipeline_keeps_masks_with_pixels():
    ds = ColourCells()
    tf = plain(copy_paste=1.0, mosaic=1.0, degrees=90.0, scale=0.5)
    grew = 0
    for idx in range(4):
        out = tf(ds.load(idx), ds, np.random.default_rng([4, 0, idx]))
        assert_masks_follow_pixels(out, ds)
        grew += len(np.unique(out["instances"])) - 1 > len(ds.load(idx)["classes"])
    assert grew >= 2


def test_copy_paste_mode_is_checked():
    with pytest.raises(ValueError, match="copy_paste_mode"):
        plain(copy_paste_mode="mirror")


@pytest.mark.parametrize("mode", ["flip", "free"])
def test_close_mosaic_also_turns_copy_paste_and_mixup_off(tiny_data, mode, caplog):
    """As Ultralytics' ``close_mosaic`` (mosaic, copy_paste, mixup = 0): the last epochs train on plain images."""
    import logging

    from cellseg_pl.data.datamodule import CellSegDataModule

    caplog.set_level(logging.INFO, logger="cellseg_pl.data.datamodule")
    dm = CellSegDataModule(str(tiny_data), imgsz=128, batch_size=2, num_workers=0, mosaic=0.0, copy_paste=1.0,
                           copy_paste_mode=mode, mixup=1.0, close_mosaic=2, degrees=0.0, translate=0.0, scale=0.0,
                           fliplr=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0)
    ds = dm.split_dataset("train", train=True)

    def cells(epoch: int) -> list[int]:
        dm.set_epoch(epoch, 5)
        tf = dm.train_transform
        return [len(np.unique(tf(ds.load(i), ds, np.random.default_rng([epoch, i]))["instances"])) - 1
                for i in range(len(ds))]

    plain = [len(ds.load(i)["classes"]) for i in range(len(ds))]
    assert sum(cells(0)) > sum(plain)  # pasted and mixed cells while mixing is on
    assert cells(3) == plain  # none in the close_mosaic epochs
    said = [r.getMessage() for r in caplog.records if r.name == "cellseg_pl.data.datamodule"]
    assert said == ["copy_paste, mixup off (close_mosaic) from epoch 4"]
