"""Weights + a folder of images -> COCO 1.0 JSON that CVAT imports as annotations (step 1 of the active-learning cycle).

One ``predict``, two ways to call it, one engine (:mod:`cellseg_pl.inference`: tiling, merging across windows) and
one writer (:func:`predict_folder`):

* the folder tool: ``python -m cellseg_pl predict --model best.ckpt --images DIR --output predictions.json`` (also
  ``scripts/predict_simple_circles.py``, the lab's old name);
* from a run's configuration, LightningCLI style: ``python -m cellseg_pl predict --config RUN/config.yaml
  --ckpt_path RUN/weights/best.ckpt --data.predict_images DIR`` (:class:`cellseg_pl.cli.CellSegCLI` maps
  ``--model.predict_conf``, ``--model.iou``, ``--model.max_det``, ``--model.min_area``, ``--data.imgsz`` and
  ``--data.batch_size`` onto the tool's arguments and calls :func:`predict_folder`).

What is written (``predictions.json``):

* ``images``: one record per readable image, ``file_name`` relative to the images folder (sub-folders kept, ``/``
  separators: CVAT matches frames by this path, extension ignored; hidden files and folders are skipped), real
  ``width``/``height``, ids from 1.
* ``categories``: ``{"id": 1 + class index, "name": class name}`` from the weights (CVAT matches labels by name).
* ``annotations``: one per detected object (:func:`coco_annotation`), ``iscrowd: 0`` with a one-part polygon
  ``segmentation`` at the **original** image resolution: masks are rebuilt from the prototypes at full size
  (:func:`cellseg_pl.postprocess.to_original`), then outlined with :func:`cellseg_pl.coco.mask_to_polygons`, which
  CVAT rasterizes back to the same pixels. ``area`` is the pixel count of that rasterized polygon, ``bbox`` the
  polygon's ``[x, y, w, h]``, ``score`` the confidence (also in ``attributes.score``, which CVAT keeps when the label
  has a number attribute ``score``). An object whose mask has several disconnected parts keeps its largest part
  (one CVAT shape per object), and ``--min-area`` drops objects below that many pixels (the lab's droplet rule:
  area < 500 px is a water droplet).

Large images are predicted on overlapping windows at full resolution (``--tile``; see :mod:`cellseg_pl.inference`).

Example:
    >>> from cellseg_pl.predict import predict_folder
    >>> summary = predict_folder("best.ckpt", "images/subset_200", "predictions.json", min_area=500)  # doctest: +SKIP
    >>> print(summary.format())  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cellseg_pl.coco import CocoError, build_coco, count_reason, mask_to_polygons, polygons_to_mask, reason_lines
from cellseg_pl.dataset import IMAGE_SUFFIXES, DatasetError, ImageTooLargeError, read_image
from cellseg_pl.inference import (
    AUTO_TILE_FACTOR,
    DEFAULT_IMGSZ,
    TILE_MODES,
    Instance,
    PredictError,
    Predictor,
    check_inference_args,
    is_inside,
    list_images,
    load_network,
    parse_device,
    tile_windows,  # noqa: F401 - re-exported: scripts/bench_real_cells.py imports it from here
)
from cellseg_pl.plots import draw_overlay, write_overlay

log = logging.getLogger(__name__)

#: Why a detection or an image is not in the JSON, as printed in the summary.
DROPPED = {
    "min_area": "area below --min-area (droplets)",
    "no_outline": "mask too small or thin for a polygon of >= 3 points",
}
IMAGE_SKIPS = {
    "unreadable": "cannot be decoded (corrupt or not an image)",
    "too_large": "over OpenCV's pixel limit (split it into tiles, or raise CV_IO_MAX_IMAGE_PIXELS)",
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
        """The human-readable report ``main`` prints."""
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
    device: str | torch.device = "cpu",
    conf: float = 0.25,
    iou: float = 0.7,
    imgsz: int | None = None,
    max_det: int = 300,
    min_area: float = 0,
    save_overlays: str | Path | None = None,
    tile: str = "auto",
    tile_overlap: int | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
) -> PredictSummary:
    """Predict every image under a folder and write the detections as COCO 1.0 JSON for CVAT.

    Args:
        model: a cellseg_pl ``.ckpt``, an Ultralytics ``-seg`` ``.pt`` (a pickle: trusted files only), or a
            network (with ``names``).
        images: folder of images (sub-folders included); ``file_name`` is the path relative to it.
        output: JSON file to write; missing parent folders are created.
        device: ``cpu``, ``0`` (= ``cuda:0``) or ``cuda:N``.
        conf: minimum score kept.
        iou: NMS IoU threshold.
        imgsz: network input side in px; default the one stored in the weights, else 640.
        max_det: maximum detections per image, or per window of a tiled image.
        min_area: drop objects smaller than this many pixels (the guide's droplet rule: 500).
        save_overlays: folder to write each image with its outlines and counts (same relative path, PNG/JPG).
        tile: ``auto``, ``on`` or ``off``: tiled prediction of large images (module docstring).
        tile_overlap: window overlap in px (default ``imgsz // 4``); objects smaller than it are never cut.
        batch_size: images or windows per forward pass.
        overwrite: replace an existing ``output``.

    Returns:
        What was written, skipped and dropped.

    Raises:
        PredictError: a bad argument, a missing or unusable model, images folder or output, no readable image.
            Nothing is written then.
    """
    check_inference_args(conf, iou, max_det, min_area, tile, tile_overlap, batch_size)
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
    _write_json_atomically(build_coco(coco_images, annotations, categories), output)
    summary.seconds = time.perf_counter() - start
    log.info("wrote %d objects on %d images to %s", summary.instances_written, summary.images_written, output)
    return summary


def _write_json_atomically(data: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    try:
        tmp.write_text(json.dumps(data))
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)



# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def add_inference_arguments(p: argparse.ArgumentParser) -> None:
    """The network, NMS and tiling flags ``predict`` and ``select`` share (dash and underscore spellings)."""
    p.add_argument("--device", default="cpu", help="cpu (default), 0 (= cuda:0) or cuda:N")
    p.add_argument("--conf", type=float, default=0.25, help="minimum score kept (default 0.25)")
    p.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold (default 0.7)")
    p.add_argument("--imgsz", type=int, default=None, help="network input side in px (default: the model's, else 640)")
    p.add_argument(
        "--max-det", "--max_det", dest="max_det", type=int, default=300, help="most objects per image or window (300)"
    )
    p.add_argument(
        "--min-area", "--min_area", dest="min_area", type=float, default=0,
        help="drop objects smaller than this many pixels, e.g. 500 for water droplets (default 0: keep all)",
    )  # fmt: skip
    p.add_argument(
        "--tile", choices=TILE_MODES, default="auto",
        help=f"predict large images on overlapping imgsz windows at full resolution: auto (a side > "
        f"{AUTO_TILE_FACTOR:g} x imgsz), on (a side > imgsz) or off (resize to imgsz) (default auto)",
    )  # fmt: skip
    p.add_argument(
        "--tile-overlap", "--tile_overlap", dest="tile_overlap", type=int, default=None, metavar="PX",
        help="overlap of neighbouring windows in px, larger than the biggest object (default imgsz/4)",
    )  # fmt: skip
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8, help="inputs per pass (8)")


def run_tool(parser: argparse.ArgumentParser, argv: list[str] | None, run) -> int:  # noqa: ANN001
    """Parse ``argv``, call ``run(args)`` and print its summary; a bad argument or input is one ``error:`` line.

    Returns:
        0 on success; 2 on a bad argument or input (``CocoError``, ``OSError``, GPU out of memory).
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse has already printed usage and the problem
        return int(stop.code or 0)
    if not logging.getLogger("cellseg_pl").handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        summary = run(args)
    except CocoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        where = err.filename or args.output
        print(f"error: {where}: {err.strerror or err}; check the path, permissions and free space", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print(f"error: --device {args.device}: out of GPU memory; lower --batch-size or --imgsz", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


#: ``predict --help``: how to predict from a run's configuration instead (LightningCLI style).
LIGHTNING_STYLE_HELP = """\
from a run's configuration instead (LightningCLI style; the same engine, tiling and JSON):
  python -m cellseg_pl predict --config RUN/config.yaml --ckpt_path RUN/weights/best.ckpt \\
      --data.predict_images DIR [--predictions FILE] [--model.predict_conf 0.25] [--model.min_area 500] \\
      [--tile auto|on|off] [--tile_overlap PX] [--save_overlays DIR]
  (--config, --ckpt_path or any --data./--model./--trainer. flag selects it; the thresholds are the run's
  --model.predict_conf/iou/max_det/min_area, the input size --data.imgsz; default output
  <project>/<name>/predictions.json, never replaced; all its options: predict --config RUN/config.yaml --help)"""


def _parser() -> argparse.ArgumentParser:
    """Flags of the lab's ``predict_simple_circles.py`` plus ours (dash and underscore spellings)."""
    p = argparse.ArgumentParser(
        prog="python -m cellseg_pl predict",
        description="Predict a folder of images and write COCO 1.0 JSON that CVAT imports as annotations "
        "(polygons at the original resolution, with scores).",
        epilog=LIGHTNING_STYLE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--model", required=True, help="cellseg_pl .ckpt or Ultralytics -seg .pt (trusted files only)")
    p.add_argument("--images", required=True, help="folder of images (sub-folders included, hidden files skipped)")
    p.add_argument("--output", required=True, help="JSON file to write, e.g. predictions.json")
    add_inference_arguments(p)
    p.add_argument(
        "--save-overlays", "--save_overlays", dest="save_overlays", default=None, metavar="DIR",
        help="also write each image with its outlines and counts here (same relative path)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line: ``predict --model M --images DIR --output predictions.json [...]``.

    Returns:
        0 on success; 2 on a bad argument or input, reported as one ``error: ...`` line on stderr.
    """
    return run_tool(_parser(), argv, lambda a: predict_folder(
        a.model, a.images, a.output, a.device, a.conf, a.iou, a.imgsz, a.max_det, a.min_area, a.save_overlays,
        a.tile, a.tile_overlap, a.batch_size, a.overwrite,
    ))  # fmt: skip


