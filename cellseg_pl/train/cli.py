"""The LightningCLI: sub-commands fit/validate/test/predict, the run folder, default callbacks and loggers.

A ``fit`` writes everything under ``<project>/<name>/`` (default ``checkpoints/train``)::

    config.yaml            the full resolved configuration (re-run with --config)
    results.csv            one row per epoch, Ultralytics' column names
    results.png            its curves; val_pred.png, val_pred_epoch{N}.png: validation outlines (cellseg_pl.train.plots)
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

import inspect
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

from cellseg_pl.train.callbacks import (
    CloseMosaic,
    ConsoleReport,
    CpuThreads,
    FileCheckpointIO,
    FitnessEarlyStopping,
    ProgressBar,
    ResultsCSV,
    RunCheckpoint,
    UltralyticsWeights,
)
from cellseg_pl.data.datamodule import CellSegDataModule
from cellseg_pl.errors import UsageError
from cellseg_pl.infer.options import InferenceOptions
from cellseg_pl.yolo.network import checkpoint_classes, read_checkpoint
from cellseg_pl.train.module import CellSegModule
from cellseg_pl.train.plots import ValidationPictures
from cellseg_pl.train.run_dir import check_free_space, check_root_dir, choose_run_dir, removed_if_fit_fails

log = logging.getLogger(__name__)

MONITOR = "fitness"
#: Model options that only affect evaluation and prediction: a checkpoint's saved values do not override them.
EVAL_KNOBS = ("conf", "iou", "max_det", "pr_conf", "min_area")


#: Lightning warnings about a checkpoint's fit-only state, spurious in validate/test (regular expressions).
FIT_ONLY_WARNINGS = (
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided",
    r"The dirpath has changed from .* won't be reloaded",
)

#: ``--ckpt_path`` values Lightning resolves itself (not file names).
CKPT_ALIASES = ("last", "best", "hpc", "registry")

#: weights/best.ckpt keeps the best validation fitness, weights/last.ckpt every epoch; early stopping on the same value
CALLBACK_DEFAULTS = {
    "checkpoint.monitor": MONITOR,
    "checkpoint.mode": "max",
    "checkpoint.filename": "best",
    "checkpoint.save_last": True,
    "checkpoint.save_top_k": 1,
    "checkpoint.auto_insert_metric_name": False,
    "checkpoint.enable_version_counter": False,
    "checkpoint.save_on_exception": True,
    "early_stopping.monitor": MONITOR,
    "early_stopping.mode": "max",
    "early_stopping.patience": 100,
}


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
        add_run_arguments(parser)

    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path``'s hyper-parameters into ``--model.*``, as Lightning does, after checking the file
        (:func:`cellseg_pl.yolo.network.read_checkpoint`: one ``error:`` line for a missing, empty, truncated or foreign
        file).

        The evaluation knobs the user gave (NMS thresholds, reporting confidence...) are kept: they do not change the
        trained network. Knobs a checkpoint of an older version holds and this version no longer has are skipped.
        """
        sub = self.config.get("subcommand")
        self._ckpt_classes: dict[int, str] | None = None
        path = self.config[sub].get("ckpt_path") if sub else None
        if not path or path in CKPT_ALIASES:
            return
        ckpt = read_checkpoint(path, flag="--ckpt_path")
        self._ckpt_classes = checkpoint_classes(ckpt)
        known = set(inspect.signature(CellSegModule).parameters) - set(EVAL_KNOBS)
        hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if k in known}
        if hparams:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)

    @property
    def fitting(self) -> bool:
        """``fit``, or ``run=False`` (building a trainer to fit from Python)."""
        return self.subcommand in ("fit", None)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        check_root_dir(cfg, Path(cfg.project) / cfg.name)
        if self.fitting:
            self.run_dir, ckpt = choose_run_dir(Path(cfg.project) / cfg.name, cfg.get("ckpt_path"))
            if ckpt != cfg.get("ckpt_path"):  # (a SLURM requeue resumes; without a sub-command there is no such key)
                cfg.ckpt_path = ckpt
            if ckpt == "last":
                last = self.run_dir / "weights" / "last.ckpt"
                self._ckpt_classes = checkpoint_classes(read_checkpoint(last, flag="--ckpt_path last"))
        else:
            self.run_dir = Path(cfg.project) / cfg.name
        cfg.trainer.default_root_dir = str(self.run_dir)
        cfg.checkpoint.dirpath = str(self.run_dir / "weights")

    def after_instantiate_classes(self) -> None:
        """A ``--ckpt_path`` trained for another class count than the data: one line, before anything is written."""
        super().after_instantiate_classes()
        if self.fitting and self.run_dir is not None and self.model is not None:
            check_free_space(self.run_dir, sum(p.numel() for p in self.model.net.parameters()))
        names = getattr(self, "_ckpt_classes", None)
        if names is None or self.datamodule is None or len(names) == self.datamodule.num_classes:
            return
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        raise class_count_error(cfg, names, self.datamodule, self.fitting)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if self.fitting:
            if trainer_cfg.get("logger") in (None, True):
                kwargs["logger"] = TensorBoardLogger(str(self.run_dir), name="", version="", default_hp_metric=False)
            kwargs["callbacks"] = fit_callbacks(self.run_dir, trainer_cfg, self._get(self.config, "data", default={}))
            if not trainer_cfg.get("plugins"):  # (a user's own plugins, a CheckpointIO among them, are kept)
                kwargs["plugins"] = [FileCheckpointIO()]
        elif trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = False
        if self.subcommand == "predict":
            from cellseg_pl.infer.predict import predict_output

            # before anything is built: a bad --predictions or images folder is one line
            predict_output(self.config[self.subcommand], self.run_dir)
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, ImportError) as e:  # accelerator/devices/strategy/precision
            raise trainer_error(e, trainer_cfg) from None

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
        with removed_if_fit_fails(self.run_dir, lambda: self.trainer.is_global_zero):
            super()._run_subcommand(subcommand)

    def _predict(self) -> None:
        """``predict`` from a run's configuration: :func:`cellseg_pl.infer.predict.predict_from_run` (rank 0)."""
        from cellseg_pl.infer.predict import predict_from_run

        if self.trainer.is_global_zero:
            print(predict_from_run(self.config[self.subcommand], self.model, self.datamodule, self.trainer,
                                   self.run_dir).format())

    def after_validate(self) -> None:
        self._report("validation")

    def after_test(self) -> None:
        self._report("test")

    def _report(self, what: str) -> None:
        """Print the numbers biologists read and, with ``--report``, write every metric as JSON (rank 0)."""
        if self.trainer.is_global_zero:
            report(self.trainer, what, self.config[self.subcommand].get("report"))


def add_run_arguments(parser: LightningArgumentParser) -> None:
    """The flags of a run beside the model's, the data's and the trainer's: where it goes, what predict and
    validate write, the inference settings, the links between model and data, the checkpoint and early stopping."""
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
    # predict: the folder tool's inference settings, said once in InferenceOptions
    parser.add_class_arguments(InferenceOptions, nested_key=None, as_group=False,
                               skip={"device", "imgsz", "batch_size"})
    parser.add_argument(
        "--save_overlays", type=Optional[str], default=None,
        help="predict: also write each image with its outlines and counts into this folder.",
    )  # fmt: skip
    parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
    parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
    parser.link_arguments("data.overlap_mask", "model.overlap_mask")
    parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
    parser.add_lightning_class_args(FitnessEarlyStopping, "early_stopping")
    parser.set_defaults(CALLBACK_DEFAULTS)


def class_count_error(cfg: Any, names: dict[int, str], datamodule: CellSegDataModule, fitting: bool) -> UsageError:
    """``--ckpt_path`` was trained for another class count than the data: what to do instead."""
    fix = (
        f"resume with the data it was trained on, or fine-tune from it: --model.model {cfg.ckpt_path} "
        f"--model.reinit_head true instead of --ckpt_path"
        if fitting
        else "give the data set it was trained on (--data.dataset)"
    )
    return UsageError(
        f"--ckpt_path: {cfg.ckpt_path} has {len(names)} classes {names} but the data ({cfg.data.dataset}) has "
        f"{datamodule.num_classes} {datamodule.class_names}; {fix}"
    )


def fit_callbacks(run_dir: Path, trainer_cfg: Any, data_cfg: Any) -> list:
    """The user's ``--trainer.callbacks``, then the run folder's writers in the order their outputs depend on."""
    user_callbacks = trainer_cfg.get("callbacks") or []
    if not isinstance(user_callbacks, list):
        user_callbacks = [user_callbacks]
    train_args = {"data": str(Path(data_cfg.get("dataset")).resolve()) if data_cfg.get("dataset") else None,
                  "imgsz": data_cfg.get("imgsz"), "project": str(run_dir.parent), "name": run_dir.name}
    callbacks = [
        *user_callbacks,
        CpuThreads(),
        ResultsCSV(run_dir / "results.csv"),
        ValidationPictures(run_dir),  # after ResultsCSV: redraws results.png from the row just written
        CloseMosaic(),
        UltralyticsWeights(run_dir / "weights", train_args),
        ConsoleReport(run_dir),  # after the weights: its summary lists them
    ]
    if trainer_cfg.get("enable_progress_bar") in (None, True) and not any(
        isinstance(c, TQDMProgressBar) for c in user_callbacks
    ):
        callbacks.append(ProgressBar())
    return callbacks


def trainer_error(e: Exception, trainer_cfg: Any) -> UsageError:
    """Lightning's refusal of an accelerator/devices/strategy/precision, as one line naming the flags."""
    import torch

    flags = ", ".join(f"--trainer.{k} {trainer_cfg.get(k)}" for k in ("accelerator", "devices", "strategy", "precision"))
    return UsageError(
        f"{flags}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__} (this machine has "
        f"{torch.cuda.device_count()} CUDA GPU(s); on a CPU-only machine pass --trainer.accelerator cpu)"
    )


def report(trainer: Trainer, what: str, path: str | None) -> None:
    """After validate/test: print the numbers biologists read; with a ``path``, write every metric there as JSON."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    batches = trainer.num_val_batches if what == "validation" else trainer.num_test_batches
    lines = [f"{what} ({sum(batches)} batches):"]
    for label, key in REPORT_ROWS:
        if key in metrics:
            lines.append(f"  {label:<34} {metrics[key]:.4f}")
    print("\n".join(lines))
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


def _flag_value(args: list[str], *flags: str) -> str | None:
    """The value of the last of ``flags`` in ``args`` (``--flag value`` or ``--flag=value``), or None."""
    value = None
    for i, arg in enumerate(args):
        name, eq, rest = arg.partition("=")
        if name in flags:
            value = rest if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value


def data_from_weights(args: list[str]) -> list[str]:
    """``validate``/``test`` of an Ultralytics ``.pt`` alone: its data set (and imgsz) from the file's ``train_args``.

    As ``yolo segment val model=best.pt`` does: when ``--model.model`` names a ``.pt`` and neither
    ``--data.dataset`` nor a ``--config`` is given, the file's recorded ``data`` (``weights/best.pt`` of a run
    records its absolute path) becomes ``--data.dataset``, and its ``imgsz`` ``--data.imgsz`` unless given.
    """
    weights = _flag_value(args, "--model.model")
    if not weights or not weights.endswith(".pt") or _flag_value(args, "--data.dataset", "--config", "-c"):
        return args
    from cellseg_pl.yolo.network import load_ultralytics_checkpoint

    train_args = load_ultralytics_checkpoint(weights, "--model.model").get("train_args") or {}
    data = train_args.get("data")
    if not data or not Path(str(data)).is_file():
        recorded = f"records data={data}, which does not exist here" if data else "records no data set"
        raise UsageError(f"--model.model: {weights} {recorded}; pass --data.dataset path/to/dataset.yaml")
    extra = ["--data.dataset", str(data)]
    if train_args.get("imgsz") and _flag_value(args, "--data.imgsz") is None:
        extra += ["--data.imgsz", str(int(train_args["imgsz"]))]
    logging.getLogger(__name__).info("--model.model %s: data set %s from the file's train_args", weights, data)
    return args + extra
