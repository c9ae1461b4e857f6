"""Train with Ultralytics' trainer and with cellseg_pl on the same data and recipe, then score both with one evaluator.

    python scripts/bench_vs_ultralytics.py [--data data/demo/dataset.yaml] [--model yolov8n-seg.yaml]
        [--epochs 30] [--imgsz 256] [--batch 8] [--workers 2] [--device cpu] [--out checkpoints/bench]

Each trainer runs in its own subprocess, one after the other, with the same model yaml, image size, batch,
epochs, augmentation recipe (the lab's: degrees 180, scale 0.5, flips 0.5, mosaic 1.0, copy_paste 0.3,
close_mosaic 10), optimizer (auto), nominal batch, seed and device. Then the final (last-epoch, EMA) weights of
both are run through the same prediction path (cellseg_pl's letterbox, NMS at conf 0.001 / IoU 0.7, masks at the
original resolution) and scored by the same evaluator: COCO mask mAP50 and mAP50-95 (faster_coco_eval, maxDets
300) and F1 at IoU 0.5 (one-to-one matching, conf 0.25). The table compares epoch wall time (median), train
images/s, validation time, peak memory and the metrics, with ratios ours/theirs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "1")

RECIPE = {"degrees": 180.0, "scale": 0.5, "flipud": 0.5, "fliplr": 0.5, "mosaic": 1.0, "copy_paste": 0.3,
          "close_mosaic": 10, "translate": 0.1, "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


# ------------------------------------------------------------------------------------------------ workers
def run_ultralytics(a: argparse.Namespace, out: Path) -> dict:
    import ultralytics.engine.trainer as trainer_module
    from ultralytics import YOLO

    trainer_module.check_amp = lambda *args, **kwargs: True  # its AMP check downloads a model; we are offline
    times: dict[str, list[float]] = {"train": [], "val": []}
    marks: dict[str, float] = {}

    def mark(name):
        def callback(_):
            marks[name] = time.perf_counter()
            if name == "train_end":
                times["train"].append(marks["train_end"] - marks["train_start"])
            elif name == "fit_end":
                times["val"].append(marks["fit_end"] - marks["train_end"])

        return callback

    model = YOLO(a.model, task="segment")
    for event, name in (("on_train_epoch_start", "train_start"), ("on_train_epoch_end", "train_end"),
                        ("on_fit_epoch_end", "fit_end")):
        model.add_callback(event, mark(name))
    device = "cpu" if a.device == "cpu" else a.device
    model.train(
        data=a.data, epochs=a.epochs, imgsz=a.imgsz, batch=a.batch, workers=a.workers, device=device,
        project=str(out), name="ultralytics", exist_ok=True, seed=0, deterministic=True, plots=False,
        patience=a.epochs, optimizer="auto", nbs=a.nbs, amp=a.device != "cpu", verbose=False, **RECIPE,
    )
    return {"train_s": times["train"], "val_s": times["val"], "peak_rss_mib": peak_rss_mib(),
            "peak_gpu_mib": peak_gpu_mib(), "weights": str(out / "ultralytics" / "weights" / "last.pt")}


def run_cellseg(a: argparse.Namespace, out: Path) -> dict:
    import lightning as L

    from cellseg_pl.__main__ import configure_environment
    from cellseg_pl.cli import CellSegCLI

    configure_environment()
    times: dict[str, list[float]] = {"train": [], "val": []}

    class Timer(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def on_validation_epoch_start(self, trainer, pl_module):
            self.v0 = time.perf_counter()
            if not trainer.sanity_checking and hasattr(self, "t0"):
                times["train"].append(self.v0 - self.t0)

        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                times["val"].append(time.perf_counter() - self.v0)

    accelerator, devices = ("cpu", "1") if a.device == "cpu" else ("gpu", str(len(a.device.split(","))))
    args = [
        "--config", str(REPO / "configs" / "demo.yaml"), "--project", str(out), "--name", "cellseg_pl",
        "--model.model", a.model, "--model.nbs", str(a.nbs), "--model.optimizer", "auto",
        "--data.dataset", a.data, "--data.imgsz", str(a.imgsz), "--data.batch_size", str(a.batch),
        "--data.num_workers", str(a.workers), "--trainer.max_epochs", str(a.epochs),
        "--trainer.accelerator", accelerator, "--trainer.devices", devices, "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.precision", a.precision or ("32-true" if a.device == "cpu" else "16-mixed"),
        "--early_stopping.patience", str(a.epochs), "--seed_everything", "0",
    ]
    for key, value in RECIPE.items():
        args += [f"--data.{key}", str(value)]
    cli = CellSegCLI(args=args, run=False)
    cli.trainer.callbacks.append(Timer())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {"train_s": times["train"], "val_s": times["val"], "peak_rss_mib": peak_rss_mib(),
            "peak_gpu_mib": peak_gpu_mib(), "weights": str(Path(cli.run_dir) / "weights" / "last.ckpt")}


# ------------------------------------------------------------------------------------------------ evaluator
def score(weights: str, data: str, imgsz: int) -> dict:
    """Predict the val split with ``weights`` through one path and score it with one evaluator."""
    import numpy as np
    import torch

    from cellseg_pl.dataset import label_path_for, load_dataset_yaml, rasterize, read_image, read_label
    from cellseg_pl.metrics import CellMatchMetrics, mask_map_metric
    from cellseg_pl.model import load_weights
    from cellseg_pl.predict import Predictor

    net, names, _ = load_weights(weights)
    predictor = Predictor(net, len(names), imgsz=imgsz, conf=0.001, iou=0.7, max_det=300, tile="off")
    spec = load_dataset_yaml(data)
    mean_ap, cells = mask_map_metric(), CellMatchMetrics(conf=0.25)

    def boxes(masks: torch.Tensor) -> torch.Tensor:
        out = []
        for m in masks:
            ys, xs = torch.nonzero(m, as_tuple=True)
            out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        return torch.tensor(out, dtype=torch.float32).view(-1, 4)

    for path in spec.splits["val"]:
        image = read_image(path)
        h, w = image.shape[:2]
        classes, polygons, _ = read_label(label_path_for(path), len(names))
        inst, order = rasterize(polygons, h, w)
        ids = [k + 1 for k in range(len(order)) if (inst == k + 1).any()]
        gt_masks = torch.from_numpy(np.stack([inst == k for k in ids]) if ids else np.zeros((0, h, w), bool))
        gt_labels = torch.as_tensor([int(classes[order[k - 1]]) for k in ids], dtype=torch.long)
        found = [d for d in predictor.predict([image])[0] if d.area > 0]
        pred_masks = torch.from_numpy(np.stack([d.full_mask(h, w) for d in found]) if found else np.zeros((0, h, w), bool))
        pred = {"masks": pred_masks, "boxes": boxes(pred_masks), "scores": torch.tensor([d.score for d in found]),
                "labels": torch.tensor([d.label for d in found], dtype=torch.long)}
        target = {"masks": gt_masks, "boxes": boxes(gt_masks), "labels": gt_labels}
        mean_ap.update([pred], [target])
        cells.update([pred], [target])
    m, c = mean_ap.compute(), cells.compute()
    return {"mAP50(M)": float(m["segm_map_50"]), "mAP50-95(M)": float(m["segm_map"]), "F1@0.5": float(c["f1"]),
            "P@0.5": float(c["precision"]), "R@0.5": float(c["recall"])}


# ------------------------------------------------------------------------------------------------ driver
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO / "data" / "demo" / "dataset.yaml"), help="YOLO-seg dataset.yaml")
    p.add_argument("--model", default="yolov8n-seg.yaml", help="model yaml (both train from scratch)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--nbs", type=int, default=8, help="nominal batch (accumulation), the same for both")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, or a GPU index such as 0")
    p.add_argument("--precision", default=None, help="cellseg_pl precision (default 32-true on CPU, 16-mixed on GPU)")
    p.add_argument("--out", default=str(REPO / "checkpoints" / "bench"), help="output folder (replaced)")
    p.add_argument("--only", choices=("ultralytics", "cellseg_pl"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    out = Path(a.out).resolve()
    if a.only:  # a worker subprocess
        result = (run_ultralytics if a.only == "ultralytics" else run_cellseg)(a, out)
        Path(a.result).write_text(json.dumps(result))
        return 0
    if a.data == str(REPO / "data" / "demo" / "dataset.yaml") and not Path(a.data).exists():
        from cellseg_pl.demo import make_demo_dataset

        make_demo_dataset(REPO / "data" / "demo")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    results = {}
    for name in ("ultralytics", "cellseg_pl"):
        result_file = out / f"{name}.json"
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--only", name,
               "--result", str(result_file)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        (out / f"{name}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            print(f"{name} failed (exit {done.returncode}); see {out / f'{name}.log'}", file=sys.stderr)
            return 1
        results[name] = json.loads(result_file.read_text())
        results[name]["wall_s"] = time.perf_counter() - t0
        print(f"{name}: trained in {results[name]['wall_s']:.0f} s", flush=True)
    n_train = None
    from cellseg_pl.dataset import load_dataset_yaml

    spec = load_dataset_yaml(a.data)
    n_train = len(spec.splits["train"])
    for name in results:
        results[name]["metrics"] = score(results[name]["weights"], a.data, a.imgsz)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    print(table(results, n_train, a))
    return 0


def table(results: dict, n_train: int, a: argparse.Namespace) -> str:
    rows = []

    def add(label: str, u: float | None, c: float | None, fmt: str = "{:.3f}", lower_is_better: bool = True):
        ratio = "" if not u or c is None else f"{c / u:.2f}"
        rows.append((label, "-" if u is None else fmt.format(u), "-" if c is None else fmt.format(c), ratio))

    u, c = results["ultralytics"], results["cellseg_pl"]
    # the first epoch includes start-up (worker start, first-batch allocation): use the median
    add("epoch wall time, median (s)", statistics.median(u["train_s"]), statistics.median(c["train_s"]), "{:.2f}")
    add("train images/s", n_train / statistics.median(u["train_s"]), n_train / statistics.median(c["train_s"]), "{:.1f}")
    add("validation time, median (s)", statistics.median(u["val_s"]), statistics.median(c["val_s"]), "{:.2f}")
    add("total wall time (s)", u["wall_s"], c["wall_s"], "{:.0f}")
    add("peak RSS (MiB)", u["peak_rss_mib"], c["peak_rss_mib"], "{:.0f}")
    add("peak GPU memory (MiB)", u["peak_gpu_mib"], c["peak_gpu_mib"], "{:.0f}")
    for key in ("mAP50(M)", "mAP50-95(M)", "F1@0.5", "P@0.5", "R@0.5"):
        add(f"{key} (one evaluator)", u["metrics"][key], c["metrics"][key], "{:.4f}")
    head = (f"data={a.data} model={a.model} epochs={a.epochs} imgsz={a.imgsz} batch={a.batch} nbs={a.nbs} "
            f"workers={a.workers} device={a.device}; {n_train} train images")
    width = max(len(r[0]) for r in rows)
    lines = [head, f"{'':<{width}}  {'ultralytics':>12}  {'cellseg_pl':>12}  {'ours/theirs':>11}"]
    lines += [f"{r[0]:<{width}}  {r[1]:>12}  {r[2]:>12}  {r[3]:>11}" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
