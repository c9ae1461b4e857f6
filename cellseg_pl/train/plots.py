"""Pictures of a run, drawn offline with our own code (matplotlib's Agg canvas and OpenCV; no font is downloaded).

* :func:`plot_results`: ``results.csv`` -> ``results.png``, the training curves of Ultralytics' ``results.png``
  (losses, mask mAP, precision/recall/F1, learning rate) plus the cell metrics biologists read.
* :func:`draw_val_grid`: validation images with predicted outlines (green, as ``predict --save-overlays``) over the
  ground truth (magenta), and the counts of both.
* :class:`ValidationPictures`: the callback every ``fit`` runs; it writes both into the run folder::

      results.png             the curves, redrawn after an epoch (at most ~1% of the training time) and at the end
      val_pred.png            the first validation images of the latest epoch (overwritten every epoch)
      val_pred_epoch{N}.png   the same, kept for epoch 1, every ``every``-th epoch and the last epoch

  and logs the grid to TensorBoard (``val/predictions``) whenever it keeps a ``val_pred_epoch{N}.png``.

Example:
    >>> from cellseg_pl.train.plots import plot_results
    >>> plot_results("checkpoints/demo/results.csv")  # doctest: +SKIP
    PosixPath('checkpoints/demo/results.png')
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import cv2
import lightning as L
import numpy as np
import torch

from cellseg_pl.files import write_atomic
from cellseg_pl.infer.overlay import PRED_COLOR
from cellseg_pl.masks import MaskWindows

log = logging.getLogger(__name__)

#: Outline colour (RGB) of the ground truth; predictions are green as in ``predict --save-overlays``
#: (magenta and green stay apart for colour-blind eyes).
TRUE_COLOR = (255, 0, 255)

#: ``results.png`` panels: (title, [(column, legend label, line style)], values lie in 0..1).
RESULTS_PANELS: tuple[tuple[str, tuple[tuple[str, str, str], ...], bool], ...] = (
    ("box loss", (("train/box_loss", "train", "-"), ("val/box_loss", "val", "-")), False),
    ("seg loss", (("train/seg_loss", "train", "-"), ("val/seg_loss", "val", "-"),
                  ("train/sem_loss", "train, semantic (YOLO26)", "--")), False),
    ("cls loss", (("train/cls_loss", "train", "-"), ("val/cls_loss", "val", "-")), False),
    ("dfl loss (YOLO26: L1 box loss)", (("train/dfl_loss", "train", "-"), ("val/dfl_loss", "val", "-"),
                                        ("train/l1_loss", "train", "-"), ("val/l1_loss", "val", "-")), False),
    ("learning rate", (("lr/pg0", "pg0", "-"), ("lr/pg1", "pg1", "--"), ("lr/pg2", "pg2", ":")), False),
    ("fitness (0.1 mAP50 + 0.9 mAP50-95)", (("fitness", "fitness", "-"),), True),
    ("mAP50", (("metrics/mAP50(M)", "mask", "-"), ("metrics/mAP50(B)", "box", "--")), True),
    ("mAP50-95", (("metrics/mAP50-95(M)", "mask", "-"), ("metrics/mAP50-95(B)", "box", "--")), True),
    (
        "precision / recall / F1 (M)",
        (
            ("metrics/precision(M)", "precision", "-"),
            ("metrics/recall(M)", "recall", "-"),
            ("metrics/F1(M)", "F1", "-"),
        ),
        True,
    ),
    (
        "cells: AP_cell, matched IoU",
        (("metrics/AP_cell(M)", "TP/(TP+FP+FN)", "-"), ("metrics/mean_matched_IoU(M)", "mean matched IoU", "-")),
        True,
    ),
    ("counting error (cells / image)", (("metrics/count_MAE", "MAE", "-"),), False),
    ("droplet-sized false positives", (("metrics/FP_droplet_sized", "count (val set)", "-"),), False),
)
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c")


def read_results(csv_path: str | Path) -> dict[str, np.ndarray]:
    """``results.csv`` as column -> float array (NaN where a cell is empty or not a number)."""
    with Path(csv_path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, np.ndarray] = {}
    for key in rows[0] if rows else []:
        values = []
        for r in rows:
            try:
                values.append(float(r.get(key) or "nan"))
            except ValueError:
                values.append(math.nan)
        columns[key.strip()] = np.asarray(values, np.float64)
    return columns


def plot_results(csv_path: str | Path, out_png: str | Path | None = None, dpi: int = 80) -> Path:
    """Draw the training curves of a ``results.csv`` (one row per epoch) into a PNG, like Ultralytics' results.png.

    Twelve panels: box/seg/cls/dfl loss (train and val), learning rate per parameter group, fitness, mask (and box)
    mAP50 and mAP50-95, precision/recall/F1, AP_cell and mean matched IoU, counting error and droplet-sized false
    positives. A dotted line is the Gaussian-smoothed curve (from 10 epochs on); a grey dashed line marks the best
    epoch (highest ``fitness``, the epoch of ``best.ckpt``). Columns missing from the CSV leave their panel empty.

    Args:
        csv_path: the ``results.csv`` of a run.
        out_png: PNG to write (default ``results.png`` next to the CSV); replaced atomically.
        dpi: resolution (80: a 1920 x 800 px picture).

    Returns:
        The PNG path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: importing plots stays cheap
    from matplotlib.figure import Figure
    from scipy.ndimage import gaussian_filter1d

    csv_path = Path(csv_path)
    out = Path(out_png) if out_png is not None else csv_path.with_name("results.png")
    data = read_results(csv_path)
    epochs = data.get("epoch", np.arange(1, 1 + len(next(iter(data.values()), []))))
    fitness = data.get("fitness")
    best = None
    if fitness is not None and np.isfinite(fitness).any():
        best = epochs[int(np.nanargmax(fitness))]

    fig = Figure(figsize=(24, 10), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 6).ravel()
    for ax, (title, lines, unit) in zip(axes, RESULTS_PANELS):
        drawn = False
        for color, (column, label, style) in zip(_COLORS, lines):
            y = data.get(column)
            if y is None or not np.isfinite(y).any():
                continue
            ok = np.isfinite(y)
            ax.plot(epochs[ok], y[ok], style, color=color, marker="." if ok.sum() < 30 else None, lw=1.5, label=label)
            if ok.sum() >= 10:
                ax.plot(epochs[ok], gaussian_filter1d(y[ok], sigma=3), ":", color=color, lw=1.5)
            drawn = True
        ax.set_title(title, fontsize=11)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
            continue
        if best is not None:
            ax.axvline(best, color="grey", ls="--", lw=0.8)
        if unit:
            ax.set_ylim(-0.02, 1.02)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if len(lines) > 1:
            ax.legend(fontsize=8, loc="best")
    for ax in axes[6:]:
        ax.set_xlabel("epoch")
    suffix = f"; best epoch {best:g} (grey dashed)" if best is not None else ""
    fig.suptitle(f"{csv_path.parent.name}: {len(epochs)} epochs{suffix}", fontsize=13)
    fig.subplots_adjust(left=0.03, right=0.99, bottom=0.06, top=0.9, wspace=0.25, hspace=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_atomic(out, buffer.getvalue())
    return out


# --------------------------------------------------------------------------------------------------
# validation grid
# --------------------------------------------------------------------------------------------------


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def dense_masks(masks: torch.Tensor | MaskWindows, indices: list[int] | None = None) -> torch.Tensor:
    """(n, H, W) bool masks (all, or ``indices``) on the CPU, from a tensor or :class:`cellseg_pl.masks.MaskWindows`."""
    if isinstance(masks, MaskWindows):
        return masks.dense("cpu", indices)
    return (masks if indices is None else masks[indices]).cpu()


def _outlines(masks: np.ndarray, scale: float) -> list[np.ndarray]:
    """Outer contours of ``(n, H, W)`` bool masks, in the pixels of the image shrunk by ``scale``."""
    contours = []
    for m in masks:
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        if not len(rows):
            continue
        y0, x0 = rows[0], cols[0]
        crop = np.ascontiguousarray(m[y0 : rows[-1] + 1, x0 : cols[-1] + 1], np.uint8)
        found, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(int(x0), int(y0)))
        contours += [np.round((c.astype(np.float32) + 0.5) * scale - 0.5).astype(np.int32) for c in found]
    return contours


def _label(image: np.ndarray, lines: list[tuple[str, tuple[int, int, int]]], scale: float = 0.45) -> None:
    """Coloured text lines on a black box in the top-left corner (OpenCV's built-in Hershey font)."""
    y = 0
    for text, color in lines:
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.rectangle(image, (0, y), (tw + 6, y + th + base + 6), (0, 0, 0), -1)
        cv2.putText(image, text, (3, y + th + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, cv2.LINE_AA)
        y += th + base + 6


def draw_val_grid(
    images: Sequence[np.ndarray],
    preds: Sequence[dict[str, Any]],
    targets: Sequence[dict[str, Any]],
    conf: float = 0.25,
    max_side: int = 512,
    columns: int | None = None,
) -> np.ndarray:
    """A grid of images with predicted outlines (green) drawn over the true outlines (magenta), with counts.

    Args:
        images: ``(H, W, 3)`` uint8 RGB images (e.g. the letterboxed network inputs of a validation batch).
        preds: per image ``{"masks": (n, H, W) bool, "scores": (n,)}`` (tensors or arrays), as ``postprocess`` gives.
        targets: per image ``{"masks": (m, H, W) bool}``.
        conf: predictions scoring below this are not drawn nor counted (the operating point, ``pr_conf``).
        max_side: images with a longer side are shrunk to it (outlines are traced at full resolution first).
        columns: images per row (default: a near-square grid).

    Returns:
        ``(rows * h + legend, columns * w, 3)`` uint8 RGB.
    """
    if not (len(images) == len(preds) == len(targets)) or not len(images):
        raise ValueError(f"draw_val_grid: need as many preds and targets as images, got "
                         f"{len(images)}, {len(preds)}, {len(targets)}")  # fmt: skip
    tiles = []
    for image, pred, target in zip(images, preds, targets):
        image = np.asarray(image, np.uint8)
        h, w = image.shape[:2]
        scale = min(1.0, max_side / max(h, w))
        if scale < 1:
            tile = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        else:
            tile = image.copy()
        scores = _numpy(pred["scores"]).reshape(-1)
        pred_masks = _numpy(pred["masks"]).astype(bool)[scores >= conf]
        true_masks = _numpy(target["masks"]).astype(bool)
        thick = max(1, round(max(tile.shape[:2]) / 400))
        cv2.drawContours(tile, _outlines(true_masks, scale), -1, TRUE_COLOR, thick + 1, cv2.LINE_AA)
        cv2.drawContours(tile, _outlines(pred_masks, scale), -1, PRED_COLOR, thick, cv2.LINE_AA)
        _label(tile, [(f"pred {len(pred_masks)}", PRED_COLOR), (f"true {len(true_masks)}", TRUE_COLOR)])
        tiles.append(tile)
    th, tw = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    cols = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    gap, legend = 2, 22
    grid = np.full((legend + rows * (th + gap), cols * (tw + gap) - gap, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        y, x = legend + r * (th + gap), c * (tw + gap)
        grid[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    text = f"green: predicted (score >= {conf:g})   magenta: ground truth"
    cv2.putText(grid, text, (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return grid[: legend + rows * (th + gap) - gap]


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an RGB uint8 image as PNG (atomically)."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"cannot encode {path}")
    write_atomic(Path(path), data.tobytes())
    return Path(path)


# --------------------------------------------------------------------------------------------------
# the callback
# --------------------------------------------------------------------------------------------------


class ValidationPictures(L.Callback):
    """Write ``results.png`` and a grid of validation predictions into the run folder during ``fit`` (rank 0).

    After each validation the first ``n_images`` images of the first validation batch (the same images every
    epoch) are drawn with :func:`draw_val_grid` into ``val_pred.png`` (overwritten); for epoch 1, every
    ``every``-th epoch and the last epoch the grid is also kept as ``val_pred_epoch{N}.png`` and logged to
    TensorBoard as ``val/predictions`` (when the logger is a ``TensorBoardLogger``).

    ``results.png`` is redrawn from ``results.csv`` at the end of an epoch and always at the end of training.
    Drawing it takes about half a second of CPU (matplotlib lays out twelve panels), which is a tenth of a demo
    epoch: after the first epoch it is redrawn only once the training time since the last drawing is at least
    ``1 / results_overhead`` times what that drawing took, so it never costs more than ``results_overhead`` of the
    run (with epochs of a minute, as on the lab's data, that is every epoch). A failure to draw is logged and never
    stops a run.

    Args:
        run_dir: the run folder (holds ``results.csv``).
        n_images: validation images in the grid (at most the validation batch size).
        every: keep (and log to TensorBoard) the grid every this many epochs.
        max_side: images larger than this are shrunk in the grid.
        results_overhead: largest share of the training time spent redrawing ``results.png``.
    """

    def __init__(
        self, run_dir: str | Path, n_images: int = 4, every: int = 10, max_side: int = 512,
        results_overhead: float = 0.01,
    ) -> None:  # fmt: skip
        self.run_dir = Path(run_dir)
        self.n_images, self.every, self.max_side = n_images, max(1, every), max_side
        self.results_overhead = results_overhead
        self._batch: tuple | None = None
        self._last_grid: tuple[int, np.ndarray] | None = None
        self._last_results: tuple[float, float] | None = None  # (monotonic end time, seconds) of the last drawing
        #: seconds spent drawing, per kind (for the curious; logged at debug level)
        self.seconds: dict[str, float] = {"grid": 0.0, "results": 0.0}

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if batch_idx or dataloader_idx or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if not isinstance(outputs, dict) or "preds" not in outputs:
            return
        n = min(self.n_images, batch["img"].shape[0])
        img = batch["img"][:n].detach().float()
        img = img * 255 if img.max() <= 1.0 else img  # after on_after_batch_transfer: 0..1
        images = img.clamp(0, 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        conf = float(getattr(pl_module.hparams, "pr_conf", 0.25))
        preds = []
        for p in outputs["preds"][:n]:  # only what is drawn (up to 300 detections score above 0.001)
            shown = torch.nonzero(p["scores"] >= conf).view(-1).tolist()
            preds.append({"masks": dense_masks(p["masks"], shown), "scores": p["scores"][shown].cpu()})
        targets = [{"masks": dense_masks(t["masks"])} for t in outputs["targets"][:n]]
        self._batch = (images, preds, targets)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._batch is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        start = time.perf_counter()
        epoch = trainer.current_epoch + 1
        try:
            conf = float(getattr(pl_module.hparams, "pr_conf", 0.25))
            grid = draw_val_grid(*self._batch, conf=conf, max_side=self.max_side)
            write_png(self.run_dir / "val_pred.png", grid)
            self._last_grid = (epoch, grid)
            if epoch == 1 or epoch % self.every == 0:
                self._keep(trainer, epoch, grid)
        except Exception as err:  # noqa: BLE001 - a picture must never stop training
            log.warning("could not draw the validation pictures: %s", err)
        finally:
            self._batch = None
            self.seconds["grid"] += time.perf_counter() - start

    def _keep(self, trainer: L.Trainer, epoch: int, grid: np.ndarray) -> None:
        write_png(self.run_dir / f"val_pred_epoch{epoch}.png", grid)
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/predictions", grid, global_step=epoch, dataformats="HWC")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self._results()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self._last_grid is not None:
            epoch, grid = self._last_grid
            if not (self.run_dir / f"val_pred_epoch{epoch}.png").exists():
                try:
                    self._keep(trainer, epoch, grid)
                except Exception as err:  # noqa: BLE001
                    log.warning("could not keep the last validation picture: %s", err)
        self._results(force=True)
        log.debug("pictures: %.2f s drawing grids, %.2f s results.png", self.seconds["grid"], self.seconds["results"])

    def _results(self, force: bool = False) -> None:
        csv_path = self.run_dir / "results.csv"
        if not csv_path.is_file():
            return
        start = time.monotonic()
        if not force and self._last_results is not None:
            end, took = self._last_results
            if start - end < took / max(self.results_overhead, 1e-6):
                return
        try:
            plot_results(csv_path, self.run_dir / "results.png")
        except Exception as err:  # noqa: BLE001 - a picture must never stop training
            log.warning("could not draw %s: %s", self.run_dir / "results.png", err)
        end = time.monotonic()
        self._last_results = (end, end - start)
        self.seconds["results"] += end - start
