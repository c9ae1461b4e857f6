"""One COCO/CVAT annotation -> one YOLO-seg outline and label text (no torch here).

Every annotation goes through a mask (pycocotools, as CVAT rasterizes it): polygons with several parts,
uncompressed RLE (CVAT masks, ``iscrowd: 1``) and compressed RLE all become one outline per instance; disconnected
parts are joined by zero-width bridges (:func:`annotation_outline`). Skip reasons are the keys of
``cellseg_pl.cvat.report.ANNOTATION_SKIPS``; fixes made on the way are appended to ``notes`` (keys of its ``NOTES``).
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from cellseg_pl.cvat.coco import (
    checked_rle,
    coordinates_out_of_range,
    mask_to_yolo_polygons,
    polygons_to_rle,
    rle_to_mask,
    validate_polygon,
)




def _annotation_rle(ann: dict, height: int, width: int, notes: list[str]) -> tuple[dict | None, str | None]:
    """Turn an annotation's segmentation into one compressed RLE at image size.

    Returns:
        ``(rle, None)`` or ``(None, skip reason)``; fixes (clipping, dropped parts) are appended to ``notes``.
    """
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        if not seg:
            return None, "box_only"
        try:
            # validates size and runs before pycocotools sees them (it has no bounds checks)
            return checked_rle(seg, height, width), None
        except (ValueError, TypeError):
            return None, "invalid_rle"
    if seg is None or (isinstance(seg, list) and all(isinstance(p, list) and not p for p in seg)):
        return None, "box_only"  # CVAT writes [] (or no key) for rectangles
    if not isinstance(seg, list):
        return None, "invalid_segmentation"
    parts = [seg] if all(isinstance(v, (int, float)) for v in seg) else seg  # a flat list is one part
    valid = [p for p in parts if validate_polygon(p) is None]
    if any(coordinates_out_of_range(p) for p in parts):
        return None, "coordinates_out_of_range"  # such a vertex makes the whole shape meaningless
    if not valid:
        return None, "invalid_polygon"
    if len(valid) < len(parts):
        notes.append("dropped_parts")
    xy = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in valid])
    if (xy < 0).any() or (xy[:, 0] > width).any() or (xy[:, 1] > height).any():
        notes.append("clipped")
    return polygons_to_rle(valid, height, width), None


def annotation_outline(ann: dict, height: int, width: int, notes: list[str]) -> tuple[np.ndarray | None, str | None]:
    """One annotation -> one YOLO outline ``(N, 2)`` int64 ``(x, y)`` pixel centres, or a skip reason."""
    rle, reason = _annotation_rle(ann, height, width, notes)
    if rle is None:
        return None, reason
    if mask_utils.area(rle) == 0:
        return None, "empty_mask"
    x, y, w, h = (int(v) for v in mask_utils.toBbox(rle))
    crop = rle_to_mask(rle, height, width, box=(x, y, w, h))
    parts = mask_to_yolo_polygons(crop)
    if not parts:
        return None, "too_small"
    if len(parts) > 1:
        notes.append("multi_part")
    return (_join_parts(parts) + (x, y)).astype(np.int64), None


def _join_parts(parts: list[np.ndarray]) -> np.ndarray:
    """Join outlines into one with zero-width bridges, each part at its vertex closest to the outline so far.

    Args:
        parts: ``(N_i, 2)`` outlines, largest first.

    Returns:
        ``(sum N_i + 2 * (len(parts) - 1), 2)``: the first outline with each further one spliced in as
        ``... a_i, b_j, b_j+1, ..., b_j-1, b_j, a_i ...``.
    """
    joined = parts[0]
    for part in parts[1:]:
        d = ((joined[:, None, :] - part[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        loop = np.roll(part, -j, axis=0)
        joined = np.concatenate([joined[: i + 1], loop, loop[:1], joined[i:]])
    return joined


def normalized_text(points: np.ndarray, width: int, height: int) -> str:
    """Format integer pixel vertices ``(N, 2)`` as ``x1 y1 x2 y2 ...`` divided by ``(width, height)``.

    Each value is the smallest 6-decimal number ``v`` with ``v * size >= pixel + 0.01``: readers that
    truncate (Ultralytics reads float32 and calls ``polygon2mask`` with ``int32`` casts) and readers that
    round both recover the pixel for images up to 100,000 px wide.
    """
    size = np.array([width, height], dtype=np.int64)
    pix = np.clip(points.astype(np.int64), 0, size - 1)
    # exact integer ceil((pix + 0.01) / size * 1e6); the 0.01 px covers float32 round-off in readers
    k = -((-(pix * 100 + 1) * 1_000_000) // (size * 100))
    return " ".join(f"{v // 1_000_000}.{v % 1_000_000:06d}" for v in k.reshape(-1).tolist())
