"""Validation metrics: COCO mask (and box) mAP through torchmetrics, and one-to-one cell matching.

Both take the same inputs, per image::

    pred   = {"masks": (n, H, W) bool, "boxes": (n, 4) xyxy px, "scores": (n,), "labels": (n,) int64}
    target = {"masks": (m, H, W) bool, "boxes": (m, 4) xyxy px, "labels": (m,) int64}

and are torchmetrics ``Metric`` objects, so Lightning reduces them across processes.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision

#: COCO max-detection thresholds with the last raised to 300 (the lab's images hold ~57 cells, often more).
MAX_DETECTIONS = [1, 10, 300]


class MaskMeanAP(MeanAveragePrecision):
    """torchmetrics' ``MeanAveragePrecision`` whose multi-process sync accepts uneven image counts per process.

    The stock sync gathers its list states as padded tensors and fails (a collective size mismatch) when the
    processes scored different numbers of images, which an unrepeated validation split produces. Here every
    list state is gathered as Python objects, so 2 processes give exactly the single-process result.
    """

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:  # noqa: ANN001 - torchmetrics' signature
        world = torch.distributed.get_world_size(group=process_group)
        for attr in self._reductions:
            local = [x.cpu() if isinstance(x, torch.Tensor) else x for x in getattr(self, attr)]
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, local, group=process_group)
            setattr(self, attr, [x for part in gathered for x in part])


def mask_map_metric() -> MeanAveragePrecision:
    """COCO-style box and mask mAP (``faster_coco_eval`` backend; pycocotools mis-reports maxDets != 100)."""
    return MaskMeanAP(
        iou_type=("bbox", "segm"),
        max_detection_thresholds=MAX_DETECTIONS,
        backend="faster_coco_eval",
    )


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix (n, m) between boolean mask stacks a (n, H, W) and b (m, H, W)."""
    if not len(a) or not len(b):
        return torch.zeros(len(a), len(b), device=a.device)
    fa, fb = a.flatten(1).float(), b.flatten(1).float()
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return inter / union.clamp(min=1)


def matched_pairs(pred_masks: torch.Tensor, pred_labels: torch.Tensor, gt_masks: torch.Tensor,
                  gt_labels: torch.Tensor, iou_threshold: float = 0.5) -> tuple[list[int], list[int], list[float]]:
    """One-to-one (Hungarian) matching of predicted to true instances of the same class.

    Returns:
        ``(predicted indices, true indices, IoUs)`` of the pairs whose IoU reaches ``iou_threshold``.
    """
    iou = mask_iou(pred_masks, gt_masks)
    if not iou.numel():
        return [], [], []
    iou = iou * (pred_labels[:, None] == gt_labels[None, :])
    rows, cols = linear_sum_assignment(-iou.cpu().numpy())
    matched = iou[rows, cols].cpu().numpy()
    good = matched >= iou_threshold
    return rows[good].tolist(), cols[good].tolist(), matched[good].tolist()


def match(pred_masks: torch.Tensor, pred_labels: torch.Tensor, gt_masks: torch.Tensor, gt_labels: torch.Tensor,
          iou_threshold: float = 0.5) -> tuple[int, int, int, float]:
    """One-to-one (Hungarian) matching of predicted to true instances of the same class.

    Returns:
        ``(tp, fp, fn, sum of IoU over matched pairs)``.
    """
    rows, _, ious = matched_pairs(pred_masks, pred_labels, gt_masks, gt_labels, iou_threshold)
    tp = len(rows)
    return tp, len(pred_masks) - tp, len(gt_masks) - tp, float(sum(ious))


class CellMatchMetrics(Metric):
    """Precision, recall, F1 and the cell papers' "AP" = TP / (TP + FP + FN) at one IoU, above one confidence.

    Also the mean IoU of matched cells, the per-image counting error (predicted minus true count) and the number
    of false positives of droplet size (area below ``min_area``: the lab's main false positive, water droplets).

    Args:
        conf: predictions scoring below this are ignored (the operating point a biologist would use).
        iou_threshold: IoU a predicted cell needs with its matched true cell to count as found.
        min_area: an unmatched prediction smaller than this (px of the original image) is a droplet-sized false
            positive (the guide's rule: under 500 px is a water droplet).
    """

    full_state_update = False

    def __init__(self, conf: float = 0.25, iou_threshold: float = 0.5, min_area: float = 500.0) -> None:
        super().__init__()
        self.conf, self.iou_threshold, self.min_area = conf, iou_threshold, min_area
        for name in ("tp", "fp", "fn", "iou_sum", "abs_count_err", "rel_count_err", "images", "fp_small"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        preds: list[dict[str, torch.Tensor]],
        targets: list[dict[str, torch.Tensor]],
        area_scale: list[float] | None = None,
    ) -> None:
        """Add a batch.

        Args:
            preds, targets: per image, as in the module docstring.
            area_scale: per image, mask px per original-image px (the letterbox gain squared; ``ratio_pad[0] ** 2``
                of the batch) when masks are not at the original resolution; default 1.
        """
        for i, (pred, target) in enumerate(zip(preds, targets)):
            keep = pred["scores"] >= self.conf
            masks = pred["masks"][keep]
            rows, _, ious = matched_pairs(
                masks, pred["labels"][keep], target["masks"], target["labels"], self.iou_threshold
            )
            tp, iou_sum = len(rows), float(sum(ious))
            fp, fn = len(masks) - tp, len(target["masks"]) - tp
            unmatched = torch.ones(len(masks), dtype=torch.bool, device=masks.device)
            unmatched[rows] = False
            scale = area_scale[i] if area_scale is not None else 1.0
            self.fp_small += int((masks[unmatched].flatten(1).sum(1) < self.min_area * scale).sum())
            self.tp += tp
            self.fp += fp
            self.fn += fn
            self.iou_sum += iou_sum
            n_pred, n_true = int(keep.sum()), len(target["masks"])
            self.abs_count_err += abs(n_pred - n_true)
            self.rel_count_err += abs(n_pred - n_true) / max(n_true, 1)
            self.images += 1

    def compute(self) -> dict[str, torch.Tensor]:
        tp, fp, fn = self.tp, self.fp, self.fn
        precision = tp / (tp + fp) if tp + fp > 0 else torch.zeros_like(tp)
        recall = tp / (tp + fn) if tp + fn > 0 else torch.zeros_like(tp)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else torch.zeros_like(tp)
        images = self.images.clamp(min=1)
        return {
            "precision": precision.float(),
            "recall": recall.float(),
            "f1": f1.float(),
            "ap_cell": (tp / (tp + fp + fn)).float() if tp + fp + fn > 0 else torch.ones_like(tp).float(),
            "mean_matched_iou": (self.iou_sum / tp).float() if tp > 0 else torch.zeros_like(tp).float(),
            "count_mae": (self.abs_count_err / images).float(),
            "count_mre": (self.rel_count_err / images).float(),
            "tp": tp.float(),
            "fp": fp.float(),
            "fn": fn.float(),
            "fp_droplet_sized": self.fp_small.float(),
        }


def targets_from_batch(batch: dict) -> list[dict[str, torch.Tensor]]:
    """Ground truth per image from a validation batch (needs the full-resolution ``instances`` maps)."""
    targets = []
    inst = batch["instances"]
    size = inst.shape[-1]
    for i in range(inst.shape[0]):
        sel = batch["batch_idx"] == i
        n = int(sel.sum())
        ids = torch.arange(1, n + 1, device=inst.device, dtype=inst.dtype)
        masks = inst[i][None] == ids[:, None, None]
        xywh = batch["bboxes"][sel] * size
        boxes = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
        targets.append({"masks": masks, "boxes": boxes, "labels": batch["cls"][sel].view(-1).long()})
    return targets

