"""The inference settings every command that predicts takes (``predict``, ``select``, ``evaluate``), said once.

:class:`InferenceOptions` is the one declaration of the confidence, NMS IoU, detection limit, droplet area, tiling
and batch settings: the tools' flags and defaults are generated from it, ``predict`` in LightningCLI's style takes the
same flags, and the LightningModule's validation settings default to its values.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch

from cellseg_pl.errors import PredictError

#: ``--tile`` values.
TILE_MODES = ("auto", "on", "off")


def parse_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``0`` (= ``cuda:0``), ``cuda``, ``cuda:1``, ``mps`` -> a usable ``torch.device``.

    Raises:
        PredictError: not a device name, or a GPU that is not there.
    """
    name = str(device).strip().lower()
    if name.isdigit():
        name = f"cuda:{name}"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise PredictError("--device", f"{device!r} is not a device", "use cpu, 0 or cuda:0") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PredictError("--device", f"{device} asks for a GPU but CUDA is not available", "use --device cpu")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise PredictError("--device", f"{device}: there are {torch.cuda.device_count()} GPUs", "use --device 0")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise PredictError("--device", "mps is not available here", "use --device cpu")
    elif dev.type != "cpu":
        raise PredictError("--device", f"{device!r} is not supported", "use cpu, 0 or cuda:0")
    return dev


@dataclass
class InferenceOptions:
    """The network, NMS and tiling settings of ``predict`` and ``select``, said once: both take them as keyword
    arguments and flags of these names and defaults. Checked when built (raises :class:`PredictError` naming the flag).

    Attributes:
        device: cpu, 0 (= cuda:0) or cuda:N.
        conf: minimum score of a detection kept, 0..1.
        iou: NMS IoU threshold, 0..1.
        imgsz: network input side in px (default: the one stored in the weights, else 640).
        max_det: most detections per image, or per window of a tiled image.
        min_area: drop detections smaller than this many original pixels, e.g. 500 for water droplets (0: keep all).
        tile: predict large images on overlapping imgsz windows at full resolution: auto (a side > 2 x imgsz),
            on (a side > imgsz) or off (resize to imgsz).
        tile_overlap: overlap of neighbouring windows in px, larger than the biggest object (default imgsz/4).
        batch_size: network inputs (images or windows) per forward pass.
    """

    device: str = "cpu"
    conf: float = 0.25
    iou: float = 0.7
    imgsz: int | None = None
    max_det: int = 300
    min_area: float = 0
    tile: Literal["auto", "on", "off"] = "auto"
    tile_overlap: int | None = None
    batch_size: int = 8

    @classmethod
    def of(cls, options: dict) -> "InferenceOptions":
        """The options a library caller passed as keywords, checked (``device`` may be a ``torch.device``)."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unexpected inference option(s) {', '.join(unknown)}; known: "
                            f"{', '.join(f.name for f in fields(cls))}")
        return cls(**{**options, **({"device": str(options["device"])} if "device" in options else {})})

    def __post_init__(self) -> None:
        if not 0.0 <= self.conf <= 1.0:
            raise PredictError("--conf", f"{self.conf} is not between 0 and 1", "pass e.g. 0.25")
        if not 0.0 <= self.iou <= 1.0:
            raise PredictError("--iou", f"{self.iou} is not between 0 and 1", "pass e.g. 0.7")
        if self.max_det < 1:
            raise PredictError("--max-det", f"{self.max_det} is not a positive number", "pass e.g. 300")
        if self.min_area < 0:
            raise PredictError("--min-area", f"{self.min_area} is negative", "pass 0 to keep everything, or e.g. 500")
        if self.tile not in TILE_MODES:
            raise PredictError("--tile", f"{self.tile!r} is not one of {', '.join(TILE_MODES)}", "pass e.g. auto")
        if self.tile_overlap is not None and self.tile_overlap < 0:
            raise PredictError("--tile-overlap", f"{self.tile_overlap} is negative", "pass e.g. a quarter of --imgsz")
        if self.batch_size < 1:
            raise PredictError("--batch-size", f"{self.batch_size} is not a positive number", "pass e.g. 8")
