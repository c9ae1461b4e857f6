"""Albumentations pipelines that move instance masks with the image: mosaic, copy-paste, affine, flips, HSV.

A transform here is a callable ``(sample, dataset, rng) -> sample`` over the loaded samples of
:class:`cellseg_pl.dataset.YoloSegDataset` (``image`` HxWx3 uint8 RGB with its long side already ``imgsz``,
``instances`` HxW uint16 instance map, ``classes``). Because every instance lives in one integer map that is warped
with nearest-neighbour interpolation, masks follow every geometric change exactly and boxes are recomputed from the
warped pixels afterwards (:func:`cellseg_pl.dataset.finalize`), never transformed as boxes.

The knobs carry Ultralytics' names and meanings (``degrees``, ``translate``, ``scale``, ``shear``, ``perspective``,
``flipud``, ``fliplr``, ``hsv_h/s/v``, ``mosaic``, ``mixup``, ``copy_paste``) so a ``yolo segment train`` recipe
maps one to one.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from typing import Any

# Albumentations asks PyPI for a newer version when imported (a network call, 2 s timeout); cellseg_pl runs
# offline, so that check is switched off before the import (the one environment write at import, on purpose).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import cv2
import numpy as np

from cellseg_pl.dataset import PAD_VALUE, letterbox

log = logging.getLogger(__name__)


class RandomHSV(A.ImageOnlyTransform):
    """Ultralytics' HSV jitter: hue, saturation and value multiplied by random gains in ``1 +- gain``.

    Args:
        hgain: hue gain (fraction of the hue circle).
        sgain: saturation gain.
        vgain: value gain.
    """

    def __init__(self, hgain: float = 0.015, sgain: float = 0.7, vgain: float = 0.4, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.hgain, self.sgain, self.vgain = hgain, sgain, vgain

    def get_params(self) -> dict[str, Any]:
        return {"gains": self.random_generator.uniform(-1, 1, 3) * [self.hgain, self.sgain, self.vgain] + 1}

    def apply(self, img: np.ndarray, gains: np.ndarray, **params: Any) -> np.ndarray:
        hue, sat, val = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV))
        x = np.arange(0, 256, dtype=np.float32)
        lut_hue = ((x * gains[0]) % 180).astype(np.uint8)
        lut_sat = np.clip(x * gains[1], 0, 255).astype(np.uint8)
        lut_val = np.clip(x * gains[2], 0, 255).astype(np.uint8)
        hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("hgain", "sgain", "vgain")


class TrainTransform:
    """The training augmentation, configured with Ultralytics' hyper-parameter names.

    Order (as in Ultralytics): 4-image mosaic (prob. ``mosaic``) or letterbox -> copy-paste -> affine (rotation,
    scale, translation, shear) and perspective -> mixup -> HSV -> vertical / horizontal flips.

    Args:
        imgsz: output side in px.
        degrees: rotation range +- deg (cells are round: the lab uses 180).
        translate: translation range +- fraction of the image side.
        scale: scale gain range ``1 +- scale``.
        shear: shear range +- deg.
        perspective: perspective distortion (Ultralytics' units, 0-0.001); mapped to Albumentations' corner jitter.
        flipud: probability of a vertical flip.
        fliplr: probability of a horizontal flip.
        hsv_h: hue gain.
        hsv_s: saturation gain.
        hsv_v: value gain.
        mosaic: probability of a 4-image mosaic.
        mixup: probability of blending with a second (augmented) image.
        copy_paste: probability of pasting cells from another image into free background of this one; the number
            pasted is ``round(copy_paste * n)`` for the n cells of the source image (at least one).
    """

    def __init__(
        self,
        imgsz: int = 640,
        degrees: float = 0.0,
        translate: float = 0.1,
        scale: float = 0.5,
        shear: float = 0.0,
        perspective: float = 0.0,
        flipud: float = 0.0,
        fliplr: float = 0.5,
        hsv_h: float = 0.015,
        hsv_s: float = 0.7,
        hsv_v: float = 0.4,
        mosaic: float = 1.0,
        mixup: float = 0.0,
        copy_paste: float = 0.0,
    ) -> None:
        self.imgsz = imgsz
        self.mosaic_p, self.mixup_p, self.copy_paste_p = mosaic, mixup, copy_paste
        # Shared memory, so that persistent data-loader workers see close_mosaic switch it off.
        self._mosaic_on = multiprocessing.Value("b", mosaic > 0, lock=False)
        self.mosaic = A.Compose(
            [
                A.Mosaic(
                    grid_yx=(2, 2),
                    target_size=(imgsz, imgsz),
                    cell_shape=(imgsz, imgsz),
                    center_range=(0.25, 0.75),
                    fit_mode="contain",
                    fill=PAD_VALUE,
                    fill_mask=0,
                    p=1.0,
                )
            ]
        )
        spatial: list[A.BasicTransform] = []
        if degrees or translate or scale != 0 or shear:
            spatial.append(
                A.Affine(
                    scale=(1 - scale, 1 + scale),
                    translate_percent=(-translate, translate),
                    rotate=(-degrees, degrees),
                    shear=(-shear, shear),
                    keep_ratio=True,  # one scale gain for both axes, as Ultralytics
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=PAD_VALUE,
                    fill_mask=0,
                    p=1.0,
                )
            )
        if perspective > 0:
            # Ultralytics moves corners by about perspective * (imgsz/2)^2 px; Albumentations takes a fraction.
            spatial.append(
                A.Perspective(scale=(0, min(0.2, perspective * imgsz / 4)), fill=PAD_VALUE, fill_mask=0, p=1.0)
            )
        self.spatial = A.Compose(spatial)
        color: list[A.BasicTransform] = []
        if hsv_h or hsv_s or hsv_v:
            color.append(RandomHSV(hsv_h, hsv_s, hsv_v))
        if flipud > 0:
            color.append(A.VerticalFlip(p=flipud))
        if fliplr > 0:
            color.append(A.HorizontalFlip(p=fliplr))
        self.color = A.Compose(color)

    @property
    def mosaic_enabled(self) -> bool:
        """Whether mosaic may be applied (``close_mosaic`` turns it off for the last epochs)."""
        return bool(self._mosaic_on.value)

    @mosaic_enabled.setter
    def mosaic_enabled(self, value: bool) -> None:
        self._mosaic_on.value = bool(value)

    def __call__(self, sample: dict[str, Any], dataset: Any, rng: np.random.Generator) -> dict[str, Any]:
        """Augment one loaded sample; ``rng`` is its own random stream (the data set derives it per sample)."""
        for compose in (self.mosaic, self.spatial, self.color):
            compose.set_random_seed(int(rng.integers(2**31)))
        sample = self._base(sample, dataset, rng)
        if self.copy_paste_p > 0 and rng.random() < self.copy_paste_p and len(dataset) > 1:
            source = dataset.load(int(rng.integers(len(dataset))))
            sample = copy_paste(sample, letterbox(source, self.imgsz), self.copy_paste_p, rng)
        sample = self._apply(self.spatial, sample)
        if self.mixup_p > 0 and rng.random() < self.mixup_p and len(dataset) > 1:
            other = dataset.load(int(rng.integers(len(dataset))))
            other = self._apply(self.spatial, self._base(other, dataset, rng))
            sample = mixup(sample, other, rng)
        return self._apply(self.color, sample)

    def _base(self, sample: dict[str, Any], dataset: Any, rng: np.random.Generator) -> dict[str, Any]:
        """Mosaic of this sample and three random others, or a plain letterbox."""
        if not (self.mosaic_enabled and rng.random() < self.mosaic_p and len(dataset) > 1):
            return letterbox(sample, self.imgsz)
        others = [dataset.load(int(rng.integers(len(dataset)))) for _ in range(3)]
        # Instance ids must stay unique across the four tiles: offset each tile's ids past the previous ones.
        offset = len(sample["classes"])
        classes = [sample["classes"]]
        metadata = []
        for other in others:
            inst = other["instances"].astype(np.uint16)
            shifted = np.where(inst > 0, inst + offset, 0).astype(np.uint16)
            metadata.append({"image": other["image"], "mask": shifted})
            classes.append(other["classes"])
            offset += len(other["classes"])
        out = self.mosaic(image=sample["image"], mask=sample["instances"], mosaic_metadata=metadata)
        return {**sample, "image": out["image"], "instances": out["mask"], "classes": np.concatenate(classes)}

    @staticmethod
    def _apply(compose: A.Compose, sample: dict[str, Any]) -> dict[str, Any]:
        if not compose.transforms:
            return sample
        out = compose(image=sample["image"], mask=sample["instances"])
        return {**sample, "image": out["image"], "instances": out["mask"]}


class ValTransform:
    """Validation / prediction: letterbox to ``imgsz`` x ``imgsz`` only."""

    def __init__(self, imgsz: int = 640) -> None:
        self.imgsz = imgsz

    def __call__(self, sample: dict[str, Any], dataset: Any, rng: np.random.Generator | None = None) -> dict[str, Any]:
        return letterbox(sample, self.imgsz)


def copy_paste(
    sample: dict[str, Any], source: dict[str, Any], fraction: float, rng: np.random.Generator, tries: int = 10
) -> dict[str, Any]:
    """Paste cells of ``source`` into free background of ``sample`` (both letterboxed to the same size).

    Each chosen source cell is flipped/rotated by a random multiple of 90 deg and placed where its mask overlaps no
    existing instance (one pixel of margin), trying up to ``tries`` random positions; cells that find no room are
    not pasted. Pasted cells get new instance ids and keep their class.

    Args:
        sample: the image being augmented (``image``, ``instances``, ``classes``).
        source: another sample of the same size to take cells from.
        fraction: share of the source's cells to try (``copy_paste``); at least one.
        rng: random stream.
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
