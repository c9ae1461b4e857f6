"""The scan before training: bad images and label lines are skipped and counted, fatal problems stop with one line."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cellseg_pl.__main__ import main
from cellseg_pl.data.dataset import YoloSegDataset, load_dataset_yaml, read_label
from cellseg_pl.data.images import read_image
from cellseg_pl.data.images import is_truncated
from cellseg_pl.data.scan import scan_split
from cellseg_pl.errors import DatasetError

from conftest import fit_args

CELL = "0 0.2 0.2 0.4 0.2 0.4 0.4 0.2 0.4"  # one good square cell


def demo_copy(tiny_data: Path, dest: Path) -> Path:
    """A private copy of the tiny demo data set (its dataset.yaml rewritten to point at the copy)."""
    shutil.copytree(tiny_data.parent, dest)
    yaml = dest / "dataset.yaml"
    yaml.write_text(f"path: {dest}\ntrain: images/train\nval: images/val\nnames:\n  0: cell\n")
    return yaml


def add(root: Path, name: str, image: bytes | np.ndarray | None, label: str | None, split: str = "train") -> Path:
    """Write ``images/<split>/<name>`` (bytes as they are, an array with cv2) and its label (None: no file)."""
    path = root / "images" / split / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, np.ndarray):
        assert cv2.imwrite(str(path), image)
    elif image is not None:
        path.write_bytes(image)
    if label is not None:
        lbl = root / "labels" / split / (Path(name).stem + ".txt")
        lbl.parent.mkdir(parents=True, exist_ok=True)
        lbl.write_text(label)
    return path


def picture(seed: int, size: int = 64) -> np.ndarray:
    return cv2.GaussianBlur(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8), (5, 5), 2)


def encoded(ext: str, seed: int) -> bytes:
    return cv2.imencode(ext, picture(seed))[1].tobytes()


# ---------------------------------------------------------------------------------------------- skipped and counted
def test_every_bad_input_gets_its_documented_treatment(tmp_path, caplog):
    root = tmp_path / "d"
    good = add(root, "good.png", picture(0), CELL + "\n")
    add(root, "corrupt.png", b"\x89PNG\r\n\x1a\n this is not an image", CELL)
    add(root, "empty_file.jpg", b"", CELL)
    add(root, "truncated.jpg", encoded(".jpg", 1)[:-200], CELL)
    add(root, "truncated.png", encoded(".png", 2)[: len(encoded(".png", 2)) // 2], CELL)
    add(root, "copy_of_good.png", good.read_bytes(), CELL)
    add(root, "bad_lines.png", picture(3), "\n".join([
        CELL,
        "0 0.1 0.1 0.5",  # line 2: odd count
        "0 0.1 0.1 0.5 0.1",  # line 3: two points
        "0 0.1 abc 0.5 0.1 0.5 0.5",  # line 4: not a number
        "0 nan 0.1 0.5 0.1 0.5 0.5",  # line 5: NaN
        "0 -0.05 0.1 1.02 0.1 0.5 0.5",  # line 6: slightly outside: clipped, kept
        "",
    ]))
    add(root, "no_label.png", picture(4), None)
    add(root, "empty_label.png", picture(5), "")
    add(root, "binary_label.png", picture(6), None)
    (root / "labels" / "train" / "binary_label.txt").write_bytes(b"\xff\xfe\x00garbage\x80\n" + CELL.encode())
    # the formats microscopes write: all usable
    Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)).save(root / "images/train/g16.tif")
    add(root, "g16.png", (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16), CELL)
    Image.fromarray(picture(7)[..., 0]).save(root / "images/train/g8.tif")
    add(root, "rgba.png", np.dstack([picture(8), np.full((64, 64), 128, np.uint8)]), CELL)
    for name in ("g16", "g8"):
        (root / "labels/train" / f"{name}.txt").write_text(CELL)

    listed = [good] + sorted(p for p in (root / "images" / "train").iterdir() if p != good)
    listed += [good, root / "images/train/vanished.png"]  # listed twice; listed but missing
    with caplog.at_level(logging.INFO, logger="cellseg_pl"):
        result = scan_split(listed, num_classes=1, split="train", root=root)

    usable = {p.name for p in result.images}
    assert usable == {"good.png", "bad_lines.png", "no_label.png", "empty_label.png", "binary_label.png", "g16.tif",
                      "g16.png", "g8.tif", "rgba.png"}
    assert result.skipped_images == {
        "corrupt": ["images/train/corrupt.png", "images/train/empty_file.jpg"],
        "duplicate": ["images/train/copy_of_good.png = images/train/good.png", "images/train/good.png (listed twice)"],
        "truncated": ["images/train/truncated.jpg", "images/train/truncated.png"],
        "missing": ["images/train/vanished.png"],
    }
    assert result.skipped_lines == {
        "odd number of coordinates": ["labels/train/bad_lines.txt:2"],
        "fewer than 3 points": ["labels/train/bad_lines.txt:3"],
        "not a number": ["labels/train/bad_lines.txt:4", "labels/train/bad_lines.txt:5",
                         "labels/train/binary_label.txt:1"],
    }
    assert result.clipped_lines == ["labels/train/bad_lines.txt:6"]
    assert result.cells == 8 and result.background == 2 and result.missing_labels == 1
    assert result.listed == 16 and len(result.images) == 9
    summary = [r.getMessage() for r in caplog.records if r.name == "cellseg_pl.data.scan"]
    assert len(summary) == 1
    assert summary[0].startswith(
        "train: 9 images (2 background, 1 without a label file), 8 cells; skipped: 2 corrupt images "
        "(images/train/corrupt.png, images/train/empty_file.jpg), 2 truncated images (images/train/truncated.jpg, "
        "images/train/truncated.png), 1 missing image (images/train/vanished.png), 2 duplicate images ("
        "images/train/copy_of_good.png = images/train/good.png, images/train/good.png (listed twice)), 5 label lines "
        "(not a number: labels/train/bad_lines.txt:4, labels/train/bad_lines.txt:5, labels/train/binary_label.txt:1; "
        "odd number of coordinates: labels/train/bad_lines.txt:2; fewer than 3 points: labels/train/bad_lines.txt:3)"
    )
    assert "clipped to [0, 1]: 1 line (labels/train/bad_lines.txt:6)" in summary[0]

    # what training then reads: the clipped polygon, the bad lines dropped, every format as uint8 RGB
    classes, polygons, skipped = read_label(root / "labels/train/bad_lines.txt", 1)
    assert len(polygons) == 2 and polygons[1].min() == 0.0 and polygons[1].max() == 1.0
    assert skipped == {"odd number of coordinates": 1, "fewer than 3 points": 1, "not a number": 2}
    for name in ("g16.tif", "g16.png", "g8.tif", "rgba.png"):
        img = read_image(root / "images/train" / name)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8, name
    assert read_image(root / "images/train/g16.tif").max() == 255  # 16-bit stretched, not cut to its high byte
    assert (read_image(root / "images/train/rgba.png") == picture(8)[..., ::-1]).all()  # alpha dropped, not mixed in
    ds = YoloSegDataset(result.images, 1, imgsz=64)
    assert sum(len(ds[i]["cls"]) for i in range(len(ds))) == result.cells


def test_truncation_is_seen_in_the_bytes():
    jpg, png = encoded(".jpg", 0), encoded(".png", 0)
    assert not is_truncated(jpg) and not is_truncated(png)
    assert is_truncated(jpg[:-2]) and is_truncated(jpg[: len(jpg) // 2]) and is_truncated(png[:-12])
    assert not is_truncated(jpg + b"\x00" * 64) and not is_truncated(png + b"trailer")  # appended bytes are fine
    assert not is_truncated(b"II*\x00 a tiff") and not is_truncated(b"")


def test_labels_in_pixels_are_fatal(tmp_path):
    root = tmp_path / "d"
    img = add(root, "a.png", picture(0), "0 12 30 40 30 40 60\n")
    with pytest.raises(DatasetError) as e:
        scan_split([img], 1, "train", root)
    assert str(e.value).startswith("labels/train/a.txt line 1: a coordinate lies 59 outside 0..1;")


def test_unreadable_file_is_fatal(tmp_path, monkeypatch):
    root = tmp_path / "d"
    a = add(root, "a.png", picture(0), CELL)
    b = add(root, "b.png", picture(1), CELL)
    real = Path.read_bytes

    def denied(self):  # the tests run as root, where chmod 000 does not stop a read
        if self.name == "b.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DatasetError, match=r"^labels/train/b.txt: cannot read \(Permission denied\); make it readable"):
        scan_split([a, b], 1, "train", root)


def test_a_split_without_usable_images_is_fatal(tmp_path):
    root = tmp_path / "d"
    bad = [add(root, f"{i}.png", b"junk", CELL) for i in range(2)]
    with pytest.raises(DatasetError, match=r"^val: none of the 2 images is usable; .*2 corrupt images"):
        scan_split(bad, 1, "val", root)


def test_unknown_class_names_file_and_line(tmp_path):
    root = tmp_path / "d"
    a = add(root, "a.png", picture(0), CELL + "\n1 0.1 0.1 0.2 0.1 0.2 0.2\n")  # class 1: fine with 2 classes
    b = add(root, "b.png", picture(1), "\n\n5 0.1 0.1 0.2 0.1 0.2 0.2\n0.43 0.1 0.2 0.3 0.1 0.2\n")
    with pytest.raises(DatasetError) as e:
        scan_split([b, a], 2, "train", root)
    assert str(e.value) == (
        "labels/train/b.txt line 3: class 5 but dataset.yaml names 2 classes (0..1); fix 'names' or the label "
        "(1 more: labels/train/b.txt line 4)"
    )
    assert scan_split([a], 2, "train", root).cells == 2
    with pytest.raises(DatasetError, match=r"line 2: class 1 but dataset.yaml names 1 class \(0\); fix 'names'"):
        scan_split([a], 1, "train", root)


def test_image_that_changes_after_the_scan(tmp_path, caplog):
    root = tmp_path / "d"
    images = [add(root, f"{i}.png", picture(i), CELL) for i in range(3)]
    usable = scan_split(images, 1, "train", root).images
    images[1].write_bytes(b"overwritten")
    ds = YoloSegDataset(usable, 1, imgsz=64, skip_unreadable=True)
    with caplog.at_level(logging.WARNING, logger="cellseg_pl"):
        assert ds[1]["im_file"] == str(images[2])
    assert "1.png: cannot decode the image" in caplog.text and "changed since the scan" in caplog.text
    images[2].unlink()
    assert ds[1]["im_file"] == str(images[0])  # both gone: the next readable one
    with pytest.raises(DatasetError, match=r"2.png: cannot read the image"):
        YoloSegDataset(usable, 1, imgsz=64)[2]  # (prediction and direct use: an error naming the file)


# ---------------------------------------------------------------------------------------------- through the CLI
def test_fit_trains_through_bad_data_and_logs_the_summary(tiny_data, tmp_path, caplog):
    yaml = demo_copy(tiny_data, tmp_path / "data")
    root = yaml.parent
    add(root, "zz_corrupt.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR broken", CELL)
    cells = sum(len(f.read_text().split("\n")) - 1 for f in (root / "labels" / "train").glob("*.txt"))
    label = sorted((root / "labels" / "train").glob("*.txt"))[0]
    label.write_text(label.read_text() + "0 0.5 0.5 0.6\n0 0.1 x 0.2 0.1 0.2 0.2\n")
    with caplog.at_level(logging.INFO, logger="cellseg_pl"):
        assert main(fit_args(yaml, tmp_path, "bad", 1)) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "cellseg_pl.data.scan"]
    assert len(lines) == 2 and lines[0].startswith("train: 8 images (0 background), ")
    n = len(label.read_text().splitlines())
    assert (
        f"{cells} cells; skipped: 1 corrupt image (images/train/zz_corrupt.png), 2 label lines (not a number: "
        f"labels/train/{label.name}:{n}; odd number of coordinates: labels/train/{label.name}:{n - 1})"
    ) in lines[0]
    assert lines[1].startswith("val: 4 images")
    assert (tmp_path / "bad" / "weights" / "last.ckpt").is_file()


def test_fit_stops_before_the_first_step_on_an_unknown_class(tiny_data, tmp_path, capsys):
    yaml = demo_copy(tiny_data, tmp_path / "data")
    label = sorted((yaml.parent / "labels" / "val").glob("*.txt"))[1]
    lines = label.read_text().splitlines()
    lines[2] = "3" + lines[2][1:]
    label.write_text("\n".join(lines) + "\n")
    assert main(fit_args(yaml, tmp_path, "fatal", 1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"error: labels/val/{label.name} line 3: class 3 but dataset.yaml names 1 class (0); fix 'names' or the label"
    )
    assert not (tmp_path / "fatal" / "weights").exists() and not (tmp_path / "fatal" / "results.csv").exists()


def test_val_image_also_in_train_is_warned_about(tiny_data, tmp_path, caplog):
    from cellseg_pl.data.datamodule import CellSegDataModule

    yaml = demo_copy(tiny_data, tmp_path / "data")
    spec = load_dataset_yaml(yaml)
    shutil.copy(spec.splits["train"][0], yaml.parent / "images" / "val" / "leak.png")
    dm = CellSegDataModule(str(yaml), imgsz=128, batch_size=2, num_workers=0)
    with caplog.at_level(logging.INFO, logger="cellseg_pl"):
        dm.setup("fit")
    assert "1 val image(s) also in train (same bytes), e.g. " in caplog.text
    assert len(dm.train_dataloader().dataset) == 8 and len(dm.val_dataloader().dataset) == 5


def test_a_split_whose_every_label_line_is_invalid_is_fatal(tmp_path):
    root = tmp_path / "d"
    imgs = [add(root, f"{i}.png", picture(i), "0 0.1 0.2 0.3\n0 0.1 nan 0.3 0.4 0.5 0.6\n") for i in range(2)]
    imgs.append(add(root, "bg.png", picture(5), ""))
    with pytest.raises(DatasetError, match=r"^train: none of its 4 label lines is usable; fix the labels \(train: 3 "):
        scan_split(imgs, 1, "train", root)
    assert scan_split(imgs[2:], 1, "train", root).background == 1  # background only (no label lines): allowed


def test_fit_refuses_a_data_set_without_one_usable_label_line(tiny_data, tmp_path, capsys):
    yaml = demo_copy(tiny_data, tmp_path / "data")
    for label in (yaml.parent / "labels" / "train").glob("*.txt"):
        label.write_text("".join(line.split()[0] + " 0.5\n" for line in label.read_text().splitlines()))
    assert main(fit_args(yaml, tmp_path, "nolabels", 1)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: train: none of its ") and "label lines is usable; fix the labels" in err[-1]
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "nolabels" / "weights").exists()
