"""Train with Ultralytics' trainer and with cellseg_pl on the same data and recipe, then score both with one evaluator.

    python -m benchmarks.vs_ultralytics [--data data/demo/dataset.yaml] [--model yolov8n-seg.yaml]
        [--epochs 30] [--imgsz 256] [--batch 8] [--workers auto] [--device cpu] [--out checkpoints/bench]

Each trainer runs in its own subprocess, one after the other, with the same model yaml, image size, batch,
epochs, augmentation recipe (the lab's: degrees 180, scale 0.5, flips 0.5, mosaic 1.0, copy_paste 0.3,
close_mosaic 10), optimizer (auto), nominal batch, seed and device. Then the final (last-epoch, EMA) weights of
both are run through the same prediction path (cellseg_pl's letterbox, NMS at conf 0.001 / IoU 0.7, masks at the
original resolution) and scored by the same evaluator: COCO mask mAP50 and mAP50-95 (faster_coco_eval, maxDets
300) and F1 at IoU 0.5 (one-to-one matching, conf 0.25). The table compares epoch wall time (median), train
images/s, validation time, peak memory and the metrics, with ratios ours/theirs. The trainer runs and the
evaluator live in ``common.py`` (shared with ``real_cells.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks import common
from benchmarks.common import REPO, run_cellseg, run_ultralytics, spawn
from cellseg_pl.evaluate import evaluate


# ------------------------------------------------------------------------------------------------ driver
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO / "data" / "demo" / "dataset.yaml"), help="YOLO-seg dataset.yaml")
    p.add_argument("--model", default="yolov8n-seg.yaml", help="model yaml (both train from scratch)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--nbs", type=int, default=8, help="nominal batch (accumulation), the same for both")
    p.add_argument("--workers", type=common.workers_arg, default="auto", help=common.WORKERS_HELP)
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
        from cellseg_pl.data.demo import make_demo_dataset

        make_demo_dataset(REPO / "data" / "demo")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    results = {}
    for name in ("ultralytics", "cellseg_pl"):
        result_file = out / f"{name}.json"
        cmd = [sys.executable, "-m", "benchmarks.vs_ultralytics", *(argv if argv is not None else sys.argv[1:]), "--only", name,
               "--result", str(result_file)]
        done = spawn(cmd, out / f"{name}.log")
        if done["returncode"] != 0:
            print(f"{name} failed (exit {done['returncode']}); see {out / f'{name}.log'}", file=sys.stderr)
            return 1
        results[name] = json.loads(result_file.read_text())
        results[name]["wall_s"] = done["wall_s"]
        print(f"{name}: trained in {results[name]['wall_s']:.0f} s", flush=True)
    n_train = None
    from cellseg_pl.data.dataset import load_dataset_yaml

    spec = load_dataset_yaml(a.data)
    n_train = len(spec.splits["train"])
    for name in results:
        result = evaluate(results[name]["weights"], a.data, imgsz=a.imgsz)
        results[name]["metrics"] = {k: result[k] for k in ("mAP50(M)", "mAP50-95(M)", "F1@0.5", "P@0.5", "R@0.5")}
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
