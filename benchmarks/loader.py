#!/usr/bin/env python
"""Train loaders side by side: cellseg_pl's and Ultralytics', same data, same recipe, batches interleaved.

    python -m benchmarks.loader [--imgsz 640] [--images 192] [--batch 8] [--workers 0 2] [--rounds 6]
        [--cache auto] [--data path/to/dataset.yaml] [--profile] [--step cpu|cuda]

Data: ``--data``, or the synthetic demo set at ``imgsz`` px (``--images`` training images of about 12 cells each,
written once to ``checkpoints/bench_loader/data``). Recipe: the guide's (mosaic 1.0, copy_paste 0.3, degrees 180,
flips 0.5, scale 0.5, translate 0.1, HSV on). For each worker count, ``--rounds`` rounds each time ``--batches``
batches of Ultralytics' loader, then as many of ours (after one warm-up round each, which also fills caches), and
report images/s, instances per sample (with its standard error: a sample's count varies a lot, sd ~12 on the
synthetic set, so a ratio of counts needs ~1,500 samples a side to be known within 3 %), peak RSS of this process
tree and the ratios ours/theirs. Our loader starts a new epoch each time it has been run through.

``--profile`` times each stage of our sample (load, mosaic, warp, copy-paste, colour, finalize, collate) in this
process. ``--step DEVICE`` also runs a yolov8n-seg training step on every batch and reports the share of the step
time spent waiting for data ("is the GPU fed?").
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

RECIPE = {"degrees": 180.0, "scale": 0.5, "flipud": 0.5, "fliplr": 0.5, "mosaic": 1.0, "copy_paste": 0.3,
          "translate": 0.1, "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4}


def peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def ultralytics_loader(data: str, imgsz: int, batch: int, workers: int):
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    spec = check_det_dataset(data, autodownload=False)
    cfg = get_cfg(overrides={"task": "segment", "imgsz": imgsz, **RECIPE})
    dataset = build_yolo_dataset(cfg, spec["train"], batch, spec, mode="train")
    return build_dataloader(dataset, batch, workers, shuffle=True)


def cellseg_loader(data: str, imgsz: int, batch: int, workers: int, cache: str):
    from cellseg_pl.data.datamodule import CellSegDataModule

    dm = CellSegDataModule(data, imgsz=imgsz, batch_size=batch, num_workers=workers, cache=cache, **RECIPE)
    dm.setup("fit")
    loader = dm.train_dataloader()
    # our samples are drawn from (seed, epoch, index): a new epoch each time the loader starts over, as in training
    # (repeating epoch 0 would count one fixed set of len(dataset) samples, Ultralytics' are new every time)
    epoch = [0]

    def next_epoch() -> None:
        epoch[0] += 1
        dm.set_epoch(epoch[0], 10**6)

    loader.next_epoch = next_epoch
    return loader


def timed(loader, batches: int, step=None) -> tuple[float, int, list[int], float]:
    """(seconds, images, instances of each sample, seconds waiting for data) over ``batches`` batches (cycling the
    loader; a loader with ``next_epoch`` is told when it starts over, so its samples are those of a new epoch)."""
    it = getattr(timed, "iters", {}).get(id(loader))
    if it is None:
        it = iter(loader)
        timed.iters = {**getattr(timed, "iters", {}), id(loader): it}
    images, counts = 0, []
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(batches):
        w0 = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            if hasattr(loader, "next_epoch"):
                loader.next_epoch()
            it = iter(loader)
            timed.iters[id(loader)] = it
            b = next(it)
        wait += time.perf_counter() - w0
        images += b["img"].shape[0]
        per_image = b["batch_idx"].view(-1).long().bincount(minlength=b["img"].shape[0])
        counts += per_image.tolist()
        if step is not None:
            step(b)
    return time.perf_counter() - t0, images, counts, wait


def make_step(device: str):
    import torch

    from cellseg_pl.yolo.loss import attach_loss
    from cellseg_pl.yolo.network import build_network

    net = build_network("yolov8n-seg.yaml", 1).to(device).train()
    criterion = attach_loss(net)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)

    def step(batch):
        b = {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}
        b["img"] = b["img"].float() / 255
        loss, _ = criterion(net(b["img"]), b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return step


def profile(data: str, imgsz: int, samples: int, cache: str) -> dict[str, float]:
    """ms per stage of our training sample, in this process."""
    import numpy as np

    from cellseg_pl.data import transforms as T
    from cellseg_pl.data.dataset import Collate, finalize
    from cellseg_pl.data.datamodule import CellSegDataModule

    dm = CellSegDataModule(data, imgsz=imgsz, batch_size=8, num_workers=0, cache=cache, **RECIPE)
    dm.setup("fit")
    ds = dm.split_dataset("train", train=True)
    tf = dm.train_transform
    times: dict[str, float] = {}

    def clock(name, fn, *a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        return out

    real_load = ds.load

    def timed_load(i):
        return clock("load (decode or cache, labels, rasterize)", real_load, i)

    ds.load = timed_load
    real_flip = T.flip_copy_paste
    T.flip_copy_paste = lambda *a, **k: clock("copy-paste", real_flip, *a, **k)  # (called inside the geometry)
    finals = []
    for i in range(samples):
        rng = np.random.default_rng([0, 0, i])
        tf.color.set_random_seed(int(rng.integers(2**31)))
        sample = {**ds.load(i % len(ds)), "ratio_pad": (1.0, (0, 0))}
        before = times.get("load (decode or cache, labels, rasterize)", 0.0)
        t0 = time.perf_counter()
        pasted = times.get("copy-paste", 0.0)
        out, gain = tf.geometric(sample, ds, rng, tf.copy_paste_mode == "flip")
        loads = times["load (decode or cache, labels, rasterize)"] - before
        inner = loads + times.get("copy-paste", 0.0) - pasted
        times["mosaic canvas + warp"] = times.get("mosaic canvas + warp", 0.0) + time.perf_counter() - t0 - inner
        if tf.copy_paste_mode == "free" and rng.random() < tf.copy_paste_p:
            src = ds.load(int(rng.integers(len(ds))))
            out = clock("copy-paste", T.copy_paste, out, src, tf.copy_paste_p, rng, zoom=gain)
        col = clock("colour + flips", tf.color, image=out["image"], mask=out["instances"])
        out = {**out, "image": col["image"], "instances": col["mask"]}
        finals.append(clock("finalize (boxes, tensors)", finalize, out))
        if len(finals) == 8:
            clock("collate (1/4 mask targets)", Collate(4), finals)
            finals = []
    ds.load = real_load
    T.flip_copy_paste = real_flip
    return {k: 1000 * v / samples for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a YOLO-seg dataset.yaml (default: synthetic demo images at --imgsz)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--images", type=int, default=192, help="synthetic training images")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", type=int, default=6, help="batches per round and loader")
    p.add_argument("--cache", default="auto", help="our --data.cache (none, ram, disk, auto)")
    p.add_argument("--profile", action="store_true", help="ms per stage of our sample")
    p.add_argument("--step", help="also run a training step per batch on this device (cpu, cuda)")
    a = p.parse_args(argv)

    data = a.data
    if data is None:
        from cellseg_pl.data.demo import make_demo_dataset

        data = str(make_demo_dataset(REPO / "checkpoints" / "bench_loader" / f"data{a.imgsz}_{a.images}",
                                     n_train=a.images, n_val=2, size=a.imgsz, seed=0))
    print(f"data={data} imgsz={a.imgsz} batch={a.batch} cache={a.cache} recipe={RECIPE}", flush=True)
    print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores here: above ~1 the machine is busy)", flush=True)
    step = make_step(a.step) if a.step else None
    rows = []
    for workers in a.workers:
        loaders = {"ultralytics": ultralytics_loader(data, a.imgsz, a.batch, workers),
                   "cellseg_pl": cellseg_loader(data, a.imgsz, a.batch, workers, a.cache)}
        for loader in loaders.values():  # warm-up: workers started, caches filled
            timed(loader, a.batches)
        stats = {name: [] for name in loaders}
        for _ in range(a.rounds):
            for name, loader in loaders.items():
                stats[name].append(timed(loader, a.batches, step))
        row = {"workers": workers}
        for name, runs in stats.items():
            row[f"{name} images/s"] = statistics.median(n / t for t, n, _, _ in runs)
            counts = [c for _, _, per_sample, _ in runs for c in per_sample]
            row[f"{name} cells/sample"] = statistics.mean(counts)
            row[f"{name} cells s.e."] = statistics.stdev(counts) / len(counts) ** 0.5 if len(counts) > 1 else 0.0
            row[f"{name} samples"] = len(counts)
            row[f"{name} data wait"] = sum(w for *_, w in runs) / sum(t for t, *_ in runs)
        rows.append(row)
        del loaders
    print(f"load average after: {os.getloadavg()[0]:.2f}; peak RSS (this process + children) "
          f"{peak_rss_mib():.0f} MiB")
    print("\n| workers | ultralytics images/s | cellseg_pl images/s | ratio | ultralytics cells/sample (± s.e.) | "
          "cellseg_pl cells/sample | ratio (± s.e.) | samples each |" + (" data wait u / c |" if step else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if step else ""))
    for r in rows:
        u, c = r["ultralytics cells/sample"], r["cellseg_pl cells/sample"]
        ratio_se = c / u * ((r["ultralytics cells s.e."] / u) ** 2 + (r["cellseg_pl cells s.e."] / c) ** 2) ** 0.5
        line = (f"| {r['workers']} | {r['ultralytics images/s']:.1f} | {r['cellseg_pl images/s']:.1f} | "
                f"{r['cellseg_pl images/s'] / r['ultralytics images/s']:.2f} | "
                f"{u:.2f} ± {r['ultralytics cells s.e.']:.2f} | "
                f"{c:.2f} ± {r['cellseg_pl cells s.e.']:.2f} | {c / u:.3f} ± {ratio_se:.3f} | "
                f"{min(r['ultralytics samples'], r['cellseg_pl samples'])} |")
        if step:
            line += f" {r['ultralytics data wait']:.0%} / {r['cellseg_pl data wait']:.0%} |"
        print(line)
    if a.profile:
        ms = profile(data, a.imgsz, 48, a.cache)
        print("\nour sample, ms per stage (one process):")
        for k, v in ms.items():
            print(f"  {k:<32} {v:7.2f}")
        print(f"  {'total':<32} {sum(ms.values()):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
