"""Active learning: rank unlabelled images by how unsure the model is of them, pick the next batch to label.

``python -m cellseg_pl select --model best.ckpt --pool images/unlabelled --k 200 --output next_batch.txt``
predicts every image of the pool (with :class:`cellseg_pl.infer.engine.Predictor`, as ``predict`` does) and scores it.
The uncertainty of an image is a weighted mean (default weights equal, 0.25 each) of four terms, each 0..1:

1. **low confidence** = 1 - mean score of its detections (1 when nothing is found: no cell the model is sure of);
2. **borderline share** = share of its detections scoring below ``borderline`` (default 0.6), i.e. in
   ``[conf, borderline)``: the cells a corrector would have to decide on;
3. **flip disagreement of masks** (test-time augmentation): the image is predicted again flipped left-right and
   upside-down, each flipped view's detections are flipped back and matched one-to-one to the original's by mask IoU
   (Hungarian); the term is ``1 - sum of matched IoUs / max(n_original, n_flipped)``, averaged over the two flips
   (0: every view finds the same cells with the same outlines; 1: the views share nothing);
4. **flip disagreement of counts** = ``|n_original - n_flipped| / max(n_original, n_flipped)``, averaged likewise.

``score = (w1 * t1 + w2 * t2 + w3 * t3 + w4 * t4) / (w1 + w2 + w3 + w4)``. Without test-time augmentation (``tta``
off, a third of the compute) terms 3 and 4 are left out and the weights of 1 and 2 renormalised. Detections below
``min_area`` (original px; the lab's droplet rule is 500) are ignored, as ``predict --min-area`` drops them.

Written (``--output next_batch.txt``):

* ``next_batch.txt``: the ``k`` most uncertain images, most uncertain first, one path per line relative to the pool
  (``/`` separators, sub-folders kept);
* ``next_batch.csv`` next to it: every scored image of the pool, ranked, with the score, its four terms, the number
  of detections, their mean score and whether it was selected;
* ``--copy-to DIR``: the selected images copied to ``DIR/<relative path>`` for a new CVAT task (an existing file is
  never replaced: identical files are left as they are, a different file with the same name stops the command before
  anything is copied);
* ``--predictions preds.json``: COCO 1.0 predictions of the selected images for CVAT, written by
  :func:`cellseg_pl.infer.predict.predict_folder` (``file_name`` = the same relative paths).

Images listed in ``--exclude`` files (e.g. the ``next_batch.txt`` of earlier cycles, already labelled) are skipped.

Example:
    >>> from cellseg_pl.infer.select import select_images
    >>> summary = select_images("best.ckpt", "images/pool", 200, "next_batch.txt", copy_to="new")  # doctest: +SKIP
    >>> print(summary.format())  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import filecmp
import io
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from torch import nn

from cellseg_pl.data.images import IMAGE_SUFFIXES, read_image
from cellseg_pl.errors import DatasetError, PredictError
from cellseg_pl.data.images import list_images
from cellseg_pl.files import is_inside
from cellseg_pl.infer.engine import Instance, Predictor, load_network
from cellseg_pl.infer.options import InferenceOptions, parse_device
from cellseg_pl.metrics import encode_crops, rle_iou
from cellseg_pl.files import atomic_file, write_atomic
from cellseg_pl.infer.predict import PredictSummary, predict_folder

log = logging.getLogger(__name__)

#: Default weights of (low confidence, borderline share, flip mask disagreement, flip count disagreement).
WEIGHTS = (1.0, 1.0, 1.0, 1.0)
#: CSV columns, in order.
CSV_COLUMNS = (
    "rank", "file", "score", "low_confidence", "borderline_share", "flip_mask_disagreement",
    "flip_count_disagreement", "detections", "mean_score", "selected",
)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# the score of one image
# --------------------------------------------------------------------------------------------------


def unflip(inst: Instance, height: int, width: int, axis: int) -> Instance:
    """A detection made on an image flipped along ``axis`` (1: left-right, 0: upside-down), in the original image."""
    h, w = inst.mask.shape
    if axis == 1:
        return Instance(inst.score, inst.label, width - inst.x0 - w, inst.y0, inst.mask[:, ::-1], inst.cut, inst.window)
    return Instance(inst.score, inst.label, inst.x0, height - inst.y0 - h, inst.mask[::-1, :], inst.cut, inst.window)


def iou_matrix(a: list[Instance], b: list[Instance]) -> np.ndarray:
    """Mask IoU ``(len(a), len(b))`` between two detection lists of one image (:func:`cellseg_pl.metrics.rle_iou`)."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    height, width = max(d.box[3] for d in a + b), max(d.box[2] for d in a + b)  # a canvas holding every mask
    rles_a, rles_b = (encode_crops([(d.mask, d.x0, d.y0) for d in x], height, width) for x in (a, b))
    return rle_iou(rles_a, rles_b)


def flip_disagreement(original: list[Instance], flipped: list[Instance]) -> tuple[float, float]:
    """``(1 - matched IoU share, count disagreement)`` between two views of one image (both in its coordinates)."""
    n = max(len(original), len(flipped))
    if n == 0:
        return 0.0, 0.0
    iou = iou_matrix(original, flipped)
    matched = 0.0
    if iou.size:
        rows, cols = linear_sum_assignment(-iou)
        matched = float(iou[rows, cols].sum())
    return 1.0 - matched / n, abs(len(original) - len(flipped)) / n


@dataclass
class ImageScore:
    """The uncertainty of one image and its parts (see the module docstring)."""

    file: str
    score: float
    low_confidence: float
    borderline_share: float
    flip_mask_disagreement: float | None
    flip_count_disagreement: float | None
    detections: int
    mean_score: float


def image_uncertainty(
    file: str,
    views: list[list[Instance]],
    borderline: float = 0.6,
    weights: tuple[float, float, float, float] = WEIGHTS,
) -> ImageScore:
    """Score one image from its detections: ``views[0]`` on the image itself, the others (if any) on flipped copies,
    already flipped back (:func:`unflip`)."""
    found = views[0]
    scores = np.array([d.score for d in found], np.float64)
    mean = float(scores.mean()) if len(scores) else 0.0
    terms = [1.0 - mean if len(scores) else 1.0, float((scores < borderline).mean()) if len(scores) else 0.0]
    w = list(weights[:2])
    mask_d = count_d = None
    if len(views) > 1:
        parts = [flip_disagreement(found, other) for other in views[1:]]
        mask_d, count_d = float(np.mean([p[0] for p in parts])), float(np.mean([p[1] for p in parts]))
        terms += [mask_d, count_d]
        w += list(weights[2:])
    score = float(np.dot(w, terms) / sum(w)) if sum(w) > 0 else 0.0
    return ImageScore(file, score, terms[0], terms[1], mask_d, count_d, len(found), mean)


# --------------------------------------------------------------------------------------------------
# a pool of images -> a ranked list
# --------------------------------------------------------------------------------------------------


@dataclass
class SelectSummary:
    """What :func:`select_images` scored, selected and wrote."""

    output: Path
    table: Path
    ranked: list[ImageScore] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)
    images_found: int = 0
    excluded: int = 0
    unreadable: list[str] = field(default_factory=list)
    copy_to: Path | None = None
    copied: int = 0
    already_there: int = 0
    predictions: PredictSummary | None = None
    tta: bool = True
    seconds: float = 0.0

    def format(self) -> str:
        """The human-readable report ``python -m cellseg_pl select`` prints."""
        n = len(self.ranked)
        lines = [
            f"scored {n} of {self.images_found} images in {self.seconds:.1f} s "
            f"({'with' if self.tta else 'without'} flip test-time augmentation)"
            + (f"; {self.excluded} excluded (already selected)" if self.excluded else ""),
        ]
        if self.unreadable:
            lines.append(
                f"skipped {len(self.unreadable)} images that cannot be decoded (e.g. {'; '.join(self.unreadable[:3])}; "
                f"the warnings above say why)"
            )
        if self.ranked:
            sel = [r.score for r in self.ranked[: len(self.selected)]]
            rest = [r.score for r in self.ranked[len(self.selected) :]]
            lines.append(
                f"selected {len(self.selected)}: uncertainty {min(sel):.3f}..{max(sel):.3f}"
                + (f" (the {len(rest)} others: {min(rest):.3f}..{max(rest):.3f})" if rest else "")
            )
            for r in self.ranked[:5]:
                lines.append(f"  {r.score:.3f}  {r.file}  ({r.detections} detections, mean score {r.mean_score:.2f})")
            if n > 5:
                lines.append("  ...")
        lines.append(f"list: {self.output}  scores: {self.table}")
        if self.copy_to is not None:
            note = f" ({self.already_there} identical files were already there)" if self.already_there else ""
            lines.append(f"copied {self.copied} images to {self.copy_to}{note}: create the CVAT task from them")
        if self.predictions is not None:
            lines.append(
                f"predictions: {self.predictions.output} ({self.predictions.instances_written} objects; import into "
                f"CVAT as 'COCO 1.0')"
            )
        return "\n".join(lines)


def read_list(path: Path) -> set[str]:
    """Relative paths of a ``next_batch.txt``-style list (one per line; blank lines and ``#`` comments skipped)."""
    if not path.is_file():
        raise PredictError(path, "does not exist", "pass a list written by an earlier 'select' with --exclude")
    lines = (line.strip().replace("\\", "/") for line in path.read_text().splitlines())
    return {line for line in lines if line and not line.startswith("#")}


def _check_outputs(output: Path, table: Path, pool: Path, copy_to: Path | None, predictions: Path | None,
                   overwrite: bool) -> None:  # fmt: skip
    if output.suffix.lower() == ".csv":
        raise PredictError("--output", f"{output} ends in .csv", "name the list .txt; the CSV is written next to it")
    for path, flag in ((output, "--output"), (table, "--output"), (predictions, "--predictions")):
        if path is None:
            continue
        if path.is_dir():
            raise PredictError(path, "is a folder", f"pass a file name with {flag}")
        if path == table and not output.exists():
            continue  # a table without its list: left by a run that failed before the list (written last)
        if path.exists() and not overwrite:
            raise PredictError(path, "already exists", f"choose another {flag} or pass --overwrite")
    if copy_to is not None:
        if copy_to.exists() and not copy_to.is_dir():
            raise PredictError(copy_to, "exists and is not a folder", "choose a folder for --copy-to")
        if is_inside(copy_to, pool):
            raise PredictError(copy_to, f"is inside --pool {pool}", "choose a folder outside the pool for --copy-to")


def _plan_copies(pool: Path, files: list[str], copy_to: Path) -> tuple[list[str], int]:
    """Files still to copy, and how many identical ones are already there; stops at a different existing file."""
    todo, same = [], 0
    for rel in files:
        src, dst = pool / rel, copy_to / rel
        if dst.exists() or dst.is_symlink():
            if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
                same += 1
                continue
            raise PredictError(
                dst, "already exists and differs from the selected image", "choose an empty --copy-to folder"
            )
        todo.append(rel)
    return todo, same


def _csv_text(ranked: list[ImageScore], k: int) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def fmt(v: float | None) -> str:
        return "" if v is None else f"{v:.4f}"

    for rank, r in enumerate(ranked, 1):
        writer.writerow([
            rank, r.file, fmt(r.score), fmt(r.low_confidence), fmt(r.borderline_share), fmt(r.flip_mask_disagreement),
            fmt(r.flip_count_disagreement), r.detections, fmt(r.mean_score), int(rank <= k),
        ])  # fmt: skip
    return buffer.getvalue()


def select_images(
    model: str | Path | nn.Module,
    pool: str | Path,
    k: int = 200,
    output: str | Path = "next_batch.txt",
    copy_to: str | Path | None = None,
    predictions: str | Path | None = None,
    tta: bool = True,
    borderline: float = 0.6,
    weights: tuple[float, float, float, float] = WEIGHTS,
    exclude: list[str] | None = None,
    overwrite: bool = False,
    **options: Any,
) -> SelectSummary:
    """Rank the images of a pool by model uncertainty and write the ``k`` most uncertain (module docstring).

    The inference settings are ``predict``'s (``options``; ``min_area``: smaller detections are ignored in the score
    and dropped from ``predictions``; with ``tta`` each image is three network inputs: itself and two flips).

    Args:
        model: cellseg_pl .ckpt or Ultralytics -seg .pt (a pickle: trusted files only); library callers may pass a
            network with ``names``.
        pool: folder of unlabelled images (sub-folders included).
        k: how many images to select (all of them when the pool holds fewer).
        output: ranked list to write, e.g. next_batch.txt; the per-image scores go to the same name with .csv.
        copy_to: copy the selected images into this folder for a new CVAT task (relative paths kept, nothing replaced).
        predictions: also write COCO 1.0 predictions of the selected images to this JSON file, for CVAT.
        tta: also predict the left-right and upside-down flipped image and score the disagreement (3x compute).
        borderline: detections scoring below this (and at least conf) are borderline.
        weights: weights of (low confidence, borderline share, flip mask disagreement, flip count disagreement).
        exclude: lists of images to leave out, e.g. the next_batch.txt of earlier cycles (repeat the flag for more).
        overwrite: replace an existing list, CSV or predictions file.
        **options: the inference settings, :class:`~cellseg_pl.infer.engine.InferenceOptions`' fields, as
            :func:`~cellseg_pl.infer.predict.predict_folder` takes them.

    Returns:
        What was scored, selected and written.

    Raises:
        PredictError: a bad argument or input (worded ``"<flag or file>: <problem>; <fix>"``); nothing is written.
    """
    opts = InferenceOptions.of(options)
    device, conf, iou, imgsz, max_det = opts.device, opts.conf, opts.iou, opts.imgsz, opts.max_det
    min_area, tile, tile_overlap, batch_size = opts.min_area, opts.tile, opts.tile_overlap, opts.batch_size
    if k < 1:
        raise PredictError("--k", f"{k} is not a positive number", "pass how many images to label, e.g. 200")
    if not conf < borderline <= 1:
        raise PredictError("--borderline", f"{borderline} is not above --conf {conf} and at most 1", "pass e.g. 0.6")
    if len(weights) != 4 or min(weights) < 0 or sum(weights[: 4 if tta else 2]) <= 0:
        raise PredictError("weights", f"{tuple(weights)} are not 4 non-negative numbers with a positive sum", "")
    pool_dir, output = Path(pool).expanduser(), Path(output).expanduser()
    table = output.with_suffix(".csv")
    copy_dir = Path(copy_to).expanduser() if copy_to is not None else None
    preds_path = Path(predictions).expanduser() if predictions is not None else None
    if not pool_dir.is_dir():
        what = "is not a folder" if pool_dir.exists() else "does not exist"
        raise PredictError(pool_dir, what, "pass the folder of unlabelled images with --pool")
    _check_outputs(output, table, pool_dir, copy_dir, preds_path, overwrite)
    skip = set().union(*(read_list(Path(p).expanduser()) for p in exclude or []))
    dev = parse_device(device)
    files = list_images(pool_dir)
    if not files:
        raise PredictError(pool_dir, f"holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})", "check --pool")
    rels = [p.relative_to(pool_dir).as_posix() for p in files]
    candidates = [rel for rel in rels if rel not in skip]
    if not candidates:
        raise PredictError("--exclude", f"excludes all {len(rels)} images of {pool_dir}", "nothing is left to select")
    net, names, imgsz = load_network(model, imgsz, tile_overlap)
    predictor = Predictor(net, len(names), imgsz, dev, conf, iou, max_det, tile, tile_overlap, batch_size)
    summary = SelectSummary(output, table, images_found=len(rels), excluded=len(rels) - len(candidates), tta=tta,
                            copy_to=copy_dir)  # fmt: skip
    log.info("scoring %d images of %s (imgsz %d, %s, tta %s)", len(candidates), pool_dir, imgsz, dev, tta)

    start = last_log = time.perf_counter()
    step = max(1, batch_size // 3) if tta else batch_size
    for offset in range(0, len(candidates), step):
        batch = []
        for rel in candidates[offset : offset + step]:
            try:
                batch.append((rel, read_image(pool_dir / rel)))
            except (DatasetError, OSError) as err:
                log.warning("skipped %s: %s", rel, err)
                summary.unreadable.append(rel)
        inputs = []
        for _, image in batch:
            inputs.append(image)
            if tta:
                inputs += [np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(image[::-1])]
        found = predictor.predict(inputs)
        per_image = len(found) // max(len(batch), 1)
        for i, (rel, image) in enumerate(batch):
            h, w = image.shape[:2]
            views = [[d for d in v if d.area >= min_area] for v in found[i * per_image : (i + 1) * per_image]]
            if tta:
                views[1] = [unflip(d, h, w, axis=1) for d in views[1]]
                views[2] = [unflip(d, h, w, axis=0) for d in views[2]]
            summary.ranked.append(image_uncertainty(rel, views, borderline, tuple(weights)))
        if time.perf_counter() - last_log > 10:
            last_log = time.perf_counter()
            log.info("%d/%d images scored", min(offset + step, len(candidates)), len(candidates))
    if not summary.ranked:
        raise PredictError(pool_dir, f"none of its {len(candidates)} images could be read", "check the image files")
    summary.ranked.sort(key=lambda r: (-r.score, r.file))
    summary.selected = [r.file for r in summary.ranked[:k]]
    if len(summary.ranked) < k:
        log.info("the pool holds %d scorable images, fewer than --k %d: all are selected", len(summary.ranked), k)
    summary.seconds = time.perf_counter() - start

    todo: list[str] = []
    if copy_dir is not None:  # checked before anything is written
        todo, summary.already_there = _plan_copies(pool_dir, summary.selected, copy_dir)
    write_atomic(table, _csv_text(summary.ranked, k))
    for rel in todo:
        with atomic_file(copy_dir / rel) as tmp:
            shutil.copy2(pool_dir / rel, tmp)
        summary.copied += 1
    if preds_path is not None:
        summary.predictions = _predict_selected(
            net, pool_dir, summary.selected, preds_path, device=dev, conf=conf, iou=iou, imgsz=imgsz, max_det=max_det,
            min_area=min_area, tile=tile, tile_overlap=tile_overlap, batch_size=batch_size, overwrite=overwrite,
        )  # fmt: skip
    # the list last: what the lab acts on exists only when everything else was written (a full disk, a kill)
    write_atomic(output, "".join(f"{rel}\n" for rel in summary.selected))
    log.info("selected %d of %d images; wrote %s and %s", len(summary.selected), len(summary.ranked), output, table)
    return summary


def _predict_selected(net: nn.Module, pool: Path, selected: list[str], output: Path, **kwargs) -> PredictSummary:
    """:func:`predict_folder` on the selected images only: a temporary folder links them under their relative paths."""
    with tempfile.TemporaryDirectory(prefix="cellseg_select_") as tmp:
        for rel in selected:
            link = Path(tmp) / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            try:
                link.symlink_to((pool / rel).resolve())
            except OSError:  # no symlinks (e.g. Windows without the privilege): copy
                shutil.copy2(pool / rel, link)
        return predict_folder(net, tmp, output, **kwargs)
