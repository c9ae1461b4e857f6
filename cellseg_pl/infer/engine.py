"""The inference engine: a YOLOv8-seg network on RGB images -> :class:`Instance` lists at the original resolution.

Shared by ``predict`` (:mod:`cellseg_pl.infer.predict`, COCO JSON for CVAT), ``select`` (:mod:`cellseg_pl.infer.select`,
uncertainty ranking) and ``evaluate`` (:mod:`cellseg_pl.evaluate`); it knows nothing about files it writes.

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

Also here: the settings every inference command takes (:class:`InferenceOptions`) and its device
(:func:`parse_device`), how it finds its images (:func:`list_images`: hidden files and folders skipped) and loads its
network (:func:`load_network`).

Example:
    >>> from cellseg_pl.infer.engine import Predictor, load_network
    >>> net, names, imgsz = load_network("best.ckpt", None)  # doctest: +SKIP
    >>> found = Predictor(net, len(names), imgsz, tile="auto").predict([rgb_image])[0]  # doctest: +SKIP
    >>> [(d.score, d.box) for d in found]  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from torch import nn

from cellseg_pl.data.dataset import letterbox
from cellseg_pl.data.labels import class_names_of
from cellseg_pl.errors import ModelError, PredictError
from cellseg_pl.yolo.network import load_weights, split_outputs
from cellseg_pl.yolo.postprocess import postprocess, to_original

log = logging.getLogger(__name__)

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
#: Tiled prediction logs its progress every this many seconds, for images of more than this many windows.
PROGRESS_EVERY_S = 10.0
PROGRESS_MIN_WINDOWS = 16
#: Largest number of full-size mask pixels assembled at once (bounds memory on large untiled images).
_MASK_PIXEL_BUDGET = 1 << 27


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


def intersection(a: Instance, b: Instance) -> int:
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
            inter = intersection(d, k)
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
        progress = _TileProgress(images, tiling, self.imgsz, self.tile_overlap)
        inputs = self._inputs(images, tiling)
        while chunk := list(itertools.islice(inputs, self.batch_size)):
            x = torch.from_numpy(np.stack([a for _, a in chunk])).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            det, proto, _ = split_outputs(self.net(x))
            results = postprocess(det, proto, self.num_classes, self.conf, self.iou, self.max_det, masks=None)
            for (win, _), result, p in zip(chunk, results, proto):
                found[win.image].extend(instances_from(result, p, (self.imgsz, self.imgsz), win))
            progress.update([win for win, _ in chunk], found)
        for i, windows in enumerate(tiling):
            if windows is not None:
                found[i] = merge_windows(found[i])
            else:
                found[i].sort(key=lambda d: -d.score)
        progress.done(found)
        return found


class _TileProgress:
    """Progress of tiled images on the log: the windows done every :data:`PROGRESS_EVERY_S` seconds, then the
    objects after merging. Silent when no image of the call is tiled into more than :data:`PROGRESS_MIN_WINDOWS`
    windows (the lab's ordinary images)."""

    def __init__(self, images: list[np.ndarray], tiling: list[list | None], imgsz: int, overlap: int) -> None:
        self.tiled = {i: len(w) for i, w in enumerate(tiling) if w is not None and len(w) > PROGRESS_MIN_WINDOWS}
        self.total = sum(self.tiled.values())
        self.done_windows = 0
        self.t0 = self.last = time.monotonic()
        for i, n in self.tiled.items():
            h, w = images[i].shape[:2]
            log.info("tiling a %dx%d px image into %d windows of %d px (overlap %d px)", w, h, n, imgsz, overlap)

    def update(self, windows: list, found: list[list[Instance]]) -> None:
        if not self.total:
            return
        self.done_windows += sum(1 for win in windows if win.image in self.tiled)
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S and self.done_windows < self.total:
            self.last = now
            objects = sum(len(found[i]) for i in self.tiled)
            left = (now - self.t0) / max(self.done_windows, 1) * (self.total - self.done_windows)
            log.info("  %d/%d windows (%.0f %%), %d detections so far, ~%.0f s left", self.done_windows, self.total,
                     100 * self.done_windows / self.total, objects, left)

    def done(self, found: list[list[Instance]]) -> None:
        if self.total:
            log.info("  %d/%d windows in %.0f s: %d objects after merging the overlaps", self.total, self.total,
                     time.monotonic() - self.t0, sum(len(found[i]) for i in self.tiled))


def instances_from(
    result: dict[str, torch.Tensor], proto: torch.Tensor, input_size: tuple[int, int], win: Window
) -> list[Instance]:
    """One network input's detections with masks built from the prototypes at the window's original size.

    Args:
        result: one entry of :func:`cellseg_pl.yolo.postprocess.postprocess` (``boxes``, ``scores``, ``labels``,
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
# what every inference command checks and loads
# --------------------------------------------------------------------------------------------------


def load_network(
    model: str | Path | nn.Module, imgsz: int | None, tile_overlap: int | None = None
) -> tuple[nn.Module, dict[int, str], int]:
    """The network, its class names and the input size (given, else the one stored in the weights, else 640).

    Args:
        model: a cellseg_pl ``.ckpt``, an Ultralytics ``-seg`` ``.pt`` (a pickle: trusted files only), or a network
            with ``names``; weights files are fused (Conv+BatchNorm folded).
        imgsz: network input side in px, a multiple of the stride; None: the one stored in the weights, else 640.
        tile_overlap: the window overlap asked for, checked against the input size (at most half of it).

    Raises:
        PredictError: an unusable model file or network, an ``imgsz`` or ``tile_overlap`` that does not fit it.
    """
    net, names, imgsz = _network_and_size(model, imgsz)
    if tile_overlap is not None and tile_overlap > imgsz // 2:
        raise PredictError("--tile-overlap", f"{tile_overlap} is more than half of imgsz {imgsz}", "pass e.g. imgsz/4")
    return net, names, imgsz


def _network_and_size(model: str | Path | nn.Module, imgsz: int | None) -> tuple[nn.Module, dict[int, str], int]:
    stored = None
    if isinstance(model, nn.Module):
        net, names = model, getattr(model, "names", None)
        if not names:
            raise PredictError("model", "the network has no 'names' (class index -> name)", "set net.names")
        names = class_names_of(names)
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



