"""The LightningCLI: sub-commands fit/validate/test/predict, the run folder, default callbacks and loggers.

A ``fit`` writes everything under ``<project>/<name>/`` (default ``checkpoints/train``)::

    config.yaml            the full resolved configuration (re-run with --config)
    results.csv            one row per epoch, Ultralytics' column names
    hparams.yaml, events.* TensorBoard logs
    weights/last.ckpt      every epoch (resume with --ckpt_path last)
    weights/best.ckpt      best validation mask fitness (0.1 mAP50(M) + 0.9 mAP50-95(M))

A new ``fit`` never writes into a folder that holds an earlier run: ``name`` becomes ``name2``, ``name3``...,
as with ``yolo segment train``. ``--ckpt_path last`` resumes the run in ``<project>/<name>`` itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

from cellseg_pl.callbacks import CloseMosaic, ResultsCSV, RunCheckpoint
from cellseg_pl.datamodule import CellSegDataModule
from cellseg_pl.module import CellSegModule

log = logging.getLogger(__name__)

MONITOR = "fitness"


class UsageError(ValueError):
    """A command-line problem the user can fix; printed as one line."""


class SaveFitConfig(SaveConfigCallback):
    """Write ``config.yaml`` into the run folder for ``fit`` only (validate/test/predict leave the run alone)."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


def has_run(folder: Path) -> bool:
    """Whether ``folder`` already holds results of a run."""
    return (folder / "weights").exists() or (folder / "results.csv").exists() or (folder / "config.yaml").exists()


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

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--project", type=str, default="checkpoints", help="Folder that holds the runs.")
        parser.add_argument("--name", type=str, default="train", help="Run name: outputs go to <project>/<name>.")
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
            }
        )
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults(
            {"early_stopping.monitor": MONITOR, "early_stopping.mode": "max", "early_stopping.patience": 100}
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        run_dir = Path(cfg.project) / cfg.name
        if self.subcommand == "fit":
            ckpt = cfg.get("ckpt_path")
            if ckpt is None:
                free = next_free_run_dir(run_dir)
                if free != run_dir:
                    log.info("%s holds an earlier run; this run writes to %s", run_dir, free)
                run_dir = free
            elif ckpt == "last" and not (run_dir / "weights" / "last.ckpt").is_file():
                raise UsageError(
                    f"--ckpt_path last: {run_dir / 'weights' / 'last.ckpt'} does not exist; give --project/--name "
                    f"of the run to resume, or a checkpoint path"
                )
            elif ckpt not in ("last", "best", "hpc", "registry") and not Path(ckpt).is_file():
                raise UsageError(f"--ckpt_path: {ckpt} does not exist")
        self.run_dir = run_dir
        cfg.trainer.default_root_dir = str(run_dir)
        cfg.checkpoint.dirpath = str(run_dir / "weights")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if self.subcommand == "fit":
            if trainer_cfg.get("logger") in (None, True):
                kwargs["logger"] = TensorBoardLogger(str(self.run_dir), name="", version="", default_hp_metric=False)
            user_callbacks = trainer_cfg.get("callbacks") or []
            if not isinstance(user_callbacks, list):
                user_callbacks = [user_callbacks]
            kwargs["callbacks"] = [
                *user_callbacks,
                ResultsCSV(self.run_dir / "results.csv"),
                CloseMosaic(),
            ]
        elif trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = False
        return super().instantiate_trainer(**kwargs)
