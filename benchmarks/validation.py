"""Where a validation pass spends its time, per image and per stage, and how that grows with the detections.

    python -m benchmarks.validation [--imgsz 640] [--cells 60] [--images 16] [--detections 10 60 150 300]
        [--model yolov8s-seg.yaml] [--device cpu|cuda] [--out checkpoints/bench_validation]

The lab's val split is ~545 images at 640 px with ~57 cells each; every epoch validates it. This benchmark draws
``--images`` synthetic 640 px images with ``--cells`` cells each (``cellseg_pl.data.demo.make_image``), loads them
with the data module's validation loader, and times the stages of :meth:`cellseg_pl.train.module.CellSegModule`'s
validation on them:

* ``forward``: the network (``--model``, random weights) on the batch, on ``--device``;
* ``nms``: Ultralytics' ``non_max_suppression`` on a head output holding ``D`` boxes per image above the
  confidence floor (the true cells' boxes, then more at random places: ``D`` = ``--detections``);
* ``box_masks``: the masks of the ``D`` boxes assembled from prototypes, in windows around their boxes
  (:func:`cellseg_pl.yolo.postprocess.box_mask_windows`);
* ``update``: :meth:`cellseg_pl.metrics.ValidationMetrics.update` with ``D`` predictions per image whose masks are
  the true cells' (then copies of them, shifted): the masks' IoUs with the true cells, counted in their windows
  (:func:`cellseg_pl.metrics.mask_ious`), and the cell matching;
* ``compute``: :meth:`ValidationMetrics.compute` over the pass (COCO box and mask mAP, F1), per image.

The network does not matter for the stages after it (the detections are made up), so ``forward`` is measured once
per batch, the others for each ``D``. Prints a table of ms per image. Not part of CI.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO


def make_images(folder: Path, n: int, size: int, cells: int, seed: int = 0) -> Path:
    """``n`` images of ``size`` px with ``cells`` cells each as a YOLO-seg val split; returns the dataset.yaml."""
    import cv2

    from cellseg_pl.data.demo import make_image, write_yolo_label

    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        (folder / "labels" / split).mkdir(parents=True, exist_ok=True)
    placed = []
    for i in range(n):
        image, polygons = make_image(rng, size, (cells, cells), (0, 0))
        cv2.imwrite(str(folder / "images" / "val" / f"img{i:03d}.png"), image)
        write_yolo_label(folder / "labels" / "val" / f"img{i:03d}.txt", polygons, size, size)
        placed.append(len(polygons))
    shutil.copy(folder / "images" / "val" / "img000.png", folder / "images" / "train" / "img000.png")
    shutil.copy(folder / "labels" / "val" / "img000.txt", folder / "labels" / "train" / "img000.txt")
    (folder / "dataset.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: {0: cell}\n")
    print(f"{n} images of {size} px, {statistics.fmean(placed):.1f} cells each (asked for {cells})", flush=True)
    return folder / "dataset.yaml"


def head_output(targets: list[dict], detections: int, anchors: int, size: int, rng: np.random.Generator):
    """A (B, 4 + 1 + 32, anchors) head output with ``detections`` boxes per image above 0.25: the true boxes first,
    then random ones; every other anchor scores 0."""
    import torch

    det = torch.zeros(len(targets), 4 + 1 + 32, anchors)
    for i, t in enumerate(targets):
        boxes = t["boxes"][:detections]
        extra = detections - len(boxes)
        if extra > 0:
            xy = torch.from_numpy(rng.uniform(20, size - 20, (extra, 2))).float()
            wh = torch.from_numpy(rng.uniform(12, 30, (extra, 2))).float()
            boxes = torch.cat([boxes, torch.cat([xy - wh / 2, xy + wh / 2], 1)])
        k = len(boxes)
        det[i, 0:2, :k] = ((boxes[:, :2] + boxes[:, 2:]) / 2).T
        det[i, 2:4, :k] = (boxes[:, 2:] - boxes[:, :2]).T
        det[i, 4, :k] = torch.from_numpy(rng.uniform(0.3, 1.0, k)).float()
        det[i, 5:, :k] = torch.randn(32, k)
    return det


def predictions(targets: list[dict], detections: int) -> list[dict]:
    """``detections`` predictions per image: the true masks, then copies shifted by 3 px (realistic outlines), as
    :class:`cellseg_pl.masks.MaskWindows` (what validation scores)."""
    import torch

    from cellseg_pl.masks import MaskWindows

    preds = []
    for t in targets:
        true = t["masks"].dense()
        masks, boxes = true, t["boxes"]
        while len(masks) < detections:
            masks = torch.cat([masks, torch.roll(true, 3, dims=2)])[:detections]
            boxes = torch.cat([boxes, t["boxes"] + torch.tensor([3.0, 0, 3.0, 0])])[:detections]
        masks, boxes = masks[:detections], boxes[:detections]
        scores = torch.linspace(0.95, 0.3, len(masks))
        preds.append({"boxes": boxes, "scores": scores, "labels": torch.zeros(len(masks), dtype=torch.long),
                      "masks": MaskWindows.from_dense(masks)})
    return preds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--cells", type=int, default=60, help="cells drawn per image")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--detections", type=int, nargs="+", default=[10, 60, 150, 300])
    p.add_argument("--model", default="yolov8s-seg.yaml", help="network of the forward stage (random weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(REPO / "checkpoints" / "bench_validation"))
    a = p.parse_args(argv)

    import torch

    from cellseg_pl.__main__ import configure_environment
    from cellseg_pl.data.datamodule import CellSegDataModule
    from cellseg_pl.metrics import ValidationMetrics, targets_from_batch
    from cellseg_pl.yolo.network import build_network
    from cellseg_pl.yolo.postprocess import box_mask_windows
    from ultralytics.utils.nms import non_max_suppression

    configure_environment()
    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    data = make_images(out / "data", a.images, a.imgsz, a.cells)
    dm = CellSegDataModule(str(data), imgsz=a.imgsz, batch_size=a.batch // 2, num_workers=0, cache="ram")
    dm.setup("validate")
    batches = list(dm.val_dataloader())  # (the val loader doubles the batch size)
    device = torch.device(a.device)
    net = build_network(a.model, 1).to(device).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    size = (a.imgsz, a.imgsz)
    anchors = sum((a.imgsz // s) ** 2 for s in (8, 16, 32))

    times: dict[str, list[float]] = {"forward": []}
    with torch.inference_mode():
        for batch in batches:  # the forward once per batch (one warm-up first)
            x = batch["img"].to(device).float() / 255 if batch["img"].dtype == torch.uint8 else batch["img"].to(device)
            net(x)
            sync()
            t0 = time.perf_counter()
            net(x)
            sync()
            times["forward"].append((time.perf_counter() - t0) / len(x))
        proto = torch.randn(a.batch, 32, a.imgsz // 4, a.imgsz // 4, device=device)
        rows = []
        for d in a.detections:
            stage = {"nms": 0.0, "box_masks": 0.0, "update": 0.0, "compute": 0.0}
            metrics = ValidationMetrics(pr_conf=0.25, min_area=0.0)
            n_images = 0
            for batch in batches:
                targets = targets_from_batch(batch)
                det = head_output(targets, d, anchors, a.imgsz, rng).to(device)
                sync()
                t0 = time.perf_counter()
                kept = non_max_suppression(det, 0.001, 0.7, nc=1, multi_label=False, max_det=300)
                sync()
                t1 = time.perf_counter()
                for i, x in enumerate(kept):
                    box_mask_windows(proto[i], x[:, 6:], x[:, :4], size)
                sync()
                t2 = time.perf_counter()
                preds = predictions(targets, d)  # (made up: not timed)
                t3 = time.perf_counter()
                metrics.update(preds, batch)
                t4 = time.perf_counter()
                stage["nms"] += t1 - t0
                stage["box_masks"] += t2 - t1
                stage["update"] += t4 - t3
                n_images += len(targets)
            t0 = time.perf_counter()
            values = metrics.compute()
            stage["compute"] = time.perf_counter() - t0
            rows.append((d, {k: 1000 * v / n_images for k, v in stage.items()}, float(values["metrics/mAP50(M)"])))
    forward = 1000 * statistics.median(times["forward"])
    print(f"\nms per image at {a.imgsz} px, {a.cells} cells per image, {a.images} images, device {a.device}; forward "
          f"of {a.model} (batch {a.batch}): {forward:.1f} ms")
    print("| detections per image | nms | box_masks | update (IoUs, matching) | compute (COCO, F1) | total after the "
          "forward |")
    print("|---|---|---|---|---|---|")
    for d, s, _ in rows:
        print(f"| {d} | {s['nms']:.1f} | {s['box_masks']:.1f} | {s['update']:.1f} | {s['compute']:.1f} | "
              f"{sum(s.values()):.1f} |")
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
