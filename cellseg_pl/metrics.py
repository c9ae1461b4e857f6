"""Validation metrics: COCO mask (and box) mAP through torchmetrics, and one-to-one cell matching.

Both take the same inputs, per image::

    pred   = {"masks": (n, H, W) bool, "boxes": (n, 4) xyxy px, "scores": (n,), "labels": (n,) int64}
    target = {"masks": (m, H, W) bool, "boxes": (m, 4) xyxy px, "labels": (m,) int64}

and are torchmetrics ``Metric`` objects, so Lightning reduces them across processes. ``masks`` may also be
:class:`cellseg_pl.masks.MaskWindows` (what validation passes: no full-size masks), or ``rles`` and ``areas`` may
replace them (masks already encoded: :func:`encoded`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision
from torchmetrics.detection.helpers import CocoBackend
from torchvision.ops import box_convert

from cellseg_pl.masks import MaskWindows, encode_many

#: COCO max-detection thresholds with the last raised to 300 (the lab's images hold ~57 cells, often more).
MAX_DETECTIONS = [1, 10, 300]


def encode_masks(
    masks: torch.Tensor | np.ndarray, indices: list[int] | None = None, boxes: torch.Tensor | np.ndarray | None = None
) -> list[dict]:
    """COCO RLEs (compressed, as ``pycocotools.mask.encode`` gives them) of a (n, H, W) bool mask stack.

    ``indices`` encodes only those masks. ``boxes`` ((n, 4) xyxy px), when every mask is known to lie inside its
    box, limits the reading to the box. Encoding goes through :class:`cellseg_pl.masks.MaskWindows` (only each
    object's window is scanned): ~20x faster than ``mask.encode`` of the full image for cells at imgsz 640.
    """
    return encode_masks_with_areas(masks, indices, boxes)[0]


def encode_masks_with_areas(
    masks: torch.Tensor | np.ndarray, indices: list[int] | None = None, boxes: torch.Tensor | np.ndarray | None = None
) -> tuple[list[dict], list[int]]:
    """:func:`encode_masks`'s RLEs and each mask's area (pixel count, what ``mask.area`` gives for the RLE)."""
    return MaskWindows.from_dense(masks, boxes).encode(indices)


def encode_crops(crops: list[tuple[np.ndarray, int, int]], height: int, width: int) -> list[dict]:
    """COCO RLEs of masks given as crops: ``(mask, x0, y0)``, a ``(h, w)`` bool array whose top-left pixel is pixel
    ``(x0, y0)`` of a ``(height, width)`` image (what :class:`cellseg_pl.infer.engine.Instance` holds). Parts outside
    the image are dropped. The same RLEs as :func:`encode_masks` of the masks pasted into full images."""
    return MaskWindows.from_crops(crops, height, width).encode()[0]


def encoded(item: dict[str, Any], indices: list[int] | None = None, in_boxes: bool = False
            ) -> tuple[list[dict], list[int]]:  # fmt: skip
    """RLEs and areas of one image's masks (all, or ``indices``): its ``rles`` and ``areas`` when it holds them,
    else its ``masks`` encoded (a (n, H, W) bool tensor, read inside ``boxes`` when ``in_boxes``, or
    :class:`cellseg_pl.masks.MaskWindows`)."""
    if "rles" in item:
        if indices is None:
            return list(item["rles"]), list(item["areas"])
        return [item["rles"][k] for k in indices], [item["areas"][k] for k in indices]
    masks = item["masks"]
    if not isinstance(masks, MaskWindows):
        masks = MaskWindows.from_dense(masks, item["boxes"] if in_boxes else None)
    if "labels" in item and len(masks) != len(item["labels"]):
        raise ValueError(f"{len(masks)} masks for {len(item['labels'])} labels")
    return masks.encode(indices)


class MaskMeanAP(MeanAveragePrecision):
    """torchmetrics' ``MeanAveragePrecision`` with fast mask encoding and a sync for uneven image counts.

    * ``update`` encodes masks with :func:`encode_masks` (the stock update encodes every full-size mask: ~0.3 s per
      640 px image with 300 detections, minutes per validation of a lab-sized split).
    * ``update`` also keeps every mask's area (pixel count), which the stock metric recomputes from the RLEs at
      ``compute`` (twice per prediction with two IoU types: a third of a validation's ``compute`` time). The
      COCO figures are the same (the areas are the same numbers).
    * The stock sync gathers its list states as padded tensors and fails (a collective size mismatch) when the
      processes scored different numbers of images, which an unrepeated validation split produces. Here every
      list state is gathered as Python objects, so 2 processes give exactly the single-process result.

    Written against torchmetrics 1.9 (pinned): it fills the same states the stock ``update`` does.

    Args:
        pred_masks_in_boxes: every predicted mask lies inside its box (true of :func:`cellseg_pl.yolo.postprocess.
            postprocess`'s): only the box is scanned when encoding it. False: the whole mask is.
        **kwargs: ``MeanAveragePrecision``'s.
    """

    def __init__(self, pred_masks_in_boxes: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pred_masks_in_boxes = pred_masks_in_boxes
        self._coco_backend = _KnownAreaBackend(self._coco_backend.backend)
        self.add_state("detection_area", default=[], dist_reduce_fx=None)

    def update(self, preds: list[dict[str, Any]], target: list[dict[str, Any]]) -> None:
        """The stock ``update``; ``masks`` may also be :class:`cellseg_pl.masks.MaskWindows`, and an item that holds
        ``rles`` and ``areas`` (its masks already encoded, see :func:`encoded`) is not encoded again."""
        from torchmetrics.detection.helpers import _input_validator

        _input_validator(preds, target, iou_type="bbox")
        for items in (preds, target):
            for i, item in enumerate(items):
                if "masks" not in item and "rles" not in item:
                    raise ValueError(f"MaskMeanAP: item {i} has neither `masks` nor `rles`")
        for item in preds:
            self.detection_box.append(box_convert(item["boxes"].reshape(-1, 4), "xyxy", "xywh"))
            rles, areas = encoded(item, in_boxes=self.pred_masks_in_boxes)
            self.detection_mask.append(_rle_state(rles))
            self.detection_area.append(torch.tensor(areas, dtype=torch.float64))
            self.detection_labels.append(item["labels"])
            self.detection_scores.append(item["scores"])
        for item in target:
            self.groundtruth_box.append(box_convert(item["boxes"].reshape(-1, 4), "xyxy", "xywh"))
            rles, areas = encoded(item)
            self.groundtruth_mask.append(_rle_state(rles))
            self.groundtruth_labels.append(item["labels"])
            self.groundtruth_crowds.append(item.get("iscrowd", torch.zeros_like(item["labels"])))
            self.groundtruth_area.append(item["area"] if "area" in item else torch.tensor(areas, dtype=torch.float64))

    def compute(self) -> dict:
        self._coco_backend.detection_area = self.detection_area
        try:
            return super().compute()
        finally:
            self._coco_backend.detection_area = None

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:  # noqa: ANN001 - torchmetrics' signature
        world = torch.distributed.get_world_size(group=process_group)
        for attr in self._reductions:
            local = [x.cpu() if isinstance(x, torch.Tensor) else x for x in getattr(self, attr)]
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, local, group=process_group)
            setattr(self, attr, [x for part in gathered for x in part])


def _rle_state(rles: list[dict]) -> tuple:
    """RLEs as torchmetrics' ``MeanAveragePrecision`` stores them: ``((h, w), counts)`` per mask."""
    return tuple((tuple(r["size"]), r["counts"]) for r in rles)


class _KnownAreaBackend(CocoBackend):
    """torchmetrics' COCO backend given the predictions' mask areas (:class:`MaskMeanAP` sets ``detection_area``
    for its ``compute``), instead of computing them from the RLEs."""

    detection_area: list[torch.Tensor] | None = None

    def _get_coco_format(self, labels, all_labels, boxes=None, masks=None, scores=None, area=None,  # noqa: ANN001
                         iou_type=("bbox",), average="micro", **kwargs: Any) -> dict:
        known = scores is not None and area is None and "segm" in iou_type and self.detection_area is not None
        if not known:
            return super()._get_coco_format(labels, all_labels, boxes=boxes, masks=masks, scores=scores, area=area,
                                            iou_type=iou_type, average=average, **kwargs)
        out = super()._get_coco_format(labels, all_labels, boxes=boxes, masks=masks, scores=scores,
                                       area=self.detection_area, iou_type=iou_type, average=average, **kwargs)
        if len(iou_type) > 1:  # a known area skips the stock per-type areas, which compute swaps in per IoU type
            for ann in out["annotations"]:
                ann["area_segm"] = ann["area"]
                ann["area_bbox"] = ann["bbox"][2] * ann["bbox"][3]
        return out


def mask_map_metric(pred_masks_in_boxes: bool = False) -> MeanAveragePrecision:
    """COCO-style box and mask mAP (``faster_coco_eval`` backend; pycocotools mis-reports maxDets != 100).

    ``pred_masks_in_boxes``: see :class:`MaskMeanAP` (validation passes True: its masks are cropped to their boxes).
    """
    return MaskMeanAP(
        pred_masks_in_boxes=pred_masks_in_boxes,
        iou_type=("bbox", "segm"),
        max_detection_thresholds=MAX_DETECTIONS,
        backend="faster_coco_eval",
    )


def rle_iou(a: list[dict], b: list[dict]) -> np.ndarray:
    """IoU matrix (n, m) float64 between two lists of COCO RLEs of one image (pycocotools, no crowd)."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    return np.asarray(mask_utils.iou(a, b, [0] * len(b)), np.float64).reshape(len(a), len(b))


def matched_pairs(pred_masks: torch.Tensor, pred_labels: torch.Tensor, gt_masks: torch.Tensor,
                  gt_labels: torch.Tensor, iou_threshold: float = 0.5) -> tuple[list[int], list[int], list[float]]:
    """One-to-one (Hungarian) matching of predicted to true instances of the same class.

    Returns:
        ``(predicted indices, true indices, IoUs)`` of the pairs whose IoU reaches ``iou_threshold``.
    """
    return _match_rles(encode_masks(pred_masks), pred_labels, encode_masks(gt_masks), gt_labels, iou_threshold)


def _match_rles(pred: list[dict], pred_labels: torch.Tensor, gt: list[dict], gt_labels: torch.Tensor,
                iou_threshold: float) -> tuple[list[int], list[int], list[float]]:
    if not pred or not gt:
        return [], [], []
    iou = rle_iou(pred, gt) * (pred_labels.cpu().numpy()[:, None] == gt_labels.cpu().numpy()[None, :])
    rows, cols = linear_sum_assignment(-iou)
    matched = iou[rows, cols]
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
        pred_masks_in_boxes: every predicted mask lies inside its box (``postprocess`` crops them): the masks are
            read inside their boxes only.
    """

    full_state_update = False

    def __init__(self, conf: float = 0.25, iou_threshold: float = 0.5, min_area: float = 500.0,
                 pred_masks_in_boxes: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.conf, self.iou_threshold, self.min_area = conf, iou_threshold, min_area
        self.pred_masks_in_boxes = pred_masks_in_boxes
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
            preds, targets: per image, as in the module docstring (``masks`` may also be
                :class:`cellseg_pl.masks.MaskWindows`, or ``rles`` and ``areas`` replace them: see :func:`encoded`).
            area_scale: per image, mask px per original-image px (the letterbox gain squared; ``ratio_pad[0] ** 2``
                of the batch) when masks are not at the original resolution; default 1.
        """
        for i, (pred, target) in enumerate(zip(preds, targets)):
            keep = pred["scores"] >= self.conf
            kept = torch.nonzero(keep).view(-1).tolist()
            pred_rles, areas = encoded(pred, kept, in_boxes=self.pred_masks_in_boxes)
            true_rles, _ = encoded(target)
            rows, _, ious = _match_rles(pred_rles, pred["labels"][keep], true_rles, target["labels"],
                                        self.iou_threshold)  # fmt: skip
            tp, iou_sum = len(rows), float(sum(ious))
            fp, fn = len(kept) - tp, len(true_rles) - tp
            unmatched = np.ones(len(kept), dtype=bool)
            unmatched[rows] = False
            scale = area_scale[i] if area_scale is not None else 1.0
            # areas from the runs, not ``mask_utils.area``: pycocotools 2.0.11 overflows (uint8) from 256 RLEs on
            self.fp_small += int((np.asarray(areas, dtype=np.int64)[unmatched] < self.min_area * scale).sum())
            self.tp += tp
            self.fp += fp
            self.fn += fn
            self.iou_sum += iou_sum
            n_pred, n_true = int(keep.sum()), len(true_rles)
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


def targets_from_batch(batch: dict) -> list[dict[str, Any]]:
    """Ground truth per image from a validation batch (needs the full-resolution ``instances`` maps): ``boxes``,
    ``labels`` and ``masks`` as :class:`cellseg_pl.masks.MaskWindows`."""
    targets = []
    inst = batch["instances"]
    size = inst.shape[-1]
    for i in range(inst.shape[0]):
        sel = batch["batch_idx"] == i
        n = int(sel.sum())
        masks = MaskWindows.from_label_map(inst[i], n)
        xywh = batch["bboxes"][sel] * size
        boxes = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
        targets.append({"masks": masks, "boxes": boxes, "labels": batch["cls"][sel].view(-1).long()})
    return targets


def mask_fitness(map50: torch.Tensor, map50_95: torch.Tensor) -> torch.Tensor:
    """The best-model rule: 0.1 * mask mAP50 + 0.9 * mask mAP50-95 (Ultralytics 8.0-8.3's weighting, on masks
    alone). Ultralytics 8.4 picks by box mAP50-95 + mask mAP50-95; for cells the masks are the product, so box
    mAP does not vote here."""
    return 0.1 * map50 + 0.9 * map50_95


class ValidationMetrics(torch.nn.Module):
    """The metrics of one validation (or test) pass: COCO mask and box mAP, and the cell matching at ``pr_conf``.

    :meth:`update` takes each batch's predictions (network-input px); :meth:`compute` returns the epoch's values
    under the names ``results.csv`` uses (Ultralytics' ``metrics/...``, and ``fitness``, the best-model rule) and
    starts the next pass.

    Args:
        pr_conf: the confidence at which precision, recall, F1 and the counts are taken.
        min_area: a false positive smaller than this (px of the original image) counts as droplet-sized.
    """

    def __init__(self, pr_conf: float, min_area: float) -> None:
        super().__init__()
        self.mean_ap = mask_map_metric()  # (update encodes the masks once, for both metrics)
        self.cells = CellMatchMetrics(conf=pr_conf, min_area=min_area)

    def update(self, preds: list[dict[str, Any]], batch: dict) -> list[dict[str, Any]]:
        """Add one batch; returns its targets (network-input px). Each mask is encoded once for both metrics."""
        targets = targets_from_batch(batch)

        # postprocess crops every predicted mask to its box; all masks of the batch are encoded on the process's
        # threads
        items = [(p, ("boxes", "scores", "labels")) for p in preds] + [(t, ("boxes", "labels")) for t in targets]
        windows = [x["masks"] if isinstance(x["masks"], MaskWindows) else MaskWindows.from_dense(
            x["masks"], x["boxes"] if i < len(preds) else None) for i, (x, _) in enumerate(items)]
        coded = [{**{k: x[k] for k in keys}, "rles": rles, "areas": areas}
                 for (x, keys), (rles, areas) in zip(items, encode_many(windows))]
        pred_items, true_items = coded[: len(preds)], coded[len(preds) :]
        self.mean_ap.update(pred_items, true_items)
        # masks are at network-input scale: droplet areas (original px) scale by the letterbox gain squared
        self.cells.update(pred_items, true_items, [gain**2 for gain, _ in batch["ratio_pad"]])
        return targets

    def compute(self) -> dict[str, torch.Tensor]:
        m = self.mean_ap.compute()
        c = self.cells.compute()
        self.mean_ap.reset()
        self.cells.reset()
        values = {
            "metrics/precision(M)": c["precision"],
            "metrics/recall(M)": c["recall"],
            "metrics/mAP50(M)": m["segm_map_50"],
            "metrics/mAP50-95(M)": m["segm_map"],
            "metrics/mAP50(B)": m["bbox_map_50"],
            "metrics/mAP50-95(B)": m["bbox_map"],
            "metrics/F1(M)": c["f1"],
            "metrics/AP_cell(M)": c["ap_cell"],
            "metrics/mean_matched_IoU(M)": c["mean_matched_iou"],
            "metrics/count_MAE": c["count_mae"],
            "metrics/count_MRE": c["count_mre"],
            "metrics/FP_droplet_sized": c["fp_droplet_sized"],
        }
        values = {k: v.float().clamp(min=0) for k, v in values.items()}
        values["fitness"] = mask_fitness(values["metrics/mAP50(M)"], values["metrics/mAP50-95(M)"])
        return values
