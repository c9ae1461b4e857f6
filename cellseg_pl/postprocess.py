"""Raw head output -> per-image boxes, scores, labels and masks (NMS + prototype masks); shared by val and predict.

Uses Ultralytics' NMS and mask ops (the second half of the door described in :mod:`cellseg_pl.model`).
"""

from __future__ import annotations

import torch


def postprocess(
    det: torch.Tensor,
    proto: torch.Tensor,
    num_classes: int,
    conf: float = 0.001,
    iou: float = 0.7,
    max_det: int = 300,
    with_masks: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """NMS and mask assembly at the network input resolution.

    Args:
        det: (B, 4 + nc + 32, A) decoded head output (xywh px, class scores, mask coefficients).
        proto: (B, 32, S/4, S/4) mask prototypes.
        num_classes: number of classes.
        conf: minimum score kept.
        iou: NMS IoU threshold.
        max_det: maximum detections per image.
        with_masks: assemble ``masks``; prediction at the original size (:func:`to_original`) does not need them.

    Returns:
        One dict per image: ``boxes`` (n, 4) xyxy px in the S x S input, ``scores`` (n,), ``labels`` (n,) int64,
        ``coeffs`` (n, 32), ``masks`` (n, S, S) bool (prototypes upsampled to S, then cropped to the box; absent
        without ``with_masks``).
    """
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import process_mask

    size = (proto.shape[2] * 4, proto.shape[3] * 4)
    outputs = non_max_suppression(det, conf, iou, nc=num_classes, multi_label=False, max_det=max_det)
    results = []
    for i, x in enumerate(outputs):
        boxes, coeffs = x[:, :4], x[:, 6:]
        result = {"boxes": boxes, "scores": x[:, 4], "labels": x[:, 5].long(), "coeffs": coeffs}
        if with_masks:
            result["masks"] = process_mask(proto[i], coeffs, boxes, size, upsample=True).bool()
        results.append(result)
    return results


def to_original(
    result: dict[str, torch.Tensor], proto: torch.Tensor, input_size: tuple[int, int], ori_shape: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """Map one image's detections from the letterboxed input back to the original image, masks at full size.

    Masks are rebuilt from the prototypes at the original resolution (not upsampled from 1/4-resolution masks), so
    small cells keep smooth outlines.

    Args:
        result: one entry of :func:`postprocess`.
        proto: (32, S/4, S/4) prototypes of that image.
        input_size: (S, S) network input size.
        ori_shape: (h0, w0) original image size.

    Returns:
        ``boxes`` (n, 4) xyxy in original px, ``scores``, ``labels``, ``masks`` (n, h0, w0) bool.
    """
    from ultralytics.utils.ops import process_mask_native, scale_boxes

    boxes = scale_boxes(input_size, result["boxes"].clone(), ori_shape)
    masks = process_mask_native(proto, result["coeffs"], boxes, ori_shape).bool()
    return {"boxes": boxes, "scores": result["scores"], "labels": result["labels"], "masks": masks}
