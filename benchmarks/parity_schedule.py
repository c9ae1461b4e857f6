#!/usr/bin/env python
"""Record the optimization schedule of Ultralytics' trainer and of ours, iteration by iteration, and compare.

    python -m benchmarks.parity_schedule [--images 17] [--batch 4] [--nbs 64] [--epochs 200] [--imgsz 64]

Both train yolov8n-seg on the same synthetic data (``--images`` training images, so ``images % batch`` can leave a
final batch of one). Recorded at the end of every iteration: the lr of each parameter group, the momentum (SGD) or
beta1 (Adam), the accumulation in force, whether the optimizer stepped, and at the end the EMA update count.
Prints the number of iterations, optimizer steps and EMA updates of both and the largest differences.
``tests/test_parity.py`` runs the same comparison on 9 images for 4 epochs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")


def record_ultralytics(data, project, epochs: int, imgsz: int, batch: int, nbs: int) -> dict:
    import ultralytics.engine.trainer as trainer_module
    from ultralytics import YOLO

    trainer_module.check_amp = lambda *a, **k: True  # (CPU: never reached; its GPU path downloads a model)
    rows, steps = [], []
    holder = {}

    def on_train_start(trainer):
        step = trainer.optimizer_step
        holder["trainer"] = trainer

        def counted():
            steps.append(len(rows))  # (this iteration's row is appended at its batch end)
            step()

        trainer.optimizer_step = counted

    def on_batch_end(trainer):
        groups = trainer.optimizer.param_groups
        rows.append(([g["lr"] for g in groups], groups[0].get("momentum", groups[0].get("betas", [None])[0]),
                     trainer.accumulate))

    model = YOLO("yolov8n-seg.yaml", task="segment")
    model.add_callback("on_train_start", on_train_start)
    model.add_callback("on_train_batch_end", on_batch_end)
    model.train(data=str(data), epochs=epochs, imgsz=imgsz, batch=batch, nbs=nbs, workers=0, device="cpu",
                project=str(Path(project).resolve()), name="u", exist_ok=True, seed=0, plots=False, val=False,
                verbose=False, optimizer="auto", mosaic=1.0, close_mosaic=1, amp=False)
    return {"rows": rows, "steps": steps, "ema_updates": int(holder["trainer"].ema.updates)}


def record_cellseg(data, project, epochs: int, imgsz: int, batch: int, nbs: int) -> dict:
    import lightning as L

    from cellseg_pl.__main__ import configure_environment
    from cellseg_pl.train.cli import CellSegCLI

    rows, steps = [], []

    class Recorder(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            groups = module.optimizers().optimizer.param_groups
            rows.append(([g["lr"] for g in groups], groups[0].get("momentum", groups[0].get("betas", [None])[0]),
                         module.recipe.accumulate_now))
            if module.recipe.last_opt_step == batch_idx + trainer.num_training_batches * trainer.current_epoch:
                steps.append(len(rows) - 1)

    configure_environment()
    args = [
        "--config", str(REPO / "configs" / "demo.yaml"), "--project", str(project), "--name", "c",
        "--data.dataset", str(data), "--data.imgsz", str(imgsz), "--data.batch_size", str(batch),
        "--data.num_workers", "0", "--data.close_mosaic", "1", "--model.nbs", str(nbs),
        "--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
        "--trainer.limit_val_batches", "1", "--early_stopping.patience", str(epochs),
    ]
    cli = CellSegCLI(args=args, run=False)
    cli.trainer.callbacks.append(Recorder())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {"rows": rows, "steps": steps, "ema_updates": int(cli.model.ema.updates)}


def compare(ours: dict, theirs: dict) -> dict:
    """Iterations, steps, EMA updates of both and the largest lr / momentum / accumulation differences."""
    n = min(len(ours["rows"]), len(theirs["rows"]))
    lr = max((abs(a - b) for i in range(n) for a, b in zip(ours["rows"][i][0], theirs["rows"][i][0])), default=0.0)
    mom = max((abs(ours["rows"][i][1] - theirs["rows"][i][1]) for i in range(n)), default=0.0)
    acc = sum(ours["rows"][i][2] != theirs["rows"][i][2] for i in range(n))
    return {"iterations": (len(ours["rows"]), len(theirs["rows"])), "optimizer_steps": (len(ours["steps"]),
            len(theirs["steps"])), "same_step_iterations": ours["steps"] == theirs["steps"],
            "ema_updates": (ours["ema_updates"], theirs["ema_updates"]), "max_lr_diff": lr, "max_momentum_diff": mom,
            "accumulate_mismatches": acc}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=17)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--nbs", type=int, default=64)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--imgsz", type=int, default=64)
    p.add_argument("--out", default=str(REPO / "checkpoints" / "parity_schedule"))
    a = p.parse_args(argv)
    from cellseg_pl.data.demo import make_demo_dataset

    out = Path(a.out)
    data = make_demo_dataset(out / f"data{a.images}", n_train=a.images, n_val=2, size=a.imgsz, seed=3)
    theirs = record_ultralytics(data, out / "runs", a.epochs, a.imgsz, a.batch, a.nbs)
    ours = record_cellseg(data, out / "runs", a.epochs, a.imgsz, a.batch, a.nbs)
    print(f"{a.images} images, batch {a.batch}, nbs {a.nbs}, {a.epochs} epochs (ours, Ultralytics):")
    for k, v in compare(ours, theirs).items():
        print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
