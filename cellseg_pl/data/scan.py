"""Check every image and label of a split once, before the first training step.

:func:`scan_split` reads each image and its label file in a thread pool (decoding releases the GIL), decides
which images training may use and returns them with a one-line summary; nothing is cached on disk.

What happens to each problem (a problem confined to one file's content is skipped and counted, so a few bad files
never stop a long run; a problem that says the data set or its ``dataset.yaml`` is set up wrong stops before the
first step, because training around it would silently learn from wrong data):

==========================================  =======================================================================
problem                                     what happens
==========================================  =======================================================================
image does not decode (corrupt, not an      image skipped, counted, named in the summary
image, empty file)
image truncated (file cut short: no JPEG    image skipped, counted (OpenCV >= 5 refuses such files itself; 4.x
end-of-image after the last scan, no PNG    decodes them with the missing part grey)
``IEND``)
image listed but missing                    image skipped, counted
same image twice (same file listed twice,   the later one skipped, counted, named with the one kept; an image
or another file with the same bytes)        shared by train and val is only warned about (val metrics overestimate)
image or label file unreadable              **fatal**: ``<file>: cannot read (Permission denied); ...``: a file
(permissions, I/O error)                    system problem that one ``chmod`` fixes; skipping could drop whole folders
class index not in ``names`` (or not an     **fatal**: ``labels/train/x.txt line 3: class 5 but dataset.yaml names
integer)                                    2 classes (0..1); fix 'names' or the label``
coordinate far outside [0, 1] (< -1 or      **fatal**: the labels are in pixels, not normalized
> 2)
coordinate slightly outside [0, 1]          clipped to [0, 1], line kept, counted
odd number of coordinates, fewer than 3     line skipped (the image is kept), counted with ``file:line``
points, not a number (incl. NaN/Inf)
label file missing or empty                 background image (kept), counted
no usable image left in a split             **fatal**
label lines, but not one usable in a split  **fatal** (every image would be background)
==========================================  =======================================================================

A fatal problem raises :class:`~cellseg_pl.data.dataset.DatasetError` with one line naming the first file (and line),
and how many more there are; ``python -m cellseg_pl fit`` prints it as ``error: ...`` and exits with status 2.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2

from cellseg_pl.data.images import decode_image, is_truncated
from cellseg_pl.data.labels import (
    NOT_A_NUMBER,
    ODD_COUNT,
    TOO_FEW_POINTS,
    UNKNOWN_CLASS,
    label_path_for,
    parse_label_line,
    read_label_text,
)
from cellseg_pl.errors import DatasetError, ImageTooLargeError

log = logging.getLogger(__name__)

#: A coordinate further than this outside [0, 1] means the labels are not normalized (pixel units): fatal.
MAX_OUTSIDE = 1.0
#: Examples listed per reason in the summary.
EXAMPLES = 3

# reasons an image is skipped
CORRUPT = "corrupt"
TOO_LARGE = "over the pixel limit"
TRUNCATED = "truncated"
MISSING = "missing"
DUPLICATE = "duplicate"
_IMAGE_REASONS = [CORRUPT, TOO_LARGE, TRUNCATED, MISSING, DUPLICATE]
_LINE_REASONS = [NOT_A_NUMBER, ODD_COUNT, TOO_FEW_POINTS]


@dataclass
class _Checked:
    """What one worker found about one image (internal)."""

    path: Path
    digest: bytes | None = None
    skip: str | None = None
    label_missing: bool = False
    cells: int = 0
    bad_lines: list[tuple[str, int]] = field(default_factory=list)  # (reason, 1-based line number)
    clipped: list[int] = field(default_factory=list)
    fatal: list[tuple[str, str]] = field(default_factory=list)  # (where, message)


@dataclass
class ScanResult:
    """The usable images of a split and what the scan found.

    Attributes:
        split: split name (``train``, ``val``, ...), used in messages.
        images: the usable images, in the order given (training uses exactly these).
        listed: number of images given.
        background: usable images without a single usable label line.
        missing_labels: usable images without a label file (counted in ``background``).
        cells: usable label lines (instances) over the usable images.
        skipped_images: reason -> files skipped for it (``corrupt``, ``truncated``, ``missing``, ``duplicate``; a
            duplicate reads ``copy = kept``).
        skipped_lines: reason -> ``file:line`` of the label lines dropped for it.
        clipped_lines: ``file:line`` of lines whose coordinates were clipped to [0, 1].
        digests: content hash -> usable image (to find images shared between splits).
        seconds: scan time.
    """

    split: str
    images: list[Path]
    listed: int
    background: int = 0
    missing_labels: int = 0
    cells: int = 0
    skipped_images: dict[str, list[str]] = field(default_factory=dict)
    skipped_lines: dict[str, list[str]] = field(default_factory=dict)
    clipped_lines: list[str] = field(default_factory=list)
    digests: dict[bytes, Path] = field(default_factory=dict, repr=False)
    seconds: float = 0.0

    def summary(self, examples: int = EXAMPLES) -> str:
        """One line: ``train: 200 images (3 background), 11,402 cells; skipped: 1 corrupt image (x.png), ...``."""
        bg = f"{self.background:,} background"
        if self.missing_labels:
            bg += f", {self.missing_labels:,} without a label file"
        text = f"{self.split}: {len(self.images):,} images ({bg}), {self.cells:,} cells"
        skipped = []
        for reason, files in sorted(self.skipped_images.items(), key=lambda kv: _IMAGE_REASONS.index(kv[0])):
            skipped.append(f"{len(files):,} {reason} image{'s' * (len(files) != 1)} ({_examples(files, examples)})")
        n_lines = sum(len(v) for v in self.skipped_lines.values())
        if n_lines:
            lines = sorted(self.skipped_lines.items(), key=lambda kv: _LINE_REASONS.index(kv[0]))
            why = "; ".join(f"{reason}: {_examples(v, examples)}" for reason, v in lines)
            skipped.append(f"{n_lines:,} label line{'s' * (n_lines != 1)} ({why})")
        if skipped:
            text += "; skipped: " + ", ".join(skipped)
        if self.clipped_lines:
            n = len(self.clipped_lines)
            text += f"; clipped to [0, 1]: {n:,} line{'s' * (n != 1)} ({_examples(self.clipped_lines, examples)})"
        return text + f" [scanned in {self.seconds:.1f} s]"


def _examples(items: list[str], n: int) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


class _Display:
    """File names as the summary shows them: relative to the data set root when under it."""

    def __init__(self, root: Path | None) -> None:
        self.root = root.resolve() if root is not None else None

    def __call__(self, path: Path) -> str:
        if self.root is not None:
            try:
                return str(path.resolve().relative_to(self.root))
            except ValueError:
                pass
        return str(path)


def _unreadable(where: str, e: OSError) -> str:
    return f"{where}: cannot read ({e.strerror or e}); make it readable (chmod a+r) or remove it"


def _class_message(where: str, cls: float, num_classes: int) -> str:
    valid = "0" if num_classes == 1 else f"0..{num_classes - 1}"
    names = f"{num_classes} class{'es' * (num_classes != 1)} ({valid})"
    shown = int(cls) if cls == int(cls) else cls
    return f"{where}: class {shown} but dataset.yaml names {names}; fix 'names' or the label"


def _check(path: Path, num_classes: int, show: _Display) -> _Checked:
    """Read, hash and decode one image, parse its label file (runs in a worker thread)."""
    out = _Checked(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        out.skip = MISSING
        return out
    except OSError as e:
        where = show(path)
        out.fatal.append((where, _unreadable(where, e)))
        return out
    out.digest = hashlib.sha1(data, usedforsecurity=False).digest()  # a content key, not security
    if is_truncated(data):
        out.skip = TRUNCATED
    else:
        try:
            decode_image(data, path)
        except ImageTooLargeError as e:
            log.warning("%s", e)  # (its size and the way out: tile it, or raise CV_IO_MAX_IMAGE_PIXELS)
            out.skip = TOO_LARGE
        except DatasetError:
            out.skip = CORRUPT
    if out.skip:
        return out
    label = label_path_for(path)
    try:
        text = read_label_text(label)
    except OSError as e:
        where = show(label)
        out.fatal.append((where, _unreadable(where, e)))
        return out
    if text is None:
        out.label_missing = True
        return out
    name = show(label)
    for number, line in enumerate(text.splitlines(), 1):
        parsed = parse_label_line(line, num_classes)
        if parsed is None:
            continue
        where = f"{name} line {number}"
        if parsed.problem == UNKNOWN_CLASS:
            out.fatal.append((where, _class_message(where, parsed.cls, num_classes)))
        elif parsed.problem is not None:
            out.bad_lines.append((parsed.problem, number))
        elif parsed.outside > MAX_OUTSIDE:
            out.fatal.append((where, (
                f"{where}: a coordinate lies {parsed.outside:g} outside 0..1; YOLO-seg labels are normalized "
                f"(x / image width, y / image height) and these look like pixels: convert the labels"
            )))
        else:
            out.cells += 1
            if parsed.outside > 0:
                out.clipped.append(number)
    return out


def scan_split(
    images: list[Path],
    num_classes: int,
    split: str = "images",
    root: Path | None = None,
    workers: int | None = None,
    log_summary: bool = True,
) -> ScanResult:
    """Check every image and label of a split once and return the images training may use.

    Args:
        images: the split's image files (each label found with :func:`~cellseg_pl.data.labels.label_path_for`).
        num_classes: number of classes in ``dataset.yaml``'s ``names``.
        split: split name for messages.
        root: data set root; files are named relative to it in messages.
        workers: reader threads (default: 2 per CPU core, at most 16: reading and decoding release the GIL).
        log_summary: log the one-line summary at INFO (DDP: only rank 0 does).

    Returns:
        The usable images and the counts; see :class:`ScanResult` and the module docstring for what is skipped.

    Raises:
        DatasetError: a fatal problem (see the module docstring): one line naming the first file (and line).
    """
    start = time.perf_counter()
    show = _Display(root)
    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = min(16, 2 * cores)
    # corrupt files are reported in the summary; keep OpenCV's decoder errors off the console meanwhile
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="cellseg-scan") as pool:
            checked = list(pool.map(lambda p: _check(Path(p), num_classes, show), images))
    finally:
        cv2.utils.logging.setLogLevel(level)

    fatal = [f for c in checked for f in c.fatal]
    if fatal:
        others = [where for where, _ in fatal[1:]]
        more = f" ({len(others):,} more: {_examples(others, EXAMPLES)})" if others else ""
        raise DatasetError(fatal[0][1] + more)

    result = ScanResult(split=split, images=[], listed=len(images))
    seen_paths: dict[Path, Path] = {}
    for c in checked:
        reason = c.skip
        if reason is None:
            key = c.path.resolve()
            kept = seen_paths.get(key) or result.digests.get(c.digest)
            if kept is not None:
                same = f"{show(c.path)} (listed twice)" if key in seen_paths else f"{show(c.path)} = {show(kept)}"
                result.skipped_images.setdefault(DUPLICATE, []).append(same)
                continue
            seen_paths[key] = c.path
            result.digests[c.digest] = c.path
        if reason is not None:
            result.skipped_images.setdefault(reason, []).append(show(c.path))
            continue
        result.images.append(c.path)
        result.cells += c.cells
        result.background += c.cells == 0
        result.missing_labels += c.label_missing
        label = show(label_path_for(c.path))
        for problem, number in c.bad_lines:
            result.skipped_lines.setdefault(problem, []).append(f"{label}:{number}")
        result.clipped_lines += [f"{label}:{number}" for number in c.clipped]
    result.seconds = time.perf_counter() - start
    if not result.images:
        raise DatasetError(f"{split}: none of the {len(images):,} images is usable; {result.summary()}")
    n_bad = sum(len(v) for v in result.skipped_lines.values())
    if n_bad and not result.cells:  # not a background set: labels it cannot read (training would learn "no cells")
        raise DatasetError(f"{split}: none of its {n_bad:,} label lines is usable; fix the labels ({result.summary()})")
    if log_summary:
        log.info(result.summary())
    return result


def shared_images(a: ScanResult, b: ScanResult) -> list[tuple[Path, Path]]:
    """Images of ``b`` with the same bytes as an image of ``a``: ``[(image in b, image in a), ...]``."""
    return [(path, a.digests[d]) for d, path in b.digests.items() if d in a.digests]
