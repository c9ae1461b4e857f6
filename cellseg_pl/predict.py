"""Weights + a folder of images -> COCO 1.0 JSON that CVAT imports as annotations (step 1 of the active-learning cycle).

What is written (``predictions.json``):

* ``images``: one record per readable image, ``file_name`` relative to the images folder (sub-folders kept, ``/``
  separators: CVAT matches frames by this path, extension ignored), real ``width``/``height``, ids from 1.
* ``categories``: ``{"id": 1 + class index, "name": class name}`` from the weights (CVAT matches labels by name).
* ``annotations``: one per detected object, ``iscrowd: 0`` with a one-part polygon ``segmentation`` at the
  **original** image resolution: masks are rebuilt from the prototypes at full size
  (:func:`cellseg_pl.postprocess.to_original`), then outlined with :func:`cellseg_pl.coco.mask_to_polygons`, which
  CVAT rasterizes back to the same pixels. ``area`` is the pixel count of that rasterized polygon, ``bbox`` the
  polygon's ``[x, y, w, h]``, ``score`` the confidence (also in ``attributes.score``, which CVAT keeps when the label
  has a number attribute ``score``). An object whose mask has several disconnected parts keeps its largest part
  (one CVAT shape per object), and ``--min-area`` drops objects below that many pixels (the lab's droplet rule:
  area < 500 px is a water droplet).

Large images are predicted at full resolution on overlapping ``imgsz`` x ``imgsz`` windows (``tile``: ``auto`` tiles
an image when a side exceeds :data:`AUTO_TILE_FACTOR` x ``imgsz``, ``on`` whenever a side exceeds ``imgsz``, ``off``
never: the whole image is resized to ``imgsz`` as in training). Tiling assumes the model was trained at about the
pixel scale of these images (training images about ``imgsz`` in size); a model trained on large images shrunk to
``imgsz`` wants ``--tile off``. Windows overlap by ``tile_overlap`` px, and detections are merged across seams by
:func:`merge_windows`:

1. a detection whose mask comes within :data:`EDGE_MARGIN` px of an *inner* window edge (one that is not the image
   border) is *cut*: the window may see only part of the object;
2. whole detections are taken first, best score first; a whole detection from another window with mask
   IoU >= :data:`SAME_OBJECT_IOU` is the same object seen twice and is dropped;
3. a cut detection covered for >= :data:`SAME_OBJECT_COVER` of the smaller mask by a kept whole detection is dropped
   (a neighbouring window saw the object whole); covered likewise by a kept *cut* detection of another window, the
   two are joined (an object too large for the overlap, seen whole by no window); otherwise it is kept.

An object smaller than the overlap (minus 2 x :data:`EDGE_MARGIN`) always lies whole in some window, so with the
default overlap (``imgsz / 4``: 160 px at 640) rule 3 only merges unusually large objects. Merging ignores classes;
``max_det`` counts per network input (an image, or one window of a tiled image, which holds far fewer objects).

Example:
    >>> from cellseg_pl.predict import predict_folder
    >>> summary = predict_folder("best.ckpt", "images/subset_200", "predictions.json", min_area=500)  # doctest: +SKIP
    >>> print(summary.format())  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn

from cellseg_pl.coco import CocoError, build_coco, count_reason, mask_to_polygons, polygons_to_mask, reason_lines
from cellseg_pl.dataset import IMAGE_SUFFIXES, DatasetError, ImageTooLargeError, letterbox, read_image
from cellseg_pl.model import ModelError, load_weights, split_outputs
from cellseg_pl.postprocess import postprocess, to_original

log = logging.getLogger(__name__)

#: ``--tile`` values.
TILE_MODES = ("auto", "on", "off")
#: ``--tile auto`` tiles an image when a side is larger than this many ``imgsz``.
AUTO_TILE_FACTOR = 2.0
#: A mask this close (px) to an inner window edge may be cut by it.
EDGE_MARGIN = 2
#: Two whole detections from different windows with at least this mask IoU are one object.
SAME_OBJECT_IOU = 0.5
#: A cut detection covered for at least this share of the smaller mask by another detection is the same object.
SAME_OBJECT_COVER = 0.5
#: Default input side when the weights do not store their training ``imgsz``.
DEFAULT_IMGSZ = 640
#: Largest number of full-size mask pixels assembled at once (bounds memory on large untiled images).
_MASK_PIXEL_BUDGET = 1 << 27
#: Why a detection or an image is not in the JSON, as printed in the summary.
DROPPED = {
    "min_area": "area below --min-area (droplets)",
    "no_outline": "mask too small or thin for a polygon of >= 3 points",
}
IMAGE_SKIPS = {
    "unreadable": "cannot be decoded (corrupt or not an image)",
    "too_large": "over OpenCV's pixel limit (split it into tiles, or raise CV_IO_MAX_IMAGE_PIXELS)",
}
NOTES = {
    "parts_dropped": "objects whose mask had several parts: the largest part was kept",
}
_OVERLAY_SUFFIXES = {".png", ".jpg", ".jpeg"}
_PALETTE = ((0, 255, 0), (255, 160, 0), (255, 0, 255), (0, 255, 255), (0, 128, 255), (255, 255, 0))


class PredictError(CocoError):
    """A problem with an argument or input, worded ``"<flag or file>: <problem>; <fix>"``."""


# --------------------------------------------------------------------------------------------------
# detections and their merging across windows
# --------------------------------------------------------------------------------------------------


@dataclass
class Instance:
    """One detected object at the original image resolution.

    Attributes:
        score: confidence, 0..1.
        label: 0-based class index.
        x0, y0: image pixel of the top-left corner of ``mask``.
        mask: ``(h, w)`` bool crop of the object's mask, cropped to its set pixels.
        cut: the mask touches an inner edge of the window it was found in (see the module docstring).
        window: index of that window within its image (0 when the image is not tiled).
    """

    score: float
    label: int
    x0: int
    y0: int
    mask: np.ndarray
    cut: bool = False
    window: int = 0

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the mask's pixels, x1/y1 exclusive."""
        return self.x0, self.y0, self.x0 + self.mask.shape[1], self.y0 + self.mask.shape[0]

    @property
    def area(self) -> int:
        """Mask pixels."""
        return int(self.mask.sum())

    def full_mask(self, height: int, width: int) -> np.ndarray:
        """The mask pasted into an ``(height, width)`` bool image."""
        out = np.zeros((height, width), bool)
        out[self.y0 : self.y0 + self.mask.shape[0], self.x0 : self.x0 + self.mask.shape[1]] = self.mask
        return out


def _intersection(a: Instance, b: Instance) -> int:
    """Pixels set in both masks."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
    if x0 >= x1 or y0 >= y1:
        return 0
    ma = a.mask[y0 - ay0 : y1 - ay0, x0 - ax0 : x1 - ax0]
    mb = b.mask[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
    return int(np.count_nonzero(ma & mb))


def _union(a: Instance, b: Instance) -> Instance:
    """One instance covering both masks (best score, ``a``'s class and window)."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
    x0, y0, x1, y1 = min(ax0, bx0), min(ay0, by0), max(ax1, bx1), max(ay1, by1)
    mask = np.zeros((y1 - y0, x1 - x0), bool)
    mask[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] |= a.mask
    mask[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0] |= b.mask
    return Instance(max(a.score, b.score), a.label, x0, y0, mask, cut=a.cut or b.cut, window=a.window)


def merge_windows(instances: list[Instance]) -> list[Instance]:
    """Merge the detections of the overlapping windows of one image (rules in the module docstring).

    Args:
        instances: detections of all windows, in image coordinates.

    Returns:
        The merged detections, best score first.
    """
    order = sorted(instances, key=lambda d: (d.cut, -d.score))
    kept: list[Instance] = []
    boxes = np.zeros((len(order), 4), np.int64)
    areas: list[int] = []
    for d in order:
        area = d.area
        if d.cut and area == 0:  # a sliver at a seam whose mask vanished; the object is seen by a neighbour
            continue
        x0, y0, x1, y1 = d.box
        b = boxes[: len(kept)]
        near = np.flatnonzero((b[:, 0] < x1) & (b[:, 2] > x0) & (b[:, 1] < y1) & (b[:, 3] > y0))
        duplicate = False
        for j in near:
            k = kept[j]
            if k.window == d.window:  # one window's detections were already separated by NMS
                continue
            inter = _intersection(d, k)
            if inter == 0:
                continue
            if not d.cut:  # then k is whole too: whole detections come first
                duplicate = inter / (area + areas[j] - inter) >= SAME_OBJECT_IOU
            elif inter >= SAME_OBJECT_COVER * min(area, areas[j]):
                duplicate = True
                if k.cut:  # no window saw this object whole: join the pieces
                    kept[j] = _union(k, d)
                    boxes[j] = kept[j].box
                    areas[j] = kept[j].area
            if duplicate:
                break
        if not duplicate:
            boxes[len(kept)] = d.box
            kept.append(d)
            areas.append(area)
    kept.sort(key=lambda d: -d.score)
    return kept


def tile_windows(height: int, width: int, size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Overlapping ``size`` x ``size`` windows covering an image, row by row.

    Consecutive windows overlap by at least ``overlap`` px; the last window of a row or column ends at the image
    border. A side not larger than ``size`` gets one window spanning it.

    Returns:
        ``(x0, y0, x1, y1)`` per window, x1/y1 exclusive.
    """

    def starts(length: int) -> list[int]:
        if length <= size:
            return [0]
        return [*range(0, length - size, size - overlap), length - size]

    return [(x, y, min(x + size, width), min(y + size, height)) for y in starts(height) for x in starts(width)]


# --------------------------------------------------------------------------------------------------
# the network on images
# --------------------------------------------------------------------------------------------------


@dataclass
class Window:
    """Where one network input comes from: image ``image``, offset, size at original resolution, inner edges."""

    image: int
    index: int
    x0: int
    y0: int
    shape: tuple[int, int]
    inner: tuple[bool, bool, bool, bool] = (False, False, False, False)  # left, top, right, bottom


class Predictor:
    """Runs a YOLOv8-seg network on RGB images and returns :class:`Instance` lists at the original resolution.

    Args:
        net: the network (eval mode; an Ultralytics ``SegmentationModel`` or anything returning
            ``((det, proto), raw)`` like it).
        num_classes: number of classes.
        imgsz: network input side in px (a multiple of the network stride, 32).
        device: where the network runs.
        conf: minimum score kept.
        iou: NMS IoU threshold.
        max_det: maximum detections per network input: per image, or per window of a tiled image (a large
            image holds more objects than one window).
        tile: ``auto``, ``on`` or ``off`` (see the module docstring).
        tile_overlap: overlap of neighbouring windows in px (default ``imgsz // 4``).
        batch_size: network inputs (images or windows) per forward pass.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        imgsz: int = DEFAULT_IMGSZ,
        device: str | torch.device = "cpu",
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
        tile: str = "auto",
        tile_overlap: int | None = None,
        batch_size: int = 8,
    ) -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.num_classes = num_classes
        self.imgsz = imgsz
        self.conf, self.iou, self.max_det = conf, iou, max_det
        self.tile = tile
        self.tile_overlap = imgsz // 4 if tile_overlap is None else tile_overlap
        self.batch_size = batch_size

    def windows(self, height: int, width: int) -> list[tuple[int, int, int, int]] | None:
        """The windows an image of this size is tiled into, or None when it is predicted in one pass."""
        limit = {"on": self.imgsz, "auto": AUTO_TILE_FACTOR * self.imgsz, "off": float("inf")}[self.tile]
        if max(height, width) <= limit:
            return None
        return tile_windows(height, width, self.imgsz, self.tile_overlap)

    def _inputs(self, images: list[np.ndarray], tiling: list[list | None]) -> Iterator[tuple[Window, np.ndarray]]:
        """Every network input, letterboxed to ``imgsz``: whole images resized as in training, or windows at 1:1."""
        s = self.imgsz
        for i, image in enumerate(images):
            h, w = image.shape[:2]
            if tiling[i] is None:
                gain = s / max(h, w)
                if gain != 1:  # as YoloSegDataset.load: long side to imgsz
                    interp = cv2.INTER_LINEAR if gain > 1 else cv2.INTER_AREA
                    image = cv2.resize(image, (max(1, round(w * gain)), max(1, round(h * gain))), interpolation=interp)
                yield Window(i, 0, 0, 0, (h, w)), _letterboxed(image, s)
                continue
            for k, (x0, y0, x1, y1) in enumerate(tiling[i]):
                inner = (x0 > 0, y0 > 0, x1 < w, y1 < h)
                yield Window(i, k, x0, y0, (y1 - y0, x1 - x0), inner), _letterboxed(image[y0:y1, x0:x1], s)

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray]) -> list[list[Instance]]:
        """Detect objects in RGB ``(H, W, 3)`` uint8 images (any sizes).

        Returns:
            One list of detections per image, at its original resolution, best score first.
        """
        tiling = [self.windows(*im.shape[:2]) for im in images]
        found: list[list[Instance]] = [[] for _ in images]
        inputs = self._inputs(images, tiling)
        while chunk := list(itertools.islice(inputs, self.batch_size)):
            x = torch.from_numpy(np.stack([a for _, a in chunk])).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            det, proto, _ = split_outputs(self.net(x))
            results = postprocess(det, proto, self.num_classes, self.conf, self.iou, self.max_det, with_masks=False)
            for (win, _), result, p in zip(chunk, results, proto):
                found[win.image].extend(self._instances(result, p, win))
        for i, windows in enumerate(tiling):
            if windows is not None:
                found[i] = merge_windows(found[i])
            else:
                found[i].sort(key=lambda d: -d.score)
        return found

    def _instances(self, result: dict[str, torch.Tensor], proto: torch.Tensor, win: Window) -> list[Instance]:
        return instances_from(result, proto, (self.imgsz, self.imgsz), win)


def instances_from(
    result: dict[str, torch.Tensor], proto: torch.Tensor, input_size: tuple[int, int], win: Window
) -> list[Instance]:
    """One network input's detections with masks built from the prototypes at the window's original size.

    Args:
        result: one entry of :func:`cellseg_pl.postprocess.postprocess` (``boxes``, ``scores``, ``labels``,
            ``coeffs`` in network-input px).
        proto: (32, S/4, S/4) prototypes of that input.
        input_size: (S, S), the letterboxed network input size.
        win: where the input comes from (a whole image: ``Window(i, 0, 0, 0, (h0, w0))``).
    """
    h, w = win.shape
    left, top, right, bottom = win.inner
    out = []
    step = max(1, _MASK_PIXEL_BUDGET // (h * w))
    for s in range(0, len(result["scores"]), step):
        part = {k: v[s : s + step] for k, v in result.items()}
        o = to_original(part, proto, input_size, (h, w))
        masks = o["masks"]
        rows, cols = masks.any(2).cpu().numpy(), masks.any(1).cpu().numpy()
        masks = masks.cpu().numpy()
        scores, labels, boxes = o["scores"].tolist(), o["labels"].tolist(), o["boxes"].tolist()
        for j in range(len(masks)):
            ys, xs = np.flatnonzero(rows[j]), np.flatnonzero(cols[j])
            if len(ys):
                my0, my1, mx0, mx1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
            else:  # an empty mask (dropped later as "no_outline", or as a seam sliver when cut)
                mx0, my0, mx1, my1 = (round(v) for v in boxes[j])
            cut = (
                (left and mx0 < EDGE_MARGIN) or (top and my0 < EDGE_MARGIN)
                or (right and mx1 > w - EDGE_MARGIN) or (bottom and my1 > h - EDGE_MARGIN)
            )  # fmt: skip
            crop = masks[j, my0:my1, mx0:mx1].copy() if len(ys) else np.zeros((0, 0), bool)
            out.append(Instance(scores[j], labels[j], win.x0 + mx0, win.y0 + my0, crop, bool(cut), win.index))
    return out


def _letterboxed(image: np.ndarray, imgsz: int) -> np.ndarray:
    """Pad an image whose long side is ``imgsz`` (or a window no larger) to ``imgsz`` x ``imgsz``, centred."""
    empty = np.zeros(image.shape[:2], np.uint8)
    return letterbox({"image": image, "instances": empty}, imgsz)["image"]


# --------------------------------------------------------------------------------------------------
# a folder of images -> COCO JSON
# --------------------------------------------------------------------------------------------------


@dataclass
class PredictSummary:
    """What :func:`predict_folder` wrote and dropped.

    Counter keys are those of ``DROPPED``, ``IMAGE_SKIPS`` and ``NOTES``; ``instances`` counts per class name.
    """

    output: Path
    names: dict[int, str]
    imgsz: int = DEFAULT_IMGSZ
    device: str = "cpu"
    images_found: int = 0
    images_written: int = 0
    tiled_images: int = 0
    windows: int = 0
    instances: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    skipped_images: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    overlays: Path | None = None
    seconds: float = 0.0

    @property
    def instances_written(self) -> int:
        return sum(self.instances.values())

    def count(self, kind: Counter, reason: str, example: str, n: int = 1) -> None:
        """Add ``n`` to ``kind[reason]`` and keep the first few examples."""
        count_reason(kind, self.examples, reason, example, n)

    def format(self) -> str:
        """The human-readable report ``main`` prints."""
        per_class = ", ".join(f"{name}: {self.instances[name]}" for name in self.names.values())
        rate = self.images_written / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"predicted {self.images_written} of {self.images_found} images (imgsz {self.imgsz}, {self.device}, "
            f"{self.seconds:.1f} s, {rate:.2f} images/s)"
            + (f"; {self.tiled_images} large images tiled into {self.windows} windows" if self.tiled_images else ""),
            f"objects written: {self.instances_written} ({per_class})",
        ]
        lines += reason_lines(
            [("skipped images", self.skipped_images, IMAGE_SKIPS), ("dropped detections", self.dropped, DROPPED),
             ("notes", self.notes, NOTES)],
            self.examples,
        )  # fmt: skip
        if self.overlays is not None:
            lines.append(f"overlays: {self.overlays}")
        lines.append(f"annotations: {self.output} (import into CVAT as 'COCO 1.0')")
        return "\n".join(lines)


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


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (sub-folders included, hidden ones skipped), sorted by relative path."""
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in rel.parts) and p.is_file():
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _check_numbers(conf: float, iou: float, max_det: int, min_area: float, tile: str, tile_overlap, batch_size) -> None:
    if not 0.0 <= conf <= 1.0:
        raise PredictError("--conf", f"{conf} is not between 0 and 1", "pass e.g. 0.25")
    if not 0.0 <= iou <= 1.0:
        raise PredictError("--iou", f"{iou} is not between 0 and 1", "pass e.g. 0.7")
    if max_det < 1:
        raise PredictError("--max-det", f"{max_det} is not a positive number", "pass e.g. 300")
    if min_area < 0:
        raise PredictError("--min-area", f"{min_area} is negative", "pass 0 to keep everything, or e.g. 500")
    if tile not in TILE_MODES:
        raise PredictError("--tile", f"{tile!r} is not one of {', '.join(TILE_MODES)}", "pass e.g. --tile auto")
    if tile_overlap is not None and tile_overlap < 0:
        raise PredictError("--tile-overlap", f"{tile_overlap} is negative", "pass e.g. a quarter of --imgsz")
    if batch_size < 1:
        raise PredictError("--batch-size", f"{batch_size} is not a positive number", "pass e.g. 8")


def _check_paths(images: Path, output: Path, overwrite: bool, save_overlays: Path | None) -> None:
    if not images.is_dir():
        what = "is not a folder" if images.exists() else "does not exist"
        raise PredictError(images, what, "pass the folder holding the images with --images")
    if output.is_dir():
        raise PredictError(output, "is a folder", "pass a file name such as predictions.json with --output")
    if output.exists() and not overwrite:
        raise PredictError(output, "already exists", "choose another --output or pass --overwrite")
    if save_overlays is not None:
        if save_overlays.exists() and not save_overlays.is_dir():
            raise PredictError(save_overlays, "exists and is not a folder", "choose a folder for --save-overlays")
        if _inside(save_overlays, images):
            raise PredictError(
                save_overlays, f"is inside --images {images}", "choose a folder outside the images for --save-overlays"
            )


def _load_network(model: str | Path | nn.Module, imgsz: int | None) -> tuple[nn.Module, dict[int, str], int]:
    """The network, its class names and the input size (given, else the one stored in the weights, else 640)."""
    stored = None
    if isinstance(model, nn.Module):
        net, names = model, getattr(model, "names", None)
        if not names:
            raise PredictError("model", "the network has no 'names' (class index -> name)", "set net.names")
        names = {int(k): str(v) for k, v in dict(names).items()}
    else:
        try:
            net, names, info = load_weights(model)
        except ModelError as err:
            raise PredictError("--model", str(err), "pass a cellseg_pl .ckpt or an Ultralytics -seg .pt") from None
        stored = info.get("imgsz")
        if isinstance(stored, (list, tuple)):
            stored = max(stored) if stored else None
        if hasattr(net, "fuse"):
            net = net.fuse(verbose=False)  # Conv+BatchNorm folded: same outputs, faster
    stride = int(max(getattr(net, "stride", torch.tensor([32.0])).tolist()))
    if imgsz is not None:
        if imgsz < stride or imgsz % stride:
            raise PredictError("--imgsz", f"{imgsz} is not a multiple of the network stride {stride}", "pass e.g. 640")
        return net, names, int(imgsz)
    if not isinstance(stored, int) or stored <= 0:
        log.info("the weights do not store their training imgsz; using %d (set --imgsz)", DEFAULT_IMGSZ)
        return net, names, DEFAULT_IMGSZ
    if stored % stride:
        log.info("stored imgsz %d rounded up to a multiple of %d", stored, stride)
        stored = -(-stored // stride) * stride
    return net, names, stored


def _annotation(inst: Instance, ann_id: int, image_id: int) -> tuple[dict | None, str | None, np.ndarray | None, bool]:
    """The COCO record of one detection: ``(record, drop reason, outline (K, 2) image px, parts dropped)``."""
    polygons = mask_to_polygons(inst.mask) if inst.mask.size else []
    if not polygons:
        return None, "no_outline", None, False
    h, w = inst.mask.shape
    area = int(polygons_to_mask(polygons[:1], h, w).sum())  # what CVAT will rasterize
    if area == 0:
        return None, "no_outline", None, False
    pts = np.asarray(polygons[0], np.float64).reshape(-1, 2) + (inst.x0, inst.y0)
    (x_min, y_min), (x_max, y_max) = pts.min(0), pts.max(0)
    score = round(float(inst.score), 5)
    record = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": inst.label + 1,
        "segmentation": [[round(float(v), 3) for v in pts.reshape(-1)]],
        "area": area,
        "bbox": [round(float(v), 3) for v in (x_min, y_min, x_max - x_min, y_max - y_min)],
        "iscrowd": 0,
        "score": score,
        "attributes": {"occluded": False, "score": score},
    }
    return record, None, pts, len(polygons) > 1


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
        color = _PALETTE[label % len(_PALETTE)][::-1]
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


def _write_overlay(path: Path, bgr: np.ndarray) -> None:
    suffix = path.suffix.lower() if path.suffix.lower() in _OVERLAY_SUFFIXES else ".png"
    path = path.with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(suffix, bgr)
    if not ok:
        raise OSError(f"cannot encode an overlay for {path}")
    path.write_bytes(data.tobytes())


def predict_folder(
    model: str | Path | nn.Module,
    images: str | Path,
    output: str | Path,
    device: str | torch.device = "cpu",
    conf: float = 0.25,
    iou: float = 0.7,
    imgsz: int | None = None,
    max_det: int = 300,
    min_area: float = 0,
    save_overlays: str | Path | None = None,
    tile: str = "auto",
    tile_overlap: int | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
) -> PredictSummary:
    """Predict every image under a folder and write the detections as COCO 1.0 JSON for CVAT.

    Args:
        model: a cellseg_pl ``.ckpt``, an Ultralytics ``-seg`` ``.pt`` (a pickle: trusted files only), or a
            network (with ``names``).
        images: folder of images (sub-folders included); ``file_name`` is the path relative to it.
        output: JSON file to write; missing parent folders are created.
        device: ``cpu``, ``0`` (= ``cuda:0``) or ``cuda:N``.
        conf: minimum score kept.
        iou: NMS IoU threshold.
        imgsz: network input side in px; default the one stored in the weights, else 640.
        max_det: maximum detections per image, or per window of a tiled image.
        min_area: drop objects smaller than this many pixels (the guide's droplet rule: 500).
        save_overlays: folder to write each image with its outlines and counts (same relative path, PNG/JPG).
        tile: ``auto``, ``on`` or ``off``: tiled prediction of large images (module docstring).
        tile_overlap: window overlap in px (default ``imgsz // 4``); objects smaller than it are never cut.
        batch_size: images or windows per forward pass.
        overwrite: replace an existing ``output``.

    Returns:
        What was written, skipped and dropped.

    Raises:
        PredictError: a bad argument, a missing or unusable model, images folder or output, no readable image.
            Nothing is written then.
    """
    _check_numbers(conf, iou, max_det, min_area, tile, tile_overlap, batch_size)
    images_dir, output = Path(images).expanduser(), Path(output).expanduser()
    overlays = Path(save_overlays).expanduser() if save_overlays is not None else None
    _check_paths(images_dir, output, overwrite, overlays)
    dev = parse_device(device)
    files = list_images(images_dir)
    if not files:
        raise PredictError(
            images_dir, f"holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})", "check the --images folder"
        )
    net, names, imgsz = _load_network(model, imgsz)
    if tile_overlap is not None and tile_overlap > imgsz // 2:
        raise PredictError("--tile-overlap", f"{tile_overlap} is more than half of imgsz {imgsz}", "pass e.g. imgsz/4")
    predictor = Predictor(net, len(names), imgsz, dev, conf, iou, max_det, tile, tile_overlap, batch_size)
    start = time.perf_counter()  # (the rate excludes loading the model)
    summary = PredictSummary(output, names, imgsz, str(dev), images_found=len(files), overlays=overlays)
    log.info("predicting %d images from %s (imgsz %d, %s, tile %s)", len(files), images_dir, imgsz, dev, tile)

    coco_images: list[dict] = []
    annotations: list[dict] = []
    last_log = time.perf_counter()
    for offset in range(0, len(files), batch_size):
        batch: list[tuple[str, np.ndarray]] = []
        for path in files[offset : offset + batch_size]:
            rel = path.relative_to(images_dir).as_posix()
            try:
                batch.append((rel, read_image(path)))
            except (DatasetError, OSError) as err:
                log.warning("skipped %s: %s", rel, err)
                reason = "too_large" if isinstance(err, ImageTooLargeError) else "unreadable"
                summary.count(summary.skipped_images, reason, rel)
        detections = predictor.predict([im for _, im in batch])
        for (rel, image), found in zip(batch, detections):
            h, w = image.shape[:2]
            windows = predictor.windows(h, w)
            if windows is not None:
                summary.tiled_images += 1
                summary.windows += len(windows)
            image_id = len(coco_images) + 1
            coco_images.append({"id": image_id, "file_name": rel, "height": h, "width": w})
            outlines, small = [], []
            for inst in found:
                record, reason, pts, parts_dropped = _annotation(inst, len(annotations) + 1, image_id)
                if record is not None and record["area"] < min_area:
                    reason = "min_area"
                    small.append(pts)
                if reason:
                    summary.count(summary.dropped, reason, rel)
                    continue
                if parts_dropped:
                    summary.count(summary.notes, "parts_dropped", rel)
                annotations.append(record)
                outlines.append((inst.label, pts))
                summary.instances[names[inst.label]] += 1
            if overlays is not None:
                _write_overlay(overlays / rel, draw_overlay(image, outlines, names, small))
        if time.perf_counter() - last_log > 10:
            last_log = time.perf_counter()
            log.info("%d/%d images, %d objects", min(offset + batch_size, len(files)), len(files), len(annotations))
    if not coco_images:
        raise PredictError(images_dir, f"none of its {len(files)} images could be read", "check the image files")
    summary.images_written = len(coco_images)

    categories = [{"id": k + 1, "name": names[k]} for k in sorted(names)]
    _write_json_atomically(build_coco(coco_images, annotations, categories), output)
    summary.seconds = time.perf_counter() - start
    log.info("wrote %d objects on %d images to %s", summary.instances_written, summary.images_written, output)
    return summary


def _write_json_atomically(data: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    try:
        tmp.write_text(json.dumps(data))
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)


class CocoPredictionWriter(BasePredictionWriter):
    """LightningCLI ``predict``: the same COCO 1.0 JSON for CVAT as ``predict --images``, from a run's checkpoint.

    ``predict_step`` yields, per image, its file, size and :class:`Instance` list; this turns them into CVAT
    records as :func:`predict_folder` does (one polygon per object, ``min_area`` filter), gathers them from all
    processes and writes one file (rank 0) at the end.

    Args:
        output: the JSON file (refused when it exists: choose another, nothing is replaced).
        images_root: folder ``file_name`` is relative to (the ``--data.predict_images`` folder).
        names: class index -> name.
        min_area: drop objects smaller than this many pixels (the guide's droplet rule: 500).
    """

    def __init__(self, output: str | Path, images_root: str | Path, names: dict[int, str], min_area: float = 0) -> None:
        super().__init__(write_interval="batch")
        self.output, self.root = Path(output), Path(images_root)
        self.names, self.min_area = dict(names), min_area
        self._images: list[dict] = []
        self._annotations: list[dict] = []

    def on_predict_start(self, trainer, pl_module) -> None:  # noqa: ANN001 - Lightning's hook signature
        self._images, self._annotations = [], []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):  # noqa: ANN001,D102
        for item in prediction:
            file = Path(item["im_file"])
            rel = file.relative_to(self.root).as_posix() if file.is_relative_to(self.root) else file.name
            h, w = item["ori_shape"]
            self._images.append({"file_name": rel, "height": int(h), "width": int(w)})
            for inst in item["instances"]:
                record, reason, _, _ = _annotation(inst, 0, 0)
                if record is not None and not reason and record["area"] >= self.min_area:
                    self._annotations.append({**record, "file_name": rel})

    def on_predict_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001 - Lightning's hook signature
        images, annotations = self._images, self._annotations
        if trainer.world_size > 1:
            gathered: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, (images, annotations))
            images = [x for part in gathered for x in part[0]]
            annotations = [x for part in gathered for x in part[1]]
        if not trainer.is_global_zero:
            return
        images = sorted({im["file_name"]: im for im in images}.values(), key=lambda im: im["file_name"])
        ids = {im["file_name"]: i for i, im in enumerate(images, start=1)}
        records = []
        for k, ann in enumerate(sorted(annotations, key=lambda a: (ids[a["file_name"]], -a["score"])), start=1):
            records.append({**{key: v for key, v in ann.items() if key != "file_name"}, "id": k,
                            "image_id": ids[ann["file_name"]]})
        categories = [{"id": k + 1, "name": self.names[k]} for k in sorted(self.names)]
        coco = build_coco([{"id": ids[im["file_name"]], **im} for im in images], records, categories)
        _write_json_atomically(coco, self.output)
        log.info("wrote %d objects on %d images to %s", len(records), len(images), self.output)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def add_inference_arguments(p: argparse.ArgumentParser) -> None:
    """The network, NMS and tiling flags ``predict`` and ``select`` share (dash and underscore spellings)."""
    p.add_argument("--device", default="cpu", help="cpu (default), 0 (= cuda:0) or cuda:N")
    p.add_argument("--conf", type=float, default=0.25, help="minimum score kept (default 0.25)")
    p.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold (default 0.7)")
    p.add_argument("--imgsz", type=int, default=None, help="network input side in px (default: the model's, else 640)")
    p.add_argument(
        "--max-det", "--max_det", dest="max_det", type=int, default=300, help="most objects per image or window (300)"
    )
    p.add_argument(
        "--min-area", "--min_area", dest="min_area", type=float, default=0,
        help="drop objects smaller than this many pixels, e.g. 500 for water droplets (default 0: keep all)",
    )  # fmt: skip
    p.add_argument(
        "--tile", choices=TILE_MODES, default="auto",
        help=f"predict large images on overlapping imgsz windows at full resolution: auto (a side > "
        f"{AUTO_TILE_FACTOR:g} x imgsz), on (a side > imgsz) or off (resize to imgsz) (default auto)",
    )  # fmt: skip
    p.add_argument(
        "--tile-overlap", "--tile_overlap", dest="tile_overlap", type=int, default=None, metavar="PX",
        help="overlap of neighbouring windows in px, larger than the biggest object (default imgsz/4)",
    )  # fmt: skip
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8, help="inputs per pass (8)")


def run_tool(parser: argparse.ArgumentParser, argv: list[str] | None, run) -> int:  # noqa: ANN001
    """Parse ``argv``, call ``run(args)`` and print its summary; a bad argument or input is one ``error:`` line.

    Returns:
        0 on success; 2 on a bad argument or input (``CocoError``, ``OSError``, GPU out of memory).
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse has already printed usage and the problem
        return int(stop.code or 0)
    if not logging.getLogger("cellseg_pl").handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        summary = run(args)
    except CocoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        where = err.filename or args.output
        print(f"error: {where}: {err.strerror or err}; check the path, permissions and free space", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print(f"error: --device {args.device}: out of GPU memory; lower --batch-size or --imgsz", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


def _parser() -> argparse.ArgumentParser:
    """Flags of the lab's ``predict_simple_circles.py`` plus ours (dash and underscore spellings)."""
    p = argparse.ArgumentParser(
        prog="python -m cellseg_pl predict",
        description="Predict a folder of images and write COCO 1.0 JSON that CVAT imports as annotations "
        "(polygons at the original resolution, with scores).",
        allow_abbrev=False,
    )
    p.add_argument("--model", required=True, help="cellseg_pl .ckpt or Ultralytics -seg .pt (trusted files only)")
    p.add_argument("--images", required=True, help="folder of images (sub-folders included)")
    p.add_argument("--output", required=True, help="JSON file to write, e.g. predictions.json")
    add_inference_arguments(p)
    p.add_argument(
        "--save-overlays", "--save_overlays", dest="save_overlays", default=None, metavar="DIR",
        help="also write each image with its outlines and counts here (same relative path)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line: ``predict --model M --images DIR --output predictions.json [...]``.

    Returns:
        0 on success; 2 on a bad argument or input, reported as one ``error: ...`` line on stderr.
    """
    return run_tool(_parser(), argv, lambda a: predict_folder(
        a.model, a.images, a.output, a.device, a.conf, a.iou, a.imgsz, a.max_det, a.min_area, a.save_overlays,
        a.tile, a.tile_overlap, a.batch_size, a.overwrite,
    ))  # fmt: skip


