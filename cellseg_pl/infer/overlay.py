"""``predict --save-overlays``: an image with its predicted outlines and per-class counts (OpenCV only, no fonts to
download)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from cellseg_pl.files import write_atomic

#: Outline colour (RGB) of predictions, also in the validation pictures of a run.
PRED_COLOR = (0, 255, 0)
#: Outline colours (RGB) by class index (cycled); class 0 is ``PRED_COLOR``.
CLASS_COLORS = (PRED_COLOR, (255, 160, 0), (255, 0, 255), (0, 255, 255), (0, 128, 255), (255, 255, 0))
#: Overlay formats kept as they are; other images (TIFF, BMP...) get a ``.png`` overlay.
OVERLAY_SUFFIXES = {".png", ".jpg", ".jpeg"}


def draw_overlay(
    image: np.ndarray, outlines: list[tuple[int, np.ndarray]], names: dict[int, str], dropped: list[np.ndarray]
) -> np.ndarray:
    """Draw predicted outlines and per-class counts on an RGB image (OpenCV only, no fonts to download).

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        outlines: ``(class index, (K, 2) polygon in continuous image px)`` per written object.
        names: class index -> name.
        dropped: outlines of detections dropped by ``--min-area``, drawn thin in red.

    Returns:
        ``(H, W, 3)`` uint8 BGR, ready for ``cv2.imencode``.
    """
    out = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    h, w = out.shape[:2]
    thick = max(1, round(max(h, w) / 1000))

    def fixed(pts: np.ndarray) -> np.ndarray:  # continuous px -> pixel-centre indices, 4 fractional bits
        return np.round((pts - 0.5) * 16).astype(np.int32).reshape(-1, 1, 2)

    for pts in dropped:
        cv2.polylines(out, [fixed(pts)], True, (0, 0, 255), 1, cv2.LINE_AA, shift=4)
    counts = Counter(label for label, _ in outlines)
    for label, pts in outlines:
        color = CLASS_COLORS[label % len(CLASS_COLORS)][::-1]
        cv2.polylines(out, [fixed(pts)], True, color, thick, cv2.LINE_AA, shift=4)
    lines = [f"{names[k]}: {counts[k]}" for k in sorted(names)]
    if dropped:
        lines.append(f"dropped (min area): {len(dropped)}")
    scale = max(0.4, max(h, w) / 1400)
    text_thick = max(1, round(scale * 2))
    y = 0
    for text in lines:
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, text_thick)
        cv2.rectangle(out, (0, y), (tw + 8, y + th + base + 8), (0, 0, 0), -1)
        white = (255, 255, 255)
        cv2.putText(out, text, (4, y + th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, white, text_thick, cv2.LINE_AA)
        y += th + base + 8
    return out


def write_overlay(path: str | Path, bgr: np.ndarray) -> Path:
    """Write an overlay of :func:`draw_overlay` as ``path`` (PNG and JPEG keep their suffix, others become ``.png``)."""
    path = Path(path)
    suffix = path.suffix.lower() if path.suffix.lower() in OVERLAY_SUFFIXES else ".png"
    path = path.with_suffix(suffix)
    ok, data = cv2.imencode(suffix, bgr)
    if not ok:
        raise OSError(f"cannot encode an overlay for {path}")
    write_atomic(path, data.tobytes())
    return path
