"""Albumentations pipelines that move instance masks with the image: mosaic, copy-paste, affine, flips, HSV.

A transform here is a callable ``(sample, dataset, rng) -> sample`` over the loaded samples of
:class:`cellseg_pl.data.dataset.YoloSegDataset` (``image`` HxWx3 uint8 RGB with its long side already ``imgsz``,
``instances`` HxW uint16 instance map, ``classes``). Because every instance lives in one integer map that is warped
with nearest-neighbour interpolation, masks follow every geometric change exactly and boxes are recomputed from the
warped pixels afterwards (:func:`cellseg_pl.data.dataset.finalize`), never transformed as boxes.

The knobs carry Ultralytics' names and meanings (``degrees``, ``translate``, ``scale``, ``shear``, ``perspective``,
``flipud``, ``fliplr``, ``hsv_h/s/v``, ``mosaic``, ``mixup``, ``copy_paste``) so a ``yolo segment train`` recipe
maps one to one.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import sys
from dataclasses import dataclass, fields
from typing import Any, Literal

import cv2
import numpy as np

from cellseg_pl.data.dataset import PAD_VALUE, instance_boxes, letterbox
from cellseg_pl.errors import UsageError

log = logging.getLogger(__name__)


def import_albumentations():  # -> the albumentations module
    """Albumentations, imported without its update check.

    Its first import asks PyPI for a newer version (a network call with a 2 s timeout) unless
    ``NO_ALBUMENTATIONS_UPDATE`` is set. cellseg_pl runs offline: the variable is set for that import only, and the
    process environment is left as it was.
    """
    if "albumentations" in sys.modules:
        return sys.modules["albumentations"]
    saved = os.environ.get("NO_ALBUMENTATIONS_UPDATE")
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    try:
        return importlib.import_module("albumentations")
    finally:
        if saved is None:
            del os.environ["NO_ALBUMENTATIONS_UPDATE"]
        else:
            os.environ["NO_ALBUMENTATIONS_UPDATE"] = saved


A = import_albumentations()

#: ``copy_paste_mode`` values (see :class:`TrainTransform`).
COPY_PASTE_MODES = ("flip", "free")


class RandomHSV(A.ImageOnlyTransform):
    """Ultralytics' HSV jitter: hue shifted by ``+- hgain`` of the circle, saturation and value scaled by ``1 +- gain``.

    Args:
        hgain: hue gain (fraction of the hue circle).
        sgain: saturation gain.
        vgain: value gain.
    """

    def __init__(self, hgain: float = 0.015, sgain: float = 0.7, vgain: float = 0.4, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.hgain, self.sgain, self.vgain = hgain, sgain, vgain

    def get_params(self) -> dict[str, Any]:
        return {"gains": self.random_generator.uniform(-1, 1, 3) * [self.hgain, self.sgain, self.vgain]}

    def apply(self, img: np.ndarray, gains: np.ndarray, **params: Any) -> np.ndarray:
        # Ultralytics 8.4: the hue is shifted (not scaled), saturation and value are scaled, and a saturation of 0
        # stays 0 (gray stays gray)
        x = np.arange(0, 256, dtype=np.float64)
        lut_hue = ((x + gains[0] * 180) % 180).astype(np.uint8)
        lut_sat = np.clip(x * (gains[1] + 1), 0, 255).astype(np.uint8)
        lut_val = np.clip(x * (gains[2] + 1), 0, 255).astype(np.uint8)
        lut_sat[0] = 0
        lut = np.stack((lut_hue, lut_sat, lut_val), -1).reshape(1, 256, 3)
        return cv2.cvtColor(cv2.LUT(cv2.cvtColor(img, cv2.COLOR_RGB2HSV), lut), cv2.COLOR_HSV2RGB)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("hgain", "sgain", "vgain")


@dataclass(frozen=True)
class Augmentation:
    """The training augmentation's knobs: Ultralytics' names, meanings and defaults (``yolo segment train``'s), said
    once here. The data module takes each as its ``--data.<name>`` flag and documents it there
    (:class:`cellseg_pl.data.datamodule.CellSegDataModule`)."""

    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    shear: float = 0.0
    perspective: float = 0.0
    flipud: float = 0.0
    fliplr: float = 0.5
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    mosaic: float = 1.0
    mixup: float = 0.0
    copy_paste: float = 0.0
    copy_paste_mode: Literal["flip", "free"] = "flip"

    def __post_init__(self) -> None:
        if self.copy_paste_mode not in COPY_PASTE_MODES:
            raise UsageError(
                f"--data.copy_paste_mode: '{self.copy_paste_mode}' is not one of {', '.join(COPY_PASTE_MODES)}"
            )


#: The augmentation knobs, in order: :class:`Augmentation`'s fields.
AUGMENTATION_KNOBS = tuple(f.name for f in fields(Augmentation))


class TrainTransform:
    """The training augmentation, configured with Ultralytics' hyper-parameter names (:class:`Augmentation`).

    Order (as Ultralytics 8.4's ``v8_transforms``): a 4-image mosaic on a ``2 * imgsz`` canvas (prob. ``mosaic``) or
    the resized image -> copy-paste in ``flip`` mode -> one warp (rotation, scale, translation, shear, perspective)
    that cuts the ``imgsz`` x ``imgsz`` sample out of the canvas' centre -> copy-paste in ``free`` mode -> mixup ->
    Ultralytics' light extras (blur, median blur, gray, CLAHE at p 0.01) -> HSV -> vertical / horizontal flips.

    The affine acts on the whole mosaic canvas, as Ultralytics' ``RandomPerspective`` (and YOLOX/MMYOLO's
    ``RandomAffine(border=-imgsz // 2)``) do: zooming out or rotating shows more of the other tiles, not padding, so
    a mosaic sample carries as many cells as theirs. The canvas and its instance map are warped once each
    (linear for pixels, nearest for instance ids), so masks move exactly with the pixels.

    ``copy_paste_mode`` ``flip`` (Ultralytics' default, the same algorithm): on every sample, mirror the mosaic canvas
    left-right and paste the mirrored copies of a ``copy_paste`` share of the cells whose mirrored box covers under
    30 % of every existing box (least-overlapping first), before the warp. ``free``: with probability ``copy_paste``,
    paste ``round(copy_paste * n)`` of the n cells of another image (at least one), rotated by a multiple of 90 deg,
    into background they do not touch, after the warp and scaled by the sample's zoom.

    Args:
        imgsz: output side in px.
        augmentation: the knobs.
        extras: probability of each of Ultralytics' default light Albumentations (Blur, MedianBlur, ToGray, CLAHE;
            0.01 as there; 0 turns them off).
    """

    def __init__(self, imgsz: int = 640, augmentation: Augmentation = Augmentation(), extras: float = 0.01) -> None:
        aug = augmentation
        self.imgsz = imgsz
        self.copy_paste_mode = aug.copy_paste_mode
        self.degrees, self.translate, self.scale = aug.degrees, aug.translate, aug.scale
        self.shear, self.perspective = aug.shear, aug.perspective
        self.mosaic_p, self.mixup_p, self.copy_paste_p = aug.mosaic, aug.mixup, aug.copy_paste
        # Shared memory, so that persistent data-loader workers see close_mosaic switch the mixing off.
        self._mixing_on = multiprocessing.Value("b", True, lock=False)
        color: list[A.BasicTransform] = []
        if extras > 0:  # Ultralytics' default Albumentations (image only)
            color += [A.Blur(p=extras), A.MedianBlur(p=extras), A.ToGray(p=extras), A.CLAHE(p=extras)]
        if aug.hsv_h or aug.hsv_s or aug.hsv_v:
            color.append(RandomHSV(aug.hsv_h, aug.hsv_s, aug.hsv_v))
        if aug.flipud > 0:
            color.append(A.VerticalFlip(p=aug.flipud))
        if aug.fliplr > 0:
            color.append(A.HorizontalFlip(p=aug.fliplr))
        self.color = A.Compose(color)

    @property
    def mixing_enabled(self) -> bool:
        """Whether mosaic, copy-paste and mixup may be applied: ``close_mosaic`` turns all three off for the last
        epochs, as Ultralytics' ``close_mosaic`` does (the model ends its training on plain, unmixed images)."""
        return bool(self._mixing_on.value)

    @mixing_enabled.setter
    def mixing_enabled(self, value: bool) -> None:
        self._mixing_on.value = bool(value)

    @property
    def mosaic_enabled(self) -> bool:
        """Whether mosaic may be applied (a ``mosaic`` probability above 0, and not turned off by close_mosaic)."""
        return self.mixing_enabled and self.mosaic_p > 0

    def __call__(self, sample: dict[str, Any], dataset: Any, rng: np.random.Generator) -> dict[str, Any]:
        """Augment one loaded sample; ``rng`` is its own random stream (the data set derives it per sample)."""
        self.color.set_random_seed(int(rng.integers(2**31)))
        sample, gain = self.geometric(sample, dataset, rng, self.copy_paste_mode == "flip")
        mixing = self.mixing_enabled and len(dataset) > 1
        if mixing and self.copy_paste_mode == "free" and self.copy_paste_p > 0 and rng.random() < self.copy_paste_p:
            source = dataset.load(int(rng.integers(len(dataset))))
            sample = copy_paste(sample, source, self.copy_paste_p, rng, zoom=gain)
        if mixing and self.mixup_p > 0 and rng.random() < self.mixup_p:
            other, _ = self.geometric(dataset.load(int(rng.integers(len(dataset)))), dataset, rng)
            sample = mixup(sample, other, rng)
        out = self.color(image=sample["image"], mask=sample["instances"])
        return {**sample, "image": out["image"], "instances": out["mask"]}

    def geometric(
        self, sample: dict[str, Any], dataset: Any, rng: np.random.Generator, flip_paste: bool = False
    ) -> tuple[dict[str, Any], float]:
        """Mosaic canvas (or the image), flip copy-paste when asked, warped to ``imgsz`` x ``imgsz``.

        Returns the sample and its scale gain.
        """
        flip_paste = flip_paste and self.copy_paste_p > 0 and self.mixing_enabled
        use_mosaic = self.mosaic_enabled and len(dataset) > 1 and rng.random() < self.mosaic_p
        if use_mosaic:
            tiles = [sample, *(dataset.load(int(rng.integers(len(dataset)))) for _ in range(3))]
            s = self.imgsz
            centre = (int(rng.uniform(s / 2, 3 * s / 2)), int(rng.uniform(s / 2, 3 * s / 2)))
            shape = (2 * s, 2 * s)
        else:
            shape = sample["image"].shape[:2]
        matrix, gain = affine_matrix(
            shape, self.imgsz, rng, self.degrees, self.translate, self.scale, self.shear, self.perspective
        )
        if use_mosaic:
            # only the part of the canvas the warp can see is built (a zoomed-in sample sees a fraction of it)
            region = visible_region(matrix, shape, self.imgsz)
            if flip_paste:  # the mirror image of the visible part is pasted from: build both (symmetric in x)
                w = shape[1]
                x0, x1 = min(region[0], w - region[2]), max(region[2], w - region[0])
                region = (x0, region[1], x1, region[3])
            sample = mosaic_canvas(tiles, self.imgsz, centre, region)
            shift = np.eye(3, dtype=np.float32)
            shift[0, 2], shift[1, 2] = region[0], region[1]
            matrix = matrix @ shift
        if flip_paste:  # (a mosaic canvas is this sample's own: pasted in place; a loaded image may be the cache's)
            sample = flip_copy_paste(sample, self.copy_paste_p, inplace=use_mosaic)
        return warp(sample, matrix, self.imgsz, self.perspective > 0), gain


def flip_copy_paste(sample: dict[str, Any], fraction: float, max_ioa: float = 0.30, inplace: bool = False
                    ) -> dict[str, Any]:  # fmt: skip
    """Ultralytics 8.4's ``CopyPaste(mode="flip")``: paste left-right mirrored copies of the sample's own cells.

    A cell is eligible when its mirrored box covers less than ``max_ioa`` of every existing box (intersection over
    the existing box's area, Ultralytics' ``bbox_ioa``); the ``round(fraction * eligible)`` eligible cells with the
    least overlap are pasted: the mirrored image's pixels under their mirrored masks. A pasted cell lies on top of
    what it covers (the covered pixels change owner); it gets a new instance id and keeps its class. ``inplace``:
    paste into the sample's own image and uint16 instance map (a mosaic canvas) instead of copies.
    """
    instances = sample["instances"]
    ids, boxes = instance_boxes(instances, min_size=1)
    if not len(ids) or fraction <= 0:
        return sample
    w = instances.shape[1]
    mirrored = boxes.copy()
    mirrored[:, 0], mirrored[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    inter = (np.minimum(mirrored[:, None, 2], boxes[None, :, 2]) - np.maximum(mirrored[:, None, 0], boxes[None, :, 0])
             ).clip(0) * (np.minimum(mirrored[:, None, 3], boxes[None, :, 3])
                          - np.maximum(mirrored[:, None, 1], boxes[None, :, 1])).clip(0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    ioa = inter / (area[None, :] + 1e-7)
    eligible = np.nonzero((ioa < max_ioa).all(1))[0]
    eligible = eligible[np.argsort(ioa.max(1)[eligible], kind="stable")]
    chosen = ids[eligible[: round(fraction * len(eligible))]]
    if not len(chosen):
        return sample
    # Each chosen cell changes only its mirrored box, where its mirror image lands: the pixels whose mirror belongs
    # to it (a pixel's mirror belongs to one cell, so no two pastes claim it). Every source is read before anything
    # is written, as in place the boxes may overlap the cells they read.
    n = len(sample["classes"])
    picked = mirrored[eligible[: len(chosen)]].astype(np.int64).tolist()
    pastes = []
    for cell, (x0, y0, x1, y1) in zip(chosen.tolist(), picked):
        mirror = (slice(y0, y1), slice(w - x1, w - x0))  # the same pixels of the left-right mirrored image
        paste = instances[mirror][:, ::-1] == cell
        pastes.append(((slice(y0, y1), slice(x0, x1)), paste, sample["image"][mirror][:, ::-1][paste]))
    image = sample["image"] if inplace else sample["image"].copy()
    out = instances.astype(np.uint16, copy=not inplace)
    for k, (box, paste, pixels) in enumerate(pastes):
        image[box][paste] = pixels
        out[box][paste] = n + 1 + k
    classes = np.asarray(sample["classes"], np.int64)
    classes = np.concatenate([classes, classes[chosen - 1]])
    return {**sample, "image": image, "instances": out, "classes": classes}


def visible_region(matrix: np.ndarray, shape: tuple[int, int], imgsz: int) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)``: the part of an input of ``shape`` that ``matrix`` maps into the output, plus a margin."""
    corners = np.array([[0, 0, 1], [imgsz, 0, 1], [0, imgsz, 1], [imgsz, imgsz, 1]], np.float64)
    src = corners @ np.linalg.inv(matrix.astype(np.float64)).T
    src = src[:, :2] / src[:, 2:3]
    h, w = shape
    x0, y0 = (int(np.clip(np.floor(v) - 2, 0, m)) for v, m in zip(src.min(0), (w, h)))
    x1, y1 = (int(np.clip(np.ceil(v) + 2, 0, m)) for v, m in zip(src.max(0), (w, h)))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def mosaic_canvas(
    samples: list[dict[str, Any]],
    imgsz: int,
    centre: tuple[int, int],
    region: tuple[int, int, int, int] | None = None,
) -> dict[str, Any]:
    """Ultralytics' 4-image mosaic: a ``2 * imgsz`` canvas, the four images around ``centre``.

    Ultralytics draws ``centre = (xc, yc)`` uniform in ``[imgsz / 2, 3 * imgsz / 2]``; image 0 ends at it top-left,
    1 top-right, 2 bottom-left, 3 bottom-right (each cut where it leaves the canvas). Instance ids stay unique:
    each tile's ids are offset past the previous tiles' ones, and ``classes`` are concatenated in the same order.

    Args:
        region: ``(x0, y0, x1, y1)``: build only this part of the canvas (its pixel (0, 0) is canvas (x0, y0)).
    """
    s = imgsz
    xc, yc = centre
    rx0, ry0, rx1, ry1 = region if region is not None else (0, 0, 2 * s, 2 * s)
    image = np.full((ry1 - ry0, rx1 - rx0, 3), PAD_VALUE, np.uint8)
    instances = np.zeros((ry1 - ry0, rx1 - rx0), np.uint16)
    classes, offset = [], 0
    for i, tile in enumerate(samples):
        h, w = tile["instances"].shape
        if i == 0:  # top left
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b = w - (x2a - x1a), h - (y2a - y1a)
        elif i == 1:  # top right
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, 2 * s), yc
            x1b, y1b = 0, h - (y2a - y1a)
        elif i == 2:  # bottom left
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(2 * s, yc + h)
            x1b, y1b = w - (x2a - x1a), 0
        else:  # bottom right
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h)
            x1b, y1b = 0, 0
        # the tile's place on the canvas, cut to the region
        cx0, cy0, cx1, cy1 = max(x1a, rx0), max(y1a, ry0), min(x2a, rx1), min(y2a, ry1)
        if cx1 > cx0 and cy1 > cy0:
            sx, sy = x1b + cx0 - x1a, y1b + cy0 - y1a
            dst = (slice(cy0 - ry0, cy1 - ry0), slice(cx0 - rx0, cx1 - rx0))
            image[dst] = tile["image"][sy : sy + cy1 - cy0, sx : sx + cx1 - cx0]
            inst = tile["instances"][sy : sy + cy1 - cy0, sx : sx + cx1 - cx0]
            instances[dst] = inst
            if offset:
                instances[dst][inst > 0] += offset
        classes.append(tile["classes"])
        offset += len(tile["classes"])
    return {**samples[0], "image": image, "instances": instances, "classes": np.concatenate(classes)}


def affine_matrix(
    shape: tuple[int, int],
    imgsz: int,
    rng: np.random.Generator,
    degrees: float = 0.0,
    translate: float = 0.0,
    scale: float = 0.0,
    shear: float = 0.0,
    perspective: float = 0.0,
) -> tuple[np.ndarray, float]:
    """Ultralytics' ``RandomPerspective`` matrix: input of ``shape`` (h, w) -> ``imgsz`` x ``imgsz`` output.

    ``M = T @ S @ R @ P @ C``: centre the input at the origin, perspective, rotation by U(-degrees, degrees) with
    scale gain U(1 - scale, 1 + scale), shear, then move the centre to ``(0.5 +- translate) * imgsz``. So the
    output is cut from the middle of the input (the mosaic canvas, or the letterboxed image).

    Returns:
        ``(M, gain)``: the 3x3 float32 matrix and the scale gain.
    """
    h, w = shape
    C = np.eye(3, dtype=np.float32)
    C[0, 2], C[1, 2] = -w / 2, -h / 2
    P = np.eye(3, dtype=np.float32)
    P[2, 0], P[2, 1] = rng.uniform(-perspective, perspective, 2) if perspective else (0.0, 0.0)
    R = np.eye(3, dtype=np.float32)
    angle = rng.uniform(-degrees, degrees) if degrees else 0.0
    gain = rng.uniform(1 - scale, 1 + scale) if scale else 1.0
    R[:2] = cv2.getRotationMatrix2D(angle=angle, center=(0, 0), scale=gain)
    S = np.eye(3, dtype=np.float32)
    if shear:
        S[0, 1], S[1, 0] = np.tan(rng.uniform(-shear, shear, 2) * np.pi / 180)
    T = np.eye(3, dtype=np.float32)
    centre = rng.uniform(0.5 - translate, 0.5 + translate, 2) if translate else np.array([0.5, 0.5])
    T[0, 2], T[1, 2] = centre * imgsz
    return T @ S @ R @ P @ C, float(gain)


def warp(sample: dict[str, Any], matrix: np.ndarray, imgsz: int, perspective: bool = False) -> dict[str, Any]:
    """Warp image (linear) and instance map (nearest) of a sample with one matrix to ``imgsz`` x ``imgsz``."""
    size = (imgsz, imgsz)
    if perspective:
        image = cv2.warpPerspective(sample["image"], matrix, size, flags=cv2.INTER_LINEAR, borderValue=(PAD_VALUE,) * 3)
        inst = cv2.warpPerspective(sample["instances"], matrix, size, flags=cv2.INTER_NEAREST, borderValue=0)
    else:
        image = cv2.warpAffine(sample["image"], matrix[:2], size, flags=cv2.INTER_LINEAR, borderValue=(PAD_VALUE,) * 3)
        inst = cv2.warpAffine(sample["instances"], matrix[:2], size, flags=cv2.INTER_NEAREST, borderValue=0)
    return {**sample, "image": image, "instances": inst}


class ValTransform:
    """Validation / prediction: letterbox to ``imgsz`` x ``imgsz`` only."""

    def __init__(self, imgsz: int = 640) -> None:
        self.imgsz = imgsz

    def __call__(self, sample: dict[str, Any], dataset: Any, rng: np.random.Generator | None = None) -> dict[str, Any]:
        return letterbox(sample, self.imgsz)


def copy_paste(
    sample: dict[str, Any],
    source: dict[str, Any],
    fraction: float,
    rng: np.random.Generator,
    tries: int = 10,
    zoom: float = 1.0,
) -> dict[str, Any]:
    """Paste cells of ``source`` into free background of ``sample``.

    Each chosen source cell is flipped/rotated by a random multiple of 90 deg, resized by ``zoom`` and placed where
    its mask overlaps no existing instance (one pixel of margin), trying up to ``tries`` random positions; cells
    that find no room are not pasted. Pasted cells get new instance ids and keep their class.

    Args:
        sample: the image being augmented (``image``, ``instances``, ``classes``).
        source: another loaded sample (any size) to take cells from.
        fraction: share of the source's cells to try (``copy_paste``); at least one.
        rng: random stream.
        tries: placements tried per cell.
        zoom: scale of the pasted cells (the sample's augmentation zoom, so they match their neighbours).
    """
    src_map = source["instances"]
    src_ids = np.unique(src_map)
    src_ids = src_ids[src_ids > 0]
    if not len(src_ids):
        return sample
    k = max(1, round(fraction * len(src_ids)))
    chosen = rng.choice(src_ids, size=min(k, len(src_ids)), replace=False)
    image = sample["image"].copy()
    instances = sample["instances"].astype(np.uint16).copy()
    classes = list(sample["classes"])
    occupied = cv2.dilate((instances > 0).astype(np.uint8), np.ones((3, 3), np.uint8))
    h, w = instances.shape
    for sid in chosen:
        ys, xs = np.nonzero(src_map == sid)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        patch_mask = src_map[y0:y1, x0:x1] == sid
        patch_img = source["image"][y0:y1, x0:x1]
        turns = int(rng.integers(4))
        patch_mask, patch_img = np.rot90(patch_mask, turns), np.rot90(patch_img, turns)
        if rng.random() < 0.5:
            patch_mask, patch_img = patch_mask[:, ::-1], patch_img[:, ::-1]
        if zoom != 1.0:
            size = (max(1, round(patch_mask.shape[1] * zoom)), max(1, round(patch_mask.shape[0] * zoom)))
            patch_img = cv2.resize(np.ascontiguousarray(patch_img), size, interpolation=cv2.INTER_LINEAR)
            patch_mask = cv2.resize(patch_mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
            if not patch_mask.any():
                continue
        ph, pw = patch_mask.shape
        if ph >= h or pw >= w:
            continue
        for _ in range(tries):
            ty, tx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
            if occupied[ty : ty + ph, tx : tx + pw][patch_mask].any():
                continue
            region = (slice(ty, ty + ph), slice(tx, tx + pw))
            image[region][patch_mask] = patch_img[patch_mask]
            classes.append(source["classes"][sid - 1])
            instances[region][patch_mask] = len(classes)
            occupied[region] |= cv2.dilate(patch_mask.astype(np.uint8), np.ones((3, 3), np.uint8))
            break
    return {**sample, "image": image, "instances": instances, "classes": np.asarray(classes, np.int64)}


def mixup(sample: dict[str, Any], other: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Blend two augmented images (ratio ~ Beta(32, 32), as Ultralytics); ``other``'s cells fill free pixels only."""
    r = float(rng.beta(32.0, 32.0))
    image = (sample["image"].astype(np.float32) * r + other["image"].astype(np.float32) * (1 - r)).astype(np.uint8)
    offset = len(sample["classes"])  # class of id k+1 is classes[k]: new ids start after the last one
    inst = sample["instances"].astype(np.uint16).copy()
    free = (inst == 0) & (other["instances"] > 0)
    inst[free] = other["instances"][free].astype(np.uint16) + offset
    classes = np.concatenate([sample["classes"], other["classes"]])
    return {**sample, "image": image, "instances": inst, "classes": classes}
