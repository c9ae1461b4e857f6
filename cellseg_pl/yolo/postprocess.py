"""Raw head output -> per-image boxes, scores, labels and masks (NMS + prototype masks); shared by val and predict.

Uses Ultralytics' NMS and mask ops (the second half of the door described in :mod:`cellseg_pl.yolo.network`).
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

    size = (proto.shape[2] * 4, proto.shape[3] * 4)
    outputs = non_max_suppression(det, conf, iou, nc=num_classes, multi_label=False, max_det=max_det)
    results = []
    for i, x in enumerate(outputs):
        boxes, coeffs = x[:, :4], x[:, 6:]
        result = {"boxes": boxes, "scores": x[:, 4], "labels": x[:, 5].long(), "coeffs": coeffs}
        if with_masks:
            result["masks"] = box_masks(proto[i], coeffs, boxes, size)
        results.append(result)
    return results


#: low-resolution pixels kept around a box's footprint, so that no interpolated pixel inside the box meets the edge
#: of its window (where bilinear interpolation would clamp instead of reading the neighbour)
_WINDOW_MARGIN = 2


def box_masks(proto: torch.Tensor, coeffs: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Ultralytics' ``process_mask(..., upsample=True)`` computed near each box only: the same (n, H, W) bool masks.

    Ultralytics upsamples every detection's mask to the whole input (``n x H x W`` floats: 300 x 640 x 640 with
    ``max_det`` 300) and then zeroes all but its box. Here each mask is upsampled in a window of prototype pixels
    around its box and cropped there. Bilinear interpolation by 4 reads the same two prototype pixels, with the same
    weights, for a pixel of the window as for that pixel of the whole image, so the masks are identical (a test
    compares them with Ultralytics' bit for bit); validation with hundreds of low-confidence detections per image is
    several times faster on the CPU. On a GPU, Ultralytics' single whole-image kernel is used.

    Args:
        proto: (32, h, w) prototypes of one image.
        coeffs: (n, 32) mask coefficients.
        boxes: (n, 4) xyxy px in the input of size ``size`` = (4h, 4w).
        size: (H, W) input size.
    """
    import torch.nn.functional as F

    n = coeffs.shape[0]
    c, mh, mw = proto.shape
    height, width = size
    if (height, width) != (4 * mh, 4 * mw):
        raise ValueError(f"box_masks: input size {size} is not 4x the prototype size {(mh, mw)}")
    if coeffs.device.type != "cpu":  # an accelerator does the whole-image upsampling in one kernel, faster than
        from ultralytics.utils.ops import process_mask  # hundreds of small ones

        return process_mask(proto, coeffs, boxes, size, upsample=True).bool()
    out = torch.zeros((n, height, width), dtype=torch.bool, device=coeffs.device)
    if not n:
        return out
    low = (coeffs @ proto.float().view(c, -1)).view(n, mh, mw)  # as Ultralytics: one product for all masks
    # crop_mask keeps the pixels x1 <= col < x2 and y1 <= row < y2
    b = boxes.float().ceil().clamp(min=0)
    cols = torch.stack([b[:, 0].clamp(max=width), b[:, 2].clamp(max=width)], 1).long().tolist()
    rows = torch.stack([b[:, 1].clamp(max=height), b[:, 3].clamp(max=height)], 1).long().tolist()
    for k, ((x0, x1), (y0, y1)) in enumerate(zip(cols, rows)):
        if x1 <= x0 or y1 <= y0:
            continue
        # prototype pixels read by pixel j: floor((j + 0.5) / 4 - 0.5) and the next, in [j // 4 - 1, j // 4 + 1]
        lx0, lx1 = max(x0 // 4 - _WINDOW_MARGIN, 0), min((x1 - 1) // 4 + _WINDOW_MARGIN, mw - 1) + 1
        ly0, ly1 = max(y0 // 4 - _WINDOW_MARGIN, 0), min((y1 - 1) // 4 + _WINDOW_MARGIN, mh - 1) + 1
        window = low[k, ly0:ly1, lx0:lx1]
        up = F.interpolate(window[None, None], (4 * (ly1 - ly0), 4 * (lx1 - lx0)), mode="bilinear")[0, 0]
        out[k, y0:y1, x0:x1] = up[y0 - 4 * ly0 : y1 - 4 * ly0, x0 - 4 * lx0 : x1 - 4 * lx0] > 0
    return out


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
