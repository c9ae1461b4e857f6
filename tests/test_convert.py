"""Tests of cellseg_pl.cvat.convert: CVAT "COCO 1.0" zip -> YOLO-seg dataset folder, on tiny synthetic zips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from cellseg_pl.cvat.coco import mask_to_polygons, polygons_to_mask
from conftest import mask_to_rle
from cellseg_pl.__main__ import main as cellseg_main
from cellseg_pl.cvat.convert import convert_coco_zip
from cellseg_pl.errors import ConvertError

REPO = Path(__file__).resolve().parents[1]
H, W = 96, 128


# ---------------------------------------------------------------------------------------------- builders


def disk(cx: float, cy: float, radius: float, height: int = H, width: int = W) -> np.ndarray:
    """Pixels whose centre lies in the disk (pixel (r, c) centre = (c+.5, r+.5))."""
    yy, xx = np.mgrid[:height, :width] + 0.5
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2


def png(height: int = H, width: int = W, seed: int = 0) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


def uncompressed_rle(mask: np.ndarray) -> dict:
    """CVAT's mask export: column-major runs starting with zeros, ``counts`` a list of ints."""
    flat = mask.T.reshape(-1).astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": ([0] + runs) if flat[0] else runs}


def image(id_: int, file_name: str, height: int = H, width: int = W) -> dict:
    return {"id": id_, "file_name": file_name, "height": height, "width": width}


def ann(id_: int, image_id: int, category_id: int, segmentation, iscrowd: int = 0) -> dict:
    return {
        "id": id_, "image_id": image_id, "category_id": category_id, "segmentation": segmentation,
        "area": 0, "bbox": [0, 0, 1, 1], "iscrowd": iscrowd, "attributes": {"occluded": False},
    }  # fmt: skip


CATEGORIES = [{"id": 3, "name": "cell", "supercategory": ""}, {"id": 7, "name": "droplet", "supercategory": ""}]


def coco(images: list[dict], annotations: list[dict], categories: list[dict] = CATEGORIES) -> str:
    return json.dumps({"licenses": [], "info": {}, "categories": categories, "images": images, "annotations": annotations})


def write_zip(path: Path, members: dict[str, bytes | str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def simple_zip(path: Path, n_images: int = 2, annotations: list[dict] | None = None, extra=None) -> Path:
    """A CVAT task export: ``instances_default.json`` and ``images/default/img<i>.png``."""
    images = [image(i + 1, f"img{i}.png") for i in range(n_images)]
    if annotations is None:
        annotations = [ann(i + 1, i + 1, 3, mask_to_polygons(disk(40, 40, 12))) for i in range(n_images)]
    members = {"annotations/instances_default.json": coco(images, annotations)}
    members.update({f"images/default/img{i}.png": png(seed=i) for i in range(n_images)})
    members.update(extra or {})
    return write_zip(path, members)


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def read_labels(label_file: Path) -> list[tuple[int, np.ndarray]]:
    """``(class, (N, 2) float64 normalized)`` per line."""
    out = []
    for line in label_file.read_text().splitlines():
        values = line.split()
        out.append((int(values[0]), np.asarray(values[1:], dtype=np.float64).reshape(-1, 2)))
    return out


def fill(points: np.ndarray, height: int, width: int, how: str = "round") -> np.ndarray:
    """Rasterize a normalized polygon at ``(x*W, y*H)`` with cv2.fillPoly, like the YOLO loaders."""
    out = np.zeros((height, width), np.uint8)
    if how == "round":
        pix = np.round(points * (width, height)).astype(np.int32)
        cv2.fillPoly(out, [pix], 1)
    elif how == "trunc32":  # Ultralytics: float32 labels, int32 cast in polygon2mask
        pix = (points.astype(np.float32) * np.array([width, height], np.float32)).astype(np.int32)
        cv2.fillPoly(out, [pix], 1)
    else:  # cellseg_pl.data.dataset: 4 fractional bits
        pix = np.round(points.astype(np.float32) * np.array([width, height], np.float32) * 16).astype(np.int32)
        cv2.fillPoly(out, [pix], 1, lineType=cv2.LINE_8, shift=4)
    return out.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def run_main(*args: str) -> int:
    return cellseg_main(["convert", *(str(a) for a in args)])


# ---------------------------------------------------------------------------------------------- round trip


@pytest.fixture
def round_trip_zip(tmp_path) -> tuple[Path, dict[str, list[tuple[int, np.ndarray]]]]:
    """Polygons, uncompressed and compressed RLE nuclei (~400 px and larger), categories 3 and 7.

    Returns the zip and, per file name, the source ``(class index, mask)`` pairs as CVAT sees them.
    """
    rng = np.random.default_rng(5)
    images, annotations, sources = [], [], {}
    aid = 0
    for i in range(6):
        name = f"frame_{i:03d}.png"
        images.append(image(i + 1, name))
        sources[name] = []
        centres = [(25, 25), (70, 25), (105, 30), (25, 70), (70, 70), (105, 72)]
        for k, (cx, cy) in enumerate(centres):
            radius = np.sqrt(rng.uniform(380, 420) / np.pi) if k < 4 else rng.uniform(15, 18)
            m = disk(cx + rng.uniform(-1, 1), cy + rng.uniform(-1, 1), radius)
            cat = 3 if k % 3 else 7
            kind = (i + k) % 3
            aid += 1
            if kind == 0:
                seg, crowd = mask_to_polygons(m), 0
                m = polygons_to_mask(seg, H, W)
            elif kind == 1:
                seg, crowd = uncompressed_rle(m), 1  # CVAT mask export
            else:
                seg, crowd = mask_to_rle(m), 1
            annotations.append(ann(aid, i + 1, cat, seg, crowd))
            sources[name].append(({3: 0, 7: 1}[cat], m))
        # one instance drawn as two polygons, 3 px apart: stays one instance
        a, b = disk(50, 45, 5), disk(50, 57, 5)
        seg = mask_to_polygons(a) + mask_to_polygons(b)
        aid += 1
        annotations.append(ann(aid, i + 1, 3, seg))
        sources[name].append((0, polygons_to_mask(seg, H, W)))
    images.append(image(99, "empty.png"))  # background
    sources["empty.png"] = []
    members = {"annotations/instances_default.json": coco(images, annotations)}
    members.update({f"images/default/{im['file_name']}": png(seed=im["id"]) for im in images})
    return write_zip(tmp_path / "task.zip", members), sources


def test_round_trip_polygons_and_rle(tmp_path, round_trip_zip):
    z, sources = round_trip_zip
    out = tmp_path / "data"
    summary = convert_coco_zip(z, out)
    spec = yaml.safe_load((out / "dataset.yaml").read_text())
    assert spec == {
        "path": str(out.resolve()), "train": "images/train", "val": "images/val", "nc": 2,
        "names": {0: "cell", 1: "droplet"},
    }  # fmt: skip
    n_src = sum(len(v) for v in sources.values())
    assert summary.instances_written == n_src and not summary.skipped_annotations
    assert summary.notes["multi_part"] == 6 and summary.background_images == 1
    ious = {"round": [], "trunc32": [], "shift4": []}
    seen = set()
    for split in ("train", "val"):
        for img_file in (out / "images" / split).iterdir():
            seen.add(img_file.name)
            assert cv2.imread(str(img_file)).shape == (H, W, 3)
            labels = read_labels(out / "labels" / split / f"{img_file.stem}.txt")
            src = sources[img_file.name]
            assert len(labels) == len(src)  # count in == count out, image by image
            for (cls, pts), (src_cls, src_mask) in zip(labels, src):  # lines keep the annotation order
                assert cls == src_cls and pts.min() >= 0 and pts.max() <= 1
                for how in ious:
                    ious[how].append(iou(fill(pts, H, W, how), src_mask))
    assert seen == set(sources)
    for how, values in ious.items():
        assert min(values) >= 0.95, how
    # truncating (Ultralytics) and rounding readers see the same pixels
    assert ious["round"] == ious["trunc32"] == ious["shift4"]


def test_round_trip_iou_on_400px_nuclei(tmp_path):
    """Every source kind at ~400 px area: min IoU >= 0.95 after conversion, as the loaders rasterize."""
    rng = np.random.default_rng(11)
    masks, annotations = [], []
    for k in range(30):
        m = disk(20 + 30 * (k % 4) + rng.uniform(-2, 2), 18 + 30 * (k // 4 % 3) + rng.uniform(-2, 2),
                 np.sqrt(rng.uniform(380, 420) / np.pi))  # fmt: skip
        seg = [mask_to_polygons(m), uncompressed_rle(m), mask_to_rle(m)][k % 3]
        masks.append(polygons_to_mask(seg, H, W) if k % 3 == 0 else m)
        annotations.append(ann(k + 1, 1 + k // 12, 3, seg))
    images = [image(i + 1, f"i{i}.png") for i in range(3)]
    members = {"annotations/instances_default.json": coco(images, annotations)}
    members.update({f"images/default/i{i}.png": png(seed=i) for i in range(3)})
    out = tmp_path / "d"
    convert_coco_zip(write_zip(tmp_path / "z.zip", members), out)
    got = []
    for i in range(3):
        (label,) = out.glob(f"labels/*/i{i}.txt")
        got += [fill(pts, H, W) for _, pts in read_labels(label)]
    ious = [iou(a, b) for a, b in zip(got, masks)]
    assert len(got) == len(masks) and min(ious) >= 0.95


def test_several_subsets_layouts_and_images_dir(tmp_path):
    m = disk(40, 40, 12)
    poly = mask_to_polygons(m)
    train = coco([image(1, "a.png"), image(2, "sub/dir/b.png")], [ann(1, 1, 3, poly), ann(2, 2, 7, poly)])
    val = coco(  # ids restart per subset in CVAT project exports
        [image(1, "c.png"), image(2, "d.png"), image(3, "frames/e.png"), image(4, "a.png"), image(5, "images/f.png")],
        [ann(1, 1, 3, poly), ann(2, 2, 3, poly), ann(3, 3, 7, poly), ann(4, 4, 3, poly), ann(5, 5, 3, poly)],
    )
    z = write_zip(
        tmp_path / "project.zip",
        {
            "annotations/instances_train.json": train,
            "annotations/instances_val.json": val,
            "images/train/a.png": png(seed=1),
            "images/train/sub/dir/b.png": png(seed=2),
            "images/c.png": png(seed=3),  # older CVAT layout
            "images/val/a.png": png(seed=4),  # same name as the train subset's a.png
            "images/val/images/f.png": png(seed=6),
        },
    )
    ext = tmp_path / "raw"
    ext.mkdir()
    (ext / "d.png").write_bytes(png(seed=5))
    (ext / "e.png").write_bytes(png(seed=7))  # found by basename
    out = tmp_path / "ds"
    summary = convert_coco_zip(z, out, images_dir=ext, val_fraction=0.3)
    assert not summary.skipped_images and summary.instances_written == 7
    assert (summary.train_images, summary.val_images) == (5, 2)
    files = {p.name for p in out.glob("images/*/*")}
    assert files == {"a.png", "sub__dir__b.png", "c.png", "d.png", "frames__e.png", "val__a.png", "images__f.png"}
    for img_file in out.glob("images/*/*"):
        label = out / "labels" / img_file.parent.name / f"{img_file.stem}.txt"
        assert len(read_labels(label)) == 1
    by_name = {p.name: p for p in out.glob("images/*/*")}
    assert by_name["val__a.png"].read_bytes() == png(seed=4)  # original bytes copied
    assert by_name["a.png"].read_bytes() == png(seed=1)
    assert snapshot(tmp_path) == {"project.zip", "raw", "raw/d.png", "raw/e.png", "ds"} | {f"ds/{p}" for p in snapshot(out)}


def test_split_is_seeded_and_deterministic(tmp_path):
    z = simple_zip(tmp_path / "z.zip", n_images=20)

    def split(seed: int, name: str) -> set[str]:
        convert_coco_zip(z, tmp_path / name, seed=seed)
        return {p.name for p in (tmp_path / name / "images" / "val").iterdir()}

    first, again, other = split(0, "a"), split(0, "b"), split(1, "c")
    assert len(first) == 4 and first == again and first != other
    assert len({p.name for p in (tmp_path / "a" / "images" / "train").iterdir()}) == 16
    two = simple_zip(tmp_path / "two.zip", n_images=2)
    summary = convert_coco_zip(two, tmp_path / "t", val_fraction=0.01)
    assert (summary.train_images, summary.val_images) == (1, 1)  # both splits non-empty


# ---------------------------------------------------------------------------------------------- per-item problems


def test_skipped_annotations_are_counted_by_reason(tmp_path):
    good = mask_to_polygons(disk(40, 40, 12))
    h_w = [H, W]
    anns = [
        ann(1, 1, 3, good),
        ann(2, 1, 3, [[]]),  # box only
        ann(3, 42, 3, good),  # unknown image
        ann(4, 1, 5, good),  # unknown category
        ann(5, 1, 3, [[1, 2, 3, 4]]),  # 2 points
        ann(6, 1, 3, [[1, 2, 3, 4, 5, 6, 7]]),  # odd count
        ann(7, 1, 3, [10, 10, 20, 10, 30, 10]),  # zero area (a flat list is one part)
        ann(8, 1, 3, {"size": h_w, "counts": [H * W]}, 1),  # empty mask
        ann(9, 1, 3, [[500, 500, 600, 500, 600, 600]]),  # all outside
        ann(10, 2, 7, [[-10, -10, 30, -10, 30, 30, -10, 30]]),  # clipped, written
        ann(11, 2, 7, [good[0], [1, 2, 3]]),  # one bad part dropped, written
        ann(12, 2, 3, {"size": [H + 1, W], "counts": [(H + 1) * W]}, 1),  # RLE of the wrong size
        ann(13, 2, 3, {"size": h_w, "counts": [5, 5]}, 1),  # runs do not cover the image
        ann(14, 2, 3, "polygon"),  # neither polygons nor RLE
        ann(15, 2, 3, [[5, 5, 8, 5, 8, 6, 5, 6]]),  # a 1x3 px line: too thin for a 3-point outline
        ann(16, 3, 3, good),  # its image is missing
        ann(17, 1, 7, []),  # box only, as CVAT writes rectangles
    ]
    members = {
        "annotations/instances_default.json": coco([image(1, "a.png"), image(2, "b.png"), image(3, "c.png")], anns),
        "images/default/a.png": png(),
        "images/default/b.png": png(seed=1),
    }
    out = tmp_path / "out"
    summary = convert_coco_zip(write_zip(tmp_path / "z.zip", members), out)
    assert summary.instances_written == 3
    assert dict(summary.skipped_annotations) == {
        "box_only": 2, "unknown_image": 1, "unknown_category": 1, "invalid_polygon": 2, "empty_mask": 3,
        "invalid_rle": 2, "invalid_segmentation": 1, "too_small": 1, "image_skipped": 1,
    }  # fmt: skip
    assert summary.annotations_read == summary.instances_written + sum(summary.skipped_annotations.values())
    assert dict(summary.skipped_images) == {"missing_file": 1}
    assert summary.notes["clipped"] == 2 and summary.notes["dropped_parts"] == 1
    assert summary.notes["images_missing_objects"] == 2
    text = summary.format()
    assert "box_only: 2 - box-only" in text and "not written" in text
    assert "missing_file: 1" in text and "c.png" in text
    lines = read_labels(next(out.glob("labels/*/b.txt")))
    assert [c for c, _ in lines] == [1, 1]
    clipped = fill(lines[0][1], H, W)
    assert iou(clipped, polygons_to_mask([[0, 0, 30, 0, 30, 30, 0, 30]], H, W)) > 0.95


def test_bad_images_are_skipped(tmp_path):
    members = {
        "annotations/instances_default.json": coco(
            [image(1, "ok.png"), image(2, "corrupt.png"), image(3, "small.png"), image(4, "../escape.png"),
             image(5, "missing.png"), image(1, "dup.png")],  # fmt: skip
            [ann(1, 2, 3, mask_to_polygons(disk(40, 40, 10))), ann(2, 1, 3, mask_to_polygons(disk(40, 40, 10)))],
        ),
        "images/default/ok.png": png(),
        "images/default/corrupt.png": b"\x89PNG\r\n\x1a\n garbage",
        "images/default/small.png": png(10, 10),
        "images/default/dup.png": png(),
    }
    (tmp_path / "escape.png").write_bytes(png())
    summary = convert_coco_zip(write_zip(tmp_path / "z.zip", members), tmp_path / "out", images_dir=tmp_path)
    assert dict(summary.skipped_images) == {
        "corrupt_image": 1, "size_mismatch": 1, "invalid_file_name": 1, "missing_file": 1, "duplicate_image_id": 1,
    }  # fmt: skip
    assert summary.skipped_annotations == {"image_skipped": 1}
    assert (summary.train_images, summary.val_images) == (1, 0)
    assert [p.name for p in (tmp_path / "out").rglob("*.png")] == ["ok.png"]


def test_damaged_zip_member_is_a_skipped_image(tmp_path):
    z = tmp_path / "z.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("annotations/instances_default.json", coco([image(1, "a.png"), image(2, "b.png")], []))
        zf.writestr("images/default/a.png", png())
        zf.writestr("images/default/b.png", png(seed=1))
    data = bytearray(z.read_bytes())
    at = data.index(png(seed=1)) + 100
    data[at] ^= 0xFF  # breaks the CRC of b.png only
    z.write_bytes(bytes(data))
    summary = convert_coco_zip(z, tmp_path / "out", allow_empty=True)
    assert summary.skipped_images == {"corrupt_image": 1} and summary.train_images == 1


def test_file_names_without_image_suffix_get_one(tmp_path):
    members = {
        "annotations/instances_default.json": coco([image(1, "frame1"), image(2, "frame2")], []),
        "images/default/frame1": png(),
        "images/default/frame2": cv2.imencode(".jpg", np.zeros((H, W, 3), np.uint8))[1].tobytes(),
    }
    convert_coco_zip(write_zip(tmp_path / "z.zip", members), tmp_path / "out", allow_empty=True)
    assert sorted(p.name for p in (tmp_path / "out").glob("images/*/*")) == ["frame1.png", "frame2.jpg"]
    assert sorted(p.name for p in (tmp_path / "out").glob("labels/*/*")) == ["frame1.txt", "frame2.txt"]


# ---------------------------------------------------------------------------------------------- fatal problems


def _fatal(tmp_path: Path, capsys, *args: str) -> str:
    """Run main, expect exit 2 with one error line and no new or changed file anywhere under tmp_path."""
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}
    dirs = snapshot(tmp_path)
    assert run_main(*args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()  # log lines (warnings) may come first; the error is one line, last
    err = lines[-1]
    assert err.startswith("error: ") and [line for line in lines if line.startswith("error")] == [err]
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert snapshot(tmp_path) == dirs
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()} == before
    return err


def test_fatal_not_a_zip(tmp_path, capsys):
    z = tmp_path / "notes.zip"
    z.write_text("hello")
    err = _fatal(tmp_path, capsys, "--coco-zip", z, "--output-dir", tmp_path / "new" / "out")
    assert str(z) in err and "not a zip file" in err and "COCO 1.0" in err


def test_fatal_zip_without_annotations(tmp_path, capsys):
    z = write_zip(tmp_path / "z.zip", {"images/default/a.png": png()})
    err = _fatal(tmp_path, capsys, "--coco-zip", z, "--output-dir", tmp_path / "out")
    assert "no annotations/instances_<subset>.json" in err and str(z) in err


def test_fatal_invalid_json(tmp_path, capsys):
    z = write_zip(tmp_path / "z.zip", {"annotations/instances_default.json": '{"images": [\n  {"id": 1,}\n]}'})
    err = _fatal(tmp_path, capsys, "--coco-zip", z, "--output-dir", tmp_path / "out")
    assert "annotations/instances_default.json: invalid JSON at line 2" in err


@pytest.mark.parametrize("member", ["../../outside.png", "/abs/outside.png", "C:\\outside.png"])
def test_fatal_zip_slip(tmp_path, capsys, member):
    z = simple_zip(tmp_path / "z.zip", extra={member: png()})
    err = _fatal(tmp_path, capsys, "--coco-zip", z, "--output-dir", tmp_path / "out")
    assert repr(member) in err and "unsafe zip" in err


def test_fatal_output_not_empty_or_a_file(tmp_path, capsys):
    z = simple_zip(tmp_path / "z.zip")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    err = _fatal(tmp_path, capsys, "--coco-zip", z, "--output-dir", busy)
    assert f"{busy}: is not empty" in err and "--overwrite" in err
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    err = _fatal(tmp_path, capsys, "--coco-zip", z, "--output_dir", a_file)
    assert "is not a folder" in err
    err = _fatal(tmp_path, capsys, "--coco-zip", z, "--output-dir", tmp_path, "--overwrite")
    assert "holds the input" in err


def test_fatal_no_usable_image_and_bad_flags(tmp_path, capsys):
    z = write_zip(tmp_path / "z.zip", {"annotations/instances_default.json": coco([image(1, "gone.png")], [])})
    err = _fatal(tmp_path, capsys, "--coco-zip", z, "--output-dir", tmp_path / "a" / "b" / "out", "--allow-empty")
    assert "none of its images could be written (missing_file: 1)" in err
    err = _fatal(tmp_path, capsys, "--coco-zip", z, "--output-dir", tmp_path / "o", "--val-fraction", "1.5")
    assert err.startswith("error: --val-fraction: 1.5")
    with pytest.raises(ConvertError, match="between 0 and 1"):
        convert_coco_zip(z, tmp_path / "o", val_fraction=0)


def test_fatal_conflicting_or_missing_categories(tmp_path, capsys):
    other = [{"id": 3, "name": "nucleus"}]
    z = write_zip(
        tmp_path / "z.zip",
        {
            "annotations/instances_train.json": coco([image(1, "a.png")], []),
            "annotations/instances_val.json": coco([image(1, "b.png")], [], other),
            "images/a.png": png(),
        },
    )
    err = _fatal(tmp_path, capsys, "--coco-zip", z, "--output-dir", tmp_path / "out")
    assert "instances_val.json: category 3 is 'nucleus' here but 'cell' in annotations/instances_train.json" in err
    z2 = write_zip(tmp_path / "z2.zip", {"annotations/instances_default.json": coco([image(1, "a.png")], [], [])})
    err = _fatal(tmp_path, capsys, "--coco-zip", z2, "--output-dir", tmp_path / "out")
    assert "no categories" in err


def test_zip_with_a_top_folder(tmp_path):
    members = {
        "task_12/annotations/instances_default.json": coco([image(1, "a.png")], [ann(1, 1, 7, [[10, 10, 40, 10, 40, 40]])]),
        "task_12/images/default/a.png": png(),
    }
    summary = convert_coco_zip(write_zip(tmp_path / "z.zip", members), tmp_path / "out")
    assert summary.instances_written == 1 and summary.instances[1] == 1


def test_overwrite_replaces_only_a_folder_convert_wrote(tmp_path, capsys):
    z = simple_zip(tmp_path / "z.zip", n_images=3)
    out = tmp_path / "out"
    assert run_main("--coco-zip", simple_zip(tmp_path / "old.zip", n_images=5), "--output-dir", out) == 0
    manifest = json.loads((out / ".cellseg_convert.json").read_text())
    assert manifest["tool"] == "cellseg_pl.cvat.convert" and "dataset.yaml" in manifest["files"]
    assert sorted(manifest["files"]) == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()
                                               and p.name != ".cellseg_convert.json")  # fmt: skip
    (out / ".cellseg_cache" / "640").mkdir(parents=True)  # caches made from the set go with it
    (out / ".cellseg_cache" / "640" / "x.npz").write_bytes(b"cache")
    (out / "labels" / "train.cache").write_bytes(b"ultralytics cache")
    (tmp_path / "sibling.txt").write_text("untouched")
    capsys.readouterr()
    assert run_main("--coco_zip", z, "--output_dir", out, "--overwrite", "--seed", "3", "--val_fraction", "0.34") == 0
    printed = capsys.readouterr().out
    assert "images: 3 (train 2, val 1)" in printed and "instances written: 3 of 3" in printed
    assert sorted(snapshot(out)) == sorted(
        ["dataset.yaml", ".cellseg_convert.json", "images", "labels", "images/train", "images/val", "labels/train",
         "labels/val"] + [f"{d}/{s}/{n}" for d, s, n in _files(out)]
    )  # fmt: skip
    assert len(list(out.glob("images/*/*"))) == 3 and (tmp_path / "sibling.txt").read_text() == "untouched"
    assert snapshot(tmp_path) == {"z.zip", "old.zip", "sibling.txt", "out"} | {f"out/{p}" for p in snapshot(out)}


def test_overwrite_refuses_folders_convert_did_not_write(tmp_path, capsys, monkeypatch):
    z = simple_zip(tmp_path / "z.zip")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.docx").write_text("years of work")
    err = _fatal(tmp_path, capsys, "--coco-zip", z, "--output-dir", mine, "--overwrite")
    assert err == (f"error: {mine}: was not written by convert (it has no .cellseg_convert.json); --overwrite only "
                   "replaces a data set folder convert wrote: choose a new --output-dir, or empty it yourself")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    err = _fatal(tmp_path, capsys, "--coco-zip", z, "--output-dir", "~", "--overwrite")
    assert f"{home}: was not written by convert (your home folder)" in err
    # a data set convert wrote, with the user's own files added: refused, naming them
    out = tmp_path / "ds"
    assert run_main("--coco-zip", z, "--output-dir", out) == 0
    capsys.readouterr()
    (out / "notes.txt").write_text("mine")
    (out / "images" / "train" / "extra.png").write_bytes(png(seed=9))
    (out / "more").mkdir()
    err = _fatal(tmp_path, capsys, "--coco-zip", z, "--output-dir", out, "--overwrite")
    assert "holds files convert did not write (images/train/extra.png, more/, notes.txt)" in err
    (out / ".cellseg_convert.json").write_text("[1, 2]")
    err = _fatal(tmp_path, capsys, "--coco-zip", z, "--output-dir", out, "--overwrite")
    assert ".cellseg_convert.json is not a convert manifest" in err


def _files(out: Path) -> list[tuple[str, str, str]]:
    return [(p.parent.parent.name, p.parent.name, p.name) for p in out.glob("*/*/*")]


def test_main_help_and_script(tmp_path, capsys):
    assert run_main("-h") == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: python -m cellseg_pl convert --coco_zip COCO_ZIP --output_dir")
    assert "--images_dir" in help_text and "(--output-dir = --output_dir" in help_text  # both spellings work
    assert "zip exported from CVAT" in help_text  # the docstring of convert_coco_zip
    assert run_main() == 2
    assert capsys.readouterr().err == (
        "error: the following arguments are required: --coco_zip, --output_dir (see python -m cellseg_pl convert "
        "--help)\n"
    )
    assert run_main("--coco-zip", "z.zip", "--output-dir", tmp_path / "o", "--val-fraction", "x") == 2
    assert capsys.readouterr().err.startswith("error: --val_fraction: expected float, got 'x'")
    z = simple_zip(tmp_path / "z.zip")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert_coco_to_yolo.py"), "--coco-zip", str(z), "--output-dir", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "instances written: 2" in done.stdout and (out / "dataset.yaml").is_file()
    again = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert_coco_to_yolo.py"), "--coco-zip", str(z), "--output-dir", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "Traceback" not in again.stderr
    shown = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert_coco_to_yolo.py"), "--help"], capture_output=True, text=True,
        cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0 and shown.stdout.startswith("usage: convert_coco_to_yolo.py --coco_zip")


# ---------------------------------------------------------------------------------------------- issue 12


def test_basename_fallback_never_guesses(tmp_path, capsys):
    poly = mask_to_polygons(disk(40, 40, 12))
    z = write_zip(tmp_path / "z.zip", {"annotations/instances_default.json": coco(
        [image(1, "day1/x.png"), image(2, "day2/x.png"), image(3, "day1/y.png")],
        [ann(1, 1, 3, poly), ann(2, 2, 3, poly), ann(3, 3, 3, poly)],
    )})  # fmt: skip
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "x.png").write_bytes(png(seed=1))
    (raw / "y.png").write_bytes(png(seed=2))  # one record only: the fallback is fine for it
    err = _fatal(tmp_path, capsys, "--coco-zip", z, "--images-dir", raw, "--output-dir", tmp_path / "out")
    assert err.startswith(f"error: {z}: --images-dir: several image records would read one file by its basename: ")
    assert f"{raw / 'x.png'} <- annotations/instances_default.json image 1 'day1/x.png', " in err
    assert "image 2 'day2/x.png'" in err and "y.png" not in err and "sub-folders" in err
    (raw / "day2").mkdir()  # laid out as file_name says: day2/x.png is found, day1/x.png alone falls back
    (raw / "day2" / "x.png").write_bytes(png(seed=3))
    summary = convert_coco_zip(z, tmp_path / "out", images_dir=raw)
    assert summary.instances_written == 3 and not summary.skipped_images
    by_name = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("images/*/*")}
    assert by_name == {"day1__x.png": png(seed=1), "day2__x.png": png(seed=3), "day1__y.png": png(seed=2)}


def test_one_file_name_in_two_image_records_is_an_error(tmp_path, capsys):
    poly = mask_to_polygons(disk(40, 40, 12))
    members = {
        "annotations/instances_default.json": coco(
            [image(1, "a.png"), image(2, "a.png"), image(3, "b.png")], [ann(1, 1, 3, poly), ann(2, 2, 7, poly)]
        ),
        "images/default/a.png": png(),
        "images/default/b.png": png(seed=1),
    }
    z = write_zip(tmp_path / "z.zip", members)
    err = _fatal(tmp_path, capsys, "--coco-zip", z, "--output-dir", tmp_path / "out")
    assert err == (f"error: {z}: several image records list one file: images/default/a.png <- "
                   "annotations/instances_default.json image 1 'a.png', annotations/instances_default.json image 2 "
                   "'a.png'; remove the duplicate image records (one file_name, one record)")  # fmt: skip


def _ids_as_strings(doc: dict) -> dict:
    for im in doc["images"]:
        im["id"] = str(im["id"])
    return doc


def _unknown_categories(doc: dict) -> dict:
    for a in doc["annotations"]:
        a["category_id"] = 99
    return doc


def _no_annotations_key(doc: dict) -> dict:
    del doc["annotations"]
    return doc


def _broken_polygons(doc: dict) -> dict:
    for a in doc["annotations"]:
        a["segmentation"] = [[1, 2, 3, 4]]
    return doc


@pytest.mark.parametrize("edit, says", [
    (_ids_as_strings, "no instance to write: image ids are strings, annotation image_ids are integers: none of its 2 "
                      "annotations gave an instance (unknown_image: 2); fix the export"),
    (_unknown_categories, "no instance to write: none of its 2 annotations gave an instance (unknown_category: 2)"),
    (_no_annotations_key, "no instance to write: no 'annotations' list in annotations/instances_default.json; fix "
                          "the export, or pass --allow-empty for a background-only set"),
    (lambda d: {**d, "annotations": []}, "no instance to write: its annotation files list no annotations"),
    (_broken_polygons, "none of its 2 annotations gave an instance (invalid_polygon: 2)"),
])  # fmt: skip
def test_a_conversion_without_instances_is_an_error(tmp_path, capsys, edit, says):
    z = simple_zip(tmp_path / "z.zip")
    with zipfile.ZipFile(z) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    doc = edit(json.loads(members["annotations/instances_default.json"]))
    members["annotations/instances_default.json"] = json.dumps(doc).encode()
    z = write_zip(tmp_path / "z.zip", members)
    err = _fatal(tmp_path, capsys, "--coco-zip", z, "--output-dir", tmp_path / "out")
    assert err.startswith(f"error: {z}: ") and says in err
    if "annotations" in doc and doc["annotations"]:  # annotations that all fail: --allow-empty does not hide them
        err = _fatal(tmp_path, capsys, "--coco-zip", z, "--output-dir", tmp_path / "out", "--allow-empty")
        assert says in err


def test_allow_empty_writes_a_background_only_set(tmp_path, capsys):
    z = simple_zip(tmp_path / "z.zip", annotations=[])
    assert run_main("--coco-zip", z, "--output-dir", tmp_path / "out", "--allow-empty") == 0
    assert "images: 2 (train 1, val 1), 2 without instances (background)" in capsys.readouterr().out
    assert all(p.read_text() == "" for p in (tmp_path / "out").glob("labels/*/*.txt"))


def test_repeated_category_names_are_merged(tmp_path):
    cats = [{"id": 1, "name": "cell"}, {"id": 2, "name": "cell"}, {"id": 3, "name": "droplet"}]
    poly = mask_to_polygons(disk(40, 40, 12))
    members = {
        "annotations/instances_default.json": coco(
            [image(1, "a.png"), image(2, "b.png")], [ann(1, 1, 1, poly), ann(2, 1, 2, poly), ann(3, 2, 3, poly)], cats
        ),
        "images/default/a.png": png(),
        "images/default/b.png": png(seed=1),
    }
    out = tmp_path / "out"
    summary = convert_coco_zip(write_zip(tmp_path / "z.zip", members), out)
    assert yaml.safe_load((out / "dataset.yaml").read_text())["names"] == {0: "cell", 1: "droplet"}
    assert summary.instances == {0: 2, 1: 1} and summary.notes["merged_categories"] == 1
    text = summary.format()
    assert "merged_categories: 1 - categories sharing a name" in text and "'cell': ids 1, 2" in text
    assert [c for c, _ in read_labels(next(out.glob("labels/*/a.txt")))] == [0, 0]


def test_huge_coordinates_are_a_named_skip_without_numpy_warnings(tmp_path):
    import warnings

    poly = mask_to_polygons(disk(40, 40, 12))
    anns = [ann(1, 1, 3, poly), ann(2, 1, 3, [[1e308, 1e308, -1e308, 5, 5, -1e308]]), ann(3, 1, 3, [[-1e9, -1e9, 1e9,
            -1e9, 1e9, 1e9, -1e9, 1e9]])]  # fmt: skip
    members = {"annotations/instances_default.json": coco([image(1, "a.png")], anns), "images/default/a.png": png()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy overflow warning would fail here
        summary = convert_coco_zip(write_zip(tmp_path / "z.zip", members), tmp_path / "out")
    assert summary.skipped_annotations == {"coordinates_out_of_range": 1} and summary.instances_written == 2
    assert "coordinates_out_of_range: 1 - polygon coordinates beyond +-1e12 px" in summary.format()


def test_output_below_a_file_names_the_users_path(tmp_path, capsys):
    z = simple_zip(tmp_path / "z.zip")
    (tmp_path / "f").write_text("a file")
    err = _fatal(tmp_path, capsys, "--coco-zip", z, "--output-dir", tmp_path / "f" / "x")
    assert err == (f"error: {tmp_path / 'f' / 'x'}: cannot be created: {tmp_path / 'f'} is a file; "
                   "choose another --output-dir")  # fmt: skip


def test_convert_log_lines_are_printed_once(tmp_path):
    members = {"annotations/instances_default.json": coco(
        [image(1, "a.png"), image(2, "gone.png")], [ann(1, 1, 3, mask_to_polygons(disk(40, 40, 12)))]
    ), "images/default/a.png": png()}  # fmt: skip
    z = write_zip(tmp_path / "z.zip", members)
    for command in ([sys.executable, "-m", "cellseg_pl", "convert"], [sys.executable, str(REPO / "scripts" /
                                                                                        "convert_coco_to_yolo.py")]):
        out = tmp_path / f"out{len(command)}"
        done = subprocess.run([*command, "--coco-zip", str(z), "--output-dir", str(out)], capture_output=True,
                              text=True, cwd=REPO, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        line = ("skipped annotations/instances_default.json: image 2 'gone.png': file in neither the zip nor "
                "--images-dir")
        assert done.stderr.splitlines().count(line) == 1, done.stderr


# a convert killed with SIGKILL at a chosen point (a real kill -9: no cleanup code runs)
_KILLED = """
import os, signal, sys
import cellseg_pl.cvat.convert as cv, cellseg_pl.files as od
from cellseg_pl.__main__ import main

def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)

point, real_write, real_exchange, real_replace = sys.argv[1], cv._split_and_write, od._exchange, os.replace
if point == "while_staging":
    cv._split_and_write = lambda *a: (real_write(*a), die())
elif point == "after_exchange":
    od._exchange = lambda a, b: die() if real_exchange(a, b) else sys.exit(77)
elif point == "between_renames":  # the fallback where renameat2(RENAME_EXCHANGE) is not supported
    od._exchange = lambda a, b: False
    os.replace = lambda a, b: (real_replace(a, b), ".convert-old-" in str(b) and die())
sys.exit(main(["convert", *sys.argv[2:]]))
"""


def _complete(out: Path) -> int:
    """The number of images of the complete data set in ``out`` (every file its manifest lists is there)."""
    files = json.loads((out / ".cellseg_convert.json").read_text())["files"]
    assert all((out / f).is_file() for f in files)
    return sum(f.startswith("images/") for f in files)


@pytest.mark.parametrize("point, left", [("while_staging", 5), ("after_exchange", 3), ("between_renames", 5)])
def test_overwrite_killed_anywhere_leaves_a_complete_set_and_the_next_run_cleans_up(tmp_path, caplog, point, left):
    out = tmp_path / "out"
    convert_coco_zip(simple_zip(tmp_path / "old.zip", n_images=5), out)
    z = simple_zip(tmp_path / "new.zip", n_images=3)
    (tmp_path / "killed.py").write_text(_KILLED)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "killed.py"), point, "--coco-zip", str(z), "--output-dir", str(out),
         "--overwrite"], capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    if done.returncode == 77:
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported here")
    assert done.returncode == -9, done.stderr
    hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.convert-")]
    assert hidden  # what the kill left behind
    if point == "between_renames":  # the old set is complete under its hidden name (beside the new one's staging)
        old = [name for name in hidden if ".convert-old-" in name]
        assert not out.exists() and len(old) == 1 and _complete(tmp_path / old[0]) == 5
    else:
        assert _complete(out) == left
    caplog.set_level("WARNING", logger="cellseg_pl")
    convert_coco_zip(z, out, overwrite=True)
    assert _complete(out) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.py", "new.zip", "old.zip", "out"]
    verb = "restored" if point == "between_renames" else "removed"
    assert any(r.message.startswith(verb) and "killed convert" in r.message or "was killed" in r.message
               for r in caplog.records), caplog.text  # fmt: skip


def test_staging_folders_of_running_converts_are_left_alone(tmp_path):
    out = tmp_path / "out"
    live = tmp_path / f".out.convert-staging-{os.getppid()}"  # a running process (our parent)
    live.mkdir()
    look_alike = tmp_path / ".out.convert-staging-abc"
    look_alike.mkdir()
    convert_coco_zip(simple_zip(tmp_path / "z.zip"), out)
    assert live.is_dir() and look_alike.is_dir() and _complete(out) == 2
