"""What the benchmarks share: one trainer run per subprocess (Ultralytics' or cellseg_pl's) and one evaluator.

Used by :mod:`benchmarks.vs_ultralytics` (demo data), :mod:`benchmarks.real_cells` (HeLa nuclei or a CVAT zip) and
the other benchmarks.

* :func:`run_ultralytics` / :func:`run_cellseg` train one model with the same recipe and knobs (read from an
  ``argparse.Namespace``: ``data`` (dataset.yaml), ``model``, ``epochs``, ``imgsz``, ``batch``, ``nbs``,
  ``workers``, ``device``, ``precision``, ``seed``, optional ``close_mosaic``) and time every epoch. Call each
  in a fresh process (:func:`spawn`): both trainers set global state (seeds, threads, Ultralytics' settings).
* Scoring is cellseg_pl's one evaluator (:func:`cellseg_pl.evaluate.evaluate`, also ``python -m cellseg_pl
  evaluate``): both trainers' weights are predicted and scored the same way.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("YOLO_OFFLINE", "1")
#: the caller's OMP_NUM_THREADS, read before anything here imports Ultralytics (which sets it to 1 when unset):
#: every worker process gets this one, so a run does not depend on whether the parent scored a model before it
_CALLER_OMP_NUM_THREADS = os.environ.get("OMP_NUM_THREADS")

#: The lab guide's augmentation recipe, given to both trainers.
RECIPE = {"degrees": 180.0, "scale": 0.5, "flipud": 0.5, "fliplr": 0.5, "mosaic": 1.0, "copy_paste": 0.3,
          "close_mosaic": 10, "translate": 0.1, "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4}


#: Ultralytics' own default ``workers`` (it loads in the training process on the CPU whatever is given).
ULTRALYTICS_WORKERS = 8
WORKERS_HELP = ("loader workers: 'auto' (default) gives each trainer its own default (cellseg_pl's auto; "
                f"Ultralytics' {ULTRALYTICS_WORKERS}, which it drops to 0 on the CPU), a number gives both that number")


def workers_arg(value: str) -> str | int:
    """``--workers``: ``auto`` or an integer >= 0."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"'auto' or an integer >= 0, got {value!r}")
    return number


def recipe(a: argparse.Namespace) -> dict:
    """:data:`RECIPE`, with ``close_mosaic`` from ``a.close_mosaic`` when ``a`` has one that is not None."""
    close = getattr(a, "close_mosaic", None)
    return {**RECIPE, **({"close_mosaic": close} if close is not None else {})}


def patience(a: argparse.Namespace) -> int:
    """Early-stopping patience: ``a.patience`` when ``a`` has one that is not None, else ``a.epochs`` (no early
    stop)."""
    value = getattr(a, "patience", None)
    return a.epochs if value is None else value


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


# ------------------------------------------------------------------------------------------------ trainers
def run_ultralytics(a: argparse.Namespace, out: Path, name: str = "ultralytics") -> dict:
    """Train with ``ultralytics.YOLO(...).train`` into ``out/name``; returns epoch times and the weight files."""
    import ultralytics.engine.trainer as trainer_module
    from ultralytics import YOLO

    trainer_module.check_amp = lambda *args, **kwargs: True  # its AMP check downloads a model; we are offline
    out = Path(out).resolve()  # Ultralytics puts a relative project under runs/segment/
    times: dict[str, list[float]] = {"train": [], "val": []}
    marks: dict[str, float] = {}

    def mark(event):
        def callback(_):
            marks[event] = time.perf_counter()
            if event == "train_end":
                times["train"].append(marks["train_end"] - marks["train_start"])
            elif event == "fit_end" and len(times["val"]) < len(times["train"]):  # not again at the final eval
                times["val"].append(marks["fit_end"] - marks["train_end"])
                print(f"[ultralytics] epoch {len(times['val'])}/{a.epochs}: train {times['train'][-1]:.1f} s, "
                      f"val {times['val'][-1]:.1f} s", flush=True)

        return callback

    model = YOLO(a.model, task="segment")
    for event, label in (("on_train_epoch_start", "train_start"), ("on_train_epoch_end", "train_end"),
                         ("on_fit_epoch_end", "fit_end")):
        model.add_callback(event, mark(label))
    device = "cpu" if a.device == "cpu" else a.device
    model.train(
        data=a.data, epochs=a.epochs, imgsz=a.imgsz, batch=a.batch, device=device,
        workers=ULTRALYTICS_WORKERS if a.workers == "auto" else a.workers,
        project=str(out), name=name, exist_ok=True, seed=getattr(a, "seed", 0), deterministic=True, plots=False,
        patience=patience(a), optimizer="auto", nbs=a.nbs, amp=a.device != "cpu", verbose=False, **recipe(a),
    )
    weights = out / name / "weights"
    return {"train_s": times["train"], "val_s": times["val"], "peak_rss_mib": peak_rss_mib(),
            "peak_gpu_mib": peak_gpu_mib(), "weights": str(weights / "last.pt"), "best": str(weights / "best.pt"),
            "epochs_run": len(times["train"]), "best_epoch": model.trainer.stopper.best_epoch}  # (1-based there)


def run_cellseg(a: argparse.Namespace, out: Path, name: str = "cellseg_pl", extra_args: tuple[str, ...] = (),
                callbacks: tuple = ()) -> dict:
    """Train with cellseg_pl's CLI (``configs/demo.yaml`` overridden by the same knobs) into ``out/name``.

    ``extra_args``: further CLI arguments, given last so they win (e.g. ``("--model.optimizer", "AdamW",
    "--model.lr0", "0.0005")`` to fine-tune as the README advises). ``callbacks``: more Lightning callbacks.
    """
    import lightning as L

    from cellseg_pl.__main__ import configure_environment
    from cellseg_pl.train.cli import CellSegCLI

    configure_environment()
    times: dict[str, list[float]] = {"train": [], "val": []}

    class Timer(L.Callback):
        """Train: from the epoch's start to its validation; val: from there to the next epoch's start (or the end
        of training), so that it includes the checkpoints and pictures written after validation, as Ultralytics'
        ``on_fit_epoch_end`` time includes its ``save_model``."""

        v0: float | None = None

        def on_train_epoch_start(self, trainer, pl_module):
            self._close()
            self.t0 = time.perf_counter()

        def on_validation_epoch_start(self, trainer, pl_module):
            if not trainer.sanity_checking and hasattr(self, "t0"):
                self.v0 = time.perf_counter()
                times["train"].append(self.v0 - self.t0)

        def on_train_end(self, trainer, pl_module):
            self._close()

        def _close(self):
            if self.v0 is None:
                return
            times["val"].append(time.perf_counter() - self.v0)
            self.v0 = None
            print(f"[cellseg_pl] epoch {len(times['val'])}/{a.epochs}: train {times['train'][-1]:.1f} s, "
                  f"val {times['val'][-1]:.1f} s (with the checkpoints and pictures after it)", flush=True)

    accelerator, devices = ("cpu", "1") if a.device == "cpu" else ("gpu", str(len(a.device.split(","))))
    args = [
        "--config", str(REPO / "configs" / "demo.yaml"), "--project", str(out), "--name", name,
        "--model.model", a.model, "--model.nbs", str(a.nbs), "--model.optimizer", "auto",
        "--data.dataset", a.data, "--data.imgsz", str(a.imgsz), "--data.batch_size", str(a.batch),
        "--data.num_workers", str(a.workers), "--trainer.max_epochs", str(a.epochs),
        "--trainer.accelerator", accelerator, "--trainer.devices", devices, "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.precision", a.precision or ("32-true" if a.device == "cpu" else "16-mixed"),
        "--early_stopping.patience", str(patience(a)), "--seed_everything", str(getattr(a, "seed", 0)),
    ]
    for key, value in recipe(a).items():
        args += [f"--data.{key}", str(value)]
    args += list(extra_args)
    cli = CellSegCLI(args=args, run=False)
    cli.trainer.callbacks.extend([Timer(), *callbacks])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    weights = Path(cli.run_dir) / "weights"
    import torch

    best = torch.load(weights / "best.ckpt", map_location="cpu", weights_only=True)
    return {"train_s": times["train"], "val_s": times["val"], "peak_rss_mib": peak_rss_mib(),
            "peak_gpu_mib": peak_gpu_mib(), "weights": str(weights / "last.ckpt"), "best": str(weights / "best.ckpt"),
            "epochs_run": len(times["train"]), "best_epoch": int(best["epoch"]) + 1}


def worker_env() -> dict[str, str]:
    """This process' environment with the caller's ``OMP_NUM_THREADS`` (absent when the caller had none)."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if _CALLER_OMP_NUM_THREADS is not None:
        env["OMP_NUM_THREADS"] = _CALLER_OMP_NUM_THREADS
    return env


def spawn(cmd: list[str], log_file: Path) -> dict:
    """Run ``cmd`` (a worker process) from the repository root, its output streamed into ``log_file``.

    Returns:
        ``returncode``, ``wall_s``, ``cpu_s`` (user + system CPU seconds of the process and the children it waited
        for, e.g. data-loader workers: less sensitive to other load than wall time) and the 1-minute load average
        before and after (``load_before``, ``load_after``).
    """
    load_before = os.getloadavg()[0]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    env = worker_env()
    with open(log_file, "w") as log:
        code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, env=env).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    return {"returncode": code, "wall_s": wall, "cpu_s": cpu, "load_before": load_before,
            "load_after": os.getloadavg()[0]}


def prepare_out(out: Path, script: str, stale: tuple[str, ...], resume: bool = False) -> None:
    """Create a benchmark's ``out`` folder, marked as ``script``'s; the entries ``stale`` of an earlier run are
    removed unless ``resume``. A folder holding anything else than this script's output is refused."""
    marker = out / f".{Path(script).stem}"
    if out.exists() and any(out.iterdir()) and not marker.exists():
        raise SystemExit(f"--out: {out} holds files this benchmark did not write; choose another folder")
    if not resume:
        for name in stale:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"output of scripts/{Path(script).name}; replaced by its next run\n")
    if out.is_relative_to(REPO):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(out / "data")], cwd=REPO).returncode == 0
        if not ignored:
            print(f"warning: {out} is inside the repository and not git-ignored: never commit its data/ "
                  "(licensed images and labels)", file=sys.stderr)
