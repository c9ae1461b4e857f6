"""Validation metrics: COCO mask (and box) mAP through torchmetrics, and one-to-one cell matching.

Both take the same inputs, per image::

    pred   = {"masks": (n, H, W) bool, "boxes": (n, 4) xyxy px, "scores": (n,), "labels": (n,) int64}
    target = {"masks": (m, H, W) bool, "boxes": (m, 4) xyxy px, "labels": (m,) int64}

and are torchmetrics ``Metric`` objects, so Lightning reduces them across processes. ``masks`` may also be
:class:`cellseg_pl.masks.MaskWindows`, or ``rles`` and ``areas`` may replace them (masks already encoded:
:func:`encoded`), or the masks' IoUs may: a prediction's ``mask_ious`` ((n, m) float64, with its image's m true
masks) and ``areas``, and the target's ``areas`` (what validation passes, :func:`mask_ious`: it never encodes).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision
from torchmetrics.detection.helpers import CocoBackend
from torchvision.ops import box_convert

from cellseg_pl.masks import MaskWindows, map_on_threads

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


def mask_ious(pred: MaskWindows, labels: torch.Tensor | np.ndarray, count: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """IoUs of predicted masks with the ``count`` true instances of a label map (instance k, 0-based, holds k + 1).

    The same numbers as pycocotools' ``mask.iou`` of the RLEs (no crowd): intersection over union of the pixel
    counts, divided as doubles; 0 where the union is empty. Counted in the masks' windows
    (:meth:`cellseg_pl.masks.MaskWindows.overlaps`): nothing is run-length encoded.

    Returns:
        ``(ious, pred_areas, true_areas)``: (n, count) float64, (n,) and (count,) int64 pixel counts.
    """
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    inter, areas = pred.overlaps(lab, count)  # (numpy only: this runs on the validation's threads)
    true_areas = np.bincount(lab.reshape(-1), minlength=count + 1)[1 : count + 1].astype(np.int64)
    union = areas[:, None] + true_areas[None, :] - inter
    ious = np.zeros(union.shape, np.float64)
    np.divide(inter, union, out=ious, where=union > 0)
    return ious, areas, true_areas


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
    * Masks may come as their IoUs (a prediction's ``mask_ious`` with its image's true masks, and both sides'
      ``areas``; :func:`mask_ious`): then nothing is encoded, and the COCO evaluation reads those IoUs instead of
      computing them from RLEs (the same numbers). Every image of a pass must come the same way.

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
        self.add_state("detection_mask_iou", default=[], dist_reduce_fx=None)  # (images given by their IoUs)

    def update(self, preds: list[dict[str, Any]], target: list[dict[str, Any]]) -> None:
        """The stock ``update``; ``masks`` may also be :class:`cellseg_pl.masks.MaskWindows`, and an item that holds
        ``rles`` and ``areas`` (its masks already encoded, see :func:`encoded`) is not encoded again."""
        from torchmetrics.detection.helpers import _input_validator

        _input_validator(preds, target, iou_type="bbox")
        given = [("mask_ious" in p) for p in preds]
        for i, (p, t) in enumerate(zip(preds, target)):
            if not given[i] and any("masks" not in x and "rles" not in x for x in (p, t)):
                raise ValueError(f"MaskMeanAP: image {i} has neither `masks` nor `rles` (nor `mask_ious`)")
            if given[i] and not ("areas" in p and "areas" in t and "masks" not in t and "rles" not in t):
                raise ValueError(f"MaskMeanAP: image {i} gives `mask_ious`: it needs `areas` on both sides, no masks")
            if given[i] and tuple(p["mask_ious"].shape) != (len(p["labels"]), len(t["labels"])):
                raise ValueError(f"MaskMeanAP: image {i}: `mask_ious` of {tuple(p['mask_ious'].shape)} for "
                                 f"{len(p['labels'])} predictions and {len(t['labels'])} true masks")
            if given[i] and "iscrowd" in t and bool(torch.as_tensor(t["iscrowd"]).any()):
                raise ValueError(f"MaskMeanAP: image {i} gives `mask_ious` and crowd regions (IoU over the "
                                 "prediction's area there): give its masks instead")
        for item, iou_given in zip(preds, given):
            self.detection_box.append(box_convert(item["boxes"].reshape(-1, 4), "xyxy", "xywh"))
            if iou_given:
                rles, areas = None, item["areas"]
                self.detection_mask_iou.append(torch.as_tensor(item["mask_ious"], dtype=torch.float64).cpu())
            else:
                rles, areas = encoded(item, in_boxes=self.pred_masks_in_boxes)
            self.detection_mask.append(_rle_state(rles, len(item["labels"])))
            self.detection_area.append(torch.as_tensor(areas, dtype=torch.float64).cpu())
            self.detection_labels.append(item["labels"])
            self.detection_scores.append(item["scores"])
        for item, iou_given in zip(target, given):
            self.groundtruth_box.append(box_convert(item["boxes"].reshape(-1, 4), "xyxy", "xywh"))
            rles, areas = (None, item["areas"]) if iou_given else encoded(item)
            self.groundtruth_mask.append(_rle_state(rles, len(item["labels"])))
            self.groundtruth_labels.append(item["labels"])
            self.groundtruth_crowds.append(item.get("iscrowd", torch.zeros_like(item["labels"])))
            self.groundtruth_area.append(
                item["area"] if "area" in item else torch.as_tensor(areas, dtype=torch.float64).cpu())

    def compute(self) -> dict:
        given = len(self.detection_mask_iou)
        if given and given != len(self.detection_box):
            raise ValueError(f"MaskMeanAP: {given} of {len(self.detection_box)} images gave `mask_ious`, the "
                             "others masks: give every image's masks the same way")
        self._coco_backend.detection_area = self.detection_area
        self._coco_backend.mask_ious = [x.numpy() for x in self.detection_mask_iou] if given else None
        try:
            return super().compute()
        finally:
            self._coco_backend.detection_area = self._coco_backend.mask_ious = None

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:  # noqa: ANN001 - torchmetrics' signature
        world = torch.distributed.get_world_size(group=process_group)
        for attr in self._reductions:
            local = [x.cpu() if isinstance(x, torch.Tensor) else x for x in getattr(self, attr)]
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, local, group=process_group)
            setattr(self, attr, [x for part in gathered for x in part])


#: the state of a mask given by its IoUs (:class:`MaskMeanAP`): no RLE, never decoded
_NO_RLE = ((0, 0), b"")


def _rle_state(rles: list[dict] | None, count: int) -> tuple:
    """RLEs as torchmetrics' ``MeanAveragePrecision`` stores them: ``((h, w), counts)`` per mask; ``None``: the
    ``count`` masks are given by their IoUs (placeholders)."""
    if rles is None:
        return (_NO_RLE,) * count
    return tuple((tuple(r["size"]), r["counts"]) for r in rles)


class _KnownAreaBackend(CocoBackend):
    """torchmetrics' COCO backend given the predictions' mask areas (:class:`MaskMeanAP` sets ``detection_area``
    for its ``compute``), instead of computing them from the RLEs, and, when :class:`MaskMeanAP` sets ``mask_ious``
    (per image, (predictions, true masks) float64), the mask IoUs instead of the RLEs (:func:`_evaluator_with_ious`)."""

    detection_area: list[torch.Tensor] | None = None
    mask_ious: list[np.ndarray] | None = None

    @property
    def cocoeval(self) -> object:
        if self.mask_ious is None:
            return super().cocoeval
        return functools.partial(_evaluator_with_ious, super().cocoeval, self.mask_ious)

    def _get_coco_format(self, labels, all_labels, boxes=None, masks=None, scores=None, area=None,  # noqa: ANN001
                         iou_type=("bbox",), average="micro", **kwargs: Any) -> dict:
        known = scores is not None and area is None and "segm" in iou_type and self.detection_area is not None
        out = super()._get_coco_format(labels, all_labels, boxes=boxes, masks=masks, scores=scores,
                                       area=self.detection_area if known else area, iou_type=iou_type,
                                       average=average, **kwargs)
        if known and len(iou_type) > 1:  # a known area skips the stock per-type areas, swapped in per IoU type
            for ann in out["annotations"]:
                ann["area_segm"] = ann["area"]
                ann["area_bbox"] = ann["bbox"][2] * ann["bbox"][3]
        if self.mask_ious is not None:  # each annotation's position in its image: its row or column of the IoUs
            image, k = None, 0
            for ann in out["annotations"]:
                k = k + 1 if ann["image_id"] == image else 0
                image, ann["_position"] = ann["image_id"], k
        return out


def _evaluator_with_ious(base: type, mask_ious: list[np.ndarray], coco_gt: Any, coco_dt: Any, iouType: str  # noqa: N803
                         ) -> Any:  # fmt: skip
    """A COCO evaluator of class ``base`` (faster_coco_eval's) whose mask IoUs are read from ``mask_ious`` (per image
    id, (predictions, true masks)) instead of computed from RLEs; its box IoUs are its own."""
    evaluator = base(coco_gt, coco_dt, iouType=iouType)
    if iouType == "segm":
        evaluator.params.compute_rle = False  # there are no RLEs to build
        evaluator.computeIoU = functools.partial(_given_iou, evaluator, mask_ious)
    return evaluator


def _given_iou(evaluator: Any, mask_ious: list[np.ndarray], img_id: int, cat_id: int) -> np.ndarray | list:
    """faster_coco_eval's ``COCOeval.computeIoU`` (1.8) with the IoU matrix looked up: the same detections, sorted
    by score (stable) and cut to the last max-detections threshold, against the same true masks, in its order."""
    p = evaluator.params
    cats, use_cats = ([cat_id] if p.useCats else p.catIds), bool(p.useCats)
    gt = evaluator.gt_dataset.get_instances([img_id], cats, use_cats)[0][0]
    dt = evaluator.dt_dataset.get_instances([img_id], cats, use_cats)[0][0]
    if len(gt) == 0 or len(dt) == 0:
        return []
    order = np.argsort([-d["score"] for d in dt], kind="mergesort")
    dt = [dt[i] for i in order][: p.maxDets[-1]]
    return mask_ious[img_id][np.ix_([d["_position"] for d in dt], [g["_position"] for g in gt])]


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
    return _match_ious(rle_iou(pred, gt), pred_labels, gt_labels, iou_threshold)


def _match_ious(iou: np.ndarray, pred_labels: torch.Tensor, gt_labels: torch.Tensor,
                iou_threshold: float) -> tuple[list[int], list[int], list[float]]:  # fmt: skip
    """Hungarian matching on an (n, m) mask IoU matrix, pairs of different classes excluded."""
    if not iou.size:
        return [], [], []
    iou = iou * (pred_labels.cpu().numpy()[:, None] == gt_labels.cpu().numpy()[None, :])
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
                :class:`cellseg_pl.masks.MaskWindows`, or ``rles`` and ``areas`` replace them: see :func:`encoded`;
                or the prediction's ``mask_ious`` and ``areas``: :func:`mask_ious`).
            area_scale: per image, mask px per original-image px (the letterbox gain squared; ``ratio_pad[0] ** 2``
                of the batch) when masks are not at the original resolution; default 1.
        """
        for i, (pred, target) in enumerate(zip(preds, targets)):
            keep = pred["scores"] >= self.conf
            kept = torch.nonzero(keep).view(-1).tolist()
            n_true = len(target["labels"])
            if "mask_ious" in pred:
                iou = np.asarray(torch.as_tensor(pred["mask_ious"]).cpu().numpy(), np.float64)[kept]
                areas = np.asarray(torch.as_tensor(pred["areas"]).cpu().numpy())[kept]
            else:
                pred_rles, areas = encoded(pred, kept, in_boxes=self.pred_masks_in_boxes)
                true_rles, _ = encoded(target)
                iou, n_true = rle_iou(pred_rles, true_rles), len(true_rles)
            rows, _, ious = _match_ious(iou, pred["labels"][keep], target["labels"], self.iou_threshold)
            tp, iou_sum = len(rows), float(sum(ious))
            fp, fn = len(kept) - tp, n_true - tp
            unmatched = np.ones(len(kept), dtype=bool)
            unmatched[rows] = False
            scale = area_scale[i] if area_scale is not None else 1.0
            # areas from the runs, not ``mask_utils.area``: pycocotools 2.0.11 overflows (uint8) from 256 RLEs on
            self.fp_small += int((np.asarray(areas, dtype=np.int64)[unmatched] < self.min_area * scale).sum())
            self.tp += tp
            self.fp += fp
            self.fn += fn
            self.iou_sum += iou_sum
            n_pred = int(keep.sum())
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
        self.mean_ap = mask_map_metric()
        self.cells = CellMatchMetrics(conf=pr_conf, min_area=min_area)

    def update(self, preds: list[dict[str, Any]], batch: dict) -> list[dict[str, Any]]:
        """Add one batch; returns its targets (network-input px). The masks' IoUs with the batch's true instances
        are counted once, in the masks' windows, for both metrics (:func:`mask_ious`): nothing is encoded."""
        targets = targets_from_batch(batch)
        # (postprocess crops every predicted mask to its box)
        windows = [p["masks"] if isinstance(p["masks"], MaskWindows) else MaskWindows.from_dense(p["masks"], p["boxes"])
                   for p in preds]
        scored = map_on_threads(mask_ious, windows, batch["instances"], [len(t["labels"]) for t in targets])
        pred_items, true_items = [], []
        for p, t, (ious, areas, true_areas) in zip(preds, targets, scored):
            pred_items.append({**{k: p[k] for k in ("boxes", "scores", "labels")}, "mask_ious": ious, "areas": areas})
            true_items.append({"boxes": t["boxes"], "labels": t["labels"], "areas": true_areas})
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
