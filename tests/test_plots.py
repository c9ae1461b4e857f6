"""Pictures: results.png from a results.csv, the validation grid, and the callback during a tiny fit."""

from __future__ import annotations

import csv
import math

import cv2
import numpy as np
import pytest
import torch

from cellseg_pl.train.plots import PRED_COLOR, TRUE_COLOR, ValidationPictures, draw_val_grid, plot_results, read_results

from conftest import fit_args


def write_results_csv(path, epochs: int = 12) -> None:
    """A results.csv as ResultsCSV writes it; ``metrics/FP_droplet_sized`` is missing (an older run)."""
    columns = ["epoch", "time", "train/box_loss", "train/seg_loss", "train/cls_loss", "train/dfl_loss",
               "metrics/precision(M)", "metrics/recall(M)", "metrics/mAP50(M)", "metrics/mAP50-95(M)",
               "val/box_loss", "val/seg_loss", "val/cls_loss", "val/dfl_loss", "lr/pg0", "lr/pg1", "lr/pg2",
               "fitness", "metrics/F1(M)", "metrics/AP_cell(M)", "metrics/count_MAE"]  # fmt: skip
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for e in range(1, epochs + 1):
            row = {c: f"{math.exp(-e / 4) * (1 + 0.1 * k):.4f}" for k, c in enumerate(columns)}
            row.update({"epoch": e, "time": 5.0 * e, "metrics/mAP50(M)": 1 - math.exp(-e / 3)})
            row["fitness"] = 0.5 - abs(e - 9) / 20  # best at epoch 9
            row["val/seg_loss"] = "" if e == 3 else row["val/seg_loss"]  # a gap (e.g. a skipped validation)
            writer.writerow(row)


def test_results_png_is_written_from_results_csv(tmp_path):
    path = tmp_path / "run" / "results.csv"
    path.parent.mkdir()
    write_results_csv(path)
    data = read_results(path)
    assert len(data["epoch"]) == 12 and math.isnan(data["val/seg_loss"][2])
    out = plot_results(path)
    assert out == tmp_path / "run" / "results.png"
    png = cv2.imread(str(out))
    assert png.shape == (800, 1920, 3)
    assert (png < 250).any(axis=2).mean() > 0.02  # curves and text, not a blank page
    assert not list(out.parent.glob(".*partial"))  # written via a temporary file, renamed
    assert plot_results(path, tmp_path / "elsewhere" / "curves.png").is_file()


def disk(h: int, w: int, cx: int, cy: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def test_val_grid_shape_colours_and_threshold():
    h = w = 64
    images = [np.full((h, w, 3), 128, np.uint8) for _ in range(3)]
    true = torch.from_numpy(np.stack([disk(h, w, 20, 40, 10)]))
    found = torch.from_numpy(np.stack([disk(h, w, 22, 40, 10), disk(h, w, 50, 50, 6)]))
    nothing = {"masks": found[:0], "scores": torch.zeros(0)}
    preds = [{"masks": found, "scores": torch.tensor([0.9, 0.1])}, nothing, nothing]
    targets = [{"masks": true}, {"masks": true}, {"masks": true[:0]}]
    grid = draw_val_grid(images, preds, targets, conf=0.25)
    legend, gap = 22, 2
    assert grid.shape == (legend + 2 * h + gap, 2 * w + gap, 3) and grid.dtype == np.uint8  # 3 images: 2 x 2

    def colour_pixels(tile: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
        return (np.abs(tile.astype(int) - rgb).sum(2) < 60)

    first = grid[legend : legend + h, :w]
    second = grid[legend : legend + h, w + gap : 2 * w + gap]
    green, magenta = colour_pixels(first, PRED_COLOR), colour_pixels(first, TRUE_COLOR)
    assert green.sum() > 30 and magenta.sum() > 30
    assert not green[40:, 40:].any()  # the prediction scoring 0.1 is below conf: not drawn
    assert colour_pixels(second, TRUE_COLOR).sum() > 30 and not colour_pixels(second, PRED_COLOR)[20:, :].any()
    # big images are shrunk to max_side
    big = draw_val_grid([np.zeros((300, 200, 3), np.uint8)], [preds[1]], [targets[2]], max_side=150)
    assert big.shape == (legend + 150, 100, 3)
    with pytest.raises(ValueError, match="as many"):
        draw_val_grid(images, preds[:1], targets)


def test_results_png_redraw_is_throttled(tmp_path, monkeypatch):
    import cellseg_pl.train.plots as plots

    (tmp_path / "results.csv").write_text("epoch,fitness\n1,0.5\n")
    calls = []
    monkeypatch.setattr(plots, "plot_results", lambda *a: calls.append(a))
    callback = ValidationPictures(tmp_path, results_overhead=0.05)
    callback._results()
    assert len(calls) == 1
    callback._last_results = (callback._last_results[0], 10.0)  # pretend the drawing took 10 s
    callback._results()  # too soon: it would cost more than 5% of the training time
    assert len(calls) == 1
    callback._results(force=True)  # the end of training always draws
    assert len(calls) == 2


@pytest.mark.slow
def test_fit_writes_results_png_and_validation_grids(tiny_data, tmp_path, monkeypatch):
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cellseg_pl.__main__ import main

    # Lightning keeps the process' rank in a global: an earlier in-process test that built a trainer of rank > 0
    # (test_distributed.py's fake SLURM job) leaves it there, and every logger call is then skipped
    monkeypatch.setattr(rank_zero_only, "rank", 0)

    assert main(fit_args(tiny_data, tmp_path, "run", 2)) == 0
    run = tmp_path / "run"
    for name in ("results.png", "val_pred.png", "val_pred_epoch1.png", "val_pred_epoch2.png"):
        assert (run / name).is_file(), name
    grid = cv2.cvtColor(cv2.imread(str(run / "val_pred.png")), cv2.COLOR_BGR2RGB)
    assert grid.shape == (22 + 2 * 128 + 2, 2 * 128 + 2, 3)  # 4 val images at imgsz 128
    assert (np.abs(grid.astype(int) - TRUE_COLOR).sum(2) < 60).sum() > 100  # the true outlines
    with (run / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["metrics/FP_droplet_sized"] != ""
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("val/predictions")] == [1, 2]
