"""Two models on the same test images: per-image records, a paired bootstrap, and the rule that promotes a model.

:func:`cellseg_pl.evaluate.evaluate` with ``per_image=True`` gives, for every test image, what each figure needs:
true/false positives and misses at the operating point (F1), the count error, and every detection's score with
whether it is a true positive at each COCO IoU threshold 0.50:0.05:0.95 (greedy matching by score, as COCO does),
so mask mAP50-95 can be recomputed on any resample of the images. :func:`paired_bootstrap` resamples the images
(the same draw for both models) and gives each figure's difference, new - old, with a 95 % interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: COCO's IoU thresholds.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
#: Figures compared, with whether higher is better.
FIGURES = {"F1": True, "mAP50-95": True, "count_MAE": False}


def f1(records: list[dict]) -> float:
    """F1 at the operating point over the images of ``records`` (``tp``, ``fp``, ``fn`` per image)."""
    tp = sum(r["tp"] for r in records)
    fp = sum(r["fp"] for r in records)
    fn = sum(r["fn"] for r in records)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def count_mae(records: list[dict]) -> float:
    """Mean absolute error of the number of cells per image."""
    return float(np.mean([abs(r["count_err"]) for r in records])) if records else 0.0


def mean_ap(records: list[dict]) -> float:
    """COCO mask mAP50-95 from per-image detection records: the mean over classes (with ground truth) and IoU
    thresholds of the 101-point interpolated precision, as COCO computes it (``area all``)."""
    classes = sorted({c for r in records for c, n in r["gt"].items() if n})
    if not classes:
        return float("nan")
    aps = []
    for c in classes:
        n_gt = sum(r["gt"].get(c, 0) for r in records)
        dets = [d for r in records for d in r["dets"] if d[1] == c]
        if not dets:
            aps.append(np.zeros(len(IOU_THRESHOLDS)))
            continue
        scores = np.array([d[0] for d in dets])
        hits = np.array([d[2] for d in dets], dtype=bool)  # (n, 10)
        order = np.argsort(-scores, kind="mergesort")
        hits = hits[order]
        tp = np.cumsum(hits, 0)
        fp = np.cumsum(~hits, 0)
        recall = tp / n_gt
        precision = tp / np.maximum(tp + fp, np.finfo(float).eps)
        # precision made monotone (from the right), then read at recall 0, 0.01, ..., 1
        precision = np.maximum.accumulate(precision[::-1], 0)[::-1]
        points = np.linspace(0, 1, 101)
        ap = []
        for t in range(len(IOU_THRESHOLDS)):
            idx = np.searchsorted(recall[:, t], points, side="left")
            ok = idx < len(recall)
            ap.append(np.where(ok, precision[np.minimum(idx, len(recall) - 1), t], 0.0).mean())
        aps.append(np.array(ap))
    return float(np.mean(aps))


def figures(records: list[dict]) -> dict[str, float]:
    """The compared figures of one model on the images of ``records``."""
    return {"F1": f1(records), "mAP50-95": mean_ap(records), "count_MAE": count_mae(records)}


@dataclass
class Difference:
    """One figure, new - old: the difference on the test set and its 95 % bootstrap interval."""

    old: float
    new: float
    low: float
    high: float

    @property
    def delta(self) -> float:
        return self.new - self.old

    def as_dict(self) -> dict[str, float]:
        return {"old": self.old, "new": self.new, "difference": self.delta, "ci95": [self.low, self.high]}


def paired_bootstrap(old: list[dict], new: list[dict], resamples: int = 1000, seed: int = 0) -> dict[str, Difference]:
    """Each figure of two models on the same images, new - old, with a 95 % percentile interval over ``resamples``
    draws of the images with replacement (the same draw for both models, so what the images share cancels)."""
    if [r["image"] for r in old] != [r["image"] for r in new]:
        raise ValueError("paired_bootstrap: the two models were scored on different images")
    rng = np.random.default_rng(seed)
    n = len(old)
    diffs: dict[str, list[float]] = {k: [] for k in FIGURES}
    for _ in range(resamples):
        pick = rng.integers(0, n, n)
        a, b = figures([old[i] for i in pick]), figures([new[i] for i in pick])
        for k in FIGURES:
            diffs[k].append(b[k] - a[k])
    base_old, base_new = figures(old), figures(new)
    out = {}
    for k in FIGURES:
        d = np.array([x for x in diffs[k] if np.isfinite(x)])
        low, high = (np.percentile(d, [2.5, 97.5]) if len(d) else (np.nan, np.nan))
        out[k] = Difference(base_old[k], base_new[k], float(low), float(high))
    return out


#: The promotion rule, in words (model cards and ``cycle learn`` say it). The 95 % intervals are reported beside it,
#: not part of it: on a test set of a few hundred cells a consistent loss of 0.001 mAP already has an interval below
#: 0, and the tolerance is there to let such noise through.
RULE = ("promoted when it is not worse: on the fixed test set, neither F1 nor mask mAP50-95 falls by more than the "
        "tolerance (0.005 by default, lab.yaml)")


def not_worse(comparison: dict[str, Difference], tolerance: float = 0.005) -> tuple[bool, str]:
    """Whether the new model may replace the old one (:data:`RULE`), and why in one line."""
    reasons = [f"{k} {comparison[k].old:.3f} -> {comparison[k].new:.3f} ({comparison[k].delta:+.3f})"
               for k in ("F1", "mAP50-95") if comparison[k].delta < -tolerance]
    if reasons:
        return False, "worse: " + "; ".join(reasons)
    return True, "not worse: " + ", ".join(f"{k} {comparison[k].delta:+.3f}" for k in ("F1", "mAP50-95"))


def bootstrap_ci(records: list[dict], resamples: int = 1000, seed: int = 0) -> dict[str, list[float]]:
    """Each figure of one model with its 95 % percentile interval over ``resamples`` draws of the images:
    ``{figure: [value, low, high]}``."""
    rng = np.random.default_rng(seed)
    n = len(records)
    draws: dict[str, list[float]] = {k: [] for k in FIGURES}
    for _ in range(resamples):
        values = figures([records[i] for i in rng.integers(0, n, n)])
        for k in FIGURES:
            draws[k].append(values[k])
    base = figures(records)
    out = {}
    for k in FIGURES:
        d = np.array([x for x in draws[k] if np.isfinite(x)])
        low, high = np.percentile(d, [2.5, 97.5]) if len(d) else (np.nan, np.nan)
        out[k] = [base[k], float(low), float(high)]
    return out
