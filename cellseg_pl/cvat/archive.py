"""Open a CVAT "COCO 1.0" export zip safely and find its images (nothing is extracted to disk).

:func:`open_coco_zip` checks every member name (zip slip: ``..``, absolute paths, drive letters), parses each
``annotations/instances_<subset>.json`` and checks it is COCO; :class:`CocoZip` then locates and reads the images each
subset lists, in the zip or in an ``images_dir`` beside it. Problems raise :class:`~cellseg_pl.cvat.coco.ConvertError`
naming the file or member.
"""

from __future__ import annotations

import json
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cellseg_pl.errors import ConvertError


__all__ = ["ZIP_READ_ERRORS", "CocoSubset", "CocoZip", "open_coco_zip", "unsafe_path_reason"]

#: What reading a damaged, encrypted or exotically compressed member can raise.
ZIP_READ_ERRORS = (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError, zlib.error)
_ANNOTATION_RE = re.compile(r"^(?P<root>(?:[^/]+/)*)annotations/instances_(?P<subset>[^/]+)\.json$")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


def unsafe_path_reason(name: str) -> str | None:
    """Why a zip member name or ``file_name`` could escape its folder (``..``, absolute, drive letter), or None."""
    norm = name.replace("\\", "/")
    if "\x00" in norm:
        return "contains a NUL byte"
    if norm.startswith("/"):
        return "is an absolute path"
    if _DRIVE_RE.match(norm):
        return "starts with a drive letter"
    if ".." in norm.split("/"):
        return "contains '..'"
    return None


@dataclass
class CocoSubset:
    """One ``annotations/instances_<name>.json`` of a zip: its parsed COCO dict and where its images live."""

    name: str
    member: str
    root: str
    coco: dict


@dataclass
class CocoZip:
    """A CVAT "COCO 1.0" export opened for reading; nothing is extracted to disk.

    Use :func:`open_coco_zip` to build one; close it (or use ``with``) when done.
    """

    path: Path
    subsets: list[CocoSubset]
    images_dir: Path | None = None
    _zip: zipfile.ZipFile | None = field(default=None, repr=False)
    _names: frozenset[str] = field(default=frozenset(), repr=False)

    def __enter__(self) -> CocoZip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying zip file."""
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def image_candidates(self, file_name: str, subset: CocoSubset) -> list[str]:
        """Where :meth:`locate_image` looks for ``file_name``, in order (zip members, then files)."""
        name = file_name.replace("\\", "/")
        found = [f"{subset.root}images/{subset.name}/{name}", f"{subset.root}images/{name}"]
        if self.images_dir is not None:
            found += [str(self.images_dir / name), str(self.images_dir / PurePosixPath(name).name)]
        return found

    def locate_image(self, file_name: str, subset: CocoSubset) -> tuple[str, str] | None:
        """Find an image listed in ``subset`` without reading it.

        Looks at ``images/<subset>/<file_name>`` and ``images/<file_name>`` in the zip, then
        ``<images_dir>/<file_name>`` and last ``<images_dir>/<basename>`` (the basename fallback: callers must make
        sure no two records land on one file, see :mod:`cellseg_pl.cvat.convert`).

        Returns:
            ``("zip", member)``, ``("file", path)``, ``("basename", path)`` or None when it is nowhere or
            ``file_name`` would escape the images folder.
        """
        if unsafe_path_reason(file_name):
            return None
        candidates = self.image_candidates(file_name, subset)
        for member in candidates[:2]:
            if member in self._names:
                return "zip", member
        for kind, path in zip(("file", "basename"), candidates[2:]):
            if Path(path).is_file():
                return kind, path
        return None

    def read_located(self, where: tuple[str, str]) -> bytes:
        """The bytes of an image found by :meth:`locate_image`; raises one of ``ZIP_READ_ERRORS`` if unreadable."""
        kind, name = where
        if kind == "zip":
            assert self._zip is not None, "CocoZip is closed"
            return self._zip.read(name)  # may raise ZIP_READ_ERRORS
        return Path(name).read_bytes()

    def read_image(self, file_name: str, subset: CocoSubset) -> tuple[bytes, str] | None:
        """Read the bytes of an image listed in ``subset`` (looked up as in :meth:`locate_image`).

        Returns:
            ``(bytes, where)`` (``where`` is the member or file path), or None when it is nowhere or
            ``file_name`` would escape the images folder.

        Raises:
            One of ``ZIP_READ_ERRORS`` when the member or file exists but cannot be read.
        """
        where = self.locate_image(file_name, subset)
        return None if where is None else (self.read_located(where), where[1])


def open_coco_zip(path: str | Path, images_dir: str | Path | None = None) -> CocoZip:
    """Open a CVAT "COCO 1.0" export, check it and parse every ``annotations/instances_<subset>.json``.

    Args:
        path: the zip file.
        images_dir: optional folder holding images missing from the zip (CVAT exports without images).

    Raises:
        ConvertError: not a zip, an unsafe member name (zip slip), no annotation JSON, invalid JSON or a
            JSON that is not COCO, ``images_dir`` not a folder. The message names the file or member.
    """
    path = Path(path)
    if not path.is_file():
        raise ConvertError(path, "does not exist or is not a file", "pass the zip exported from CVAT with --coco-zip")
    if images_dir is not None and not Path(images_dir).is_dir():
        raise ConvertError(images_dir, "is not a folder", "pass the folder holding the images with --images-dir")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ConvertError(path, f"is not a zip file ({err})", "export the task from CVAT as 'COCO 1.0'") from None
    try:
        names = _checked_member_names(zf, path)
        subsets = [_read_subset(zf, path, m) for m in sorted(names) if _ANNOTATION_RE.match(m)]
        if not subsets:
            shown = ", ".join(sorted(names)[:5]) or "nothing"
            raise ConvertError(
                path,
                f"no annotations/instances_<subset>.json inside (it holds {shown})",
                "export the task from CVAT in the 'COCO 1.0' format",
            )
    except BaseException:
        zf.close()
        raise
    return CocoZip(path, subsets, Path(images_dir) if images_dir else None, zf, frozenset(names))


def _checked_member_names(zf: zipfile.ZipFile, path: Path) -> set[str]:
    """All file member names; raises ConvertError naming the first member that could escape (zip slip)."""
    names = set()
    for info in zf.infolist():
        reason = unsafe_path_reason(info.filename)
        if reason:
            raise ConvertError(
                path, f"member {info.filename!r} {reason} (unsafe zip)", "re-export the annotations from CVAT"
            )
        if not info.is_dir():
            names.add(info.filename)
    return names


def _read_subset(zf: zipfile.ZipFile, path: Path, member: str) -> CocoSubset:
    """Parse one annotation member into a :class:`CocoSubset`, with errors naming ``zip:member``."""
    where = f"{path}:{member}"
    try:
        coco = json.loads(zf.read(member).decode("utf-8-sig"))
    except json.JSONDecodeError as err:
        raise ConvertError(
            where,
            f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}",
            "re-export the annotations from CVAT",
        ) from None
    except (UnicodeDecodeError, *ZIP_READ_ERRORS) as err:
        raise ConvertError(where, f"cannot be read ({err})", "re-export the annotations from CVAT") from None
    problem = _coco_structure_problem(coco)
    if problem:
        raise ConvertError(where, problem, "export the task from CVAT in the 'COCO 1.0' format")
    match = _ANNOTATION_RE.match(member)
    assert match is not None
    return CocoSubset(match["subset"], member, match["root"], coco)


def _coco_structure_problem(coco: Any) -> str | None:
    """Why a parsed JSON is not a COCO instances dict (top-level lists and their record fields), or None."""
    if not isinstance(coco, dict):
        return f"top level is a {type(coco).__name__}, expected a COCO object"
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key, []), list):
            return f"'{key}' is not a list"
        for i, rec in enumerate(coco.get(key, [])):
            if not isinstance(rec, dict):
                return f"'{key}'[{i}] is not an object"
    required = {"images": ("id", "file_name"), "annotations": ("id", "image_id", "category_id"), "categories": ("id", "name")}
    for key, fields in required.items():
        for i, rec in enumerate(coco.get(key, [])):
            missing = [f for f in fields if f not in rec]
            if missing:
                return f"'{key}'[{i}] lacks {', '.join(missing)}"
    return None
