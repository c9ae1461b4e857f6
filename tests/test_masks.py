"""MaskWindows: masks kept in windows give exactly pycocotools' RLEs and areas, and the masks back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

import cellseg_pl.masks as masks_mod
from cellseg_pl.masks import MaskWindows


def reference(stack: np.ndarray) -> tuple[list[bytes], list[int]]:
    """pycocotools' RLEs (counts) and areas of a (n, H, W) bool stack."""
    if not len(stack):
        return [], []
    rles = mask_utils.encode(np.asfortranarray(stack.transpose(1, 2, 0).astype(np.uint8)))
    return [r["counts"] for r in rles], [int(m.sum()) for m in stack]


def awkward_masks(h: int, w: int, n: int, seed: int) -> np.ndarray:
    """Random blobs and the cases that break run-length encoders: objects on every image edge, columns full from
    the last row into the next column's first row, the image's first and last pixel, full and empty masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    stack = np.zeros((n, h, w), bool)
    for k in range(n):
        cy, cx = rng.uniform(-5, h + 5), rng.uniform(-5, w + 5)
        ry, rx = rng.uniform(0.5, h / 2), rng.uniform(0.5, w / 2)
        stack[k] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        if k % 3 == 0:
            stack[k] &= rng.random((h, w)) < 0.7  # ragged: many runs
    stack[0] = False
    stack[1] = True
    stack[3, -1, -1] = stack[3, 0, 0] = True
    if w >= 6 and h >= 2:
        stack[2, :, 3:6] = True  # whole columns: one run across column boundaries
        stack[4, h - 2 :, 1] = stack[4, :2, 2] = True  # a run from the end of one column into the next
    return stack


@pytest.mark.parametrize("h, w, n", [(1, 1, 5), (7, 3, 9), (37, 53, 40), (64, 64, 150)])
def test_windows_of_dense_masks_encode_as_pycocotools_and_give_the_masks_back(h, w, n):
    stack = awkward_masks(h, w, n, seed=h * w)
    counts, areas = reference(stack)
    for windows in (MaskWindows.from_dense(stack), MaskWindows.from_dense(torch.from_numpy(stack))):
        rles, got_areas = windows.encode()
        assert [r["counts"] for r in rles] == counts and got_areas == areas
        assert len(windows) == n and torch.equal(windows.dense(), torch.from_numpy(stack))
        assert torch.equal(windows.dense(indices=[n - 1, 0]), torch.from_numpy(stack[[n - 1, 0]]))
    if n > masks_mod.GROUP_SIZE:
        assert len(MaskWindows.from_dense(stack).groups) > 1
    # read inside boxes that hold each mask (with fractional bounds), and a subset in another order
    boxes = []
    for m in stack:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min() - 0.4, ys.min() - 0.9, xs.max() + 1.2, ys.max() + 1] if len(ys) else [2, 2, 2, 2])
    in_boxes = MaskWindows.from_dense(stack, np.array(boxes))
    assert [r["counts"] for r in in_boxes.encode()[0]] == counts
    picked = [n - 1, 0, 3]
    rles, got_areas = in_boxes.encode(picked)
    assert [r["counts"] for r in rles] == [counts[k] for k in picked] and got_areas == [areas[k] for k in picked]
    assert in_boxes.encode([]) == ([], [])


def test_windows_of_a_label_map_and_of_crops():
    h, w = 29, 41
    rng = np.random.default_rng(1)
    labels = np.zeros((h, w), np.int32)
    labels[:, 0:3] = 1  # full columns on the left edge
    labels[5:9, 10:30] = 2
    labels[h - 4 :, w - 6 :] = 4  # the bottom-right corner (label 3 has no pixels)
    labels[rng.random((h, w)) < 0.05] = 5
    stack = np.stack([labels == k for k in range(1, 6)])
    counts, areas = reference(stack)
    for lab in (labels, torch.from_numpy(labels)):
        windows = MaskWindows.from_label_map(lab, 5)
        rles, got = windows.encode()
        assert [r["counts"] for r in rles] == counts and got == areas and got[2] == 0
        assert torch.equal(windows.dense(), torch.from_numpy(stack))
    assert len(MaskWindows.from_label_map(labels, 0)) == 0 and MaskWindows.from_label_map(labels, 0).encode() == ([], [])
    # crops partly outside the image
    crops = [(rng.random((9, 12)) > 0.3, -4, -2), (rng.random((6, 8)) > 0.3, w - 5, h - 3), (np.ones((3, 3), bool), 60, 5)]
    full = np.zeros((3, h, w), bool)
    for k, (m, x0, y0) in enumerate(crops):
        for r, c in zip(*np.nonzero(m)):
            if 0 <= y0 + r < h and 0 <= x0 + c < w:
                full[k, y0 + r, x0 + c] = True
    windows = MaskWindows.from_crops(crops, h, w)
    assert [r["counts"] for r in windows.encode()[0]] == reference(full)[0]
    assert torch.equal(windows.dense(), torch.from_numpy(full))


def label_map(h: int, w: int, count: int, seed: int) -> np.ndarray:
    """A random (h, w) map of ``count`` instances (ids 1..count; some rasterized to nothing), 0 background."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((h, w), np.int64)
    for k in range(1, count + 1):
        y, x = rng.integers(0, h), rng.integers(0, w)
        lab[y : y + rng.integers(1, h // 2 + 2), x : x + rng.integers(1, w // 2 + 2)] = k
    return lab


@pytest.mark.parametrize(
    "h, w, n, count", [(1, 1, 5, 1), (37, 53, 40, 9), (64, 64, 150, 30), (20, 30, 5, 0), (64, 48, 20, 300)]
)
def test_overlaps_count_each_masks_pixels_on_each_instance(h, w, n, count):
    """Intersections and areas counted in the windows equal those of the full masks, for windows of full masks,
    of prediction boxes (reaching past the image) and of crops."""
    from cellseg_pl.yolo.postprocess import box_mask_windows

    stack, lab = awkward_masks(h, w, n, seed=n), label_map(h, w, count, seed=n)
    inter_ref = np.stack([[(m & (lab == k + 1)).sum() for k in range(count)] for m in stack]).reshape(n, count)
    for windows in (MaskWindows.from_dense(stack), MaskWindows.from_crops([(m, 0, 0) for m in stack], h, w)):
        inter, areas = windows.overlaps(torch.from_numpy(lab), count)
        assert inter.dtype == np.int64 and np.array_equal(inter, inter_ref)
        assert areas.tolist() == stack.reshape(n, -1).sum(1).tolist()
    if h % 4 == 0 and w % 4 == 0:  # box windows: prototype pixels beyond the image repeat the last row / column
        g = torch.Generator().manual_seed(n)
        proto, coeffs = torch.randn(32, h // 4, w // 4, generator=g), torch.randn(n, 32, generator=g)
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
        boxes = torch.cat([xy - 9, xy + torch.rand(n, 2, generator=g) * 40], 1)
        windows = box_mask_windows(proto, coeffs, boxes, (h, w))
        dense = windows.dense().numpy()
        inter, areas = windows.overlaps(lab, count)
        assert np.array_equal(inter, np.stack([[(m & (lab == k + 1)).sum() for k in range(count)] for m in dense])
                              .reshape(n, count))
        assert areas.tolist() == dense.reshape(n, -1).sum(1).tolist() and areas.sum() > 0


def test_overlaps_refuse_a_label_map_that_does_not_fit():
    windows = MaskWindows.from_dense(awkward_masks(8, 8, 5, seed=0))
    with pytest.raises(ValueError, match="holds 4 instances, not 3"):
        windows.overlaps(np.full((8, 8), 4), 3)
    with pytest.raises(ValueError, match="label map of"):
        windows.overlaps(np.zeros((8, 9), np.int64), 3)
