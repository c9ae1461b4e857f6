"""Weights + a folder of images -> COCO 1.0 JSON that CVAT imports as annotations (step 1 of the active-learning cycle).

One ``predict``, two ways to call it, one engine (:mod:`cellseg_pl.infer.engine`: tiling, merging across windows) and
one writer (:func:`predict_folder`):

* the folder tool: ``python -m cellseg_pl predict --model best.ckpt --images DIR --output predictions.json`` (also
  ``scripts/predict_simple_circles.py``, the lab's old name);
* from a run's configuration, LightningCLI style: ``python -m cellseg_pl predict --config RUN/config.yaml
  --ckpt_path RUN/weights/best.ckpt --data.predict_images DIR`` (:func:`predict_from_run`: the same inference flags
  and defaults, :class:`~cellseg_pl.infer.options.InferenceOptions`; ``--data.imgsz`` and ``--data.batch_size`` from
  the run).

What is written (``predictions.json``):

* ``images``: one record per readable image, ``file_name`` relative to the images folder (sub-folders kept, ``/``
  separators: CVAT matches frames by this path, extension ignored; hidden files and folders are skipped), real
  ``width``/``height``, ids from 1.
* ``categories``: ``{"id": 1 + class index, "name": class name}`` from the weights (CVAT matches labels by name).
* ``annotations``: one per detected object (:func:`coco_annotation`), ``iscrowd: 0`` with a one-part polygon
  ``segmentation`` at the **original** image resolution: masks are rebuilt from the prototypes at full size
  (:func:`cellseg_pl.yolo.postprocess.to_original`), then outlined with :func:`cellseg_pl.cvat.coco.mask_to_polygons`, which
  CVAT rasterizes back to the same pixels. ``area`` is the pixel count of that rasterized polygon, ``bbox`` the
  polygon's ``[x, y, w, h]``, ``score`` the confidence (also in ``attributes.score``, which CVAT keeps when the label
  has a number attribute ``score``). An object whose mask has several disconnected parts keeps its largest part
  (one CVAT shape per object), and ``--min-area`` drops objects below that many pixels (the lab's droplet rule:
  area < 500 px is a water droplet).

Large images are predicted on overlapping windows at full resolution (``--tile``; see :mod:`cellseg_pl.infer.engine`).

Example:
    >>> from cellseg_pl.infer.predict import predict_folder
    >>> summary = predict_folder("best.ckpt", "images/subset_200", "predictions.json", min_area=500)  # doctest: +SKIP
    >>> print(summary.format())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from cellseg_pl.cvat.coco import build_coco, count_reason, mask_to_polygons, polygons_to_mask, reason_lines
from cellseg_pl.data.images import IMAGE_SUFFIXES, read_image
from cellseg_pl.errors import DatasetError, ImageTooLargeError, PredictError, UsageError
from cellseg_pl.data.images import list_images
from cellseg_pl.files import is_inside
from cellseg_pl.infer.engine import DEFAULT_IMGSZ, Instance, Predictor, load_network
from cellseg_pl.infer.options import InferenceOptions, parse_device
from cellseg_pl.files import write_atomic
from cellseg_pl.infer.overlay import draw_overlay, write_overlay

log = logging.getLogger(__name__)

#: Why a detection or an image is not in the JSON, as printed in the summary.
DROPPED = {
    "min_area": "area below --min-area (droplets)",
    "no_outline": "mask too small or thin for a polygon of >= 3 points",
}
IMAGE_SKIPS = {
    "unreadable": "cannot be decoded (corrupt or not an image)",
    "too_large": "over the pixel limit (split it into tiles, or raise CV_IO_MAX_IMAGE_PIXELS)",
}
NOTES = {
    "parts_dropped": "objects whose mask had several parts: the largest part was kept",
}


@dataclass
class PredictSummary:
    """What :func:`predict_folder` wrote and dropped.

    Counter keys are those of ``DROPPED``, ``IMAGE_SKIPS`` and ``NOTES``; ``instances`` counts per class name.
    """

    output: Path
    names: dict[int, str]
    imgsz: int = DEFAULT_IMGSZ
    device: str = "cpu"
    images_found: int = 0
    images_written: int = 0
    tiled_images: int = 0
    windows: int = 0
    instances: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    skipped_images: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    overlays: Path | None = None
    seconds: float = 0.0

    @property
    def instances_written(self) -> int:
        return sum(self.instances.values())

    def count(self, kind: Counter, reason: str, example: str, n: int = 1) -> None:
        """Add ``n`` to ``kind[reason]`` and keep the first few examples."""
        count_reason(kind, self.examples, reason, example, n)

    def format(self) -> str:
        """The human-readable report ``python -m cellseg_pl predict`` prints."""
        per_class = ", ".join(f"{name}: {self.instances[name]}" for name in self.names.values())
        rate = self.images_written / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"predicted {self.images_written} of {self.images_found} images (imgsz {self.imgsz}, {self.device}, "
            f"{self.seconds:.1f} s, {rate:.2f} images/s)"
            + (f"; {self.tiled_images} large images tiled into {self.windows} windows" if self.tiled_images else ""),
            f"objects written: {self.instances_written} ({per_class})",
        ]
        lines += reason_lines(
            [("skipped images", self.skipped_images, IMAGE_SKIPS), ("dropped detections", self.dropped, DROPPED),
             ("notes", self.notes, NOTES)],
            self.examples,
        )  # fmt: skip
        if self.overlays is not None:
            lines.append(f"overlays: {self.overlays}")
        lines.append(f"annotations: {self.output} (import into CVAT as 'COCO 1.0')")
        return "\n".join(lines)


def _check_paths(images: Path, output: Path, overwrite: bool, save_overlays: Path | None) -> None:
    if not images.is_dir():
        what = "is not a folder" if images.exists() else "does not exist"
        raise PredictError(images, what, "pass the folder holding the images with --images")
    if output.is_dir():
        raise PredictError(output, "is a folder", "pass a file name such as predictions.json with --output")
    if output.exists() and not overwrite:
        raise PredictError(output, "already exists", "choose another --output or pass --overwrite")
    if save_overlays is not None:
        if save_overlays.exists() and not save_overlays.is_dir():
            raise PredictError(save_overlays, "exists and is not a folder", "choose a folder for --save-overlays")
        if is_inside(save_overlays, images):
            raise PredictError(
                save_overlays, f"is inside --images {images}", "choose a folder outside the images for --save-overlays"
            )


def coco_annotation(
    inst: Instance, ann_id: int, image_id: int
) -> tuple[dict | None, str | None, np.ndarray | None, bool]:
    """The COCO record of one detection, as CVAT imports it (module docstring).

    Returns:
        ``(record, drop reason, outline (K, 2) in image px, parts dropped)``: ``record`` is None and the reason
        ``"no_outline"`` when the mask gives no polygon CVAT can draw.
    """
    polygons = mask_to_polygons(inst.mask) if inst.mask.size else []
    if not polygons:
        return None, "no_outline", None, False
    h, w = inst.mask.shape
    area = int(polygons_to_mask(polygons[:1], h, w).sum())  # what CVAT will rasterize
    if area == 0:
        return None, "no_outline", None, False
    pts = np.asarray(polygons[0], np.float64).reshape(-1, 2) + (inst.x0, inst.y0)
    (x_min, y_min), (x_max, y_max) = pts.min(0), pts.max(0)
    score = round(float(inst.score), 5)
    record = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": inst.label + 1,
        "segmentation": [[round(float(v), 3) for v in pts.reshape(-1)]],
        "area": area,
        "bbox": [round(float(v), 3) for v in (x_min, y_min, x_max - x_min, y_max - y_min)],
        "iscrowd": 0,
        "score": score,
        "attributes": {"occluded": False, "score": score},
    }
    return record, None, pts, len(polygons) > 1


def predict_folder(
    model: str | Path | nn.Module,
    images: str | Path,
    output: str | Path,
    save_overlays: str | Path | None = None,
    overwrite: bool = False,
    **options: Any,
) -> PredictSummary:
    """Predict every image under a folder and write the detections as COCO 1.0 JSON for CVAT.

    Args:
        model: cellseg_pl .ckpt or Ultralytics -seg .pt (a pickle: trusted files only); library callers may pass a
            network with ``names``.
        images: folder of images (sub-folders included, hidden files skipped); file_name is the path relative to it.
        output: JSON file to write, e.g. predictions.json; missing parent folders are created.
        save_overlays: also write each image with its outlines and counts into this folder (same relative path).
        overwrite: replace an existing output file.
        **options: the inference settings, :class:`~cellseg_pl.infer.engine.InferenceOptions`' fields (``device``,
            ``conf``, ``iou``, ``imgsz``, ``max_det``, ``min_area``, ``tile``, ``tile_overlap``, ``batch_size``;
            documented, defaulted and checked there; ``device`` may also be a ``torch.device``).

    Returns:
        What was written, skipped and dropped.

    Raises:
        PredictError: a bad argument, a missing or unusable model, images folder or output, no readable image.
            Nothing is written then.
    """
    opts = InferenceOptions.of(options)
    device, conf, iou, imgsz, max_det = opts.device, opts.conf, opts.iou, opts.imgsz, opts.max_det
    min_area, tile, tile_overlap, batch_size = opts.min_area, opts.tile, opts.tile_overlap, opts.batch_size
    images_dir, output = Path(images).expanduser(), Path(output).expanduser()
    overlays = Path(save_overlays).expanduser() if save_overlays is not None else None
    _check_paths(images_dir, output, overwrite, overlays)
    dev = parse_device(device)
    files = list_images(images_dir)
    if not files:
        raise PredictError(
            images_dir, f"holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})", "check the --images folder"
        )
    net, names, imgsz = load_network(model, imgsz, tile_overlap)
    predictor = Predictor(net, len(names), imgsz, dev, conf, iou, max_det, tile, tile_overlap, batch_size)
    start = time.perf_counter()  # (the rate excludes loading the model)
    summary = PredictSummary(output, names, imgsz, str(dev), images_found=len(files), overlays=overlays)
    log.info("predicting %d images from %s (imgsz %d, %s, tile %s)", len(files), images_dir, imgsz, dev, tile)

    coco_images: list[dict] = []
    annotations: list[dict] = []
    last_log = time.perf_counter()
    for offset in range(0, len(files), batch_size):
        batch: list[tuple[str, np.ndarray]] = []
        for path in files[offset : offset + batch_size]:
            rel = path.relative_to(images_dir).as_posix()
            try:
                batch.append((rel, read_image(path)))
            except (DatasetError, OSError) as err:
                log.warning("skipped %s: %s", rel, err)
                reason = "too_large" if isinstance(err, ImageTooLargeError) else "unreadable"
                summary.count(summary.skipped_images, reason, rel)
        detections = predictor.predict([im for _, im in batch])
        for (rel, image), found in zip(batch, detections):
            h, w = image.shape[:2]
            windows = predictor.windows(h, w)
            if windows is not None:
                summary.tiled_images += 1
                summary.windows += len(windows)
            image_id = len(coco_images) + 1
            coco_images.append({"id": image_id, "file_name": rel, "height": h, "width": w})
            outlines, small = [], []
            for inst in found:
                record, reason, pts, parts_dropped = coco_annotation(inst, len(annotations) + 1, image_id)
                if record is not None and record["area"] < min_area:
                    reason = "min_area"
                    small.append(pts)
                if reason:
                    summary.count(summary.dropped, reason, rel)
                    continue
                if parts_dropped:
                    summary.count(summary.notes, "parts_dropped", rel)
                annotations.append(record)
                outlines.append((inst.label, pts))
                summary.instances[names[inst.label]] += 1
            if overlays is not None:
                write_overlay(overlays / rel, draw_overlay(image, outlines, names, small))
        if time.perf_counter() - last_log > 10:
            last_log = time.perf_counter()
            log.info("%d/%d images, %d objects", min(offset + batch_size, len(files)), len(files), len(annotations))
    if not coco_images:
        raise PredictError(images_dir, f"none of its {len(files)} images could be read", "check the image files")
    summary.images_written = len(coco_images)

    categories = [{"id": k + 1, "name": names[k]} for k in sorted(names)]
    write_atomic(output, json.dumps(build_coco(coco_images, annotations, categories)))
    summary.seconds = time.perf_counter() - start
    log.info("wrote %d objects on %d images to %s", summary.instances_written, summary.images_written, output)
    return summary


def predict_output(cfg: Any, run_dir: Path) -> Path:
    """``predict`` from a run's configuration: ``--predictions`` (default ``<run>/predictions.json``), checked with
    ``--data.predict_images`` before anything is built.

    Raises:
        UsageError: the output exists, or the images folder is not given or not a folder.
    """
    output = Path(cfg.get("predictions") or run_dir / "predictions.json")
    if output.exists():
        raise UsageError(f"--predictions: {output} exists; give another file (nothing is replaced)")
    images = cfg.data.get("predict_images")
    if not images:
        raise UsageError("--data.predict_images: give the folder of images to predict on")
    if not Path(images).is_dir():
        what = "is not a folder" if Path(images).exists() else "does not exist"
        raise UsageError(f"--data.predict_images: {images} {what}; give the folder of images to predict on")
    return output


def predict_from_run(cfg: Any, module: Any, datamodule: Any, trainer: Any, run_dir: Path) -> PredictSummary:
    """``predict`` in LightningCLI's style: :func:`predict_folder` on ``--data.predict_images`` with a run's weights.

    Weights: ``--ckpt_path`` (a file, or ``last``/``best`` of ``<project>/<name>/weights``), else the network
    ``--model.model`` built (its EMA when kept). The inference settings are the folder tool's own flags with its
    defaults (``--conf``, ``--iou``, ``--max_det``, ``--min_area``, ``--tile``, ``--tile_overlap``), so both spellings
    of ``predict`` write the same JSON; the input size is ``--data.imgsz``, the batch ``--data.batch_size``, the
    device the trainer's (one device; ``--trainer.precision`` does not apply).

    Args:
        cfg: the ``predict`` sub-command's parsed configuration.
        module, datamodule, trainer: what LightningCLI built from it.
        run_dir: ``<project>/<name>``.
    """
    ckpt = cfg.get("ckpt_path")
    if ckpt in ("last", "best"):
        ckpt = run_dir / "weights" / f"{ckpt}.ckpt"
        if not ckpt.is_file():
            raise UsageError(f"--ckpt_path {cfg.ckpt_path}: {ckpt} does not exist; give --project/--name of the run")
    elif ckpt in ("hpc", "registry"):
        raise UsageError(f"--ckpt_path {ckpt}: predict takes a checkpoint file, last or best")
    if ckpt is None:
        weights = module.eval_net
        weights.names = module.class_names
    else:
        weights = ckpt
    device = trainer.strategy.root_device
    if trainer.world_size > 1:
        log.info("predict runs on one device: %s", device)
    options = {f.name: cfg[f.name] for f in fields(InferenceOptions) if f.name in cfg}
    options.update(device=device, imgsz=datamodule.hparams.imgsz, batch_size=datamodule.hparams.batch_size)
    try:
        return predict_folder(weights, cfg.data.predict_images, predict_output(cfg, run_dir),
                              save_overlays=cfg.get("save_overlays"), **options)
    except PredictError as err:
        raise UsageError(str(err)) from None
