"""Peak memory and time of one training step on dense images (the mask-loss memory of Ultralytics #17961, #14812).

Each case (cells per image x batch size x mask loss) runs in a fresh subprocess that writes synthetic images of small
round cells, builds the batch through cellseg_pl's data path (YoloSegDataset + Collate, so the targets are exactly
what training sees), then runs yolov8n-seg forward + loss + backward on the CPU: it reports the peak resident
memory of the first step (VmHWM, reset before it), the memory before it (network and batch built) and the time of
the fastest of ``--steps`` further steps (the first also allocates one-time caches).

    python -m benchmarks.memory                                  # imgsz 640, batch 2, 30/100/300 cells, both losses
    python -m benchmarks.memory --batch 2 8 --loss chunked
    python -m benchmarks.memory --child --instances 300 --batch 2 --loss ultralytics   # one case, JSON line

``--loss ultralytics`` is Ultralytics' ``v8SegmentationLoss``; ``chunked`` is cellseg_pl's default
(``cellseg_pl.yolo.loss.attach_loss(chunked_mask_loss=True)``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mib(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB (Linux); ru_maxrss when /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is the step's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def write_cells(folder: Path, images: int, cells: int, imgsz: int, seed: int = 0) -> list[Path]:
    """``images`` images of side ``imgsz`` with ``cells`` non-overlapping round cells (radius 7-11 px at 640)."""
    import cv2
    import numpy as np

    from cellseg_pl.data.demo import write_yolo_label

    rng = np.random.default_rng(seed)
    step = imgsz / 20  # 400 slots: up to 400 cells per image
    slots = [((i + 0.5) * step, (j + 0.5) * step) for j in range(20) for i in range(20)]
    if cells > len(slots):
        raise SystemExit(f"--instances: at most {len(slots)} cells per image")
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir(parents=True)
    paths = []
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    for k in range(images):
        img = rng.normal(110, 8, (imgsz, imgsz, 3)).clip(0, 255).astype(np.uint8)
        polys = []
        for s in rng.choice(len(slots), cells, replace=False):
            cx, cy = np.array(slots[s]) + rng.uniform(-0.1, 0.1, 2) * step
            r = rng.uniform(7, 11) * imgsz / 640
            poly = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
            cv2.fillPoly(img, [poly.round().astype(np.int32)], (190, 170, 160))
            polys.append(poly)
        path = folder / "images" / f"{k}.png"
        cv2.imwrite(str(path), img)
        write_yolo_label(folder / "labels" / f"{k}.txt", polys, imgsz, imgsz)
        paths.append(path)
    return paths


def child(instances: int, batch_size: int, imgsz: int, loss_name: str, steps: int = 2) -> dict:
    """One case, in this (fresh) process: two training steps, the second measured."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    import torch

    from cellseg_pl.data.dataset import Collate, YoloSegDataset
    from cellseg_pl.yolo.loss import attach_loss
    from cellseg_pl.yolo.network import build_network
    from cellseg_pl.data.transforms import ValTransform

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_cells(Path(tmp), batch_size, instances, imgsz)
        ds = YoloSegDataset(paths, 1, imgsz=imgsz, transform=ValTransform(imgsz))
        batch = Collate(mask_ratio=4, overlap_mask=True)([ds[i] for i in range(len(ds))])
    batch["img"] = batch["img"].float() / 255
    net = build_network("yolov8n-seg.yaml", 1).train()
    criterion = attach_loss(net, chunked_mask_loss=loss_name == "chunked")

    def step() -> tuple[float, float]:
        net.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss, parts = criterion(net(batch["img"]), batch)
        loss.backward()
        return time.perf_counter() - start, float(parts["seg_loss"])

    before = _rss_mib("VmRSS")  # network and batch built, nothing run yet
    exact = _reset_peak()
    step()
    peak = _rss_mib("VmHWM") if exact else _rss_mib("ru_maxrss")
    # the time of a warm step (the first one allocates caches): the fastest of a few, as CPUs here are shared
    seconds, seg_loss = min(step() for _ in range(steps))
    return {
        "instances": instances,
        "labelled": int(batch["cls"].shape[0]),
        "batch": batch_size,
        "imgsz": imgsz,
        "loss": loss_name,
        "rss_before_mib": round(before, 1),
        "peak_rss_mib": round(peak, 1),
        "step_s": round(seconds, 2),
        "seg_loss": round(seg_loss, 5),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[30, 100, 300], help="cells per image")
    parser.add_argument("--batch", type=int, nargs="+", default=[2], help="batch sizes")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--loss", nargs="+", choices=["ultralytics", "chunked"], default=["ultralytics", "chunked"])
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the measured one (fastest kept)")
    parser.add_argument("--child", action="store_true", help="run one case in this process, print it as JSON")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.instances[0], args.batch[0], args.imgsz, args.loss[0], args.steps)))
        return 0
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print(f"yolov8n-seg, imgsz {args.imgsz}, CPU; step = forward + loss + backward; each row a fresh process")
    print("| loss | batch | cells/image | RSS before (MiB) | peak RSS (MiB) | peak - before (MiB) | step (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for loss in args.loss:
        for batch in args.batch:
            for n in args.instances:
                cmd = [sys.executable, "-m", "benchmarks.memory", "--child", "--instances", str(n), "--batch", str(batch),
                       "--imgsz", str(args.imgsz), "--loss", loss, "--steps", str(args.steps)]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    print(f"| {loss} | {batch} | {n} | failed (exit {done.returncode}): "
                          f"{done.stderr.strip().splitlines()[-1:]} |", flush=True)
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"| {loss} | {batch} | {n} | {r['rss_before_mib']:,.0f} | {r['peak_rss_mib']:,.0f} | "
                      f"{r['peak_rss_mib'] - r['rss_before_mib']:,.0f} | {r['step_s']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
