"""Images over the pixel limit (2^28 px, read from the header before decoding; OpenCV's own is 2^30): one clear error
naming the file, its size and the way out; the scan before training skips and counts it and keeps the good images
of the folder (issue 12); a giant PNG costs no memory (issue 27).

A real 33000 x 33000 PNG is not needed: OpenCV checks the size in the header before it decodes anything, so a PNG
whose IHDR says 33000 x 33000 (a few hundred bytes) takes the same path.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cellseg_pl.data.images import decode_image, image_size_from_header, read_image
from cellseg_pl.errors import DatasetError, ImageTooLargeError

from conftest import huge_png


def write_huge(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(huge_png())
    return path


def test_image_over_the_opencv_limit_names_file_size_and_fix(tmp_path):
    path = write_huge(tmp_path / "slide.png")
    with pytest.raises(cv2.error):  # what OpenCV itself does: an exception, not None
        cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)
    with pytest.raises(ImageTooLargeError) as info:
        read_image(path)
    message = str(info.value)
    assert isinstance(info.value, DatasetError)  # every caller that handles a bad image handles this one
    assert message.startswith(f"{path}: image is 33000x33000 px")
    assert "CV_IO_MAX_IMAGE_PIXELS" in message and "split it into tiles" in message
    assert "\n" not in message


def test_a_giant_image_under_opencvs_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    import cellseg_pl.data.images as images

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded")

    path = write_huge_real(tmp_path / "stitch.png", 30000, 30000)  # 9e8 px: under OpenCV's 2^30, over ours
    monkeypatch.setattr(images.cv2, "imdecode", no_decoding)
    with pytest.raises(ImageTooLargeError) as info:
        read_image(path)
    assert str(info.value).startswith(f"{path}: image is 30000x30000 px (900,000,000 px; ~5.0 GiB to decode), over "
                                      "the limit of 268,435,456 px (CV_IO_MAX_IMAGE_PIXELS); split it into tiles")
    # the variable raises the limit (OpenCV reads the same one): then the image is decoded
    monkeypatch.setenv("CV_IO_MAX_IMAGE_PIXELS", str(10**9))
    with pytest.raises(AssertionError, match="decoded"):
        read_image(path)
    monkeypatch.setenv("CV_IO_MAX_IMAGE_PIXELS", "1000")  # and lowers it
    with pytest.raises(ImageTooLargeError, match=r"image is 30000x30000 px .* over the limit of 1,000 px"):
        read_image(path)


def write_huge_real(path: Path, width: int, height: int) -> Path:
    """A valid PNG of ``width`` x ``height`` black 1-bit gray pixels: OpenCV decodes it (as 8-bit) into ``width *
    height`` bytes, and into 3 times that as RGB; the file is ~110 KB for 30000 x 30000."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * ((width + 7) // 8 + 1) * height, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def test_reading_a_giant_png_is_refused_in_little_memory(tmp_path):
    """Every command reads images through read_image: the 30000 x 30000 PNG costs under 1 GB (its decoding: ~3.5)."""
    import subprocess
    import sys

    path = write_huge_real(tmp_path / "stitch.png", 30000, 30000)
    code = f"""
from cellseg_pl.data.images import read_image
from cellseg_pl.errors import ImageTooLargeError
try:
    read_image({str(path)!r})
except ImageTooLargeError as e:
    print("REFUSED", e)
# VmHWM: this process' peak (ru_maxrss would carry over the forking test process' own)
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("PEAK_MIB", peak_kib // 1024)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in __import__("os").environ.items() if k != "CV_IO_MAX_IMAGE_PIXELS"})
    assert done.returncode == 0, done.stderr
    assert "REFUSED" in done.stdout and "30000x30000 px" in done.stdout
    peak = int(done.stdout.split("PEAK_MIB")[1])
    assert peak < 1024, peak


def test_other_opencv_exceptions_become_a_dataset_error(tmp_path, monkeypatch):
    import cellseg_pl.data.dataset as dataset_mod

    def refuse(*args, **kwargs):
        raise cv2.error("OpenCV(5.0.0) loadsave.cpp:1: error: (-2:Unspecified error) something else")

    monkeypatch.setattr(dataset_mod.cv2, "imdecode", refuse)
    with pytest.raises(DatasetError, match=r"^x\.png: OpenCV cannot decode the image \(.*something else\)") as info:
        decode_image(b"\x89PNG....", "x.png")
    assert not isinstance(info.value, ImageTooLargeError)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif", ".bmp"])
def test_size_from_header(suffix):
    ok, encoded = cv2.imencode(suffix, np.zeros((37, 53, 3), np.uint8))
    assert ok
    assert image_size_from_header(encoded) == (53, 37)
    assert image_size_from_header(encoded.tobytes()) == (53, 37)


def test_size_from_header_of_non_images():
    assert image_size_from_header(huge_png(40000, 30000)) == (40000, 30000)
    for data in (b"", b"garbage", b"\xff\xd8\xff\xe0\x00\x10", b"II*\0\xff\xff\xff\xff"):
        assert image_size_from_header(data) is None


def test_scan_before_training_skips_and_counts_it(tmp_path):
    from cellseg_pl.data.scan import scan_split

    folder = tmp_path / "images" / "train"
    folder.mkdir(parents=True)
    good = []
    for k in range(2):
        good.append(folder / f"{k}.png")
        assert cv2.imwrite(str(good[-1]), np.full((32, 32, 3), 100 + k, np.uint8))
    huge = write_huge(folder / "slide.png")
    result = scan_split([good[0], huge, good[1]], 1, "train", tmp_path, log_summary=False)
    assert result.images == good  # the good images of the folder are kept
    assert [str(p) for files in result.skipped_images.values() for p in files] == ["images/train/slide.png"]
    assert list(result.skipped_images) == ["over the pixel limit"]  # its own reason, not "corrupt"
    assert "slide.png" in result.summary()


def test_convert_skips_and_counts_an_image_over_the_limit_and_writes_the_others(tmp_path):
    import json
    import zipfile

    from cellseg_pl.cvat.convert import convert_coco_zip

    good = cv2.imencode(".png", np.full((64, 64, 3), 90, np.uint8))[1].tobytes()
    square = [10.0, 10.0, 40.0, 10.0, 40.0, 40.0, 10.0, 40.0]
    coco = {
        "images": [{"id": i + 1, "file_name": f"{n}.png", "width": w, "height": w}
                   for i, (n, w) in enumerate([("a", 64), ("b", 64), ("c", 64), ("big", 33000)])],
        "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "segmentation": [square],
                         "area": 900.0, "bbox": [10, 10, 30, 30], "iscrowd": 0} for i in range(4)],
        "categories": [{"id": 1, "name": "cell"}],
    }
    zpath = tmp_path / "export.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("annotations/instances_default.json", json.dumps(coco))
        for n in "abc":
            zf.writestr(f"images/default/{n}.png", good)
        zf.writestr("images/default/big.png", huge_png())
    summary = convert_coco_zip(zpath, tmp_path / "out")
    written = sorted(p.name for p in (tmp_path / "out" / "images").rglob("*.png"))
    assert written == ["a.png", "b.png", "c.png"]
    assert summary.skipped_images.get("too_large") == 1
