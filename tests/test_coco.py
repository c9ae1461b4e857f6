"""Tests of cellseg_pl.cvat.coco: polygon/mask/RLE conversions and COCO dicts."""

from __future__ import annotations

import json
import warnings

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from scipy import ndimage

from cellseg_pl.cvat.coco import (
    build_coco,
    mask_to_polygons,
    mask_to_yolo_polygons,
    polygons_to_mask,
    rle_to_mask,
    validate_polygon,
)

from conftest import mask_to_rle


def disk(height: int, width: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """Pixels whose centre lies in the disk (continuous coordinates, pixel (r, c) centre = (c+.5, r+.5))."""
    yy, xx = np.mgrid[:height, :width] + 0.5
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def fill_yolo(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Rasterize pixel-centre polygons the way Ultralytics' polygon2mask does."""
    out = np.zeros((height, width), np.uint8)
    cv2.fillPoly(out, [np.round(p).astype(np.int32) for p in polygons], 1)
    return out.astype(bool)


def uncompressed_rle(mask: np.ndarray) -> dict:
    """CVAT-style uncompressed RLE: column-major runs starting with zeros."""
    flat = mask.T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


@pytest.fixture(scope="module")
def nuclei() -> list[np.ndarray]:
    """Round nuclei of about 400 px area at random sub-pixel centres and radii (60x60 masks)."""
    rng = np.random.default_rng(0)
    return [
        disk(60, 60, *rng.uniform(27, 33, 2), np.sqrt(rng.uniform(360, 440) / np.pi)) for _ in range(100)
    ]


# ---------------------------------------------------------------------------------------------- rasterizing


def test_polygons_to_mask_uses_pixel_edges_and_clips():
    square = [2.0, 3.0, 5.0, 3.0, 5.0, 7.0, 2.0, 7.0]  # x 2..5, y 3..7: columns 2-4, rows 3-6
    m = polygons_to_mask([square], 10, 10)
    assert m.dtype == bool and m.shape == (10, 10)
    assert m.sum() == 12 and m[3:7, 2:5].all()
    assert polygons_to_mask([[-5, -5, 20, -5, 20, 20, -5, 20]], 10, 10).all()
    two = polygons_to_mask([square, [7, 7, 9, 7, 9, 9, 7, 9]], 10, 10)
    assert two.sum() == 16
    with pytest.raises(ValueError, match="odd number"):
        polygons_to_mask([[1, 2, 3, 4, 5]], 10, 10)
    with pytest.raises(ValueError, match="needs >= 3"):
        polygons_to_mask([[1, 2, 3, 4]], 10, 10)


def test_polygons_far_outside_are_clipped_exactly():
    huge = [-1e9, -1e9, 1e9, -1e9, 1e9, 1e9, -1e9, 1e9]
    assert polygons_to_mask([huge], 20, 30).all()
    concave = [10.2, 5.5, 1000.0, 8.3, 40.7, 12.1, 900.0, 18.9, 12.5, 16.0, 5.0, 11.0]
    wide = polygons_to_mask([concave], 25, 2000)[:, :60]
    assert wide.any() and (polygons_to_mask([concave], 25, 60) == wide).all()
    assert not polygons_to_mask([[500, 500, 600, 500, 600, 600]], 20, 30).any()


def test_rle_to_mask_uncompressed_and_compressed():
    m = disk(30, 40, 20.3, 14.7, 9.0)
    assert (rle_to_mask(uncompressed_rle(m), 30, 40) == m).all()
    compressed = mask_to_rle(m)
    assert isinstance(compressed["counts"], str)
    assert (rle_to_mask(compressed, 30, 40) == m).all()
    assert (rle_to_mask({**compressed, "counts": compressed["counts"].encode()}, 30, 40) == m).all()
    assert json.loads(json.dumps(compressed)) == compressed


def test_rle_to_mask_matches_pycocotools_and_crops():
    rng = np.random.default_rng(4)
    for _ in range(50):
        h, w = rng.integers(1, 30, 2)
        m = rng.random((h, w)) < 0.5
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        with warnings.catch_warnings():  # pycocotools' decode warns under numpy 2
            warnings.simplefilter("ignore", DeprecationWarning)
            expected = mask_utils.decode(rle).astype(bool)
        assert (rle_to_mask(rle, h, w) == expected).all() and (expected == m).all()
        x, y = rng.integers(0, w), rng.integers(0, h)
        bw, bh = rng.integers(0, w - x + 1), rng.integers(0, h - y + 1)
        assert (rle_to_mask(uncompressed_rle(m), h, w, box=(x, y, bw, bh)) == m[y : y + bh, x : x + bw]).all()
    with pytest.raises(ValueError, match="not inside"):
        rle_to_mask(uncompressed_rle(m), h, w, box=(0, 0, w + 1, 1))


@pytest.mark.parametrize(
    "rle, match",
    [
        ({"size": [30, 41], "counts": [1230]}, "does not match the image size"),
        ({"size": [30, 40], "counts": [10, 5]}, "expected H\\*W = 1200"),
        ({"size": [30, 40], "counts": [1300, -100]}, "negative"),
        ({"size": [30, 40], "counts": "0Z"}, "ends in the middle"),
        ({"size": [30, 40], "counts": 17}, "expected a list or a string"),
    ],
)
def test_rle_to_mask_rejects_bad_rle(rle, match):
    with pytest.raises(ValueError, match=match):
        rle_to_mask(rle, 30, 40)


# ---------------------------------------------------------------------------------------------- outlining


def test_mask_to_polygons_is_exact_without_simplification():
    """Tolerance 0 traces pixel edges exactly: the round trip gives the mask back, holes filled."""
    rng = np.random.default_rng(1)
    for _ in range(300):
        h, w = rng.integers(3, 25, 2)
        m = rng.random((h, w)) < rng.uniform(0.2, 0.8)
        got = polygons_to_mask(mask_to_polygons(m, tolerance=0), h, w)
        assert (got == ndimage.binary_fill_holes(m)).all()


def test_mask_to_polygons_iou_on_400px_nuclei(nuclei):
    ious = [iou(polygons_to_mask(mask_to_polygons(m), 60, 60), m) for m in nuclei]
    assert min(ious) >= 0.95 and np.mean(ious) >= 0.97
    # what the pixel-edge tracing buys: a contour through boundary-pixel centres loses the outer half-ring
    naive = []
    for m in nuclei:
        c, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        naive.append(iou(polygons_to_mask([(c[0].reshape(-1) + 0.5).tolist()], 60, 60), m))
    assert np.mean(naive) < 0.93


def test_mask_to_polygons_larger_nuclei_are_better():
    rng = np.random.default_rng(2)
    ious = [iou(polygons_to_mask(mask_to_polygons(m), 120, 120), m) for m in
            (disk(120, 120, *rng.uniform(55, 65, 2), rng.uniform(30, 40)) for _ in range(20))]  # fmt: skip
    assert min(ious) >= 0.98


def test_mask_to_polygons_parts_holes_specks():
    m = disk(50, 80, 20, 25, 12) | disk(50, 80, 60, 25, 8)
    m[2, 2] = True  # a speck: no polygon of >= 3 points survives simplification
    polys = mask_to_polygons(m)
    assert len(polys) == 2
    assert all(len(p) % 2 == 0 and len(p) >= 6 for p in polys)
    areas = [polygons_to_mask([p], 50, 80).sum() for p in polys]
    assert areas[0] > areas[1]  # largest first
    ring = disk(40, 40, 20, 20, 12) & ~disk(40, 40, 20, 20, 5)
    (ring_poly,) = mask_to_polygons(ring)
    assert iou(polygons_to_mask([ring_poly], 40, 40), disk(40, 40, 20, 20, 12)) > 0.95  # hole filled
    assert mask_to_polygons(np.zeros((5, 5), bool)) == []


def test_mask_to_yolo_polygons_fillpoly_round_trip(nuclei):
    rng = np.random.default_rng(3)
    for _ in range(100):  # exact without simplification (holes filled)
        h, w = rng.integers(3, 25, 2)
        m = ndimage.binary_fill_holes(ndimage.binary_opening(rng.random((h, w)) < 0.7))
        assert (fill_yolo(mask_to_yolo_polygons(m, tolerance=0), h, w) == m).all()
    ious = [iou(fill_yolo(mask_to_yolo_polygons(m), 60, 60), m) for m in nuclei]
    assert min(ious) >= 0.95 and np.mean(ious) >= 0.97
    polys = mask_to_yolo_polygons(disk(60, 60, 30, 30, 11) | disk(60, 60, 52, 52, 4))
    assert [p.shape[1] for p in polys] == [2, 2] and len(polys[0]) > len(polys[1])
    assert polys[0].dtype == np.float64


def test_mask_to_rle_matches_pycocotools():
    m = disk(20, 30, 10, 10, 6)
    rle = mask_to_rle(m)
    assert rle["size"] == [20, 30]
    assert mask_utils.area({**rle, "counts": rle["counts"].encode()}) == m.sum()


def test_build_coco():
    coco = build_coco([{"id": 1, "file_name": "a.png", "height": 2, "width": 3}], [], [{"id": 1, "name": "cell"}])
    assert coco["categories"][0]["name"] == "cell" and coco["images"][0]["file_name"] == "a.png"
    assert set(coco) >= {"info", "licenses", "images", "annotations", "categories"}


def test_coordinates_beyond_the_limit_are_refused_without_numpy_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "beyond +-1e+12 px" in validate_polygon([1e308, 1e308, -1e308, 5, 5, -1e308])
        with pytest.raises(ValueError, match="beyond"):
            polygons_to_mask([[1e308, 0, 0, 1e308, 5, 5]], 10, 10)
    assert validate_polygon([-1e9, -1e9, 1e9, -1e9, 1e9, 1e9]) is None  # far, still clipped exactly
