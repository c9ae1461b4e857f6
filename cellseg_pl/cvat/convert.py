"""CVAT "COCO 1.0" zip -> YOLO-seg dataset folder (``dataset.yaml``, ``images/{train,val}``, ``labels/{train,val}``).

What is written, for an output folder ``D``:

* ``D/dataset.yaml``: ``path`` (absolute ``D``), ``train: images/train``, ``val: images/val``, ``nc`` and
  ``names`` (0-based class -> CVAT label name, classes in order of COCO category id).
* ``D/images/<split>/<name>``: the original image bytes. Sub-folders in ``file_name`` are flattened by
  joining the parts with ``__`` (``a/b/c.jpg`` -> ``a__b__c.jpg``), so each label sits where Ultralytics
  looks for it even when a folder is itself called ``images``; clashing stems get the subset name and
  then the image id prepended/appended.
* ``D/labels/<split>/<stem>.txt``: one line per instance, ``cls x1 y1 x2 y2 ...``, vertices on boundary
  pixel centres (see :func:`cellseg_pl.cvat.coco.mask_to_yolo_polygons`) divided by the image width/height,
  6 decimals rounded *up*, so ``int(x * W)`` (Ultralytics' ``polygon2mask``) and ``round(x * W)`` both
  give the pixel back. An image without instances gets an empty file (background).

Every annotation goes through a mask (pycocotools, as CVAT rasterizes it): polygons with several parts,
uncompressed RLE (CVAT masks, ``iscrowd: 1``, which Ultralytics' converter drops) and compressed RLE all
become one outline per instance. An instance with several disconnected parts stays one label line: its
parts are joined by zero-width bridges at their closest vertices (Ultralytics' ``merge_multi_segment``
idea), so counts in == counts out; ``cv2.fillPoly`` paints the bridge as a 1 px line (see :mod:`cellseg_pl.cvat.labels`).

Fatal problems raise :class:`ConvertError` (or another :class:`~cellseg_pl.cvat.coco.ConvertError`) and leave nothing
written: an unreadable zip or JSON, zip slip, an output folder that is not empty without ``overwrite`` or (with it)
was not written by ``convert``; two image records that would read one image file (the same ``file_name`` twice, or
``--images-dir``'s basename fallback landing two names on one file: never guessed); a result without a single
instance (string image ids against integer ``image_id`` values, every category unknown, no ``annotations``, ...) unless
``allow_empty`` and the files list no annotation at all. Categories sharing a name are merged into one class (CVAT
matches labels by name). The folder is built beside the target and swapped in (:mod:`cellseg_pl.files`): a kill
leaves the old or the new set. Per-annotation and per-image problems are skipped and counted by reason.

The zip is read by :mod:`cellseg_pl.cvat.archive`, its records indexed and checked by :mod:`cellseg_pl.cvat.index`;
the skip reasons, the summary and :class:`~cellseg_pl.cvat.report.ConvertError` are in
:mod:`cellseg_pl.cvat.report`.

Command line (the arguments of :func:`convert_coco_zip`, see :mod:`cellseg_pl.__main__`):
``python -m cellseg_pl convert --coco-zip Z --output-dir D [--images-dir I] [--val-fraction 0.2] [--overwrite]``, or
``scripts/convert_coco_to_yolo.py`` with the same flags (the lab's old name).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from cellseg_pl.cvat.index import (
    IndexedImage,
    attach_annotations,
    check_not_empty,
    collect_images,
    id_key,
    locate_images,
    merge_categories,
    with_image_suffix,
)
from cellseg_pl.cvat.report import ANNOTATION_SKIPS, IMAGE_SKIPS, ConvertSummary
from cellseg_pl.cvat.archive import ZIP_READ_ERRORS, CocoZip, open_coco_zip
from cellseg_pl.data.images import decode_image
from cellseg_pl.files import check_output_dir, remove_stale, staging_folder, swap_into_place, write_manifest
from cellseg_pl.cvat.labels import annotation_outline, normalized_text
from cellseg_pl.errors import ConvertError, DatasetError, ImageTooLargeError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------------


def convert_coco_zip(
    coco_zip: str | Path,
    output_dir: str | Path,
    images_dir: str | Path | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
    allow_empty: bool = False,
) -> ConvertSummary:
    """Convert a CVAT "COCO 1.0" export into a YOLO-seg dataset folder (layout in the module docstring).

    Args:
        coco_zip: the zip exported from CVAT (one or several ``annotations/instances_<subset>.json``).
        output_dir: folder to create; must be empty or missing unless ``overwrite``.
        images_dir: folder with the images when the zip has none (looked up as ``<dir>/<file_name>``,
            then ``<dir>/<basename>`` unless that makes two image records read one file: an error).
        val_fraction: share of images for validation, in (0, 1); the split is by image, seeded.
        seed: seed of the split; the same seed and input give the same split.
        overwrite: replace a non-empty ``output_dir`` that an earlier ``convert`` wrote (it holds
            ``.cellseg_convert.json`` and nothing else but caches); anything else is refused.
        allow_empty: accept a data set without a single instance (background only), provided the annotation
            files list no annotation at all; otherwise no instance is an error.

    Returns:
        What was written and skipped.

    Raises:
        ConvertError / ConvertError: fatal problems; nothing has been written then.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConvertError("--val-fraction", f"{val_fraction} is not between 0 and 1", "pass e.g. 0.2")
    out = Path(output_dir).expanduser().resolve()
    remove_stale(out)  # first: a killed run's old set may need to be put back before the checks look at it
    check_output_dir(out, overwrite, [Path(coco_zip), *([Path(images_dir)] if images_dir else [])])
    with open_coco_zip(coco_zip, images_dir) as cz:
        names, class_of, merged = merge_categories(cz)
        summary = ConvertSummary(Path(coco_zip), out, names)
        for example in merged:
            summary.count(summary.notes, "merged_categories", example)
        images = collect_images(cz, summary)
        locate_images(cz, images)
        attach_annotations(cz, images, class_of, summary)
        if not any(img.anns for img in images.values()):  # no instance possible: say why before decoding
            check_not_empty(cz, summary, allow_empty)
        with staging_folder(out) as tmp:
            written = _convert_images(cz, images, class_of, tmp, summary)
            if not written:
                reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary.skipped_images.items())) or "none listed"
                raise ConvertError(
                    cz.path, f"none of its images could be written ({reasons})", "check --images-dir and the zip"
                )
            check_not_empty(cz, summary, allow_empty)
            _split_and_write(written, tmp, val_fraction, seed, summary)
            _write_yaml(tmp / "dataset.yaml", out, names, cz.path)
            write_manifest(tmp, cz.path)
            swap_into_place(tmp, out)
    logger.info("wrote %s", out)
    return summary


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def _convert_images(
    cz: CocoZip,
    images: dict[tuple[int, Any], IndexedImage],
    class_of: dict[int, int],
    tmp: Path,
    summary: ConvertSummary,
) -> list[IndexedImage]:
    """Read, check and stage every image under ``tmp/staging`` and compute its label lines.

    Returns:
        The images that were written, in input order.
    """
    staging = tmp / "staging"
    staging.mkdir()
    written = []
    for img in images.values():
        where = f"{img.subset.member}: image {img.record['id']} {img.record.get('file_name')!r}"
        reason, data, shape = _read_checked_image(cz, img)
        if reason:
            logger.warning("skipped %s: %s", where, IMAGE_SKIPS[reason])
            summary.count(summary.skipped_images, reason, where)
            for ann in img.anns:
                summary.count(summary.skipped_annotations, "image_skipped", f"{where}: annotation {ann['id']}")
            continue
        assert data is not None and shape is not None
        img.name = with_image_suffix(img.name, data)
        _image_lines(img, shape, class_of, summary)
        (staging / img.name).write_bytes(data)
        written.append(img)
    return written


def _read_checked_image(cz: CocoZip, img: IndexedImage) -> tuple[str | None, bytes | None, tuple[int, int] | None]:
    """Read an image's bytes and decode them once; returns ``(skip reason, bytes, (H, W))``."""
    if not img.name:
        return "invalid_file_name", None, None
    if img.source is None:
        return "missing_file", None, None
    try:
        data = cz.read_located(img.source)
    except ZIP_READ_ERRORS as err:
        logger.warning("%s: cannot be read (%s)", img.record["file_name"], err)
        return "corrupt_image", None, None
    try:
        # IMREAD_COLOR applies EXIF rotation, like cv2.imread in the training loaders
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    except cv2.error:  # OpenCV raises (instead of returning None) for an image over its pixel limit
        try:
            decode_image(data, img.record["file_name"])  # the message that names its size and the fix
        except ImageTooLargeError as err:
            logger.warning("%s", err)
            return "too_large", None, None
        except DatasetError as err:
            logger.warning("%s", err)
        return "corrupt_image", None, None
    if decoded is None:
        return "corrupt_image", None, None
    shape = (int(decoded.shape[0]), int(decoded.shape[1]))
    listed = (img.record.get("height"), img.record.get("width"))
    if all(isinstance(v, int) and v > 0 for v in listed) and listed != shape:
        logger.warning("%s: decoded size %s differs from JSON %s", img.record["file_name"], shape, listed)
        return "size_mismatch", None, None
    return None, data, shape


def _image_lines(img: IndexedImage, shape: tuple[int, int], class_of: dict[int, int], summary: ConvertSummary) -> None:
    """Fill ``img.lines`` with one ``cls x1 y1 ...`` line per usable annotation; count the others."""
    height, width = shape
    skipped = 0
    for ann in img.anns:
        notes: list[str] = []
        outline, reason = annotation_outline(ann, height, width, notes)
        where = f"{img.subset.member}: annotation {ann['id']} on {img.record['file_name']!r}"
        for note in notes:
            summary.count(summary.notes, note, where)
        if outline is None:
            assert reason is not None
            logger.debug("skipped %s: %s", where, ANNOTATION_SKIPS[reason])
            summary.count(summary.skipped_annotations, reason, where)
            skipped += 1
            continue
        cls = class_of[id_key(ann["category_id"])]
        img.lines.append(f"{cls} {normalized_text(outline, width, height)}")
        summary.instances[cls] += 1
    if skipped:
        summary.count(summary.notes, "images_missing_objects", repr(img.record["file_name"]))


def _split_and_write(
    written: list[IndexedImage], tmp: Path, val_fraction: float, seed: int, summary: ConvertSummary
) -> None:
    """Split images into train/val (seeded, by output name order) and move them and their labels in place."""
    order = sorted(written, key=lambda im: im.name)
    n_val = int(round(len(order) * val_fraction))
    if len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)
    else:
        n_val = 0
        logger.warning("only one image: it goes to train and the val split is empty")
    perm = np.random.default_rng(seed).permutation(len(order))
    val = {int(i) for i in perm[:n_val]}
    for split in ("train", "val"):
        (tmp / "images" / split).mkdir(parents=True)
        (tmp / "labels" / split).mkdir(parents=True)
    for i, img in enumerate(order):
        split = "val" if i in val else "train"
        os.replace(tmp / "staging" / img.name, tmp / "images" / split / img.name)
        text = "".join(line + "\n" for line in img.lines)
        (tmp / "labels" / split / f"{os.path.splitext(img.name)[0]}.txt").write_text(text)
        summary.background_images += not img.lines
    (tmp / "staging").rmdir()
    summary.val_images = n_val
    summary.train_images = len(order) - n_val


def _write_yaml(path: Path, out: Path, names: dict[int, str], source: Path) -> None:
    """Write ``dataset.yaml`` as Ultralytics and ``cellseg_pl.data.datamodule`` read it."""
    doc = {"path": str(out), "train": "images/train", "val": "images/val", "nc": len(names), "names": names}
    header = f"# written by cellseg_pl.cvat.convert from {Path(source).name}\n"
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
