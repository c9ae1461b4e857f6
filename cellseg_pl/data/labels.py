"""YOLO-seg label files: where an image's label file is, its text, and which of its lines are usable.

A label file holds one line per instance, ``class x1 y1 x2 y2 ...`` with coordinates normalized to the image size.
:func:`parse_label_line` is the one place that decides which lines are usable: training
(:func:`cellseg_pl.data.dataset.read_label`) and the check before training (:mod:`cellseg_pl.data.scan`) both call it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

def label_path_for(image: Path) -> Path:
    """The label file of an image: ``.../images/...x.png`` -> ``.../labels/...x.txt`` (Ultralytics' rule)."""
    parts = list(image.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


#: Why :func:`parse_label_line` drops a line (the keys of :func:`cellseg_pl.data.dataset.read_label`'s ``skipped`` counts).
NOT_A_NUMBER = "not a number"
UNKNOWN_CLASS = "unknown class index"
ODD_COUNT = "odd number of coordinates"
TOO_FEW_POINTS = "fewer than 3 points"


class LabelLine(NamedTuple):
    """One parsed label line.

    Attributes:
        cls: class index as written (``nan`` when not a number).
        polygon: (k, 2) float32 normalized xy, clipped to [0, 1]; None when the line is dropped.
        problem: None for a usable line, else why it is dropped (``NOT_A_NUMBER``, ``UNKNOWN_CLASS``, ...).
        outside: how far the furthest coordinate lies outside [0, 1] before clipping (0 inside).
    """

    cls: float
    polygon: np.ndarray | None
    problem: str | None
    outside: float


def parse_label_line(line: str, num_classes: int) -> LabelLine | None:
    """Parse one YOLO-seg label line ``class x1 y1 x2 y2 ...`` (normalized); None for a blank line.

    The one place that decides which lines are usable: :func:`cellseg_pl.data.dataset.read_label` (training) and
    :mod:`cellseg_pl.data.scan` (the check before training) both call it. A class must be an integer in
    ``0..num_classes-1``; NaN/Inf coordinates count as not a number.
    """
    values = line.split()
    if not values:
        return None
    try:
        cls = float(values[0])
        coords = np.asarray(values[1:], dtype=np.float64)
    except ValueError:
        return LabelLine(float("nan"), None, NOT_A_NUMBER, 0.0)
    if not np.isfinite(cls) or not np.isfinite(coords).all():
        return LabelLine(cls, None, NOT_A_NUMBER, 0.0)
    if cls != int(cls) or not 0 <= cls < num_classes:
        return LabelLine(cls, None, UNKNOWN_CLASS, 0.0)
    if coords.size % 2:
        return LabelLine(cls, None, ODD_COUNT, 0.0)
    if coords.size < 6:
        return LabelLine(cls, None, TOO_FEW_POINTS, 0.0)
    outside = max(0.0, -float(coords.min()), float(coords.max()) - 1.0)
    return LabelLine(cls, coords.reshape(-1, 2).clip(0.0, 1.0).astype(np.float32), None, outside)


def read_label_text(path: Path) -> str | None:
    """The text of a label file, None when it does not exist (a background image).

    Undecodable bytes become U+FFFD, so such lines are dropped as not a number instead of failing.
    """
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None


def class_names_of(names: Any) -> dict[int, str]:
    """Class index -> name, from any form a data set or a model holds them in: a list, a mapping with int or str
    keys, or nothing (``{}``).

    Raises:
        TypeError, ValueError: ``names`` is none of these.
    """
    if not names:
        return {}
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    return {int(k): str(v) for k, v in dict(names).items()}
