"""YOLO-seg data set on disk -> samples with instance masks -> the batch dict the loss reads.

The batch schema (written once, here; everything else refers to it)
-------------------------------------------------------------------
``collate`` returns a dict with, for a batch of B images of side S (= ``imgsz``) holding N instances in all:

=============  ==========================  ===============================================================
key            shape, dtype                meaning
=============  ==========================  ===============================================================
``img``        (B, 3, S, S) uint8          RGB, letterboxed; the module turns it into float 0..1 on device
``batch_idx``  (N,) float32                index in the batch of the image each instance belongs to
``cls``        (N, 1) float32              0-based class index
``bboxes``     (N, 4) float32              box of the instance's mask, **normalized xywh** (centre x, y, w, h
                                           divided by S), the convention Ultralytics' loss expects
``masks``      (B, S/r, S/r) int64 when    instance map at 1/r resolution (r = ``mask_ratio``, 4 by default):
               ``overlap_mask``, else      pixel value k+1 is the k-th instance *of that image* (instances of an
               (N, S/r, S/r) float32       image are listed in ``cls``/``bboxes`` in that order), 0 background.
                                           Without overlap: one binary mask per instance.
``instances``  (B, S, S) int32             the same instance map at full resolution (only when the collate has
                                           ``full_masks=True``: validation, for mask mAP)
``im_file``    list[str]                   source image path
``ori_shape``  list[(h0, w0)]              original image size in px
``ratio_pad``  list[(gain, (pad_w, pad_h))]  letterbox: original px * gain + pad = network-input px
                                           (only meaningful for un-augmented, i.e. validation, samples)
=============  ==========================  ===============================================================

Instances overlap rarely in cell images; where they do, the instance map keeps the smaller one on top (larger
instances are drawn first), exactly as Ultralytics' ``overlap_mask=True`` targets do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
import yaml
from scipy import ndimage

from cellseg_pl.data.labels import class_names_of, label_path_for, parse_label_line, read_label_text
from cellseg_pl.data.images import IMAGE_SUFFIXES, list_images, load_resized
from cellseg_pl.errors import DatasetError

log = logging.getLogger(__name__)

#: Letterbox padding value, as in Ultralytics.
PAD_VALUE = 114
_SHIFT = 4


@dataclass
class DatasetSpec:
    """What a YOLO-seg ``dataset.yaml`` describes, with paths resolved.

    Attributes:
        yaml_path: the ``dataset.yaml`` file.
        root: the resolved ``path`` entry.
        names: class index -> class name.
        splits: split name (``train``, ``val``, ``test``) -> sorted list of image files.
    """

    yaml_path: Path
    root: Path
    names: dict[int, str]
    splits: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.names)


def _list_images(entry: str | list, root: Path, yaml_path: Path, key: str) -> list[Path]:
    """Resolve one ``train``/``val`` entry: a folder, a ``.txt`` list of images, an image, or a list of those."""
    if isinstance(entry, (list, tuple)):
        return sorted({p for e in entry for p in _list_images(e, root, yaml_path, key)})
    p = Path(str(entry))
    p = p if p.is_absolute() else root / p
    if p.is_dir():
        return list_images(p)
    if p.suffix == ".txt" and p.is_file():
        files = []
        for line in p.read_text().splitlines():
            if line.strip():
                q = Path(line.strip())
                files.append(q if q.is_absolute() else (p.parent / q))
        return sorted(files)
    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
        return [p]
    raise DatasetError(f"{yaml_path}: '{key}: {entry}' resolves to {p}, which does not exist; fix '{key}' or 'path'")


def load_dataset_yaml(path: str | Path) -> DatasetSpec:
    """Read a YOLO-seg ``dataset.yaml`` (keys ``path``, ``train``, ``val``, optional ``test``, ``names``).

    A relative ``path`` is taken relative to the yaml file's folder (then to the working directory).
    ``names`` may be a list or an ``{index: name}`` mapping.
    """
    yaml_path = Path(path)
    if not yaml_path.is_file():
        hint = "write the demo data with: python scripts/make_demo_data.py" if "demo" in yaml_path.parts else (
            "pass the dataset.yaml written by 'cellseg_pl convert'"
        )
        raise DatasetError(f"{yaml_path} does not exist; {hint}")
    try:
        spec = yaml.safe_load(yaml_path.read_text())
    except yaml.YAMLError as e:
        raise DatasetError(f"{yaml_path}: not valid YAML ({e})") from None
    if not isinstance(spec, dict):
        raise DatasetError(f"{yaml_path}: expected a mapping with 'path', 'train', 'val' and 'names'")
    for key in ("train", "val", "names"):
        if key not in spec:
            raise DatasetError(f"{yaml_path}: missing key '{key}'")
    raw_root = Path(str(spec.get("path") or "."))
    root = raw_root if raw_root.is_absolute() else (yaml_path.parent / raw_root)
    if not root.exists() and not raw_root.is_absolute() and raw_root.exists():
        root = raw_root
    try:
        names = class_names_of(spec["names"])
    except (TypeError, ValueError):
        raise DatasetError(f"{yaml_path}: 'names' must be a list or a mapping index -> name") from None
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"{yaml_path}: class indices in 'names' must be 0..{len(names) - 1}, got {sorted(names)}")
    splits = {}
    for key in ("train", "val", "test"):
        if spec.get(key):
            splits[key] = _list_images(spec[key], root.resolve(), yaml_path, key)
    return DatasetSpec(yaml_path=yaml_path, root=root.resolve(), names=names, splits=splits)


def read_label(path: Path, num_classes: int) -> tuple[np.ndarray, list[np.ndarray], dict[str, int]]:
    """Parse a YOLO-seg label file.

    Returns:
        ``(classes, polygons, skipped)``: classes (n,) int64; one (k, 2) float32 normalized polygon per instance
        (coordinates clipped to [0, 1]); ``skipped`` counts lines dropped by reason (see
        :func:`~cellseg_pl.data.labels.parse_label_line`). A missing file means a background image.
    """
    skipped: dict[str, int] = {}
    classes, polygons = [], []
    try:
        text = read_label_text(path)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the label file ({e.strerror or e}); check its permissions") from None
    for line in (text or "").splitlines():
        parsed = parse_label_line(line, num_classes)
        if parsed is None:
            continue
        if parsed.problem is not None:
            skipped[parsed.problem] = skipped.get(parsed.problem, 0) + 1
            continue
        classes.append(int(parsed.cls))
        polygons.append(parsed.polygon)
    return np.asarray(classes, np.int64), polygons, skipped


def rasterize(polygons: list[np.ndarray], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw normalized polygons into one instance map, larger instances first so small ones stay on top.

    Returns:
        ``(instance_map, order)``: uint16 HxW where value k+1 is polygon ``order[k]``; instances fully covered by
        others are absent from the map.
    """
    # 4 fractional bits: sub-pixel vertices, rasterized with the pixel-centre convention of Ultralytics' loader
    scale = np.array([width, height], np.float32) * (1 << _SHIFT)
    pixel_polys = [np.round(p * scale).astype(np.int32) for p in polygons]
    areas = [abs(cv2.contourArea(p.astype(np.float32))) for p in pixel_polys]
    order = np.argsort(areas, kind="stable")[::-1]
    instance_map = np.zeros((height, width), np.uint16)
    for k, i in enumerate(order):
        cv2.fillPoly(instance_map, [pixel_polys[i]], k + 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return instance_map, order


def mask_targets(instances: np.ndarray, ratio: int, overlap: bool = True, count: int = 0) -> np.ndarray:
    """The mask loss' targets at ``1 / ratio`` of the network input, made from an instance map as Ultralytics makes
    them from polygons (``polygon2mask``: each instance's mask resized with linear interpolation, kept where the
    result rounds to 1).

    A linear resize by an even ``ratio`` averages the 2x2 pixels around each target pixel's centre (an odd ``ratio``
    takes the centre pixel), so a target pixel belongs to an instance that covers at least half of them. A target
    is thus slightly larger than the instance's exact area (each outline moves outwards by up to half a pixel), the
    size Ultralytics trains its masks towards: with exact areas (one pixel sampled per target pixel) predicted masks
    came out smaller than the cells and matched them worse (HeLa tiles, 150 epochs: mean matched IoU 0.863 against
    0.885; test mask mAP50-95 0.652 against 0.718, seed 0).

    Args:
        instances: HxW instance map (0 background, k the k-th instance), H and W multiples of ``ratio``.
        ratio: the downsampling (``mask_ratio``).
        overlap: one map (True): where two instances both qualify, the smaller one (by area in ``instances``)
            wins, as in Ultralytics' ``polygons2masks_overlap``. False: a bool mask per instance 1..``count``.
        count: the number of instances (``overlap=False``).

    Returns:
        ``(H/ratio, W/ratio)`` int64 map, or ``(count, H/ratio, W/ratio)`` bool masks.
    """
    h, w = instances.shape[0] // ratio, instances.shape[1] // ratio
    lo, hi = (ratio // 2 - 1, ratio // 2 + 1) if ratio % 2 == 0 else (ratio // 2, ratio // 2 + 1)
    # the centre pixels of every block, one (h, w) map per position (4 for an even ratio, 1 for an odd one)
    centre = [instances[lo + dy :: ratio, lo + dx :: ratio][:h, :w].astype(np.int64)
              for dy in range(hi - lo) for dx in range(hi - lo)]  # fmt: skip
    covers = []  # where each candidate covers at least half of the centre pixels
    for c in centre:
        votes = sum((c == other).astype(np.int8) for other in centre)
        covers.append((c > 0) & (2 * votes >= len(centre)))
    if not overlap:
        out = np.zeros((count, h, w), bool)
        for c, cov in zip(centre, covers):
            ys, xs = np.nonzero(cov & (c <= count))
            out[c[ys, xs] - 1, ys, xs] = True
        return out
    area = np.bincount(instances.reshape(-1))
    top = area.shape[0]
    # smaller area first, then the larger id: the rank encodes the id, so the lowest rank names the winner
    none = np.iinfo(np.int64).max
    rank = np.full((h, w), none, np.int64)
    for c, cov in zip(centre, covers):
        np.minimum(rank, np.where(cov, area[c] * (top + 1) + (top - c), none), out=rank)
    return np.where(rank < none, top - rank % (top + 1), 0)


def instance_boxes(instance_map: np.ndarray, min_size: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of the instances present in an instance map, recomputed from the (transformed) pixels.

    Args:
        instance_map: HxW integer map, 0 background.
        min_size: instances whose box is narrower or lower than this (px) are dropped.

    Returns:
        ``(ids, boxes)``: ids (n,) of the kept instances (ascending) and their xyxy pixel boxes (n, 4) float32,
        x2/y2 exclusive.
    """
    slices = ndimage.find_objects(instance_map)
    ids, boxes = [], []
    for k, sl in enumerate(slices):
        if sl is None:
            continue
        y, x = sl
        if x.stop - x.start < min_size or y.stop - y.start < min_size:
            continue
        ids.append(k + 1)
        boxes.append((x.start, y.start, x.stop, y.stop))
    return np.asarray(ids, np.int64), np.asarray(boxes, np.float32).reshape(-1, 4)


def letterbox_params(height: int, width: int, imgsz: int) -> tuple[float, tuple[float, float]]:
    """Gain and (pad_w, pad_h) that fit an image of the given size into ``imgsz`` x ``imgsz``, centred."""
    gain = min(imgsz / height, imgsz / width)
    new_w, new_h = round(width * gain), round(height * gain)
    return gain, ((imgsz - new_w) // 2, (imgsz - new_h) // 2)


class YoloSegDataset(torch.utils.data.Dataset):
    """Images and YOLO-seg polygon labels -> augmented samples with instance maps.

    Args:
        images: image files; each label is found with :func:`label_path_for`.
        num_classes: number of classes (label lines with another index are skipped and counted).
        imgsz: network input side in px (a multiple of 32).
        transform: callable ``(sample, dataset, rng) -> sample`` applied to a loaded sample (see
            :mod:`cellseg_pl.data.transforms`); ``None`` letterboxes only.
        seed: base seed of the augmentation randomness.
        epoch: shared integer (``multiprocessing.Value``) holding the current epoch, or None for epoch 0.
        skip_unreadable: an image that cannot be read or decoded any more (the files were checked by
            :func:`cellseg_pl.data.scan.scan_split` before training, so it changed since) is replaced by the next image
            of the list, with a warning naming it, instead of stopping the run with a :class:`DatasetError`.
        cache: an :class:`cellseg_pl.data.cache.ImageCache` of these images (``get(index)`` -> what
            :func:`load_resized` returns, or None), or None to decode every time.

    Each process keeps the labels it has parsed (classes and polygons, a few kB per image; Ultralytics keeps them
    all too): a mosaic reads four images, and parsing their text again was a tenth of a sample's time.

    Randomness is a pure function of ``(seed, epoch, index)``: a sample is augmented the same way whichever worker
    loads it, and a run resumed at an epoch boundary sees exactly the samples an uninterrupted run would.
    """

    def __init__(
        self,
        images: list[Path],
        num_classes: int,
        imgsz: int = 640,
        transform: Callable[[dict, "YoloSegDataset", np.random.Generator], dict] | None = None,
        seed: int = 0,
        epoch: Any = None,
        skip_unreadable: bool = False,
        cache: Any = None,
    ) -> None:
        self.images = [Path(p) for p in images]
        self.cache = cache
        self.num_classes = num_classes
        self.imgsz = imgsz
        self.transform = transform
        self.seed = seed
        self.epoch = epoch
        self.skip_unreadable = skip_unreadable
        self._labels: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}  # parsed labels, per process

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> dict[str, Any]:
        """Load image ``index`` resized so its long side is ``imgsz``, with its instance map.

        Returns:
            dict with ``image`` (h, w, 3) uint8 RGB, ``instances`` (h, w) uint16 map, ``classes`` (n,) int64 where
            ``classes[k]`` is the class of map value k+1, ``ori_shape`` (h0, w0) and ``im_file``.
        """
        attempts = len(self.images) if self.skip_unreadable else 1
        for step in range(attempts):
            i = (index + step) % len(self.images)
            path = self.images[i]
            try:
                cached = self.cache.get(i) if self.cache is not None else None
                image, (h0, w0) = cached if cached is not None else load_resized(path, self.imgsz)
                if i not in self._labels:
                    self._labels[i] = read_label(label_path_for(path), self.num_classes)[:2]
                classes, polygons = self._labels[i]
                break
            except DatasetError as e:
                if step == attempts - 1:
                    raise
                # the scan before training found this file usable: it changed since; keep the run going
                log.warning("%s (it changed since the scan before training); using the next image instead", e)
        h, w = image.shape[:2]
        instances, order = rasterize(polygons, h, w)
        return {
            "image": image,
            "instances": instances,
            "classes": classes[order] if len(order) else classes,
            "ori_shape": (h0, w0),
            "im_file": str(path),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch = int(self.epoch.value) if self.epoch is not None else 0
        rng = np.random.default_rng([self.seed, epoch, index])
        sample = self.load(index)
        h, w = sample["instances"].shape
        gain_total = self.imgsz / max(sample["ori_shape"])
        _, pad = letterbox_params(h, w, self.imgsz)
        sample["ratio_pad"] = (gain_total, pad)
        if self.transform is not None:
            sample = self.transform(sample, self, rng)
        else:
            sample = letterbox(sample, self.imgsz)
        return finalize(sample)


def letterbox(sample: dict[str, Any], imgsz: int) -> dict[str, Any]:
    """Pad a loaded sample (long side already ``imgsz``) to ``imgsz`` x ``imgsz``, centred, as validation does."""
    image, instances = sample["image"], sample["instances"]
    h, w = instances.shape
    _, (pad_w, pad_h) = letterbox_params(h, w, imgsz)
    out = np.full((imgsz, imgsz, 3), PAD_VALUE, np.uint8)
    out[pad_h : pad_h + h, pad_w : pad_w + w] = image
    inst = np.zeros((imgsz, imgsz), instances.dtype)
    inst[pad_h : pad_h + h, pad_w : pad_w + w] = instances
    return {**sample, "image": out, "instances": inst}


def finalize(sample: dict[str, Any]) -> dict[str, Any]:
    """Compact the instance ids of a transformed sample and recompute boxes from its pixels."""
    instances = sample["instances"]
    ids, boxes = instance_boxes(instances)
    classes = sample["classes"][ids - 1] if len(ids) else np.zeros(0, np.int64)
    lut = np.zeros(int(instances.max()) + 1 if instances.size else 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    compact = lut[instances]
    s_h, s_w = compact.shape
    xywh = np.stack(
        [(boxes[:, 0] + boxes[:, 2]) / 2 / s_w, (boxes[:, 1] + boxes[:, 3]) / 2 / s_h,
         (boxes[:, 2] - boxes[:, 0]) / s_w, (boxes[:, 3] - boxes[:, 1]) / s_h],
        axis=1,
    ) if len(boxes) else np.zeros((0, 4), np.float32)
    out = {
        "img": torch.from_numpy(np.ascontiguousarray(sample["image"].transpose(2, 0, 1))),
        "instances": torch.from_numpy(compact),
        "cls": torch.from_numpy(classes.astype(np.float32)),
        "bboxes": torch.from_numpy(xywh.astype(np.float32)),
        "im_file": sample["im_file"],
        "ori_shape": sample["ori_shape"],
        "ratio_pad": sample["ratio_pad"],
    }
    return out


class Collate:
    """Stack samples into the batch dict described in the module docstring.

    Args:
        mask_ratio: downsampling of the loss' mask targets (Ultralytics' ``mask_ratio``, 4).
        overlap_mask: one instance map per image (True) or one binary mask per instance (False).
        full_masks: also return the full-resolution ``instances`` maps (validation needs them for mask mAP).
    """

    def __init__(self, mask_ratio: int = 4, overlap_mask: bool = True, full_masks: bool = False) -> None:
        self.mask_ratio = mask_ratio
        self.overlap_mask = overlap_mask
        self.full_masks = full_masks

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        img = torch.stack([s["img"] for s in samples])
        size = img.shape[-1] // self.mask_ratio
        counts = [len(s["cls"]) for s in samples]
        batch = {
            "img": img,
            "batch_idx": torch.cat([torch.full((n,), i, dtype=torch.float32) for i, n in enumerate(counts)]),
            "cls": torch.cat([s["cls"] for s in samples]).view(-1, 1),
            "bboxes": torch.cat([s["bboxes"] for s in samples]).view(-1, 4),
            "im_file": [s["im_file"] for s in samples],
            "ori_shape": [s["ori_shape"] for s in samples],
            "ratio_pad": [s["ratio_pad"] for s in samples],
        }
        maps = [s["instances"].numpy() for s in samples]
        if self.overlap_mask:
            batch["masks"] = torch.from_numpy(np.stack([mask_targets(m, self.mask_ratio) for m in maps]))
        else:
            per_instance = [torch.from_numpy(mask_targets(m, self.mask_ratio, False, n)) for m, n in zip(maps, counts)]
            batch["masks"] = torch.cat(per_instance).float() if per_instance else torch.zeros(0, size, size)
        if self.full_masks:
            batch["instances"] = torch.stack([s["instances"] for s in samples])
        return batch
