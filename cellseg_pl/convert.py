"""CVAT "COCO 1.0" zip -> YOLO-seg dataset folder (``dataset.yaml``, ``images/{train,val}``, ``labels/{train,val}``).

What is written, for an output folder ``D``:

* ``D/dataset.yaml``: ``path`` (absolute ``D``), ``train: images/train``, ``val: images/val``, ``nc`` and
  ``names`` (0-based class -> CVAT label name, classes in order of COCO category id).
* ``D/images/<split>/<name>``: the original image bytes. Sub-folders in ``file_name`` are flattened by
  joining the parts with ``__`` (``a/b/c.jpg`` -> ``a__b__c.jpg``), so each label sits where Ultralytics
  looks for it even when a folder is itself called ``images``; clashing stems get the subset name and
  then the image id prepended/appended.
* ``D/labels/<split>/<stem>.txt``: one line per instance, ``cls x1 y1 x2 y2 ...``, vertices on boundary
  pixel centres (see :func:`cellseg_pl.coco.mask_to_yolo_polygons`) divided by the image width/height,
  6 decimals rounded *up*, so ``int(x * W)`` (Ultralytics' ``polygon2mask``) and ``round(x * W)`` both
  give the pixel back. An image without instances gets an empty file (background).

Every annotation goes through a mask (pycocotools, as CVAT rasterizes it): polygons with several parts,
uncompressed RLE (CVAT masks, ``iscrowd: 1``, which Ultralytics' converter drops) and compressed RLE all
become one outline per instance. An instance with several disconnected parts stays one label line: its
parts are joined by zero-width bridges at their closest vertices (Ultralytics' ``merge_multi_segment``
idea), so counts in == counts out; ``cv2.fillPoly`` paints the bridge as a 1 px line (see :mod:`cellseg_pl.yolo_label`).

Fatal problems raise :class:`ConvertError` (or another :class:`~cellseg_pl.coco.CocoError`) and leave nothing
written: an unreadable zip or JSON, zip slip, an output folder that is not empty without ``overwrite`` or (with it)
was not written by ``convert``; two image records that would read one image file (the same ``file_name`` twice, or
``--images-dir``'s basename fallback landing two names on one file: never guessed); a result without a single
instance (string image ids against integer ``image_id`` values, every category unknown, no ``annotations``, ...) unless
``allow_empty`` and the files list no annotation at all. Categories sharing a name are merged into one class (CVAT
matches labels by name). The folder is built beside the target and swapped in (:mod:`cellseg_pl.outdir`): a kill
leaves the old or the new set. Per-annotation and per-image problems are skipped and counted by reason.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np
import yaml

from cellseg_pl.coco import CocoError, count_reason, reason_lines
from cellseg_pl.cvat_zip import ZIP_READ_ERRORS, CocoSubset, CocoZip, open_coco_zip, unsafe_path_reason
from cellseg_pl.dataset import DatasetError, ImageTooLargeError, decode_image
from cellseg_pl.outdir import check_output_dir, remove_stale, staging_folder, swap_into_place, write_manifest
from cellseg_pl.yolo_label import annotation_outline, normalized_text

logger = logging.getLogger(__name__)

#: Why an annotation was not written, as printed in the summary.
ANNOTATION_SKIPS = {
    "box_only": "box-only (empty segmentation): no mask to train on, not written",
    "unknown_image": "image_id not listed in 'images'",
    "unknown_category": "category_id not listed in 'categories'",
    "invalid_polygon": "no polygon part with >= 3 points and an even number of finite coordinates",
    "coordinates_out_of_range": "polygon coordinates beyond +-1e12 px: no position in any image",
    "invalid_rle": "RLE whose size differs from the image or whose runs are malformed",
    "invalid_segmentation": "segmentation is neither polygons nor RLE",
    "empty_mask": "zero area inside the image",
    "too_small": "too thin or small for an outline of >= 3 points",
    "image_skipped": "its image was skipped",
}
#: Why an image was not written.
IMAGE_SKIPS = {
    "missing_file": "file in neither the zip nor --images-dir",
    "corrupt_image": "bytes that cannot be read or that OpenCV cannot decode",
    "too_large": "over OpenCV's pixel limit (2^30 px): tile it, or raise CV_IO_MAX_IMAGE_PIXELS",
    "size_mismatch": "decoded size differs from width/height in the JSON",
    "invalid_file_name": "file_name empty, not a string, or escaping its folder ('..', absolute path)",
    "duplicate_image_id": "image id listed twice in one annotation file (the first is kept)",
}
#: Things fixed on the way, still written.
NOTES = {
    "clipped": "annotations with coordinates outside the image, clipped to it",
    "dropped_parts": "invalid polygon parts dropped from otherwise valid annotations",
    "multi_part": "instances with several disconnected parts, joined into one outline",
    "merged_categories": "categories sharing a name (CVAT matches labels by name), merged into one class",
    "images_missing_objects": "images written although some of their annotations were skipped: "
    "those objects look like background to training",
}
_IMAGE_SUFFIXES = {".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm", ".heic"}
_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"), (b"BM", ".bmp"))


class ConvertError(CocoError):
    """A fatal problem with an argument or the output folder, worded ``"<file or flag>: <problem>; <fix>"``."""


@dataclass
class ConvertSummary:
    """What :func:`convert_coco_zip` wrote and skipped.

    Counter keys are the keys of ``ANNOTATION_SKIPS``, ``IMAGE_SKIPS`` and ``NOTES``. Every annotation in
    the JSON is either written (``instances``) or counted once in ``skipped_annotations``.
    """

    coco_zip: Path
    output_dir: Path
    names: dict[int, str]
    train_images: int = 0
    val_images: int = 0
    background_images: int = 0
    annotations_read: int = 0
    instances: Counter = field(default_factory=Counter)
    skipped_annotations: Counter = field(default_factory=Counter)
    skipped_images: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def instances_written(self) -> int:
        """Label lines written, all classes."""
        return sum(self.instances.values())

    def count(self, kind: Counter, reason: str, example: str) -> None:
        """Add one to ``kind[reason]`` and keep the first few examples for the summary."""
        count_reason(kind, self.examples, reason, example)

    def format(self) -> str:
        """The human-readable report ``main`` prints."""
        lines = [
            f"converted {self.coco_zip} -> {self.output_dir}",
            f"images: {self.train_images + self.val_images} (train {self.train_images}, val {self.val_images}),"
            f" {self.background_images} without instances (background)",
            f"instances written: {self.instances_written} of {self.annotations_read} annotations ("
            + ", ".join(f"{self.names[c]}: {self.instances[c]}" for c in sorted(self.names))
            + ")",
        ]
        lines += reason_lines(
            [("skipped images", self.skipped_images, IMAGE_SKIPS),
             ("skipped annotations", self.skipped_annotations, ANNOTATION_SKIPS), ("notes", self.notes, NOTES)],
            self.examples,
        )  # fmt: skip
        lines.append(f"dataset: {self.output_dir / 'dataset.yaml'}")
        return "\n".join(lines)


@dataclass
class _Image:
    """One image on its way to the output: where it came from, its output name and label lines."""

    subset: CocoSubset
    record: dict
    name: str = ""
    source: tuple[str, str] | None = None  # CocoZip.locate_image's answer
    lines: list[str] = field(default_factory=list)
    anns: list[dict] = field(default_factory=list)


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
        ConvertError / CocoError: fatal problems; nothing has been written then.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConvertError("--val-fraction", f"{val_fraction} is not between 0 and 1", "pass e.g. 0.2")
    out = Path(output_dir).expanduser().resolve()
    remove_stale(out)  # first: a killed run's old set may need to be put back before the checks look at it
    check_output_dir(out, overwrite, [Path(coco_zip), *([Path(images_dir)] if images_dir else [])])
    with open_coco_zip(coco_zip, images_dir) as cz:
        names, class_of, merged = _merge_categories(cz)
        summary = ConvertSummary(Path(coco_zip), out, names)
        for example in merged:
            summary.count(summary.notes, "merged_categories", example)
        images = _collect_images(cz, summary)
        _locate_images(cz, images)
        _attach_annotations(cz, images, class_of, summary)
        if not any(img.anns for img in images.values()):  # no instance possible: say why before decoding
            _check_not_empty(cz, summary, allow_empty)
        with staging_folder(out) as tmp:
            written = _convert_images(cz, images, class_of, tmp, summary)
            if not written:
                reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary.skipped_images.items())) or "none listed"
                raise ConvertError(
                    cz.path, f"none of its images could be written ({reasons})", "check --images-dir and the zip"
                )
            _check_not_empty(cz, summary, allow_empty)
            _split_and_write(written, tmp, val_fraction, seed, summary)
            _write_yaml(tmp / "dataset.yaml", out, names, cz.path)
            write_manifest(tmp, cz.path)
            swap_into_place(tmp, out)
    logger.info("wrote %s", out)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line: ``convert_coco_to_yolo.py --coco-zip Z --output-dir D [--images-dir I] ...``.

    Returns:
        0 on success; 2 on a fatal problem, reported as one ``error: <file>: <problem>; <fix>`` line on stderr.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse has already printed usage and the problem
        return int(stop.code or 0)
    # logging is configured by the entry point (python -m cellseg_pl); the old script gets Python's last-resort
    # handler, which prints warnings to stderr
    try:
        summary = convert_coco_zip(
            args.coco_zip, args.output_dir, args.images_dir, args.val_fraction, args.seed, args.overwrite,
            args.allow_empty,
        )  # fmt: skip
    except CocoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # named by the user's path: staging folders beside it are ours, not theirs
        where = args.output_dir
        if err.filename and not Path(err.filename).name.startswith("."):
            where = err.filename
        print(f"error: {where}: {err.strerror or err}; check the path, permissions and free space", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


def _parser() -> argparse.ArgumentParser:
    """Flags of the lab's ``convert_coco_to_yolo.py`` (dash and underscore spellings)."""
    p = argparse.ArgumentParser(
        prog="convert_coco_to_yolo.py",
        description="Convert a CVAT 'COCO 1.0' export (zip) into a YOLO-seg dataset folder with dataset.yaml.",
        allow_abbrev=False,
    )
    p.add_argument("--coco-zip", "--coco_zip", dest="coco_zip", required=True, help="zip exported from CVAT")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, help="dataset folder to create")
    p.add_argument(
        "--images-dir", "--images_dir", dest="images_dir", default=None, help="folder with images missing from the zip"
    )
    p.add_argument(
        "--val-fraction", "--val_fraction", dest="val_fraction", type=float, default=0.2,
        help="share of images for validation (default 0.2)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace a data set folder an earlier convert wrote (never a folder with other files)",
    )  # fmt: skip
    p.add_argument(
        "--allow-empty", "--allow_empty", dest="allow_empty", action="store_true",
        help="accept a background-only data set (annotation files without annotations); else no instance is an error",
    )  # fmt: skip
    return p


# --------------------------------------------------------------------------------------------------
# checks and reading
# --------------------------------------------------------------------------------------------------


def _merge_categories(cz: CocoZip) -> tuple[dict[int, str], dict[int, int], list[str]]:
    """Merge the categories of all subsets; classes are 0-based in order of (first) COCO category id.

    Category ids with one name become one class: CVAT matches labels by name, so ``{1: cell, 2: cell}`` is one
    label to it (and two classes of one name could not be told apart in predictions).

    Returns:
        ``names`` (class -> name), ``class_of`` (COCO category id -> class) and the merged names, as examples.
    """
    by_id: dict[int, tuple[str, str]] = {}
    for sub in cz.subsets:
        for cat in sub.coco.get("categories", []):
            cid, name = cat["id"], str(cat["name"])
            if not isinstance(cid, int) or isinstance(cid, bool):
                raise CocoError(f"{cz.path}:{sub.member}", f"category id {cid!r} is not an integer", "fix the export")
            if cid in by_id and by_id[cid][0] != name:
                raise CocoError(
                    f"{cz.path}:{sub.member}",
                    f"category {cid} is {name!r} here but {by_id[cid][0]!r} in {by_id[cid][1]}",
                    "export all subsets from one CVAT project",
                )
            by_id.setdefault(cid, (name, sub.member))
    if not by_id:
        raise CocoError(cz.path, "no categories in any annotation file", "define labels in CVAT and export again")
    ids_of: dict[str, list[int]] = {}
    for cid in sorted(by_id):
        ids_of.setdefault(by_id[cid][0], []).append(cid)
    names = dict(enumerate(ids_of))
    class_of = {cid: k for k, name in names.items() for cid in ids_of[name]}
    merged = [f"{name!r}: ids {', '.join(map(str, ids))}" for name, ids in ids_of.items() if len(ids) > 1]
    for example in merged:
        logger.warning("%s: categories %s share one name: merged into one class", cz.path, example)
    return names, class_of, merged


def _id_key(value: Any) -> Any:
    """A hashable key for a JSON id (ints and strings as they are)."""
    return value if isinstance(value, (int, str)) else repr(value)


def _collect_images(cz: CocoZip, summary: ConvertSummary) -> dict[tuple[int, Any], _Image]:
    """Index the images of all subsets by ``(subset index, image id)`` and give them unique output names."""
    images: dict[tuple[int, Any], _Image] = {}
    taken: set[str] = set()
    for s, sub in enumerate(cz.subsets):
        for rec in sub.coco.get("images", []):
            key = (s, _id_key(rec["id"]))
            if key in images:
                summary.count(summary.skipped_images, "duplicate_image_id", f"{sub.member}: id {rec['id']}")
                continue
            img = images[key] = _Image(sub, rec)
            file_name = rec["file_name"]
            if isinstance(file_name, str) and file_name.strip() and not unsafe_path_reason(file_name):
                img.name = _unique_name(file_name, sub.name, rec["id"], taken)
    return images


def _locate_images(cz: CocoZip, images: dict[tuple[int, Any], _Image]) -> None:
    """Find each image's file; refuse a file that two image records would read (never guess whose pixels they are).

    Raises:
        ConvertError: naming the file and the records, for the same ``file_name`` listed twice or for
            ``--images-dir``'s basename fallback landing two names (``day1/x.png``, ``day2/x.png``) on one file.
    """
    readers: dict[tuple[str, str], list[_Image]] = {}
    for img in images.values():
        if img.name:
            img.source = cz.locate_image(img.record["file_name"], img.subset)
        if img.source is not None:
            kind, where = img.source
            key = ("zip", where) if kind == "zip" else ("file", str(Path(where).resolve()))
            readers.setdefault(key, []).append(img)
    clashes = [group for group in readers.values() if len(group) > 1]
    if not clashes:
        return
    shown = "; ".join(
        f"{group[0].source[1]} <- " + ", ".join(
            f"{im.subset.member} image {im.record['id']} {im.record['file_name']!r}" for im in group[:3]
        ) for group in clashes[:2]  # type: ignore[index]
    )  # fmt: skip
    more = f" (and {len(clashes) - 2} more files)" if len(clashes) > 2 else ""
    if any(im.source[0] == "basename" for group in clashes for im in group):  # type: ignore[index]
        problem = f"--images-dir: several image records would read one file by its basename: {shown}{more}"
        hint = "lay the images out in --images-dir as their file_name says (sub-folders), or rename them"
    else:
        problem = f"several image records list one file: {shown}{more}"
        hint = "remove the duplicate image records (one file_name, one record)"
    raise ConvertError(cz.path, problem, hint)


def _unique_name(file_name: str, subset: str, image_id: Any, taken: set[str]) -> str:
    """Flatten ``file_name`` (``a/b.jpg`` -> ``a__b.jpg``) and make its stem unique (case-insensitively).

    Stems must be unique because ``x.jpg`` and ``x.png`` would share ``labels/x.txt``.
    """
    parts = [p for p in PurePosixPath(file_name.replace("\\", "/")).parts if p not in ("", ".")]
    flat = "__".join(parts)
    stem, suffix = os.path.splitext(flat)
    if suffix.lower() not in _IMAGE_SUFFIXES:  # a suffix will be appended later: the whole name is the stem
        stem, suffix = flat, ""
    candidates = [stem, f"{subset}__{stem}", f"{subset}__{stem}__{image_id}"]
    n = 2
    while candidates[-1].lower() in taken:
        candidates.append(f"{subset}__{stem}__{image_id}_{n}")
        n += 1
    chosen = next(c for c in candidates if c.lower() not in taken)
    taken.add(chosen.lower())
    return chosen + suffix


def _attach_annotations(
    cz: CocoZip, images: dict[tuple[int, Any], _Image], class_of: dict[int, int], summary: ConvertSummary
) -> None:
    """Give each image its annotations; count those pointing at unknown images or categories."""
    for s, sub in enumerate(cz.subsets):
        for ann in sub.coco.get("annotations", []):
            summary.annotations_read += 1
            where = f"{sub.member}: annotation {ann['id']}"
            img = images.get((s, _id_key(ann["image_id"])))
            if img is None:
                summary.count(summary.skipped_annotations, "unknown_image", f"{where} -> image {ann['image_id']}")
            elif _id_key(ann["category_id"]) not in class_of:
                summary.count(summary.skipped_annotations, "unknown_category", f"{where} -> {ann['category_id']}")
            else:
                img.anns.append(ann)


def _check_not_empty(cz: CocoZip, summary: ConvertSummary, allow_empty: bool) -> None:
    """Refuse a data set without a single instance, saying why nothing matched (``allow_empty``: see the caller)."""
    if summary.instances_written:
        return
    n = summary.annotations_read
    if n == 0 and allow_empty:
        logger.warning("%s: no annotations: a background-only data set (--allow-empty)", cz.path)
        return
    if not any("annotations" in sub.coco for sub in cz.subsets):
        why = f"no 'annotations' list in {', '.join(sub.member for sub in cz.subsets)}"
    elif n == 0:
        why = "its annotation files list no annotations"
    else:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(summary.skipped_annotations.items())) or "none usable"
        why = f"none of its {n} annotations gave an instance ({why})"
        for field_, listed in (("image_id", "image ids"), ("category_id", "category ids")):
            mismatch = _id_type_mismatch(cz, field_)
            if mismatch:
                why = f"{listed} are {mismatch[0]}, annotation {field_}s are {mismatch[1]}: {why}"
    hint = "fix the export" + (", or pass --allow-empty for a background-only set" if n == 0 else "")
    raise ConvertError(cz.path, f"no instance to write: {why}", hint)


def _id_type_mismatch(cz: CocoZip, field_: str) -> tuple[str, str] | None:
    """``("strings", "integers")`` when the listed ids and the annotations' ``field_`` share no JSON type."""
    listed_key = "images" if field_ == "image_id" else "categories"

    def kinds(values: list[Any]) -> set[str]:
        return {"integers" if isinstance(v, int) else "strings" if isinstance(v, str) else type(v).__name__ + "s"
                for v in values}  # fmt: skip

    listed = kinds([r["id"] for sub in cz.subsets for r in sub.coco.get(listed_key, [])])
    used = kinds([a[field_] for sub in cz.subsets for a in sub.coco.get("annotations", [])])
    if listed and used and not listed & used:
        return " and ".join(sorted(listed)), " and ".join(sorted(used))
    return None


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------


def _convert_images(
    cz: CocoZip, images: dict[tuple[int, Any], _Image], class_of: dict[int, int], tmp: Path, summary: ConvertSummary
) -> list[_Image]:
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
        img.name = _with_image_suffix(img.name, data)
        _image_lines(img, shape, class_of, summary)
        (staging / img.name).write_bytes(data)
        written.append(img)
    return written


def _read_checked_image(cz: CocoZip, img: _Image) -> tuple[str | None, bytes | None, tuple[int, int] | None]:
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


def _with_image_suffix(name: str, data: bytes) -> str:
    """Append a suffix guessed from the bytes when ``name`` lacks an image suffix (Ultralytics skips those)."""
    if os.path.splitext(name)[1].lower() in _IMAGE_SUFFIXES:
        return name
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return name + suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return name + ".webp"
    return name + ".png"  # decodable but unknown: a suffix Ultralytics lists, OpenCV sniffs the content


def _image_lines(img: _Image, shape: tuple[int, int], class_of: dict[int, int], summary: ConvertSummary) -> None:
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
        cls = class_of[_id_key(ann["category_id"])]
        img.lines.append(f"{cls} {normalized_text(outline, width, height)}")
        summary.instances[cls] += 1
    if skipped:
        summary.count(summary.notes, "images_missing_objects", repr(img.record["file_name"]))


def _split_and_write(written: list[_Image], tmp: Path, val_fraction: float, seed: int, summary: ConvertSummary) -> None:
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
    """Write ``dataset.yaml`` as Ultralytics and ``cellseg_pl.datamodule`` read it."""
    doc = {"path": str(out), "train": "images/train", "val": "images/val", "nc": len(names), "names": names}
    header = f"# written by cellseg_pl.convert from {Path(source).name}\n"
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
