"""Data set on disk -> samples -> batch: label parsing, rasterization, boxes from masks, the batch schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cellseg_pl.data.dataset import Collate, YoloSegDataset, instance_boxes, load_dataset_yaml, rasterize, read_label
from cellseg_pl.data.images import read_image
from cellseg_pl.data.labels import label_path_for
from cellseg_pl.data.transforms import ValTransform
from cellseg_pl.errors import DatasetError


def test_load_dataset_yaml(tiny_data):
    spec = load_dataset_yaml(tiny_data)
    assert spec.names == {0: "cell"}
    assert len(spec.splits["train"]) == 8 and len(spec.splits["val"]) == 4
    assert all(label_path_for(p).is_file() for p in spec.splits["train"])


def test_dataset_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "d.yaml"
    bad.write_text("path: .\ntrain: images/train\nnames: [cell]\n")
    with pytest.raises(DatasetError, match="missing key 'val'"):
        load_dataset_yaml(bad)
    bad.write_text("path: .\ntrain: images/train\nval: images/val\nnames: [cell]\n")
    with pytest.raises(DatasetError, match=r"'train: images/train'.*does not exist"):
        load_dataset_yaml(bad)


def test_label_path_mirrors_images_folder():
    assert label_path_for(Path("/d/images/train/a.png")) == Path("/d/labels/train/a.txt")
    assert label_path_for(Path("/d/images/train/sub/a.jpg")) == Path("/d/labels/train/sub/a.txt")


def test_read_label_skips_and_counts_bad_lines(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text(
        "0 0.1 0.1 0.5 0.1 0.5 0.5\n"  # good
        "0 0.1 0.1 0.5\n"  # odd count
        "0 0.1 0.1 0.5 0.1\n"  # 2 points
        "3 0.1 0.1 0.5 0.1 0.5 0.5\n"  # unknown class
        "0 -0.2 0.1 1.5 0.1 0.5 0.5\n"  # out of range -> clipped, kept
        "\n"
    )
    classes, polys, skipped = read_label(f, num_classes=1)
    assert classes.tolist() == [0, 0]
    assert polys[1].min() >= 0 and polys[1].max() <= 1
    assert skipped == {"odd number of coordinates": 1, "fewer than 3 points": 1, "unknown class index": 1}
    classes, polys, skipped = read_label(tmp_path / "missing.txt", 1)
    assert len(classes) == 0 and polys == [] and skipped == {}


def test_rasterize_puts_small_instances_on_top():
    big = np.array([[0.1, 0.1], [0.9, 0.1], [0.9, 0.9], [0.1, 0.9]], np.float32)
    small = np.array([[0.4, 0.4], [0.6, 0.4], [0.6, 0.6], [0.4, 0.6]], np.float32)
    inst, order = rasterize([small, big], 100, 100)
    assert order.tolist() == [1, 0]  # big drawn first (id 1), small on top (id 2)
    assert inst[50, 50] == 2 and inst[20, 20] == 1
    ids, boxes = instance_boxes(inst)
    assert ids.tolist() == [1, 2]
    np.testing.assert_allclose(boxes[1], [40, 40, 61, 61], atol=1)


def test_read_image_normalizes_16bit_gray_and_rgba(tmp_path):
    import cv2

    gray16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 10)
    cv2.imwrite(str(tmp_path / "g.png"), gray16)
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 2] = 200
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    g = read_image(tmp_path / "g.png")
    assert g.shape == (64, 64, 3) and g.dtype == np.uint8 and g.max() == 255 and g.min() == 0
    a = read_image(tmp_path / "a.png")
    assert a.shape == (32, 32, 3) and a[0, 0, 0] == 200  # BGR(A) on disk -> RGB
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="bad.png: cannot decode"):
        read_image(tmp_path / "bad.png")


def test_val_sample_and_batch_schema(tiny_data):
    spec = load_dataset_yaml(tiny_data)
    ds = YoloSegDataset(spec.splits["val"], 1, imgsz=128, transform=ValTransform(128))
    batch = Collate(mask_ratio=4, overlap_mask=True, full_masks=True)([ds[0], ds[1]])
    n = batch["cls"].shape[0]
    assert batch["img"].shape == (2, 3, 128, 128) and batch["img"].dtype == torch.uint8
    assert batch["batch_idx"].shape == (n,) and batch["bboxes"].shape == (n, 4)
    assert batch["masks"].shape == (2, 32, 32) and batch["masks"].dtype == torch.int64
    assert batch["instances"].shape == (2, 128, 128)
    # instance ids are 1..n_i per image, in the order of cls/bboxes
    for i in range(2):
        n_i = int((batch["batch_idx"] == i).sum())
        assert set(batch["instances"][i].unique().tolist()) == set(range(n_i + 1))
    # boxes are normalized xywh of the instance's pixels
    inst0 = batch["instances"][0]
    ys, xs = torch.nonzero(inst0 == 1, as_tuple=True)
    x, y, w, h = (batch["bboxes"][0] * 128).tolist()
    assert abs((x - w / 2) - xs.min().item()) <= 1 and abs((x + w / 2) - (xs.max().item() + 1)) <= 1
    assert abs((y - h / 2) - ys.min().item()) <= 1 and abs((y + h / 2) - (ys.max().item() + 1)) <= 1
    # the labels on disk match: one instance per polygon line
    lines = [l for l in label_path_for(Path(batch["im_file"][0])).read_text().splitlines() if l.strip()]
    assert int((batch["batch_idx"] == 0).sum()) == len(lines)


def test_collate_without_overlap_gives_one_mask_per_instance(tiny_data):
    spec = load_dataset_yaml(tiny_data)
    ds = YoloSegDataset(spec.splits["val"], 1, imgsz=128, transform=ValTransform(128))
    samples = [ds[0], ds[1]]
    a = Collate(4, overlap_mask=True)(samples)
    b = Collate(4, overlap_mask=False)(samples)
    n = a["cls"].shape[0]
    assert b["masks"].shape == (n, 32, 32)
    first = int((a["batch_idx"] == 0).sum())
    assert torch.equal(b["masks"][0].bool(), a["masks"][0] == 1)
    assert torch.equal(b["masks"][first].bool(), a["masks"][1] == 1)


def test_background_image_has_no_instances(tiny_data, tmp_path):
    spec = load_dataset_yaml(tiny_data)
    src = spec.splits["val"][0]
    img_dir, lbl_dir = tmp_path / "images" / "val", tmp_path / "labels" / "val"
    img_dir.mkdir(parents=True)
    lbl_dir.mkdir(parents=True)
    (img_dir / src.name).write_bytes(src.read_bytes())
    (lbl_dir / (src.stem + ".txt")).write_text("")
    ds = YoloSegDataset([img_dir / src.name], 1, imgsz=128, transform=ValTransform(128))
    batch = Collate(4, True, True)([ds[0]])
    assert batch["cls"].shape == (0, 1) and batch["bboxes"].shape == (0, 4)
    assert int(batch["instances"].max()) == 0


def test_read_image_applies_exif_orientation_like_cv2_imread(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (40, 20), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 deg clockwise to display
    img.save(tmp_path / "r.jpg", exif=exif.tobytes())
    out = read_image(tmp_path / "r.jpg")
    assert out.shape[:2] == (40, 20)  # height and width swapped: displayed as CVAT and Ultralytics show it


def test_mask_targets_are_centred_on_the_full_resolution_masks():
    """The 1/4-resolution loss targets must not be shifted against the masks the network is scored on."""
    import cv2

    inst = np.zeros((128, 128), np.int32)
    for k, (cx, cy, r) in enumerate([(30, 40, 9), (80, 70, 13), (100, 25, 6)], start=1):
        cv2.circle(inst, (cx, cy), r, k, -1)
    sample = {"img": torch.zeros(3, 128, 128, dtype=torch.uint8), "instances": torch.from_numpy(inst),
              "cls": torch.zeros(3), "bboxes": torch.zeros(3, 4), "im_file": "x", "ori_shape": (128, 128),
              "ratio_pad": (1.0, (0, 0))}
    small = Collate(mask_ratio=4)([sample])["masks"][0].numpy()
    for k in (1, 2, 3):
        ys, xs = np.nonzero(inst == k)
        sy, sx = np.nonzero(small == k)
        # mask pixel j covers full-resolution pixels 4j..4j+3, centred on 4j + 1.5
        assert abs(sx.mean() - (xs.mean() - 1.5) / 4) < 0.2 and abs(sy.mean() - (ys.mean() - 1.5) / 4) < 0.2


# ---------------------------------------------------------------------------------------------- mask targets


def _discs(size: int, n: int, seed: int) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    inst = np.zeros((size, size), np.uint16)
    for k in range(1, n + 1):
        cv2.circle(inst, (int(rng.integers(0, size)), int(rng.integers(0, size))), int(rng.integers(2, 20)), k, -1)
    return inst


@pytest.mark.parametrize("ratio", [1, 2, 4, 8])
def test_each_mask_target_is_the_linear_resize_ultralytics_makes(ratio):
    import cv2

    from cellseg_pl.data.dataset import mask_targets

    inst = _discs(256, 24, seed=ratio)
    n = int(inst.max())
    per = mask_targets(inst, ratio, overlap=False, count=n)
    side = 256 // ratio
    assert per.shape == (n, side, side)
    for k in range(1, n + 1):  # Ultralytics' polygon2mask: cv2.resize (linear) of the instance's 0/1 mask
        assert np.array_equal(per[k - 1], cv2.resize((inst == k).astype(np.uint8), (side, side)) > 0), k


@pytest.mark.parametrize("ratio", [1, 2, 3, 4])
def test_overlap_mask_targets_pixel_by_pixel(ratio):
    """Each target pixel, computed one by one: of the instances that cover at least half of the block's centre
    pixels, the smallest (by area in the map; on a tie the larger id); 0 if none. Maps with 2 + 2 splits, ids
    above the instance count and a size that is not a multiple of the ratio."""
    from cellseg_pl.data.dataset import mask_targets

    rng = np.random.default_rng(ratio)
    for trial in range(4):
        inst = np.zeros((37, 50), np.int32)
        for k in range(1, 30):
            y, x = rng.integers(0, 37), rng.integers(0, 50)
            inst[y : y + rng.integers(1, 9), x : x + rng.integers(1, 9)] = rng.integers(1, 12)
        area = np.bincount(inst.ravel())
        lo, hi = (ratio // 2 - 1, ratio // 2 + 1) if ratio % 2 == 0 else (ratio // 2, ratio // 2 + 1)
        h, w = 37 // ratio, 50 // ratio
        expected = np.zeros((h, w), np.int64)
        per = np.zeros((11, h, w), bool)
        for i in range(h):
            for j in range(w):
                centre = inst[i * ratio + lo : i * ratio + hi, j * ratio + lo : j * ratio + hi].ravel().tolist()
                covering = [v for v in set(centre) if v > 0 and 2 * centre.count(v) >= len(centre)]
                if covering:
                    expected[i, j] = min(covering, key=lambda v: (area[v], -v))
                for v in covering:
                    if v <= 11:
                        per[v - 1, i, j] = True
        got = mask_targets(inst, ratio)
        assert got.dtype == np.int64 and np.array_equal(got, expected), trial
        assert np.array_equal(mask_targets(inst, ratio, overlap=False, count=11), per), trial


def test_overlapping_mask_targets_keep_the_smaller_instance_on_top():
    from cellseg_pl.data.dataset import mask_targets

    inst = np.zeros((8, 8), np.uint16)
    inst[:, :6] = 1  # large
    inst[:, 6:] = 2  # small
    inst[0:4, 2] = 2  # target pixel (0, 0) covers columns 1-2 around its centre: half 1, half 2
    small = mask_targets(inst, 4)
    assert small[0, 0] == 2 and small[1, 0] == 1 and small[0, 1] == 2  # smaller wins; else the covering one
    alone = mask_targets(inst, 4, overlap=False, count=2)
    assert alone[0, 0, 0] and alone[1, 0, 0]  # without overlap both masks hold the pixel, as polygon2mask's would


def test_mask_targets_have_the_size_of_ultralytics_targets_for_the_same_polygons():
    from ultralytics.data.utils import polygons2masks_overlap

    from cellseg_pl.data.dataset import mask_targets, rasterize

    rng = np.random.default_rng(0)
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    polygons = []
    for _ in range(60):  # nuclei of HeLa tiles at 256 px: radii of 3-8 px, where the convention matters most
        cx, cy, r = rng.uniform(30, 226), rng.uniform(30, 226), rng.uniform(3, 8)
        polygons.append(np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1) / 256)
    inst, order = rasterize(polygons, 256, 256)
    ours = mask_targets(inst, 4)
    theirs, _ = polygons2masks_overlap((256, 256), [p * 256 for p in polygons], downsample_ratio=4)
    # (one pixel sampled per target pixel gave 0.948: targets 5 % smaller than Ultralytics' on such cells)
    area_ratio = (ours > 0).sum() / (theirs > 0).sum()
    assert 0.98 < area_ratio < 1.03, area_ratio
