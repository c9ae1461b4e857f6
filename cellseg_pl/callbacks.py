"""Callbacks of every ``fit``: crash-safe checkpoints, Ultralytics-style ``results.csv``, the ``close_mosaic`` switch."""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger(__name__)

#: Column order of Ultralytics' segment ``results.csv``; extra metrics follow, sorted.
RESULTS_COLUMNS = (
    "epoch",
    "time",
    "train/box_loss",
    "train/seg_loss",
    "train/cls_loss",
    "train/dfl_loss",
    "metrics/precision(B)",
    "metrics/recall(B)",
    "metrics/mAP50(B)",
    "metrics/mAP50-95(B)",
    "metrics/precision(M)",
    "metrics/recall(M)",
    "metrics/mAP50(M)",
    "metrics/mAP50-95(M)",
    "val/box_loss",
    "val/seg_loss",
    "val/cls_loss",
    "val/dfl_loss",
    "lr/pg0",
    "lr/pg1",
    "lr/pg2",
)


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


class ResultsCSV(L.Callback):
    """Append one row per epoch to ``<run dir>/results.csv`` with Ultralytics' column names (epoch 1-based).

    ``time`` is the cumulative training time in seconds. On resume the rows of epochs that are re-run are replaced,
    earlier rows are kept.

    Args:
        path: the CSV file (the CLI puts it in the run folder).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._elapsed = 0.0
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None:
            self._elapsed += time.monotonic() - self._start
            self._start = None
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        row: dict[str, float] = {"epoch": trainer.current_epoch + 1, "time": round(self._elapsed, 3)}
        for key, value in trainer.callback_metrics.items():
            number = _number(value)
            if number is not None and ("/" in key or key == "fitness"):
                row[key] = number
        self._write(row)

    def _write(self, row: dict[str, float]) -> None:
        rows = []
        if self.path.is_file():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if float(r.get("epoch") or 0) < row["epoch"]]
        rows.append(row)
        extra = sorted({k for r in rows for k in r} - set(RESULTS_COLUMNS))
        columns = [c for c in RESULTS_COLUMNS if any(c in r for r in rows)] + extra
        tmp = self.path.with_suffix(".csv.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: _format(r.get(k, "")) for k in columns})
        os.replace(tmp, self.path)

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self._elapsed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._elapsed = float(state_dict.get("elapsed", 0.0))


def _format(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


class CloseMosaic(L.Callback):
    """Tell the data module the epoch, so it can turn mosaic off for the last ``close_mosaic`` epochs."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(trainer.current_epoch, trainer.max_epochs or -1)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes ``last.ckpt`` after *every* epoch, atomically.

    Lightning's own callback refreshes ``last`` only when it also saves a top-k checkpoint or when an optimizer
    step happened since the previous save; with Ultralytics' gradient accumulation an epoch can end without one.
    Every file is written to a temporary name in the same folder and renamed into place, so a crash or
    ``kill -9`` at any moment leaves the previous complete file.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_epoch_saved = -1

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        folder, name = os.path.split(filepath)
        tmp = os.path.join(folder, f".partial-{os.getpid()}-{name}")  # never matches the "last*" pattern
        super()._save_checkpoint(trainer, tmp)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        trainer.strategy.barrier("RunCheckpoint.rename")
        self._last_checkpoint_saved = filepath
        if os.path.basename(filepath).startswith(self.CHECKPOINT_NAME_LAST):
            self._last_epoch_saved = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if (
            self.save_last
            and not trainer.fast_dev_run
            and trainer.state.fn == TrainerFn.FITTING
            and self._last_epoch_saved != trainer.current_epoch
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """On an interruption (SIGTERM, Ctrl-C) refresh ``last.ckpt`` with the current state, never ``best``.

        A failed run (any other exception, e.g. NaN losses) keeps the last good ``last.ckpt`` instead.
        """
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not (self.save_on_exception and self.save_last and trainer.state.fn == TrainerFn.FITTING):
            return
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            log.info("interrupted: saved %s; resume with --ckpt_path last", self.last_model_path)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_epoch_saved": self._last_epoch_saved}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._last_epoch_saved = state_dict.get("last_epoch_saved", -1)
