"""The one evaluator: any model's predictions on one split of a data set, scored as cell biologists read them.

``python -m cellseg_pl evaluate --model best.pt --data dataset.yaml [--split test] [--output metrics.json]``

A cellseg_pl ``.ckpt`` and an Ultralytics ``.pt`` (``yolo segment train``'s ``best.pt``) are scored the same way,
so two trainers, or two versions of a model, are compared with one evaluator:

* every image is predicted once, through ``predict``'s engine (:class:`cellseg_pl.infer.engine.Predictor`: letterboxed
  to ``imgsz`` as in training, masks rebuilt at the original resolution), at conf 0.001 with ``predict``'s NMS IoU
  and detection limit, by the network as trained (Conv and BatchNorm not folded);
* COCO mask mAP50 and mAP50-95 (``faster_coco_eval`` through torchmetrics, up to 300 detections per image);
* at one confidence (``conf``, the operating point) and over a sweep of confidences: one-to-one (Hungarian) matching
  at mask IoU 0.5, with precision, recall, F1, the cell papers' "AP" = TP / (TP + FP + FN), the mean IoU of matched
  cells and the counting error per image;
* the detections kept at ``conf``, as true and false positives by score band.

The ground truth is the split's label files (YOLO-seg polygons, rasterized at the original resolution).

Example:
    >>> from cellseg_pl.evaluate import evaluate
    >>> result = evaluate("best.pt", "data/demo/dataset.yaml", split="val")  # doctest: +SKIP
    >>> result["F1@0.5"], result["mAP50-95(M)"]  # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

import numpy as np
import torch

from cellseg_pl.data.dataset import load_dataset_yaml, rasterize, read_label
from cellseg_pl.data.images import read_image
from cellseg_pl.data.labels import label_path_for
from cellseg_pl.errors import DatasetError
from cellseg_pl.files import write_atomic
from cellseg_pl.infer.engine import DEFAULT_IMGSZ, Instance, Predictor
from cellseg_pl.infer.options import InferenceOptions, parse_device
from cellseg_pl.metrics import CellMatchMetrics, mask_map_metric, matched_pairs
from cellseg_pl.yolo.network import load_weights

#: Lower edges of the score bands in which the detections kept at ``conf`` are counted.
SCORE_BANDS = (0.25, 0.4, 0.6, 0.8)
#: Confidence of the predictions scored (every detection the metrics may need).
PREDICT_CONF = 0.001


def evaluate(
    model: str | Path,
    data: str | Path,
    split: str = "val",
    conf: float = 0.25,
    sweep: tuple[float, ...] = (),
    imgsz: int | None = None,
    device: str = InferenceOptions.device,
    batch_size: int = InferenceOptions.batch_size,
    output: str | Path | None = None,
    per_image: bool = False,
) -> dict:
    """Predict one split of a data set once and score it.

    Args:
        model: a cellseg_pl .ckpt or an Ultralytics -seg .pt (a pickle: trusted files only).
        data: the YOLO-seg dataset.yaml whose label files are the ground truth.
        split: train, val or test.
        conf: the confidence at which detections count for the matching metrics (the operating point).
        sweep: more confidences at which F1, precision, recall and the matching counts are computed.
        imgsz: network input side in px (default: the one stored in the weights).
        device: cpu, 0 (= cuda:0) or cuda:N.
        batch_size: images per forward pass.
        output: also write the result to this JSON file.
        per_image: also return ``per_image``: one record per image, for comparisons that resample the images
            (:mod:`cellseg_pl.lab.compare`): ``image``, ``tp``/``fp``/``fn`` at ``conf``, ``count_err``, ``gt`` (class
            -> true instances) and ``dets``: ``[score, class, [true positive at IoU 0.50, 0.55, ..., 0.95]]`` of every
            detection, COCO's greedy matching.

    Returns:
        ``mAP50(M)``, ``mAP50-95(M)``; at ``conf`` and IoU 0.5: ``F1@0.5``, ``P@0.5``, ``R@0.5``, ``AP_dsb@0.5``,
        ``mean_matched_IoU``, ``count_MAE``, ``TP``, ``FP``, ``FN``; ``sweep``: ``{conf: {"F1", "P", "R", "TP", "FP",
        "FN", "detections", "IoU"}}``; ``bands``: ``{"lo-hi": {"TP", "FP"}}`` of the detections kept at ``conf``;
        ``images``; ``model``, ``data``, ``split``, ``imgsz``.
    """
    spec = load_dataset_yaml(data)
    paths = spec.splits.get(split)
    if not paths:
        raise DatasetError(f"--data: {data}: the '{split}' split has no images")
    net, names, info = load_weights(model, flag="--model")
    stored = info.get("imgsz")
    imgsz = int(imgsz or (max(stored) if isinstance(stored, (list, tuple)) and stored else stored) or DEFAULT_IMGSZ)
    predictor = Predictor(net, len(names), imgsz, parse_device(device), conf=PREDICT_CONF, iou=InferenceOptions.iou,
                          max_det=InferenceOptions.max_det, tile="off", batch_size=batch_size)
    confs = sorted({conf, *sweep})
    mean_ap = mask_map_metric()
    cells = {c: CellMatchMetrics(conf=c) for c in confs}
    edges = sorted({conf, *(b for b in SCORE_BANDS if b > conf)})
    bands = {f"{lo:.2f}-{hi:.2f}": {"TP": 0, "FP": 0} for lo, hi in zip(edges, [*edges[1:], 1.0])}
    records: list[dict] | None = [] if per_image else None
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = [read_image(path) for path in chunk]
        for path, image, found in zip(chunk, images, predictor.predict(images)):
            score_image(path, image, found, len(names), mean_ap, cells, (conf, edges, bands), records)
    m = mean_ap.compute()
    at = {c: {k: float(v) for k, v in metric.compute().items()} for c, metric in cells.items()}
    main = at[conf]
    result = {
        "mAP50(M)": float(m["segm_map_50"]), "mAP50-95(M)": float(m["segm_map"]),
        "F1@0.5": main["f1"], "P@0.5": main["precision"], "R@0.5": main["recall"], "AP_dsb@0.5": main["ap_cell"],
        "mean_matched_IoU": main["mean_matched_iou"], "count_MAE": main["count_mae"],
        "TP": main["tp"], "FP": main["fp"], "FN": main["fn"],
        "sweep": {c: {"F1": at[c]["f1"], "P": at[c]["precision"], "R": at[c]["recall"], "TP": at[c]["tp"],
                      "FP": at[c]["fp"], "FN": at[c]["fn"], "detections": at[c]["tp"] + at[c]["fp"],
                      "IoU": at[c]["mean_matched_iou"]} for c in sweep},
        "bands": bands, "images": len(paths), "model": str(model), "data": str(data), "split": split, "imgsz": imgsz,
    }  # fmt: skip
    if records is not None:
        result["per_image"] = records
    if output is not None:
        write_atomic(Path(output), json.dumps(result, indent=2))
    return result


def format_result(result: dict) -> str:
    """The figures of :func:`evaluate`, one per line, as ``evaluate`` prints them."""
    rows = (("mask mAP50 (COCO)", "mAP50(M)"), ("mask mAP50-95 (COCO)", "mAP50-95(M)"), ("precision", "P@0.5"),
            ("recall", "R@0.5"), ("F1", "F1@0.5"), ("AP = TP/(TP+FP+FN)", "AP_dsb@0.5"),
            ("mean IoU of matched cells", "mean_matched_IoU"), ("counting error per image", "count_MAE"))
    lines = [f"{result['model']} on {result['images']} {result['split']} images of {result['data']} "
             f"(imgsz {result['imgsz']}; matching at IoU 0.5, conf as given):"]
    lines += [f"  {label:<28} {result[key]:.4f}" for label, key in rows]
    lines.append(f"  true / false positives, missed   {result['TP']:.0f} / {result['FP']:.0f} / {result['FN']:.0f}")
    return "\n".join(lines)


def true_instances(path: Path, height: int, width: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The true instances of an image from its label file, as the evaluator scores them.

    Returns:
        ``(masks, labels)``: ``(n, height, width)`` bool tensor of the non-empty rasterized instances (a later
        polygon covers an earlier one where they overlap) and their ``(n,)`` long class indices.
    """
    classes, polygons, _ = read_label(label_path_for(Path(path)), num_classes)
    inst, order = rasterize(polygons, height, width)
    ids = [k + 1 for k in range(len(order)) if (inst == k + 1).any()]
    masks = torch.from_numpy(np.stack([inst == k for k in ids]) if ids else np.zeros((0, height, width), bool))
    labels = torch.as_tensor([int(classes[order[k - 1]]) for k in ids], dtype=torch.long)
    return masks, labels


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``(n, 4)`` float32 xyxy pixel boxes (x1/y1 exclusive) of a ``(n, H, W)`` bool tensor of non-empty masks."""
    m = masks.numpy()
    n, h, w = m.shape
    if not n:
        return torch.zeros((0, 4), dtype=torch.float32)
    rows, cols = m.any(2), m.any(1)
    xyxy = np.stack([cols.argmax(1), rows.argmax(1), w - cols[:, ::-1].argmax(1), h - rows[:, ::-1].argmax(1)], 1)
    return torch.from_numpy(xyxy.astype(np.float32))


def score_image(path: Path, image: np.ndarray, found: list[Instance], num_classes: int, mean_ap, cells: dict,
                banding: tuple | None = None, records: list[dict] | None = None) -> None:
    """Add one image's detections and its label file to the metrics.

    Args:
        banding: ``(conf, edges, bands)``: the detections scoring at least ``conf`` are matched to the truth and
            counted as ``TP``/``FP`` into ``bands[f"{lo:.2f}-{hi:.2f}"]`` by their score (``edges``: lower edges).
        records: append the image's record (:func:`evaluate`'s ``per_image``); needs ``banding``.
    """
    h, w = image.shape[:2]
    gt_masks, gt_labels = true_instances(path, h, w, num_classes)
    found = [d for d in found if d.area > 0]
    pred_masks = torch.from_numpy(np.stack([d.full_mask(h, w) for d in found]) if found else np.zeros((0, h, w), bool))
    pred = {"masks": pred_masks, "boxes": torch.tensor([d.box for d in found], dtype=torch.float32).view(-1, 4),
            "scores": torch.tensor([d.score for d in found]),
            "labels": torch.tensor([d.label for d in found], dtype=torch.long)}
    target = {"masks": gt_masks, "boxes": mask_boxes(gt_masks), "labels": gt_labels}
    mean_ap.update([pred], [target])
    for c, metric in cells.items():  # handed only what it keeps: it costs per detection handed
        keep = pred["scores"] >= c
        metric.update([{k: v[keep] for k, v in pred.items()}], [target])
    if banding is not None:
        conf, edges, bands = banding
        keep = pred["scores"] >= conf
        scores = pred["scores"][keep].tolist()
        rows, _, _ = matched_pairs(pred["masks"][keep], pred["labels"][keep], gt_masks, gt_labels)
        names, matched = list(bands), set(rows)
        for k, s in enumerate(scores):
            bands[names[bisect.bisect_right(edges, s) - 1]]["TP" if k in matched else "FP"] += 1
        if records is not None:
            records.append({
                "image": str(path), "tp": len(rows), "fp": len(scores) - len(rows), "fn": len(gt_masks) - len(rows),
                "count_err": len(scores) - len(gt_masks),
                "gt": {int(c): int((gt_labels == c).sum()) for c in gt_labels.unique()},
                "dets": coco_hits(pred, gt_masks, gt_labels),
            })  # fmt: skip


def coco_hits(pred: dict[str, torch.Tensor], gt_masks: torch.Tensor, gt_labels: torch.Tensor) -> list[list]:
    """``[score, class, [hit at IoU 0.50, 0.55, ..., 0.95]]`` per detection (at most COCO's detection limit, best
    scores first): COCO's greedy matching, each detection taking the unmatched true instance of its class with the
    highest mask IoU at or above the threshold."""
    from cellseg_pl.metrics import MAX_DETECTIONS, encode_masks, rle_iou

    order = torch.argsort(pred["scores"], descending=True, stable=True)[: max(MAX_DETECTIONS)].tolist()
    scores, labels = pred["scores"][order].tolist(), pred["labels"][order].tolist()
    thresholds = np.linspace(0.5, 0.95, 10)
    if not order:
        return []
    gt = gt_labels.numpy()
    iou = rle_iou(encode_masks(pred["masks"][order]), encode_masks(gt_masks)) if len(gt) else np.zeros((len(order), 0))
    out = []
    taken = np.zeros((len(thresholds), len(gt)), bool)
    for d, (score, label) in enumerate(zip(scores, labels)):
        hits = []
        for t, thr in enumerate(thresholds):
            # (COCO: among unmatched true instances, the highest IoU reaching the threshold; the last one on a tie)
            cand = np.where(~taken[t] & (gt == label) & (iou[d] >= min(thr, 1 - 1e-10)), iou[d], -1.0)
            m = len(cand) - 1 - int(cand[::-1].argmax()) if len(cand) else -1
            hit = m >= 0 and cand[m] >= 0
            if hit:
                taken[t, m] = True
            hits.append(bool(hit))
        out.append([float(score), int(label), hits])
    return out
