"""Tests of cellseg_pl.cvat.archive: safe reading of CVAT "COCO 1.0" zips (zip slip, errors, image lookup)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from cellseg_pl.cvat.coco import build_coco
from cellseg_pl.cvat.archive import open_coco_zip
from cellseg_pl.errors import ConvertError


def make_zip(path: Path, members: dict[str, bytes | str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def coco_json(file_names: list[str]) -> str:
    images = [{"id": i + 1, "file_name": f, "height": 4, "width": 4} for i, f in enumerate(file_names)]
    return json.dumps(build_coco(images, [], [{"id": 1, "name": "cell"}]))


@pytest.mark.parametrize(
    "member, reason",
    [
        ("../evil.png", "contains '..'"),
        ("images/../../evil.png", "contains '..'"),
        ("/etc/evil.png", "absolute path"),
        ("C:/evil.png", "drive letter"),
        ("images\\..\\..\\evil.png", "contains '..'"),
    ],
)
def test_open_coco_zip_rejects_zip_slip(tmp_path, member, reason):
    z = make_zip(tmp_path / "x.zip", {"annotations/instances_default.json": coco_json([]), member: b"x"})
    with pytest.raises(ConvertError, match=reason) as err:
        open_coco_zip(z)
    assert repr(member) in str(err.value) and str(z) in str(err.value)


def test_open_coco_zip_errors(tmp_path):
    text = tmp_path / "notes.zip"
    text.write_text("not a zip")
    with pytest.raises(ConvertError, match="is not a zip file"):
        open_coco_zip(text)
    with pytest.raises(ConvertError, match="does not exist"):
        open_coco_zip(tmp_path / "missing.zip")
    empty = make_zip(tmp_path / "e.zip", {"images/a.png": b"x"})
    with pytest.raises(ConvertError, match=r"no annotations/instances_<subset>\.json inside \(it holds images/a\.png\)"):
        open_coco_zip(empty)
    bad = make_zip(tmp_path / "b.zip", {"annotations/instances_default.json": '{\n "images": [],\n oops\n}'})
    with pytest.raises(ConvertError, match=r"instances_default\.json: invalid JSON at line 3 column 2"):
        open_coco_zip(bad)
    wrong = make_zip(tmp_path / "w.zip", {"annotations/instances_default.json": '{"images": {}}'})
    with pytest.raises(ConvertError, match="'images' is not a list"):
        open_coco_zip(wrong)
    with pytest.raises(ConvertError, match="is not a folder"):
        open_coco_zip(empty, images_dir=tmp_path / "nope")


def test_open_coco_zip_subsets_and_image_lookup(tmp_path):
    z = make_zip(
        tmp_path / "x.zip",
        {
            "annotations/instances_train.json": coco_json(["a.png", "sub/b.png"]),
            "annotations/instances_val.json": coco_json(["c.png", "d.png", "frames/e.png"]),
            "images/train/a.png": b"A",
            "images/train/sub/b.png": b"B",
            "images/c.png": b"C",
        },
    )
    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "d.png").write_bytes(b"D")
    (ext / "e.png").write_bytes(b"E")
    before = sorted(p for p in tmp_path.rglob("*"))
    with open_coco_zip(z, images_dir=ext) as cz:
        train, val = cz.subsets
        assert (train.name, val.name) == ("train", "val")
        assert len(train.coco["images"]) == 2 and len(val.coco["images"]) == 3
        assert cz.read_image("a.png", train) == (b"A", "images/train/a.png")
        assert cz.read_image("sub/b.png", train)[0] == b"B"
        assert cz.read_image("c.png", val) == (b"C", "images/c.png")
        assert cz.read_image("d.png", val) == (b"D", str(ext / "d.png"))
        assert cz.read_image("frames/e.png", val)[0] == b"E"  # basename fallback in --images-dir
        assert cz.read_image("zzz.png", val) is None
        assert cz.read_image("../ext/d.png", val) is None  # never looks outside the images folder
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing extracted


def test_locate_image_says_when_it_fell_back_to_the_basename(tmp_path):
    z = make_zip(tmp_path / "x.zip", {"annotations/instances_default.json": coco_json(["a.png", "d/b.png"]),
                                      "images/default/a.png": b"A"})  # fmt: skip
    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "b.png").write_bytes(b"B")
    with open_coco_zip(z, images_dir=ext) as cz:
        (sub,) = cz.subsets
        assert cz.locate_image("a.png", sub) == ("zip", "images/default/a.png")
        assert cz.locate_image("d/b.png", sub) == ("basename", str(ext / "b.png"))
        assert cz.locate_image("b.png", sub) == ("file", str(ext / "b.png"))
        assert cz.read_located(cz.locate_image("d/b.png", sub)) == b"B"
