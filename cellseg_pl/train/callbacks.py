"""Callbacks of every ``fit``: crash-safe checkpoints, Ultralytics-style ``results.csv``, the ``close_mosaic`` switch."""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from cellseg_pl.errors import OutputError
from cellseg_pl.files import atomic_file, partial_path, write_failure_cause

log = logging.getLogger(__name__)

#: Column order of Ultralytics' segment ``results.csv`` (YOLO26 has l1 and sem losses, others dfl); extra metrics
#: follow, sorted.
RESULTS_COLUMNS = (
    "epoch",
    "time",
    "train/box_loss",
    "train/seg_loss",
    "train/cls_loss",
    "train/dfl_loss",
    "train/l1_loss",
    "train/sem_loss",
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
    "val/l1_loss",
    "val/sem_loss",
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


class CpuThreads(L.Callback):
    """Training on the CPU: torch threads = this node's cores divided by its processes, unless the user's
    environment set ``OMP_NUM_THREADS`` (a SLURM job's ``--cpus-per-task``, say).

    The loader workers decode on one thread each and wait for the step most of the time, so no core is kept
    back for them. Measured on 2 cores (HeLa tiles at 320 px, yolov8n-seg, batch 8, epochs 2-3): 2 threads and
    no worker trained an epoch in 15-18 s, 2 threads beside 2 workers in 16-19 s, 1 thread beside 2 workers
    (a core left to each worker) in 28-30 s. Ultralytics trains on ``cores - 1`` threads with no worker: 1 thread
    on 2 cores.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            share_cpu(trainer, getattr(trainer.datamodule, "num_workers", 0))


def share_cpu(trainer: L.Trainer, workers: int) -> None:
    """Set this process' torch threads as :class:`CpuThreads` says (nothing on a GPU)."""
    from lightning.pytorch.accelerators import CPUAccelerator

    from cellseg_pl import USER_OMP_NUM_THREADS
    from cellseg_pl.data.datamodule import cores

    if not isinstance(trainer.accelerator, CPUAccelerator):
        return
    share = max(1, cores() // max(trainer.num_devices, 1))
    if USER_OMP_NUM_THREADS:
        threads = torch.get_num_threads()
    else:
        threads = share
        torch.set_num_threads(threads)  # also undoes the OMP_NUM_THREADS=1 that importing Ultralytics sets
    log.info("CPU training: %d torch thread(s) per process, %d loader worker(s)", threads, workers)
    if threads < share:
        log.info(
            "OMP_NUM_THREADS=%s: the step uses %d of this process' %d cores (unset it to use them all; a "
            "parent process that imported Ultralytics sets it to 1)", USER_OMP_NUM_THREADS, threads, share,
        )


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
        with atomic_file(self.path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: _format(r.get(k, "")) for k in columns})

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self._elapsed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._elapsed = float(state_dict.get("elapsed", 0.0))


def _format(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


class FitnessEarlyStopping(EarlyStopping):
    """Lightning's ``EarlyStopping`` with two rules for small data sets.

    * Ultralytics' rule for the start of a run: while the best ``fitness`` is still 0 (a model trained from scratch
      that finds no cell yet), an epoch counts as an improvement. Without it, ``--early_stopping.patience 20`` (the
      guide's) stopped a 150-epoch run from scratch on 20 images at epoch 21 with a model that had found nothing.
    * An epoch in which the optimizer did not step is not counted: its weights are the ones validated before, so its
      validation says nothing new. With fewer training images than the nominal batch (``--model.nbs``, 64) a step
      comes only every few epochs (20 images, batch 4: every 3.2 epochs), and counting every epoch made patience 20
      mean 6 steps: a run from scratch stopped at epoch 46 of 150, after one early peak, with a model worth a
      quarter of the others (HeLa tiles, seed 1). With a step every epoch (the lab's data sets) this is Ultralytics'
      rule exactly.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_step_seen: int | None = None  # the optimizer step of the weights last checked

    def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
        recipe = getattr(trainer.lightning_module, "recipe", None)
        step = getattr(recipe, "last_opt_step", None)
        if step is not None and step == self.last_step_seen:
            return  # no optimizer step since the last check: the same weights, counted neither way
        self.last_step_seen = step
        super()._run_early_stopping_check(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_step_seen": self.last_step_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.last_step_seen = state_dict.get("last_step_seen")

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        best = self.best_score
        if self.mode == "max" and torch.isfinite(best) and best <= 0 and torch.isfinite(current) and current >= best:
            self.best_score = current.to(best.device)
            self.wait_count = 0
            return False, None
        return super()._evaluate_stopping_criteria(current)


class CloseMosaic(L.Callback):
    """Tell the data module the epoch, so it can turn mosaic off for the last ``close_mosaic`` epochs."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(trainer.current_epoch, trainer.max_epochs or -1)


class FileCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with a local checkpoint serialized straight into its file.

    Lightning's own serializes into memory and copies that through fsspec: 0.23 s per epoch for the 66 MB
    checkpoint of a yolov8n-seg run (weights, EMA, AdamW state, pending gradients), against 0.11 s for
    ``torch.save`` into the file. The file is the temporary of :class:`RunCheckpoint`, renamed into place once
    complete, so it is as crash-safe. Remote paths (``s3://...``) keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        from fsspec.implementations.local import LocalFileSystem
        from lightning.fabric.utilities.cloud_io import get_filesystem

        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        torch.save(checkpoint, path)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes ``last.ckpt`` after *every* epoch, atomically.

    Lightning's own callback refreshes ``last`` only when it also saves a top-k checkpoint or when an optimizer
    step happened since the previous save; with Ultralytics' gradient accumulation an epoch can end without one.
    Every file is written to a temporary name in the same folder and renamed into place, so a crash or
    ``kill -9`` at any moment leaves the previous complete file. When ``best`` was just written from the same
    state (a new best epoch), ``last`` becomes a hard link to it instead of a second serialization of the same
    weights and optimizer; files are only ever replaced by renaming, never rewritten, so the two stay independent.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_epoch_saved = -1
        self._saved_at: tuple | None = None  # what ``now`` was when _last_checkpoint_saved was written

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        folder, name = os.path.split(filepath)
        tmp = str(partial_path(Path(filepath)))  # hidden: never matches the "last*" pattern
        # (epoch, step, batch) and the last path the state records: the state ``last`` would hold
        now = (trainer.current_epoch, trainer.global_step, trainer.fit_loop.total_batch_idx, self.last_model_path)
        same = self._last_checkpoint_saved
        if name.startswith(self.CHECKPOINT_NAME_LAST) and self._saved_at == now and same and same != filepath:
            # that very state was written to ``same`` a moment ago (every rank takes this branch alike)
            if trainer.is_global_zero:
                try:
                    os.link(same, tmp)
                except OSError:  # a file system without hard links
                    shutil.copyfile(same, tmp)
                for logger in trainer.loggers:
                    logger.after_save_checkpoint(proxy(self))
            self._last_global_step_saved = trainer.global_step
        else:
            try:
                super()._save_checkpoint(trainer, tmp)
            except (OSError, RuntimeError) as e:  # (fsspec stages the file in /tmp; torch's writer says RuntimeError)
                Path(tmp).unlink(missing_ok=True)
                cause = (e.strerror if isinstance(e, OSError) else None) or write_failure_cause(Path(folder)) or str(e)
                raise OutputError(filepath, f"cannot write the checkpoint ({cause})",
                                  "check free space and permissions; the previous checkpoint is kept") from None
        # (Lightning sets last_model_path to ``last`` before it writes ``last``: a ``best`` written first matches it
        # from the second epoch on)
        self._saved_at = now
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


class ConsoleReport(L.Callback):
    """One line per validated epoch (epochs 1-based: ``12/40``) and a summary at the end of ``fit``.

    The line: training losses, mask precision, recall, mAP50, mAP50-95 and F1 (at ``--model.pr_conf``). The summary:
    the best epoch and its metrics, the time taken, the run folder and the files in it.

    Args:
        run_dir: the run folder (named in the summary).
    """

    METRICS = (("P", "metrics/precision(M)"), ("R", "metrics/recall(M)"), ("mAP50", "metrics/mAP50(M)"),
               ("mAP50-95", "metrics/mAP50-95(M)"), ("F1", "metrics/F1(M)"))

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._start = None
        self._best: tuple[float, int, dict[str, float]] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or "fitness" not in trainer.callback_metrics:
            return
        m = {k: _number(v) for k, v in trainer.callback_metrics.items()}
        epoch = trainer.current_epoch + 1
        losses = " ".join(
            f"{name} {m[key]:.3f}" for name in ("box", "seg", "cls", "dfl", "l1", "sem")
            if (key := f"train/{name}_loss") in m and m[key] is not None
        )
        scores = " ".join(f"{name} {m[key]:.3f}" for name, key in self.METRICS if m.get(key) is not None)
        log.info("epoch %d/%d  %s  |  mask %s", epoch, trainer.max_epochs, losses or "-", scores)
        fitness = m.get("fitness")
        if fitness is not None and (self._best is None or fitness > self._best[0]):
            self._best = (fitness, epoch, {name: m[key] for name, key in self.METRICS if m.get(key) is not None})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self._start is None:
            return
        minutes = (time.monotonic() - self._start) / 60
        done = trainer.current_epoch  # (epochs completed)
        log.info("%d epoch(s) completed in %.1f min", done, minutes)
        if self._best is not None:
            fitness, epoch, metrics = self._best
            scores = " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
            log.info("best epoch %d (fitness %.4f): mask %s", epoch, fitness, scores)
        files = [p.relative_to(self.run_dir).as_posix() for p in sorted(self.run_dir.glob("weights/*"))
                 if not p.name.startswith(".")]
        files += [name for name in ("results.csv", "results.png", "config.yaml") if (self.run_dir / name).exists()]
        log.info("results saved to %s: %s", self.run_dir, ", ".join(files))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self._best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        best = state_dict.get("best")
        self._best = tuple(best) if best is not None else None


class UltralyticsWeights(L.Callback):
    """``weights/best.pt`` and ``weights/last.pt`` in Ultralytics' format, beside the Lightning checkpoints.

    So every command of the lab's guide works on a run folder unchanged (``yolo segment val model=.../best.pt``,
    ``predict_simple_circles.py --model .../best.pt``, ``cp .../best.pt models/v2.pt``). ``best.pt`` is written
    after each epoch that wrote a new ``best.ckpt`` (the same EMA weights, float16 as Ultralytics saves them; ~0.1 s
    for yolov8s), ``last.pt`` at the end of ``fit``. Files are written under a temporary name and renamed into place.

    Args:
        weights_dir: the run's ``weights`` folder.
        train_args: recorded as the file's ``train_args`` (``data``, ``imgsz``, ...: what ``yolo val`` reads).
    """

    def __init__(self, weights_dir: str | Path, train_args: dict[str, Any] | None = None) -> None:
        self.weights_dir = Path(weights_dir)
        self.train_args = dict(train_args or {})
        self._best_path: str | None = None
        self._best_score: float | None = None

    def _save(self, pl_module: L.LightningModule, name: str, epoch: int) -> None:
        from cellseg_pl.yolo.network import save_ultralytics_checkpoint

        with atomic_file(self.weights_dir / name) as tmp:
            save_ultralytics_checkpoint(pl_module.eval_net, tmp, pl_module.class_names,
                                        {**self.train_args, "epochs_trained": epoch})

    def _refresh_best(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        if not trainer.is_global_zero or checkpoint is None or not checkpoint.best_model_path:
            return
        score = _number(checkpoint.best_model_score)
        if checkpoint.best_model_path != self._best_path or score != self._best_score:
            # best.ckpt was (re)written at the end of the epoch just finished, from these very weights (no step since)
            self._save(pl_module, "best.pt", trainer.current_epoch)
            self._best_path, self._best_score = checkpoint.best_model_path, score

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # (Lightning runs checkpoint callbacks after all others: best.ckpt of epoch N is known at N+1's start)
        self._refresh_best(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._refresh_best(trainer, pl_module)
        if trainer.is_global_zero:
            self._save(pl_module, "last.pt", trainer.current_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"best_path": self._best_path, "best_score": self._best_score}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._best_path = state_dict.get("best_path")
        self._best_score = state_dict.get("best_score")


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar with epochs counted from 1, as ``results.csv``, the plots and the console lines."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        # Lightning 2.6's own hook, with the description 1-based (set before the bar is first drawn)
        from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf

        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset()
        self.train_progress_bar.total = convert_inf(self.total_train_batches)
        self.train_progress_bar.initial = 0
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")
