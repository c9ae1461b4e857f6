"""Raw head output -> per-image boxes, scores, labels and masks (NMS + prototype masks); shared by val and predict.

Uses Ultralytics' NMS and mask ops (the second half of the door described in :mod:`cellseg_pl.yolo.network`).
"""

from __future__ import annotations

import torch

from cellseg_pl.masks import MaskGroup, MaskWindows, size_groups


def postprocess(
    det: torch.Tensor,
    proto: torch.Tensor,
    num_classes: int,
    conf: float = 0.001,
    iou: float = 0.7,
    max_det: int = 300,
    masks: str | None = "dense",
) -> list[dict]:
    """NMS and mask assembly at the network input resolution.

    Args:
        det: (B, 4 + nc + 32, A) decoded head output (xywh px, class scores, mask coefficients).
        proto: (B, 32, S/4, S/4) mask prototypes.
        num_classes: number of classes.
        conf: minimum score kept.
        iou: NMS IoU threshold.
        max_det: maximum detections per image.
        masks: ``"dense"``: ``masks`` (n, S, S) bool (prototypes upsampled to S, then cropped to the box);
            ``"windows"``: the same masks as :class:`cellseg_pl.masks.MaskWindows` (each kept in a window around its
            box: what validation scores, without n full-size masks); None: no masks (prediction at the original
            size, :func:`to_original`, rebuilds them).

    Returns:
        One dict per image: ``boxes`` (n, 4) xyxy px in the S x S input, ``scores`` (n,), ``labels`` (n,) int64,
        ``coeffs`` (n, 32), and ``masks`` as asked.
    """
    from ultralytics.utils.nms import non_max_suppression

    if masks not in ("dense", "windows", None):
        raise ValueError(f"postprocess: masks must be 'dense', 'windows' or None, not {masks!r}")
    size = (proto.shape[2] * 4, proto.shape[3] * 4)
    outputs = non_max_suppression(det, conf, iou, nc=num_classes, multi_label=False, max_det=max_det)
    results = []
    for i, x in enumerate(outputs):
        boxes, coeffs = x[:, :4], x[:, 6:]
        result = {"boxes": boxes, "scores": x[:, 4], "labels": x[:, 5].long(), "coeffs": coeffs}
        if masks is not None:
            windows = box_mask_windows(proto[i], coeffs, boxes, size)
            result["masks"] = windows if masks == "windows" else windows.dense(coeffs.device)
        results.append(result)
    return results


#: low-resolution pixels kept around a box's footprint: output pixel j reads prototype pixels floor((j + 0.5) / 4 -
#: 0.5) and the next, within [j // 4 - 1, j // 4 + 1], so no pixel inside the box reads beyond its window (where
#: bilinear interpolation would clamp instead of reading the neighbour)
_WINDOW_MARGIN = 1


def box_masks(proto: torch.Tensor, coeffs: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Ultralytics' ``process_mask(..., upsample=True)``: (n, H, W) bool masks, from :func:`box_mask_windows`.

    Args: as :func:`box_mask_windows`.
    """
    return box_mask_windows(proto, coeffs, boxes, size).dense(coeffs.device)


def box_mask_windows(proto: torch.Tensor, coeffs: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]
                     ) -> MaskWindows:  # fmt: skip
    """Ultralytics' ``process_mask(..., upsample=True)`` computed near each box only: the same masks, as windows.

    Ultralytics upsamples every detection's mask to the whole input (``n x H x W`` floats: 300 x 640 x 640 with
    ``max_det`` 300) and then zeroes all but its box. Here each mask is upsampled in a window of prototype pixels
    around its box (windows of similar size share one stack: one gather and one ``interpolate`` per
    :data:`cellseg_pl.masks.GROUP_SIZE` masks) and cropped to the box. Bilinear interpolation by 4 reads the same
    two prototype pixels, with the same weights, for a pixel of the window as for that pixel of the whole image
    (beyond the image's last row or column the window repeats it, as the whole image's interpolation clamps), so the
    masks are identical (a test compares them with Ultralytics' bit for bit); validation with hundreds of
    low-confidence detections per image is several times faster, and holds no full-size masks.

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
    if not n:
        return MaskWindows(size=(height, width), count=0, groups=())
    device = coeffs.device
    low = (coeffs @ proto.float().view(c, -1)).view(n, mh, mw)  # as Ultralytics: one product for all masks
    # crop_mask keeps the pixels x1 <= col < x2 and y1 <= row < y2
    b = boxes.float().ceil().clamp(min=0)
    x0, x1 = b[:, 0].clamp(max=width).long(), b[:, 2].clamp(max=width).long()
    y0, y1 = b[:, 1].clamp(max=height).long(), b[:, 3].clamp(max=height).long()
    empty = (x1 <= x0) | (y1 <= y0)
    # prototype pixels read by pixel j: floor((j + 0.5) / 4 - 0.5) and the next, in [j // 4 - 1, j // 4 + 1]
    lx0 = (torch.div(x0, 4, rounding_mode="floor") - _WINDOW_MARGIN).clamp(min=0)
    ly0 = (torch.div(y0, 4, rounding_mode="floor") - _WINDOW_MARGIN).clamp(min=0)
    lx1 = (torch.div(x1 - 1, 4, rounding_mode="floor") + _WINDOW_MARGIN).clamp(max=mw - 1) + 1
    ly1 = (torch.div(y1 - 1, 4, rounding_mode="floor") + _WINDOW_MARGIN).clamp(max=mh - 1) + 1
    lw = torch.where(empty, 0, lx1 - lx0).clamp(min=0)
    lh = torch.where(empty, 0, ly1 - ly0).clamp(min=0)
    groups = []
    for index in size_groups(lh, lw):
        rows_n, cols_n = max(int(lh[index].max()), 1), max(int(lw[index].max()), 1)
        # beyond the prototypes' last row or column, repeat it (the whole image's interpolation clamps there)
        rows = (ly0[index, None] + torch.arange(rows_n, device=device)).clamp(max=mh - 1)
        cols = (lx0[index, None] + torch.arange(cols_n, device=device)).clamp(max=mw - 1)
        window = low[index[:, None, None], rows[:, :, None], cols[:, None, :]]
        up = F.interpolate(window[:, None], (4 * rows_n, 4 * cols_n), mode="bilinear")[:, 0] > 0
        top, left = 4 * ly0[index], 4 * lx0[index]
        r = top[:, None] + torch.arange(4 * rows_n, device=device)  # image rows of the window
        col = left[:, None] + torch.arange(4 * cols_n, device=device)
        inside_r = (r >= y0[index, None]) & (r < y1[index, None])
        inside_c = (col >= x0[index, None]) & (col < x1[index, None])
        up &= inside_r[:, :, None] & inside_c[:, None, :]
        groups.append(MaskGroup(up, left, top, index))
    return MaskWindows(size=(height, width), count=n, groups=tuple(groups))


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
