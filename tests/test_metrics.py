"""Metrics: ground truth fed back as predictions scores 1.0; matching counts TP/FP/FN correctly."""

from __future__ import annotations

import torch

from cellseg_pl.metrics import CellMatchMetrics, mask_iou, mask_map_metric, match


def disk(cx: int, cy: int, r: int, size: int = 64) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def target_of(masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    m = torch.stack(masks)
    boxes = []
    for x in m:
        ys, xs = torch.nonzero(x, as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return {"masks": m, "boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.zeros(len(m), dtype=torch.long)}


def as_pred(target: dict[str, torch.Tensor], scores: list[float] | None = None) -> dict[str, torch.Tensor]:
    n = len(target["masks"])
    return {**target, "scores": torch.tensor(scores or [1.0] * n)}


def test_ground_truth_as_predictions_scores_one():
    targets = [target_of([disk(10, 10, 5), disk(40, 40, 8), disk(20, 50, 6)]), target_of([disk(30, 30, 10)])]
    metric = mask_map_metric()
    metric.update([as_pred(t) for t in targets], targets)
    result = metric.compute()
    assert result["segm_map"].item() == 1.0 and result["segm_map_50"].item() == 1.0
    assert result["bbox_map"].item() == 1.0
    cells = CellMatchMetrics()
    cells.update([as_pred(t) for t in targets], targets)
    c = cells.compute()
    assert c["precision"] == 1 and c["recall"] == 1 and c["f1"] == 1 and c["ap_cell"] == 1
    assert c["mean_matched_iou"] == 1 and c["count_mae"] == 0


def test_mask_map_drops_when_a_cell_is_missed():
    target = target_of([disk(10, 10, 5), disk(40, 40, 8)])
    pred = as_pred(target_of([disk(10, 10, 5)]))
    metric = mask_map_metric()
    metric.update([pred], [target])
    assert abs(metric.compute()["segm_map_50"].item() - 0.5) < 0.02


def test_matching_missed_split_and_false_positive():
    gt = target_of([disk(10, 10, 6), disk(40, 40, 10), disk(50, 12, 5)])
    # cell 1 found; cell 2 split into two halves (neither reaches IoU 0.5 -> 2 FP, 1 FN); cell 3 missed; 1 extra
    left = disk(40, 40, 10) & (torch.arange(64)[None, :] < 39)
    right = disk(40, 40, 10) & (torch.arange(64)[None, :] >= 42)
    pred_masks = torch.stack([disk(10, 10, 6), left, right, disk(20, 50, 4)])
    tp, fp, fn, iou_sum = match(pred_masks, torch.zeros(4, dtype=torch.long), gt["masks"], gt["labels"])
    assert (tp, fp, fn) == (1, 3, 2)
    assert abs(iou_sum - 1.0) < 1e-6


def test_match_respects_classes_and_confidence():
    gt = target_of([disk(20, 20, 8)])
    pred = {**as_pred(gt, [0.9]), "labels": torch.tensor([1])}
    tp, fp, fn, _ = match(pred["masks"], pred["labels"], gt["masks"], gt["labels"])
    assert (tp, fp, fn) == (0, 1, 1)
    m = CellMatchMetrics(conf=0.5)
    m.update([as_pred(gt, [0.3])], [gt])  # below the operating confidence: ignored
    c = m.compute()
    assert c["recall"] == 0 and c["fn"] == 1 and c["fp"] == 0 and c["count_mae"] == 1


def test_mask_iou_matrix():
    a = torch.stack([disk(10, 10, 5), disk(40, 40, 5)])
    iou = mask_iou(a, a[[1]])
    assert iou.shape == (2, 1) and iou[0, 0] == 0 and iou[1, 0] == 1
