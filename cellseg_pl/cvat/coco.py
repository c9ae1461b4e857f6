"""COCO JSON and polygon <-> mask <-> RLE conversions (no torch here); CVAT zips: :mod:`cellseg_pl.cvat.archive`.

Two polygon conventions live in this project; every function says which one it speaks:

* **COCO / CVAT** (``polygons_to_mask``, ``mask_to_polygons``): flat ``[x1, y1, x2, y2, ...]`` lists in
  continuous pixel coordinates, pixel ``(r, c)`` covers ``[c, c+1] x [r, r+1]``; a pixel belongs to the
  shape when its centre ``(c+0.5, r+0.5)`` is inside (pycocotools' rasterizer, which CVAT and COCO tools use).
* **YOLO** (``mask_to_yolo_polygons``): ``(N, 2)`` vertices on pixel centres, ``(x, y) = (c, r)``, filled with
  ``cv2.fillPoly`` which also paints the pixels the outline passes through (Ultralytics' ``polygon2mask``).

Masks are ``bool`` arrays of shape ``(H, W)``. RLE dicts are COCO's ``{"size": [H, W], "counts": ...}``
(column-major runs, starting with a run of zeros).

Example:
    >>> m = np.zeros((40, 40), bool); m[10:20, 5:15] = True
    >>> bool((polygons_to_mask(mask_to_polygons(m, tolerance=0), 40, 40) == m).all())  # exact unsimplified
    True
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from cellseg_pl.errors import ConvertError

logger = logging.getLogger(__name__)

__all__ = [
    "ConvertError",
    "build_coco",
    "checked_rle",
    "coordinates_out_of_range",
    "mask_to_polygons",
    "mask_to_yolo_polygons",
    "polygons_to_mask",
    "rle_to_mask",
    "validate_polygon",
]


#: Examples of each skip reason kept for the tools' summaries.
MAX_EXAMPLES = 3
#: Largest polygon coordinate accepted, in pixels: far-away vertices are clipped to the image, which stays exact
#: to ~1e-4 px from here; beyond it (e.g. 1e308) the arithmetic overflows.
MAX_COORDINATE = 1e12


def count_reason(kind: Counter, examples: dict[str, list[str]], reason: str, example: str, n: int = 1) -> None:
    """Add ``n`` to ``kind[reason]`` and keep the first few distinct examples (the tools' summaries)."""
    kind[reason] += n
    shown = examples.setdefault(reason, [])
    if len(shown) < MAX_EXAMPLES and example not in shown:
        shown.append(example)


def reason_lines(groups: list[tuple[str, Counter, dict[str, str]]], examples: dict[str, list[str]]) -> list[str]:
    """Summary lines ``title: total`` then ``  reason: n - meaning (e.g. ...)`` for each ``(title, counts, meanings)``."""
    lines = []
    for title, kind, meaning in groups:
        if sum(kind.values()):
            lines.append(f"{title}: {sum(kind.values())}")
        for reason, n in sorted(kind.items()):
            example = "; ".join(examples.get(reason, []))
            lines.append(f"  {reason}: {n} - {meaning[reason]}" + (f" (e.g. {example})" if example else ""))
    return lines


# --------------------------------------------------------------------------------------------------
# polygons, masks, RLE
# --------------------------------------------------------------------------------------------------


def validate_polygon(polygon: Any) -> str | None:
    """Return why ``polygon`` is not a usable COCO polygon part, or ``None`` when it is.

    A part must be a flat list of at least 6 finite numbers (3 points) with an even count.
    """
    if not isinstance(polygon, (list, tuple)):
        return f"polygon part is a {type(polygon).__name__}, not a list of numbers"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon):
        return "polygon part holds non-numeric values"
    if len(polygon) % 2:
        return f"polygon part has an odd number of coordinates ({len(polygon)})"
    if len(polygon) < 6:
        return f"polygon part has {len(polygon) // 2} points (needs >= 3)"
    if not np.isfinite(np.asarray(polygon, dtype=np.float64)).all():
        return "polygon part holds NaN or infinite coordinates"
    if coordinates_out_of_range(polygon):
        return f"polygon part holds coordinates beyond +-{MAX_COORDINATE:g} px"
    return None


def coordinates_out_of_range(polygon: Any) -> bool:
    """Whether a list of finite numbers has one beyond :data:`MAX_COORDINATE` (pixels, either sign); else False."""
    if not isinstance(polygon, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon
    ):
        return False
    xy = np.abs(np.asarray(polygon, dtype=np.float64))
    return bool(np.isfinite(xy).all() and xy.max(initial=0.0) > MAX_COORDINATE)


def _clip_to_box(points: np.ndarray, lo: tuple[float, float], hi: tuple[float, float]) -> np.ndarray:
    """Clip a polygon ``(N, 2)`` to the box ``lo..hi`` (Sutherland-Hodgman; concave parts stay exact inside)."""
    for axis in (0, 1):
        for bound, below in ((lo[axis], False), (hi[axis], True)):
            if not len(points):
                return points
            inside = points[:, axis] <= bound if below else points[:, axis] >= bound
            out = []
            for p, q, p_in, q_in in zip(points, np.roll(points, 1, 0), inside, np.roll(inside, 1)):
                if p_in != q_in:  # the edge q -> p crosses the bound
                    out.append(q + (bound - q[axis]) / (p[axis] - q[axis]) * (p - q))
                if p_in:
                    out.append(p)
            points = np.asarray(out, dtype=np.float64).reshape(-1, 2)
    return points


def polygons_to_rle(polygons: list[list[float]], height: int, width: int) -> dict:
    """Rasterize COCO polygons (all parts unioned) into one compressed RLE of size ``(height, width)``.

    Parts must pass :func:`validate_polygon`. Parts reaching beyond the image are first clipped to it
    (plus a 1 px margin, so no pixel changes): pycocotools allocates memory along every edge and
    overflows on far-away coordinates.
    """
    parts = []
    for part in polygons:
        xy = np.asarray(part, dtype=np.float64).reshape(-1, 2)
        if (xy < -1).any() or (xy[:, 0] > width + 1).any() or (xy[:, 1] > height + 1).any():
            xy = _clip_to_box(xy, (-1.0, -1.0), (width + 1.0, height + 1.0))
        if len(xy) >= 3:
            parts.append(xy.reshape(-1).tolist())
    if not parts:
        return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
    rles = mask_utils.frPyObjects(parts, height, width)
    return mask_utils.merge(rles) if len(rles) != 1 else rles[0]


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Rasterize COCO polygons the way pycocotools, COCO tools and CVAT do.

    Args:
        polygons: flat ``[x1, y1, x2, y2, ...]`` parts in continuous pixel coordinates (the union is taken).
        height, width: mask size in pixels.

    Returns:
        ``bool`` array ``(height, width)``; a pixel is set when its centre lies inside a part.
    """
    if not polygons:
        return np.zeros((height, width), dtype=bool)
    for part in polygons:
        problem = validate_polygon(part)
        if problem:
            raise ValueError(problem)
    return rle_to_mask(polygons_to_rle(polygons, height, width), height, width)


def _counts_from_string(counts: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string (LEB128-like, 5 bits per char, delta-coded) into run lengths."""
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    runs: list[int] = []
    pos = 0
    while pos < len(data):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(data):
                raise ValueError("compressed RLE string ends in the middle of a number")
            c = data[pos] - 48
            if not 0 <= c < 64:
                raise ValueError(f"compressed RLE string holds an invalid character {chr(data[pos])!r}")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _checked_runs(segmentation: dict, height: int, width: int) -> list[int]:
    """Validate an RLE dict against the image size and return its run lengths (zeros first).

    pycocotools decodes without bounds checks, so the runs are checked here first: a bad RLE must become
    a clear ValueError, never a crash or a garbage mask.
    """
    if not isinstance(segmentation, dict):
        raise ValueError(f"RLE is a {type(segmentation).__name__}, expected an object with size and counts")
    size = segmentation.get("size")
    if not (
        isinstance(size, (list, tuple))
        and len(size) == 2
        and all(isinstance(v, int) for v in size)
        and list(size) == [height, width]
    ):
        raise ValueError(f"RLE size {size} does not match the image size [{height}, {width}] (H, W)")
    counts = segmentation.get("counts")
    if isinstance(counts, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
            raise ValueError("uncompressed RLE counts must be integers")
        runs = list(counts)
    elif isinstance(counts, (str, bytes)):
        runs = _counts_from_string(counts)
    else:
        raise ValueError(f"RLE counts is a {type(counts).__name__}, expected a list or a string")
    if any(v < 0 for v in runs):
        raise ValueError("RLE has negative run lengths")
    if sum(runs) != height * width:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels, expected H*W = {height * width}")
    return runs


def checked_rle(segmentation: dict, height: int, width: int) -> dict:
    """Validate a COCO RLE (uncompressed or compressed) and return pycocotools' compressed form.

    Returns:
        ``{"size": [H, W], "counts": bytes}`` for ``mask_utils.area``/``toBbox``/``merge``.

    Raises:
        ValueError: the size differs from ``(height, width)`` or the runs are malformed.
    """
    runs = _checked_runs(segmentation, height, width)
    counts = segmentation["counts"]
    if isinstance(counts, (list, tuple)):
        return mask_utils.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    return {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def rle_to_mask(
    segmentation: dict, height: int, width: int, box: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """Decode a COCO RLE, uncompressed (``counts`` list, CVAT masks) or compressed (``counts`` str/bytes).

    Decoded here with numpy (same result as ``pycocotools.mask.decode``, which warns under numpy 2).

    Args:
        segmentation: ``{"size": [H, W], "counts": ...}``.
        height, width: the image size the RLE must have.
        box: optional ``(x, y, w, h)`` integer pixel box inside the image: decode only that crop
            (cheap for one cell in a large image).

    Raises:
        ValueError: the size differs from ``(height, width)`` or the runs do not cover ``height * width`` pixels.

    Returns:
        ``bool`` array ``(height, width)``, or ``(h, w)`` with ``box``.
    """
    runs = np.asarray(_checked_runs(segmentation, height, width), dtype=np.int64)
    x, y, w, h = box if box is not None else (0, 0, width, height)
    if not (0 <= x and 0 <= y and 0 <= w and 0 <= h and x + w <= width and y + h <= height):
        raise ValueError(f"box {box} is not inside the {width}x{height} image")
    start, stop = x * height, (x + w) * height  # the columns of the box, in column-major order
    ends = np.cumsum(runs)
    lengths = np.minimum(ends, stop) - np.maximum(ends - runs, start)
    keep = lengths > 0
    values = (np.arange(len(runs)) % 2 == 1)[keep]  # runs alternate 0, 1, 0, ...
    columns = np.repeat(values, lengths[keep]).reshape(w, height)
    return np.ascontiguousarray(columns[:, y : y + h].T)


def _crack_loops(mask: np.ndarray) -> list[np.ndarray]:
    """Trace the pixel-edge ("crack") boundary of a mask into closed loops of unit edges.

    Pixel ``(r, c)`` covers ``[c, c+1] x [r, r+1]``. Every edge between a set and an unset pixel is directed
    so the set pixel is on its left when drawn with y pointing down; at a corner where two set pixels touch
    diagonally the loop turns right, so diagonal neighbours stay one part (8-connectivity, like
    ``cv2.findContours``).

    Returns:
        Loops as ``(K, 2, 2)`` int arrays of ``(start, end)`` corners ``(x, y)``, in traversal order.
        Outer boundaries have negative shoelace area, holes positive.
    """
    p = np.pad(mask.astype(bool), 1)
    fg = p[1:-1, 1:-1]
    r, c = np.nonzero(fg & ~p[:-2, 1:-1])  # top edges, walked right to left
    segs = [np.stack([c + 1, r, c, r], 1)]
    r, c = np.nonzero(fg & ~p[2:, 1:-1])  # bottom edges, left to right
    segs.append(np.stack([c, r + 1, c + 1, r + 1], 1))
    r, c = np.nonzero(fg & ~p[1:-1, :-2])  # left edges, downwards
    segs.append(np.stack([c, r, c, r + 1], 1))
    r, c = np.nonzero(fg & ~p[1:-1, 2:])  # right edges, upwards
    segs.append(np.stack([c + 1, r + 1, c + 1, r], 1))
    edges = np.concatenate(segs).reshape(-1, 2, 2)

    outgoing: dict[tuple[int, int], list[int]] = {}
    for i, (x, y) in enumerate(edges[:, 0].tolist()):
        outgoing.setdefault((x, y), []).append(i)
    used = np.zeros(len(edges), dtype=bool)
    loops = []
    for first in range(len(edges)):
        order, i = [], first
        while not used[i]:  # each edge has exactly one successor, so every walk closes on itself
            used[i] = True
            order.append(i)
            i = _next_edge(edges, i, outgoing[tuple(edges[i, 1].tolist())])
        if order:
            loops.append(edges[order])
    return loops


def _next_edge(edges: np.ndarray, i: int, candidates: list[int]) -> int:
    """The edge after edge ``i``: the only one leaving its end corner, or at a diagonal touch (two leave)
    the right turn, which keeps the two diagonal pixels in one loop (8-connectivity)."""
    if len(candidates) == 1:
        return candidates[0]
    d_in = edges[i, 1] - edges[i, 0]
    for j in candidates:
        d_out = edges[j, 1] - edges[j, 0]
        if d_in[0] * d_out[1] - d_in[1] * d_out[0] > 0:  # clockwise on screen (y down) = right turn
            return j
    raise AssertionError("a pixel-edge corner has two outgoing edges but no right turn")


def _shoelace(points: np.ndarray) -> float:
    """Signed area of a closed ``(N, 2)`` polygon (negative for our outer loops)."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _bbox_crop(mask: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Crop a mask to its set pixels; returns ``(crop, x0, y0)`` (empty crop when nothing is set)."""
    rows, cols = np.any(mask, 1), np.any(mask, 0)
    if not rows.any():
        return mask[:0, :0], 0, 0
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(cols)[[0, -1]]
    return mask[y0 : y1 + 1, x0 : x1 + 1], int(x0), int(y0)


def mask_to_polygons(mask: np.ndarray, tolerance: float = 0.5) -> list[list[float]]:
    """Outline a mask as COCO/CVAT polygons (continuous coordinates, pixel ``(r, c)`` = ``[c,c+1]x[r,r+1]``).

    The outline follows the pixel edges: its vertices are the midpoints of the boundary pixel edges
    (marching squares at level 0.5), so it cuts each corner by at most 0.35 px and keeps the area within
    half a pixel; a polygon through boundary-pixel centres would lose half the boundary ring instead
    (IoU ~0.92 on a 400 px nucleus). It is then simplified with Douglas-Peucker (``cv2.approxPolyDP``).

    Holes are filled: COCO polygon parts are unioned by every reader, so a hole cannot be expressed;
    cells are solid. Each 8-connected part gives one polygon; parts left with < 3 points are dropped.

    Args:
        mask: ``(H, W)`` bool or 0/1 array.
        tolerance: largest distance in pixels the simplified outline may stray from the traced one
            (0 keeps every vertex).

    Returns:
        One flat ``[x1, y1, x2, y2, ...]`` list (floats, pixels) per part, largest part first.
    """
    crop, x0, y0 = _bbox_crop(np.asarray(mask).astype(bool))
    polygons = []
    for loop in _crack_loops(crop):
        mid = loop.mean(axis=1)  # crack midpoints, (K, 2) x, y in crop coordinates
        if _shoelace(mid) >= 0:
            continue  # a hole (see docstring)
        pts = mid + (x0, y0)
        if tolerance > 0:
            pts = cv2.approxPolyDP(pts.astype(np.float32).reshape(-1, 1, 2), tolerance, True).reshape(-1, 2)
        if len(pts) >= 3:
            polygons.append(pts.astype(np.float64))
    polygons.sort(key=lambda p: _shoelace(p))  # most negative = largest outer area first
    return [[round(float(v), 3) for v in p.reshape(-1)] for p in polygons]


def mask_to_yolo_polygons(mask: np.ndarray, tolerance: float = 0.5) -> list[np.ndarray]:
    """Outline a mask in the YOLO convention: vertices on boundary pixel centres, for ``cv2.fillPoly``.

    ``cv2.fillPoly`` (Ultralytics' ``polygon2mask``) paints the pixels its outline passes through, so a
    contour through the centres of the outermost pixels reproduces the mask; Douglas-Peucker with
    ``tolerance`` px then drops near-collinear vertices. Holes are filled (external contours only), each
    8-connected part gives one polygon, parts with < 3 vertices (specks, 1 px lines) are dropped.

    Args:
        mask: ``(H, W)`` bool or 0/1 array.
        tolerance: largest distance in pixels the simplified outline may stray from the traced one.

    Returns:
        ``(N, 2)`` float64 arrays of ``(x, y)`` pixel coordinates (``x`` = column), largest part first.
        Divide by ``(W, H)`` to get YOLO's normalized coordinates.
    """
    crop, x0, y0 = _bbox_crop(np.asarray(mask).astype(bool))
    if crop.size == 0:
        return []
    contours, _ = cv2.findContours(crop.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    polygons = []
    for contour in contours:
        if tolerance > 0:
            contour = cv2.approxPolyDP(contour, tolerance, True)
        pts = contour.reshape(-1, 2).astype(np.float64) + (x0, y0)
        if len(pts) >= 3:
            polygons.append(pts)
    polygons.sort(key=lambda p: -abs(_shoelace(p)))
    return polygons


def build_coco(images: list[dict], annotations: list[dict], categories: list[dict]) -> dict:
    """Assemble a COCO dict CVAT imports (``info``/``licenses`` present, ids as given).

    Args:
        images: ``{"id", "file_name", "height", "width"}`` dicts.
        annotations: ``{"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}`` dicts.
        categories: ``{"id", "name"}`` dicts (CVAT matches them by name).
    """
    return {
        "info": {"description": "cellseg_pl"},
        "licenses": [],
        "categories": [{"supercategory": "", **c} for c in categories],
        "images": list(images),
        "annotations": list(annotations),
    }
