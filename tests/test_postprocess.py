"""cellseg_pl.yolo.postprocess on hand-made head output: NMS, score threshold, max_det, masks cropped to their boxes, and the
mapping of a letterboxed input back to the original image."""

from __future__ import annotations

import pytest
import torch

from cellseg_pl.yolo.postprocess import box_mask_windows, box_masks, postprocess, to_original

S, NC, NM = 64, 2, 32  # input side, classes, mask coefficients


def head_output(rows: list[tuple[tuple[float, float, float, float], int, float, int]], batch: int = 1) -> torch.Tensor:
    """(batch, 4 + NC + NM, anchors): image 0 holds ``rows`` of (xywh px, class, score, prototype channel), the other
    images only scores of 0."""
    det = torch.zeros(batch, 4 + NC + NM, max(len(rows), 1))
    for a, (xywh, cls, score, channel) in enumerate(rows):
        det[0, :4, a] = torch.tensor(xywh)
        det[0, 4 + cls, a] = score
        det[0, 4 + NC + channel, a] = 1.0
    return det


def prototypes(batch: int = 1) -> torch.Tensor:
    """(batch, NM, S/4, S/4): channel 0 positive everywhere, channel 1 positive in prototype rows >= 10 (px >= 40)."""
    proto = torch.full((batch, NM, S // 4, S // 4), -1.0)
    proto[:, 0] = 1.0
    proto[:, 1, 10:] = 1.0
    return proto


ROWS = [
    ((20, 20, 16, 16), 0, 0.9, 0),  # -> xyxy (12, 12, 28, 28)
    ((21, 20, 16, 16), 0, 0.8, 0),  # IoU 0.88 with the first: suppressed at iou 0.7
    ((45, 45, 10, 20), 1, 0.6, 1),  # -> xyxy (40, 35, 50, 55), class 1
    ((50, 10, 8, 8), 0, 0.0005, 0),  # under conf 0.001
]


def test_nms_threshold_boxes_labels_and_coefficients():
    (out,) = postprocess(head_output(ROWS), prototypes(), NC, conf=0.001, iou=0.7)
    assert out["boxes"].tolist() == [[12.0, 12.0, 28.0, 28.0], [40.0, 35.0, 50.0, 55.0]]
    assert out["scores"].tolist() == pytest.approx([0.9, 0.6])
    assert out["labels"].tolist() == [0, 1] and out["labels"].dtype == torch.int64
    assert out["coeffs"].shape == (2, NM)
    assert out["coeffs"].argmax(1).tolist() == [0, 1]
    # a looser IoU keeps the near-duplicate; max_det keeps the best ones only
    (loose,) = postprocess(head_output(ROWS), prototypes(), NC, conf=0.001, iou=0.95)
    assert loose["scores"].tolist() == pytest.approx([0.9, 0.8, 0.6])
    (top,) = postprocess(head_output(ROWS), prototypes(), NC, conf=0.001, iou=0.95, max_det=1)
    assert top["scores"].tolist() == pytest.approx([0.9])
    (confident,) = postprocess(head_output(ROWS), prototypes(), NC, conf=0.7)
    assert confident["scores"].tolist() == pytest.approx([0.9])


def test_masks_at_input_size_cropped_to_the_box():
    (out,) = postprocess(head_output(ROWS), prototypes(), NC)
    masks = out["masks"]
    assert masks.shape == (2, S, S) and masks.dtype == torch.bool
    # prototype 0 is positive everywhere: the mask is exactly its box
    expected = torch.zeros(S, S, dtype=torch.bool)
    expected[12:28, 12:28] = True
    assert torch.equal(masks[0], expected)
    # prototype 1 is positive from px ~40 down: the mask is that part of box (40, 35, 50, 55), nothing outside it
    inside = torch.zeros(S, S, dtype=torch.bool)
    inside[35:55, 40:50] = True
    assert not (masks[1] & ~inside).any()
    assert masks[1][44:55, 40:50].all() and not masks[1][35:37].any()


def test_batch_without_detections_and_without_masks():
    outs = postprocess(head_output(ROWS, batch=2), prototypes(2), NC)
    assert [len(o["scores"]) for o in outs] == [2, 0]
    empty = outs[1]
    assert empty["boxes"].shape == (0, 4) and empty["coeffs"].shape == (0, NM) and empty["masks"].shape == (0, S, S)
    windows = postprocess(head_output(ROWS), prototypes(), NC, masks="windows")[0]
    dense = postprocess(head_output(ROWS), prototypes(), NC)[0]
    assert torch.equal(windows["masks"].dense(), dense["masks"])
    with pytest.raises(ValueError, match="'dense', 'windows' or None"):
        postprocess(head_output(ROWS), prototypes(), NC, masks="full")
    no_masks = postprocess(head_output(ROWS), prototypes(), NC, masks=None)[0]
    assert "masks" not in no_masks and len(no_masks["boxes"]) == 2


@pytest.mark.parametrize(
    "ori_shape, box_in, box_out",
    [
        ((32, 64), [12.0, 28.0, 28.0, 44.0], [12.0, 12.0, 28.0, 28.0]),  # letterboxed: 16 px bars above and below
        ((128, 128), [10.0, 10.0, 30.0, 30.0], [20.0, 20.0, 60.0, 60.0]),  # input at half the original size
    ],
)
def test_to_original_undoes_the_letterbox_with_full_size_masks(ori_shape, box_in, box_out):
    result = {"boxes": torch.tensor([box_in]), "scores": torch.tensor([0.7]), "labels": torch.tensor([1]),
              "coeffs": torch.nn.functional.one_hot(torch.tensor([0]), NM).float()}  # fmt: skip
    out = to_original(result, prototypes()[0], (S, S), ori_shape)
    assert out["boxes"].tolist() == [box_out]
    assert result["boxes"].tolist() == [box_in]  # the input result is left as it was
    assert out["scores"].tolist() == pytest.approx([0.7]) and out["labels"].tolist() == [1]
    h0, w0 = ori_shape
    assert out["masks"].shape == (1, h0, w0) and out["masks"].dtype == torch.bool
    x0, y0, x1, y1 = (int(v) for v in box_out)
    expected = torch.zeros(h0, w0, dtype=torch.bool)
    expected[y0:y1, x0:x1] = True
    assert torch.equal(out["masks"][0], expected)  # rebuilt at the original resolution, cropped to the box


@pytest.mark.parametrize("side", [64, 320])
def test_box_masks_are_ultralytics_process_mask_bit_for_bit(side):
    """The windowed upsampling gives exactly Ultralytics' masks: boxes inside, across the image edges, tiny, empty,
    on integer and fractional pixel bounds."""
    from ultralytics.utils.ops import process_mask

    g = torch.Generator().manual_seed(side)
    proto = torch.randn(NM, side // 4, side // 4, generator=g)
    n = 120
    centre = torch.rand(n, 2, generator=g) * side * 1.1 - side * 0.05
    half = torch.rand(n, 2, generator=g) * side * 0.15
    boxes = torch.cat([centre - half, centre + half], 1)
    s = float(side)
    boxes[:6] = torch.tensor([[0, 0, s, s], [-3.5, -2.2, 10.3, 7.9], [s - 5.5, s - 9.1, s + 3, s + 2],
                              [10, 10, 10, 12], [4.0, 8.0, 12.0, 16.0], [7.25, 3.75, 8.5, 4.25]])
    coeffs = torch.randn(n, NM, generator=g) * 0.3
    expected = process_mask(proto, coeffs, boxes, (side, side), upsample=True).bool()
    got = box_masks(proto, coeffs, boxes, (side, side))
    assert got.dtype == torch.bool and got.shape == (n, side, side)
    assert expected.any() and torch.equal(got, expected)
    # as windows (what validation scores): the same masks, and pycocotools' RLEs and areas of them
    import numpy as np
    from pycocotools import mask as mask_utils

    windows = box_mask_windows(proto, coeffs, boxes, (side, side))
    assert len(windows.groups) > 1 and torch.equal(windows.dense(), expected)
    rles, areas = windows.encode()
    ref = mask_utils.encode(np.asfortranarray(expected.permute(1, 2, 0).numpy().astype(np.uint8)))
    assert [r["counts"] for r in rles] == [r["counts"] for r in ref]
    assert areas == expected.sum((1, 2)).tolist()
    assert box_masks(proto, coeffs[:0], boxes[:0], (side, side)).shape == (0, side, side)
    with pytest.raises(ValueError, match="not 4x"):
        box_masks(proto, coeffs, boxes, (side, side + 4))
