"""benchmarks/best_rule.py: the epoch a rule picks and the epoch a run stops at (no training)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from benchmarks import best_rule as study


def test_pick_is_best_ckpt_and_ultralytics_early_stopping():
    scores = [0, 0, 0, 0.2, 0.5, 0.4, 0.5, 0.45, 0.3, 0.3]
    assert study.pick(scores, None) == (5, 10)  # a tie is not a new best (best.ckpt keeps the first)
    assert study.pick(scores, 3) == (5, 8)  # 3 epochs after the last improvement
    assert study.pick([0] * 6 + [0.1], 3) == (7, 7)  # no stop while nothing is found yet
    assert study.pick([0.3, 0.2, 0.1], 1) == (1, 2)


def test_epochs_without_an_optimizer_step_are_not_counted():
    scores = [0.1, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]
    assert study.pick(scores, 2) == (2, 4)
    # a step every other epoch (fewer images than the nominal batch): the same weights are validated twice
    stepped = [True, True, False, True, False, True, False]
    assert study.pick(scores, 2, stepped) == (2, 6)
    rows = [{"train/box_loss": 1.0, "val/box_loss": 2.0, "metrics/mAP50(M)": 0.1},
            {"train/box_loss": 0.9, "val/box_loss": 2.0, "metrics/mAP50(M)": 0.1},  # same weights validated again
            {"train/box_loss": 0.8, "val/box_loss": 1.9, "metrics/mAP50(M)": 0.1}]
    assert study.stepped_epochs(rows) == [True, False, True]


def test_rules_read_results_csv_columns():
    row = {"metrics/mAP50(M)": 0.9, "metrics/mAP50-95(M)": 0.6, "metrics/mAP50-95(B)": 0.5, "metrics/F1(M)": 0.8}
    assert study.RULES["mask 0.1/0.9"](row) == 0.1 * 0.9 + 0.9 * 0.6
    assert study.RULES["box+mask mAP50-95"](row) == 1.1
    assert study.RULES["F1 + mask mAP50-95"](row) == 0.8 + 0.6
