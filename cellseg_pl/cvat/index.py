"""The records of a CVAT zip, indexed for ``convert``, and the checks that refuse a set before anything is written.

Categories become 0-based classes (ids sharing a name merge into one class); images get unique output names and
their files located (two records reading one file are refused, never guessed); annotations are attached to their
images; a set without a single instance is refused, saying why (:func:`check_not_empty`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cellseg_pl.cvat.report import ConvertSummary
from cellseg_pl.cvat.archive import CocoSubset, CocoZip, unsafe_path_reason
from cellseg_pl.data.images import IMAGE_SUFFIXES, image_kind
from cellseg_pl.errors import ConvertError

logger = logging.getLogger(__name__)



@dataclass
class IndexedImage:
    """One image on its way to the output: where it came from, its output name and label lines."""

    subset: CocoSubset
    record: dict
    name: str = ""
    source: tuple[str, str] | None = None  # CocoZip.locate_image's answer
    lines: list[str] = field(default_factory=list)
    anns: list[dict] = field(default_factory=list)


def merge_categories(cz: CocoZip) -> tuple[dict[int, str], dict[int, int], list[str]]:
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
                raise ConvertError(f"{cz.path}:{sub.member}", f"category id {cid!r} is not an integer", "fix the export")
            if cid in by_id and by_id[cid][0] != name:
                raise ConvertError(
                    f"{cz.path}:{sub.member}",
                    f"category {cid} is {name!r} here but {by_id[cid][0]!r} in {by_id[cid][1]}",
                    "export all subsets from one CVAT project",
                )
            by_id.setdefault(cid, (name, sub.member))
    if not by_id:
        raise ConvertError(cz.path, "no categories in any annotation file", "define labels in CVAT and export again")
    ids_of: dict[str, list[int]] = {}
    for cid in sorted(by_id):
        ids_of.setdefault(by_id[cid][0], []).append(cid)
    names = dict(enumerate(ids_of))
    class_of = {cid: k for k, name in names.items() for cid in ids_of[name]}
    merged = [f"{name!r}: ids {', '.join(map(str, ids))}" for name, ids in ids_of.items() if len(ids) > 1]
    for example in merged:
        logger.warning("%s: categories %s share one name: merged into one class", cz.path, example)
    return names, class_of, merged


def id_key(value: Any) -> Any:
    """A hashable key for a JSON id (ints and strings as they are)."""
    return value if isinstance(value, (int, str)) else repr(value)


def collect_images(cz: CocoZip, summary: ConvertSummary) -> dict[tuple[int, Any], IndexedImage]:
    """Index the images of all subsets by ``(subset index, image id)`` and give them unique output names."""
    images: dict[tuple[int, Any], IndexedImage] = {}
    taken: set[str] = set()
    for s, sub in enumerate(cz.subsets):
        for rec in sub.coco.get("images", []):
            key = (s, id_key(rec["id"]))
            if key in images:
                summary.count(summary.skipped_images, "duplicate_image_id", f"{sub.member}: id {rec['id']}")
                continue
            img = images[key] = IndexedImage(sub, rec)
            file_name = rec["file_name"]
            if isinstance(file_name, str) and file_name.strip() and not unsafe_path_reason(file_name):
                img.name = _unique_name(file_name, sub.name, rec["id"], taken)
    return images


def locate_images(cz: CocoZip, images: dict[tuple[int, Any], IndexedImage]) -> None:
    """Find each image's file; refuse a file that two image records would read (never guess whose pixels they are).

    Raises:
        ConvertError: naming the file and the records, for the same ``file_name`` listed twice or for
            ``--images-dir``'s basename fallback landing two names (``day1/x.png``, ``day2/x.png``) on one file.
    """
    readers: dict[tuple[str, str], list[IndexedImage]] = {}
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
    if suffix.lower() not in IMAGE_SUFFIXES:  # a suffix will be appended later: the whole name is the stem
        stem, suffix = flat, ""
    candidates = [stem, f"{subset}__{stem}", f"{subset}__{stem}__{image_id}"]
    n = 2
    while candidates[-1].lower() in taken:
        candidates.append(f"{subset}__{stem}__{image_id}_{n}")
        n += 1
    chosen = next(c for c in candidates if c.lower() not in taken)
    taken.add(chosen.lower())
    return chosen + suffix


def attach_annotations(
    cz: CocoZip, images: dict[tuple[int, Any], IndexedImage], class_of: dict[int, int], summary: ConvertSummary
) -> None:
    """Give each image its annotations; count those pointing at unknown images or categories."""
    for s, sub in enumerate(cz.subsets):
        for ann in sub.coco.get("annotations", []):
            summary.annotations_read += 1
            where = f"{sub.member}: annotation {ann['id']}"
            img = images.get((s, id_key(ann["image_id"])))
            if img is None:
                summary.count(summary.skipped_annotations, "unknown_image", f"{where} -> image {ann['image_id']}")
            elif id_key(ann["category_id"]) not in class_of:
                summary.count(summary.skipped_annotations, "unknown_category", f"{where} -> {ann['category_id']}")
            else:
                img.anns.append(ann)


def check_not_empty(cz: CocoZip, summary: ConvertSummary, allow_empty: bool) -> None:
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


def with_image_suffix(name: str, data: bytes) -> str:
    """Append a suffix guessed from the bytes when ``name`` lacks an image suffix (Ultralytics skips those)."""
    if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
        return name
    return name + (image_kind(data) or ".png")  # decodable but unknown: a suffix Ultralytics lists, OpenCV sniffs the content
