"""The LightningCLI: sub-commands fit/validate/test/predict, the run folder, default callbacks and loggers.

A ``fit`` writes everything under ``<project>/<name>/`` (default ``checkpoints/train``)::

    config.yaml            the full resolved configuration (re-run with --config)
    results.csv            one row per epoch, Ultralytics' column names
    results.png            its curves; val_pred.png, val_pred_epoch{N}.png: validation outlines (cellseg_pl.plots)
    hparams.yaml, events.* TensorBoard logs
    weights/last.ckpt      every epoch (resume with --ckpt_path last)
    weights/best.ckpt      best validation mask fitness (0.1 mAP50(M) + 0.9 mAP50-95(M))

A new ``fit`` never writes into a folder that holds an earlier run: ``name`` becomes ``name2``, ``name3``...,
as with ``yolo segment train``. ``--ckpt_path last`` resumes the run in ``<project>/<name>`` itself.

Under SLURM the folder is taken as given (give each job its own ``--name``, e.g. with ``$SLURM_JOB_ID``, which a
requeued job keeps): a requeued job finds its folder and resumes from the checkpoint Lightning wrote on the
requeue signal (``hpc_ckpt_*.ckpt``), else from ``weights/last.ckpt``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Literal, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment

from cellseg_pl.callbacks import (
    CloseMosaic,
    ConsoleReport,
    FitnessEarlyStopping,
    ProgressBar,
    ResultsCSV,
    RunCheckpoint,
    UltralyticsWeights,
)
from cellseg_pl.datamodule import CellSegDataModule
from cellseg_pl.model import checkpoint_classes, read_checkpoint
from cellseg_pl.module import CellSegModule
from cellseg_pl.plots import ValidationPictures

log = logging.getLogger(__name__)

MONITOR = "fitness"
#: Model options that only affect evaluation and prediction: a checkpoint's saved values do not override them.
EVAL_KNOBS = ("conf", "iou", "max_det", "pr_conf", "predict_conf", "min_area")
#: The run folder rank 0 chose, handed to the worker processes Lightning's DDP launcher starts.
RUN_DIR_ENV = "CELLSEG_PL_RUN_DIR"


class UsageError(ValueError):
    """A command-line problem the user can fix; printed as one line."""


#: Lightning warnings about a checkpoint's fit-only state, spurious in validate/test (regular expressions).
FIT_ONLY_WARNINGS = (
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided",
    r"The dirpath has changed from .* won't be reloaded",
)

#: ``--ckpt_path`` values Lightning resolves itself (not file names).
CKPT_ALIASES = ("last", "best", "hpc", "registry")


class SaveFitConfig(SaveConfigCallback):
    """Write ``config.yaml`` into the run folder for ``fit`` only (validate/test/predict leave the run alone).

    The folders the CLI derives from ``--project/--name`` (``trainer.default_root_dir``, ``checkpoint.dirpath``) are
    saved empty, so a re-run with ``--config`` (and maybe another ``--name``) derives them anew.
    """

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        config = self.config
        self.config = config.clone()
        self.config.trainer.default_root_dir = None
        self.config.checkpoint.dirpath = None
        try:
            super().setup(trainer, pl_module, stage)
        finally:
            self.config = config


def has_run(folder: Path) -> bool:
    """Whether ``folder`` already holds results of a run."""
    return (folder / "weights").exists() or (folder / "results.csv").exists() or (folder / "config.yaml").exists()


def remove_failed_fit_files(folder: Path, before: set[Path] | None, top: Path | None = None) -> None:
    """After a failed ``fit``: remove what it wrote (``config.yaml``, TensorBoard events, pictures) unless it wrote a
    checkpoint or a ``results.csv`` row (then the run can be resumed or read: everything is kept).

    Args:
        folder: the run folder.
        before: the paths under it before the fit started, or None when the fit created it (then it goes too).
        top: the outermost folder the fit created above ``folder`` (e.g. a new ``--project``); removed if empty.
    """
    if not folder.is_dir() or (folder / "results.csv").exists() or any((folder / "weights").glob("*.ckpt")):
        return
    created = sorted((p for p in folder.rglob("*") if before is None or p not in before), reverse=True)
    for path in created:  # deepest first: files, then the folders they were in
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink(missing_ok=True)
    if before is None:
        for parent in (folder, *folder.parents):
            if not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()
            if parent == (top or folder):
                break
    if created:
        log.info("the run failed before its first checkpoint: removed what it wrote to %s", folder)


def _outermost_missing(folder: Path) -> Path | None:
    """The outermost of ``folder`` and its parents that does not exist yet (None when ``folder`` exists)."""
    missing = None
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing = path
    return missing


def next_free_run_dir(folder: Path) -> Path:
    """``folder`` if it holds no run, else the first of ``folder2``, ``folder3``... that does not."""
    if not has_run(folder):
        return folder
    n = 2
    while has_run(folder.with_name(f"{folder.name}{n}")):
        n += 1
    return folder.with_name(f"{folder.name}{n}")


class CellSegCLI(LightningCLI):
    """``python -m cellseg_pl {fit,validate,test,predict} --config configs/demo.yaml [--section.key value ...]``."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self.run_dir: Path | None = None
        super().__init__(
            CellSegModule,
            CellSegDataModule,
            save_config_callback=SaveFitConfig,
            save_config_kwargs={"overwrite": True, "config_filename": "config.yaml"},
            trainer_defaults={"max_epochs": 100, "log_every_n_steps": 1},
            auto_configure_optimizers=False,
            parser_kwargs={"default_env": False},
            args=args,
            run=run,
        )

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("validate", "test"):
            parser.set_defaults(verbose=False)  # our report (after_validate/after_test) prints the metrics once
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--project", type=str, default="checkpoints", help="Folder that holds the runs.")
        parser.add_argument("--name", type=str, default="train", help="Run name: outputs go to <project>/<name>.")
        parser.add_argument(
            "--report", type=str, default=None, help="validate/test: also write the metrics to this JSON file."
        )
        parser.add_argument(
            "--predictions",
            type=str,
            default=None,
            help="predict: COCO 1.0 JSON to write for CVAT (default <project>/<name>/predictions.json; never replaced).",
        )
        parser.add_argument(
            "--tile", type=Literal["auto", "on", "off"], default="auto",
            help="predict: large images on overlapping imgsz windows at full resolution: auto (a side > 2 x imgsz), "
            "on (a side > imgsz) or off (resize to imgsz), as predict --images.",
        )  # fmt: skip
        parser.add_argument(
            "--tile_overlap", type=Optional[int], default=None,
            help="predict: overlap of neighbouring windows in px, larger than the biggest object (default imgsz/4).",
        )  # fmt: skip
        parser.add_argument(
            "--save_overlays", type=Optional[str], default=None,
            help="predict: also write each image with its outlines and counts into this folder.",
        )  # fmt: skip
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.overlap_mask", "model.overlap_mask")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": MONITOR,
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.enable_version_counter": False,
                "checkpoint.save_on_exception": True,
            }
        )
        parser.add_lightning_class_args(FitnessEarlyStopping, "early_stopping")
        parser.set_defaults(
            {"early_stopping.monitor": MONITOR, "early_stopping.mode": "max", "early_stopping.patience": 100}
        )

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before Lightning reads it (:func:`cellseg_pl.model.read_checkpoint`: one ``error:``
        line for a missing, empty, truncated or foreign file).

        Lightning replaces ``--model.*`` by the hyper-parameters saved in ``--ckpt_path``; keep the evaluation
        knobs the user gave (NMS thresholds, reporting confidence...), which do not change the trained network."""
        sub = self.config.get("subcommand")
        self._ckpt_classes: dict[int, str] | None = None
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and ckpt not in CKPT_ALIASES:
            self._ckpt_classes = checkpoint_classes(read_checkpoint(ckpt, flag="--ckpt_path"))
        kept = {k: self.config[sub]["model"][k] for k in EVAL_KNOBS} if sub else {}
        super()._parse_ckpt_path()
        for key, value in kept.items():
            self.config[sub]["model"][key] = value

    @property
    def fitting(self) -> bool:
        """``fit``, or ``run=False`` (building a trainer to fit from Python)."""
        return self.subcommand in ("fit", None)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = Path(cfg.project) / cfg.name
        self._check_root_dir(cfg, run_dir)
        if self.fitting:
            ckpt = cfg.get("ckpt_path")
            if ckpt is None and os.environ.get(RUN_DIR_ENV) and int(os.environ.get("LOCAL_RANK", 0)) > 0:
                run_dir = Path(os.environ[RUN_DIR_ENV])  # a DDP worker process: rank 0's folder
            elif ckpt is None and SLURMEnvironment.detect():
                if not list(run_dir.glob("hpc_ckpt_*.ckpt")) and (run_dir / "weights" / "last.ckpt").is_file():
                    log.info("SLURM job restarted: resuming %s from weights/last.ckpt", run_dir)
                    cfg.ckpt_path = "last"
            elif ckpt is None:
                free = next_free_run_dir(run_dir)
                if free != run_dir:
                    log.info("%s holds an earlier run; this run writes to %s", run_dir, free)
                run_dir = free
            elif ckpt == "last" and not (run_dir / "weights" / "last.ckpt").is_file():
                raise UsageError(
                    f"--ckpt_path last: {run_dir / 'weights' / 'last.ckpt'} does not exist; give --project/--name "
                    f"of the run to resume, or a checkpoint path"
                )
            elif ckpt == "last":
                last = run_dir / "weights" / "last.ckpt"
                self._ckpt_classes = checkpoint_classes(read_checkpoint(last, flag="--ckpt_path last"))
        self.run_dir = run_dir
        if self.fitting:
            os.environ[RUN_DIR_ENV] = str(run_dir)
        cfg.trainer.default_root_dir = str(run_dir)
        cfg.checkpoint.dirpath = str(run_dir / "weights")

    def _check_root_dir(self, cfg: Any, run_dir: Path) -> None:
        """Refuse a ``--trainer.default_root_dir`` that is not ``<project>/<name>``: the run folder is named once."""
        given = cfg.trainer.get("default_root_dir")
        if given is None or Path(given) == run_dir:
            return
        saved_dirpath = cfg.checkpoint.get("dirpath")
        if saved_dirpath is not None and Path(saved_dirpath) == Path(given) / "weights":
            # both derived folders of a config.yaml saved by an older version: the folder of the run it came from
            log.info("the config's trainer.default_root_dir %s is the run it was saved from; using %s", given, run_dir)
            return
        raise UsageError(
            f"--trainer.default_root_dir: {given} is not used; the run folder is <project>/<name> ({run_dir} here): "
            f"give --project {Path(given).parent} --name {Path(given).name} instead"
        )

    def after_instantiate_classes(self) -> None:
        """A ``--ckpt_path`` trained for another class count than the data: one line, before anything is written."""
        super().after_instantiate_classes()
        names = getattr(self, "_ckpt_classes", None)
        if names is None or self.datamodule is None or len(names) == self.datamodule.num_classes:
            return
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        fix = (
            f"resume with the data it was trained on, or fine-tune from it: --model.model {cfg.ckpt_path} "
            f"--model.reinit_head true instead of --ckpt_path"
            if self.fitting
            else "give the data set it was trained on (--data.dataset)"
        )
        raise UsageError(
            f"--ckpt_path: {cfg.ckpt_path} has {len(names)} classes {names} but the data ({cfg.data.dataset}) has "
            f"{self.datamodule.num_classes} {self.datamodule.class_names}; {fix}"
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if self.fitting:
            if trainer_cfg.get("logger") in (None, True):
                kwargs["logger"] = TensorBoardLogger(str(self.run_dir), name="", version="", default_hp_metric=False)
            user_callbacks = trainer_cfg.get("callbacks") or []
            if not isinstance(user_callbacks, list):
                user_callbacks = [user_callbacks]
            data_cfg = self._get(self.config, "data", default={})
            train_args = {"data": str(Path(data_cfg.get("dataset")).resolve()) if data_cfg.get("dataset") else None,
                          "imgsz": data_cfg.get("imgsz"), "project": str(self.run_dir.parent),
                          "name": self.run_dir.name}
            kwargs["callbacks"] = [
                *user_callbacks,
                ResultsCSV(self.run_dir / "results.csv"),
                ValidationPictures(self.run_dir),  # after ResultsCSV: redraws results.png from the row just written
                CloseMosaic(),
                UltralyticsWeights(self.run_dir / "weights", train_args),
                ConsoleReport(self.run_dir),  # after the weights: its summary lists them
            ]
            if trainer_cfg.get("enable_progress_bar") in (None, True) and not any(
                isinstance(c, TQDMProgressBar) for c in user_callbacks
            ):
                kwargs["callbacks"].append(ProgressBar())
        elif trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = False
        if self.subcommand == "predict":
            self._predict_output()  # before anything is built: a bad --predictions or images folder is one line
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, ImportError) as e:  # accelerator/devices/strategy/precision
            flags = ", ".join(
                f"--trainer.{k} {trainer_cfg.get(k)}" for k in ("accelerator", "devices", "strategy", "precision")
            )
            import torch

            raise UsageError(
                f"{flags}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__} (this machine has "
                f"{torch.cuda.device_count()} CUDA GPU(s); on a CPU-only machine pass --trainer.accelerator cpu)"
            ) from None

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a ``fit`` that fails before writing any checkpoint leaves no files in its run folder."""
        if subcommand == "predict":
            return self._predict()
        if subcommand in ("validate", "test"):
            with warnings.catch_warnings():
                # The fit callbacks (results.csv, checkpoint bookkeeping) have no part in validate/test: Lightning's
                # warnings that their saved states find no taker, or that ``weights/`` moved, say nothing here.
                for message in FIT_ONLY_WARNINGS:
                    warnings.filterwarnings("ignore", message=message)
                return super()._run_subcommand(subcommand)
        if subcommand != "fit":
            return super()._run_subcommand(subcommand)
        run_dir = self.run_dir
        before = set(run_dir.rglob("*")) if run_dir.is_dir() else None
        top = _outermost_missing(run_dir)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if self.trainer.is_global_zero:
                remove_failed_fit_files(run_dir, before, top)
            raise

    def _predict_output(self) -> Path:
        """``--predictions`` (default ``<project>/<name>/predictions.json``), checked with ``--data.predict_images``."""
        cfg = self.config[self.subcommand]
        output = Path(cfg.get("predictions") or self.run_dir / "predictions.json")
        if output.exists():
            raise UsageError(f"--predictions: {output} exists; give another file (nothing is replaced)")
        images = cfg.data.get("predict_images")
        if not images:
            raise UsageError("--data.predict_images: give the folder of images to predict on")
        if not Path(images).is_dir():
            what = "is not a folder" if Path(images).exists() else "does not exist"
            raise UsageError(f"--data.predict_images: {images} {what}; give the folder of images to predict on")
        return output

    def _predict(self) -> None:
        """``predict``: the folder tool (:func:`cellseg_pl.predict.predict_folder`) on ``--data.predict_images``, with
        this run's weights and thresholds, so both spellings of ``predict`` write the same JSON.

        Weights: ``--ckpt_path`` (a file, or ``last``/``best`` of ``<project>/<name>/weights``), else the network
        ``--model.model`` built (its EMA when kept). Thresholds: ``--model.predict_conf``, ``--model.iou``,
        ``--model.max_det``, ``--model.min_area``; input size ``--data.imgsz``, batch ``--data.batch_size``; device
        the trainer's (one device; ``--trainer.precision`` does not apply). Only global rank 0 predicts.
        """
        from cellseg_pl.predict import PredictError, predict_folder

        cfg = self.config[self.subcommand]
        if not self.trainer.is_global_zero:
            return
        ckpt = cfg.get("ckpt_path")
        if ckpt in ("last", "best"):
            ckpt = self.run_dir / "weights" / f"{ckpt}.ckpt"
            if not ckpt.is_file():
                raise UsageError(f"--ckpt_path {cfg.ckpt_path}: {ckpt} does not exist; give --project/--name of the run")
        elif ckpt in CKPT_ALIASES:
            raise UsageError(f"--ckpt_path {ckpt}: predict takes a checkpoint file, last or best")
        if ckpt is None:
            weights = self.model.eval_net
            weights.names = self.model.class_names
        else:
            weights = ckpt
        device = self.trainer.strategy.root_device
        if self.trainer.world_size > 1:
            log.info("predict runs on one device: %s", device)
        h = self.model.hparams
        try:
            summary = predict_folder(
                weights, cfg.data.predict_images, self._predict_output(), device, conf=h.predict_conf, iou=h.iou,
                imgsz=self.datamodule.hparams.imgsz, max_det=h.max_det, min_area=h.min_area,
                save_overlays=cfg.get("save_overlays"), tile=cfg.get("tile", "auto"),
                tile_overlap=cfg.get("tile_overlap"), batch_size=self.datamodule.hparams.batch_size,
            )  # fmt: skip
        except PredictError as err:
            raise UsageError(str(err)) from None
        print(summary.format())

    def after_validate(self) -> None:
        self._report("validation")

    def after_test(self) -> None:
        self._report("test")

    def _report(self, what: str) -> None:
        """Print the numbers biologists read and, with ``--report``, write every metric as JSON (rank 0)."""
        if not self.trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        batches = self.trainer.num_val_batches if what == "validation" else self.trainer.num_test_batches
        lines = [f"{what} ({sum(batches)} batches):"]
        for label, key in REPORT_ROWS:
            if key in metrics:
                lines.append(f"  {label:<34} {metrics[key]:.4f}")
        print("\n".join(lines))
        path = self.config[self.subcommand].get("report")
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(metrics, indent=2, sort_keys=True))


#: (label, metric key) printed after validate/test.
REPORT_ROWS = (
    ("mask mAP50", "metrics/mAP50(M)"),
    ("mask mAP50-95", "metrics/mAP50-95(M)"),
    ("mask precision @ pr_conf", "metrics/precision(M)"),
    ("mask recall @ pr_conf", "metrics/recall(M)"),
    ("F1 @ IoU 0.5", "metrics/F1(M)"),
    ("AP_cell = TP/(TP+FP+FN) @ IoU 0.5", "metrics/AP_cell(M)"),
    ("mean IoU of matched cells", "metrics/mean_matched_IoU(M)"),
    ("counting error per image (cells)", "metrics/count_MAE"),
    ("relative counting error", "metrics/count_MRE"),
    ("false positives of droplet size", "metrics/FP_droplet_sized"),
    ("box mAP50", "metrics/mAP50(B)"),
)
