"""Metrics: ground truth fed back as predictions scores 1.0; matching counts TP/FP/FN correctly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from cellseg_pl.masks import MaskWindows
from cellseg_pl.metrics import (
    CellMatchMetrics,
    encode_crops,
    encode_masks,
    encode_masks_with_areas,
    mask_map_metric,
    match,
    rle_iou,
)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix (n, m) of two boolean mask stacks, from their RLEs."""
    if not len(a) or not len(b):
        return torch.zeros(len(a), len(b))
    return torch.as_tensor(rle_iou(encode_masks(a), encode_masks(b)).astype(np.float32))


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



def test_crops_encode_as_their_masks_pasted_into_the_image():
    """encode_crops (Instance-style crops, also partly outside the image) gives encode_masks' RLEs of the pasted
    masks, so the IoU of crops is the IoU of full masks."""
    g = np.random.default_rng(0)
    height, width = 37, 53
    crops = [(g.random((h, w)) > 0.4, x0, y0)
             for h, w, x0, y0 in [(5, 7, 0, 0), (9, 4, 49, 30), (6, 6, -2, 10), (8, 8, 20, -3), (3, 3, 60, 5),
                                  (12, 20, 10, 12)]]
    crops.append((np.zeros((4, 4), bool), 3, 3))  # an empty mask
    full = np.zeros((len(crops), height, width), bool)
    for k, (mask, x0, y0) in enumerate(crops):
        for (r, c) in zip(*np.nonzero(mask)):
            if 0 <= y0 + r < height and 0 <= x0 + c < width:
                full[k, y0 + r, x0 + c] = True
    got, expected = encode_crops(crops, height, width), encode_masks(full)
    assert [r["counts"] for r in got] == [r["counts"] for r in expected]
    reference = mask_utils.encode(np.asfortranarray(full.transpose(1, 2, 0).astype(np.uint8)))
    assert [r["counts"] for r in expected] == [r["counts"] for r in reference]
    iou, nonempty = np.diag(rle_iou(got, got)), full.any((1, 2))
    assert nonempty.sum() == 5 and np.allclose(iou[nonempty], 1.0) and not iou[~nonempty].any()
    # masks known to lie inside boxes: scanning only the boxes gives the same RLEs
    boxes = []
    for mask in full:
        rows, cols = np.nonzero(mask)
        boxes.append([cols.min() - 0.5, rows.min() - 0.2, cols.max() + 1.3, rows.max() + 1] if len(rows) else [3, 3, 3, 3])
    in_boxes = encode_masks(full, boxes=np.array(boxes))
    assert [r["counts"] for r in in_boxes] == [r["counts"] for r in expected]


# ---------------------------------------------------------------------------------------------- cell metrics


def cell_metrics(pred_masks: list[torch.Tensor], gt_masks: list[torch.Tensor], **kwargs) -> dict[str, float]:
    """CellMatchMetrics of one image whose predictions all score 0.9."""
    metric = CellMatchMetrics(**{"min_area": 0.0, **kwargs.pop("init", {})})
    pred = as_pred(target_of(pred_masks), [0.9] * len(pred_masks))
    metric.update([pred], [target_of(gt_masks)], **kwargs)
    return {k: float(v) for k, v in metric.compute().items()}


CELLS = [disk(12, 12, 7), disk(45, 15, 8), disk(20, 45, 9)]


def test_cell_metrics_perfect_match():
    c = cell_metrics(CELLS, CELLS)
    assert (c["tp"], c["fp"], c["fn"]) == (3, 0, 0)
    assert c["f1"] == c["ap_cell"] == c["mean_matched_iou"] == 1 and c["count_mae"] == 0
    assert c["fp_droplet_sized"] == 0


def test_cell_metrics_one_missed():
    c = cell_metrics(CELLS[:2], CELLS)
    assert (c["tp"], c["fp"], c["fn"]) == (2, 0, 1)
    assert c["precision"] == 1 and abs(c["recall"] - 2 / 3) < 1e-6 and abs(c["ap_cell"] - 2 / 3) < 1e-6
    assert c["count_mae"] == 1 and abs(c["count_mre"] - 1 / 3) < 1e-6


def test_cell_metrics_one_split():
    x = torch.arange(64)[None, :]
    left, right = CELLS[2] & (x < 19), CELLS[2] & (x >= 22)  # both halves under IoU 0.5 with the cell
    c = cell_metrics([CELLS[0], CELLS[1], left, right], CELLS)
    assert (c["tp"], c["fp"], c["fn"]) == (2, 2, 1)
    assert abs(c["ap_cell"] - 2 / 5) < 1e-6 and c["count_mae"] == 1  # one cell too many


def test_cell_metrics_one_merged():
    a, b = disk(40, 40, 7), disk(54, 40, 7)
    bridge = torch.zeros(64, 64, dtype=torch.bool)
    bridge[36:45, 40:55] = True
    c = cell_metrics([CELLS[0], a | b | bridge], [CELLS[0], a, b])  # the two touching cells found as one
    assert (c["tp"], c["fp"], c["fn"]) == (1, 1, 2)
    assert c["count_mae"] == 1 and abs(c["f1"] - 0.4) < 1e-6


def test_droplet_sized_false_positives_are_counted_at_the_original_scale():
    droplet, blob = disk(55, 55, 3), disk(50, 8, 6)  # unmatched: 29 px and 113 px
    preds = [*CELLS, droplet, blob]
    c = cell_metrics(preds, CELLS, init={"min_area": 100})
    assert c["fp"] == 2 and c["fp_droplet_sized"] == 1  # the cells are large but matched: never counted
    # masks at half the original resolution (letterbox gain 0.5): 29 mask px are 116 original px, not a droplet
    assert cell_metrics(preds, CELLS, init={"min_area": 100}, area_scale=[0.25])["fp_droplet_sized"] == 0
    assert cell_metrics(preds, CELLS, init={"min_area": 500}, area_scale=[0.25])["fp_droplet_sized"] == 2


def test_fast_rle_encoding_equals_pycocotools():
    import numpy as np
    from pycocotools import mask as mask_utils

    from cellseg_pl.metrics import encode_masks

    rng = np.random.default_rng(0)
    for trial in range(200):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        stack = rng.random((3, h, w)) < rng.random()
        if trial % 3 == 0:
            stack[:, :, : w // 2] = False  # objects away from the left edge
        if trial % 7 == 0:
            stack[:] = False  # empty masks
        ours = [r["counts"] for r in encode_masks(torch.from_numpy(stack))]
        ref = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"] for m in stack]
        assert ours == ref, trial
        assert [r["counts"] for r in encode_masks(stack, [2, 0])] == [ref[2], ref[0]]
        rles, areas = encode_masks_with_areas(stack)
        assert [r["counts"] for r in rles] == ref and areas == stack.reshape(3, -1).sum(1).tolist(), trial


def test_mask_map_equals_torchmetrics_stock_metric():
    """Every figure (all, small/medium/large areas, both IoU types) equals the stock torchmetrics metric's on images
    with cells of all three COCO sizes, overlaps, a prediction with an empty mask and an image without cells."""
    from torchmetrics.detection import MeanAveragePrecision

    from cellseg_pl.metrics import MAX_DETECTIONS

    rng = np.random.default_rng(1)
    preds, targets = [], []
    for image in range(4):
        if image == 3:
            empty = torch.zeros(0, 160, 160, dtype=torch.bool)
            targets.append({"masks": empty, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)})
            pm = torch.stack([disk(30, 30, 4, 160)])
            p = target_of(list(pm))
            preds.append(as_pred(p, [0.3]))
            continue
        centres, radii = rng.integers(10, 150, (12, 2)), rng.choice([2, 4, 25, 60], 12)
        gt = target_of([disk(int(x), int(y), int(r), 160) for (x, y), r in zip(centres, radii)])
        shift = rng.integers(-3, 4, (12, 2))
        pm = [disk(int(x + dx), int(y + dy), int(r), 160) for (x, y), (dx, dy), r in zip(centres, shift, radii)]
        p = target_of(pm[:10])
        p["masks"][0] = False  # a detection whose mask came out empty
        preds.append(as_pred(p, rng.random(10).tolist()))
        targets.append(gt)

    ours = mask_map_metric()
    stock = MeanAveragePrecision(iou_type=("bbox", "segm"), max_detection_thresholds=MAX_DETECTIONS,
                                 backend="faster_coco_eval")
    ours.update(preds, targets)
    stock.update([{k: p[k] for k in ("masks", "boxes", "scores", "labels")} for p in preds], targets)
    a, b = ours.compute(), stock.compute()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert 0 < a["segm_map"] < 1 and a["segm_map_small"] != a["segm_map_large"]


# ---------------------------------------------------------------------------------------------- dense images


def grid_cells(n: int, side: int, pitch: int, size: int, top: int = 0) -> torch.Tensor:
    """``n`` square cells of ``side`` px on a grid of ``pitch`` px, from row ``top`` of a ``size`` px image."""
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    per_row = size // pitch
    for k in range(n):
        y, x = top + (k // per_row) * pitch, (k % per_row) * pitch
        masks[k, y : y + side, x : x + side] = True
    return masks


def test_dense_image_with_300_predictions_through_every_metric():
    """>= 256 detections per image: pycocotools' ``mask.area`` overflows there (uint8 count), so nothing may use it."""
    cells = grid_cells(300, 8, 12, 256)  # 300 true cells of 64 px
    droplets = grid_cells(20, 3, 12, 256, top=200)  # 20 unmatched predictions of 9 px
    gt = target_of(list(cells))
    pred_masks = torch.cat([cells, droplets])
    scores = [0.9] * 300 + [0.5] * 20  # the false positives score lowest: AP stays 1
    pred = as_pred(target_of(list(pred_masks)), scores)

    m = mask_map_metric()
    m.update([pred], [gt])
    result = m.compute()
    assert result["segm_map"].item() == 1.0 and result["bbox_map"].item() == 1.0

    c = CellMatchMetrics(conf=0.25, min_area=20)
    c.update([pred], [gt])
    out = {k: float(v) for k, v in c.compute().items()}
    assert (out["tp"], out["fp"], out["fn"]) == (300, 20, 0)
    assert out["fp_droplet_sized"] == 20 and out["count_mae"] == 20 and out["mean_matched_iou"] == 1
    # read inside their boxes only (validation: postprocess crops every mask to its box): the same figures
    in_boxes = CellMatchMetrics(conf=0.25, min_area=20, pred_masks_in_boxes=True)
    in_boxes.update([pred], [gt])
    assert {k: float(v) for k, v in in_boxes.compute().items()} == out

    assert match(pred_masks, pred["labels"], gt["masks"], gt["labels"])[:3] == (300, 20, 0)
    assert mask_iou(pred_masks, cells).shape == (320, 300)


def test_module_validation_with_300_detections_per_image(tiny_data, monkeypatch):
    """The module's validation path (postprocess -> both metrics -> logged values) on images with 300 detections."""
    import lightning as L

    import cellseg_pl.train.module as module_mod
    from cellseg_pl.data.datamodule import CellSegDataModule
    from cellseg_pl.train.module import CellSegModule

    def dense(det, proto, num_classes, conf=0.001, iou=0.7, max_det=300, masks="dense"):
        size = proto.shape[-1] * 4
        masks = grid_cells(300, 4, 7, size)
        boxes = torch.stack([torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
                             for ys, xs in (torch.nonzero(mk, as_tuple=True) for mk in masks)])
        result = {"boxes": boxes, "scores": torch.linspace(0.9, 0.3, 300), "labels": torch.zeros(300, dtype=torch.long),
                  "coeffs": torch.zeros(300, 32), "masks": masks}
        return [dict(result) for _ in range(det.shape[0])]

    monkeypatch.setattr(module_mod, "postprocess", dense)
    data = CellSegDataModule(str(tiny_data), imgsz=128, batch_size=2, num_workers=0)
    model = CellSegModule(num_classes=data.num_classes, class_names=data.class_names)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    (metrics,) = trainer.validate(model, datamodule=data, verbose=False)

    def windows(*args, **kwargs):  # the same masks as MaskWindows, as the module's postprocess gives them
        return [{**r, "masks": MaskWindows.from_dense(r["masks"])} for r in dense(*args, **kwargs)]

    monkeypatch.setattr(module_mod, "postprocess", windows)
    assert trainer.validate(model, datamodule=data, verbose=False) == [metrics]
    assert metrics["metrics/count_MAE"] > 250  # ~12 cells per image, 300 detections above pr_conf
    assert metrics["metrics/FP_droplet_sized"] > 0 and 0 <= metrics["metrics/mAP50(M)"] <= 1


def test_validation_metrics_from_mask_ious_equal_the_stock_metric_on_masks():
    """Validation counts mask IoUs in the windows (nothing encoded): every figure equals the stock torchmetrics metric
    and the cell matching given the full masks, with two classes, tied scores, empty predicted masks, an image
    without cells and one with more detections than the last max-detections threshold (300)."""
    from torchmetrics.detection import MeanAveragePrecision

    from cellseg_pl.metrics import MAX_DETECTIONS, ValidationMetrics, targets_from_batch

    rng = np.random.default_rng(3)
    size, maps, classes, preds = 96, [], [], []
    for image in range(4):
        lab = torch.zeros(size, size, dtype=torch.int64)
        n_true = 0 if image == 2 else 14
        centres, radii = rng.integers(8, 88, (n_true, 2)), rng.choice([3, 6, 11, 20], n_true)
        for k, ((x, y), r) in enumerate(zip(centres, radii)):
            lab[disk(int(x), int(y), int(r), size)] = k + 1
        present = [k for k in range(1, n_true + 1) if (lab == k).any()]  # compact ids, as the loader's maps
        compact = torch.zeros_like(lab)
        for new, old in enumerate(present, 1):
            compact[lab == old] = new
        maps.append(compact)
        classes.append(torch.tensor(rng.integers(0, 2, len(present)), dtype=torch.float32))
        n_pred = 330 if image == 3 else 20
        pc, pr = rng.integers(0, 96, (n_pred, 2)), rng.choice([2, 5, 10, 18], n_pred)
        if n_true:  # most predictions near a true cell
            pc[: n_true] = np.clip(centres + rng.integers(-3, 4, (n_true, 2)), 0, 95)
            pr[: n_true] = radii
        masks = torch.stack([disk(int(x), int(y), int(r), size) for (x, y), r in zip(pc, pr)])
        boxes = torch.tensor([[x - r, y - r, x + r + 1, y + r + 1] for (x, y), r in zip(pc, pr)], dtype=torch.float32)
        boxes = boxes.clamp(0, size)
        masks[1] = False  # a detection whose mask came out empty
        scores = torch.tensor(rng.choice([0.9, 0.6, 0.3, 0.2, 0.05], n_pred), dtype=torch.float32)  # ties
        preds.append({"boxes": boxes, "scores": scores, "labels": torch.tensor(rng.integers(0, 2, n_pred)),
                      "masks": masks})
    boxes_xywh = []
    for lab in maps:
        for k in range(1, int(lab.max()) + 1):
            ys, xs = torch.nonzero(lab == k, as_tuple=True)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            boxes_xywh.append(torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]) / size)
    batch = {
        "instances": torch.stack(maps), "cls": torch.cat(classes).view(-1, 1), "bboxes": torch.stack(boxes_xywh),
        "batch_idx": torch.cat([torch.full((len(c),), i, dtype=torch.float32) for i, c in enumerate(classes)]),
        "ratio_pad": [(0.5, (0.0, 0.0))] * 4,
    }
    ours = ValidationMetrics(pr_conf=0.25, min_area=40)
    ours.update(preds[:2], {**batch, "instances": batch["instances"][:2], "ratio_pad": batch["ratio_pad"][:2],
                            **{k: batch[k][batch["batch_idx"] < 2] for k in ("cls", "bboxes", "batch_idx")}})
    rest = batch["batch_idx"] >= 2
    ours.update([{**p, "masks": MaskWindows.from_dense(p["masks"], p["boxes"])} for p in preds[2:]],
                {**batch, "instances": batch["instances"][2:], "ratio_pad": batch["ratio_pad"][2:],
                 "cls": batch["cls"][rest], "bboxes": batch["bboxes"][rest], "batch_idx": batch["batch_idx"][rest] - 2})
    got = ours.compute()

    targets = [{**t, "masks": torch.stack([lab == k + 1 for k in range(len(t["labels"]))]) if len(t["labels"])
                else torch.zeros(0, size, size, dtype=torch.bool)}
               for t, lab in zip(targets_from_batch(batch), maps)]
    stock = MeanAveragePrecision(iou_type=("bbox", "segm"), max_detection_thresholds=MAX_DETECTIONS,
                                 backend="faster_coco_eval")
    stock.update(preds, targets)
    m = stock.compute()
    cells = CellMatchMetrics(conf=0.25, min_area=40)
    cells.update(preds, targets, [0.25] * 4)
    c = cells.compute()
    expected = {"metrics/mAP50(M)": m["segm_map_50"], "metrics/mAP50-95(M)": m["segm_map"],
                "metrics/mAP50(B)": m["bbox_map_50"], "metrics/mAP50-95(B)": m["bbox_map"],
                "metrics/precision(M)": c["precision"], "metrics/recall(M)": c["recall"], "metrics/F1(M)": c["f1"],
                "metrics/AP_cell(M)": c["ap_cell"], "metrics/mean_matched_IoU(M)": c["mean_matched_iou"],
                "metrics/count_MAE": c["count_mae"], "metrics/count_MRE": c["count_mre"],
                "metrics/FP_droplet_sized": c["fp_droplet_sized"]}
    for key, value in expected.items():
        assert torch.equal(got[key], value.float().clamp(min=0)), key
    assert 0 < got["metrics/mAP50-95(M)"] < got["metrics/mAP50(M)"] < 1 and got["metrics/FP_droplet_sized"] > 0


def test_mask_map_refuses_images_given_both_ways():
    t = target_of([disk(10, 10, 5), disk(40, 40, 8)])
    metric = mask_map_metric()
    metric.update([as_pred(t)], [t])
    given = {k: t[k] for k in ("boxes", "labels")}
    metric.update([{**given, "scores": torch.ones(2), "mask_ious": np.eye(2), "areas": np.array([81, 197])}],
                  [{**given, "areas": np.array([81, 197])}])
    with pytest.raises(ValueError, match="1 of 2 images gave `mask_ious`"):
        metric.compute()
    with pytest.raises(ValueError, match="image 0 has neither `masks` nor `rles`"):
        metric.update([{**given, "scores": torch.ones(2), "areas": np.array([81, 197])}],
                      [{**given, "areas": np.array([81, 197])}])
    with pytest.raises(ValueError, match=r"`mask_ious` of \(2, 2\) for 2 predictions and 1 true masks"):
        metric.update([{**given, "scores": torch.ones(2), "mask_ious": np.eye(2), "areas": np.array([81, 197])}],
                      [{"boxes": t["boxes"][:1], "labels": t["labels"][:1], "areas": np.array([81])}])


def test_mask_ious_are_pycocotools_ious_bit_for_bit():
    from cellseg_pl.metrics import mask_ious

    rng = np.random.default_rng(5)
    lab = torch.zeros(80, 80, dtype=torch.int64)
    for k, ((x, y), r) in enumerate(zip(rng.integers(5, 75, (12, 2)), rng.integers(2, 15, 12)), 1):
        lab[disk(int(x), int(y), int(r), 80)] = k
    count = int(lab.max())
    assert all((lab == k).any() for k in range(1, count + 1))
    pred = torch.stack([disk(int(x), int(y), int(r), 80) for (x, y), r in zip(rng.integers(0, 80, (40, 2)),
                                                                             rng.integers(1, 20, 40))])
    pred[0] = False
    ious, areas, true_areas = mask_ious(MaskWindows.from_dense(pred), lab, count)
    true = torch.stack([lab == k for k in range(1, count + 1)])
    assert np.array_equal(ious, rle_iou(encode_masks(pred), encode_masks(true)))  # the same doubles
    assert areas.tolist() == pred.sum((1, 2)).tolist() and true_areas.tolist() == true.sum((1, 2)).tolist()
    assert (ious > 0).sum() > 10
