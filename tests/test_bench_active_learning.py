"""benchmarks/active_learning.py: arms, recipes, the simulated CVAT export, cost accounting and labels-to-reach on
tiny synthetic data.

No download and no training: the costs get made-up errors, the curves made-up rows (the cycle itself is the lab's,
tested in tests/test_lab.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

from benchmarks import active_learning as al
from cellseg_pl.data import demo

from cellseg_pl.data.dataset import load_dataset_yaml  # noqa: E402
from cellseg_pl.infer.predict import Instance  # noqa: E402


def test_arms_are_strategy_and_recipe():
    assert al.parse_arm("random") == ("random", "lab")
    assert al.parse_arm("uncertainty:guide") == ("uncertainty", "guide")
    for bad in ("diverse", "random:fast", "random:"):
        if bad == "random:":
            assert al.parse_arm(bad) == ("random", "lab")
            continue
        with pytest.raises(ValueError, match="STRATEGY"):
            al.parse_arm(bad)


def test_seed_set_is_reproducible_per_seed():
    pool = [f"img{i:02d}.png" for i in range(30)]
    first = al.pick_random(pool, 5, np.random.default_rng([0, 12345]))
    assert first == al.pick_random(pool[::-1], 5, np.random.default_rng([0, 12345]))
    assert first != al.pick_random(pool, 5, np.random.default_rng([1, 12345]))
    assert len(set(first)) == 5 and sorted(al.pick_random(pool[:3], 5, np.random.default_rng(0))) == pool[:3]


def test_recipes_scale_the_labs_recipe_and_the_guide_one_is_optimizer_auto():
    import yaml

    from cellseg_pl.lab.init import RECIPE

    text = RECIPE.format(epochs=100, min_area=0.0, imgsz=256, batch_size=8, patience=20)
    lab = yaml.safe_load(al.fine_tuning_recipe(text, "lab", 3, 8, 8, 2, "auto"))
    guide = yaml.safe_load(al.fine_tuning_recipe(text, "guide", 3, 8, 8, 2, "auto"))
    for doc in (lab, guide):
        assert doc["seed_everything"] == 3 and doc["trainer"]["max_epochs"] == 8
        assert doc["early_stopping"]["patience"] == 8 and doc["model"]["nbs"] == 8
        assert (doc["data"]["close_mosaic"], doc["data"]["copy_paste"], doc["data"]["imgsz"]) == (2, 0.3, 256)
    assert (lab["model"]["optimizer"], lab["model"]["lr0"], lab["model"]["warmup_bias_lr"]) == ("AdamW", 0.0005, 0.0005)
    # the guide's command: lr0=0.0005 is given but optimizer auto ignores it; the bias warmup is Ultralytics' default
    assert (guide["model"]["optimizer"], guide["model"]["lr0"]) == ("auto", 0.0005)
    assert "warmup_bias_lr" not in guide["model"]
    with pytest.raises(ValueError, match="unknown recipe"):
        al.fine_tuning_recipe(text, "fast", 0, 8, 8, 2, "auto")


def test_simulated_cvat_export_converts_back_to_the_true_labels(tmp_path):
    from cellseg_pl.cvat.convert import convert_coco_zip

    data, _ = al.build_synthetic(tmp_path / "syn", {"train": 10, "val": 2, "test": 2})
    pool = al.Pool(data)
    picks = sorted(pool.paths)[:3]
    corrected = al.true_labels_zip([pool.paths[n] for n in picks], pool.names_map, tmp_path / "corrected.zip")
    out = tmp_path / "converted"
    convert_coco_zip(corrected, out, images_dir=pool.folder)
    spec = load_dataset_yaml(out / "dataset.yaml")
    converted = {p.name: p for split in spec.splits.values() for p in split}
    assert sorted(converted) == picks and spec.names == pool.names_map
    for name in picks:
        h, w = cv2.imread(str(pool.paths[name])).shape[:2]
        truth, _ = al.true_instances(pool.paths[name], h, w, 1)
        back, _ = al.true_instances(converted[name], h, w, 1)
        assert len(back) == len(truth) == pool.cells[name]
        inter = (truth & back).sum(dim=(1, 2)).float()
        union = (truth | back).sum(dim=(1, 2)).float()
        # the same outlines: convert re-traces each outline through pixel centres (~0.5 px inside, 0.86 on these
        # ~200 px cells); a wrong image or a shifted polygon gives far less
        assert (inter / union).min() > 0.8, name


def test_costs_and_rows():
    cells = {"a": 10, "b": 4, "c": 7, "d": 0}
    seed_cost = al.batch_cost(["a", "b"], cells, None)  # no model: every cell drawn by hand
    assert seed_cost == {"new_images": 2, "new_cells": 14, "new_fp": 0, "new_fn": 14, "new_corrections": 14}
    first = al.cycle_row("random", 0, 0, ["a", "b"], seed_cost, cells, {"F1@0.5": 0.5, "mAP50-95(M)": 0.2})
    assert (first["labelled_images"], first["labelled_cells"], first["cum_corrections"]) == (2, 14, 14)
    assert (first["added_images"], first["added_corrections"], first["F1"]) == (0, 0, 0.5)
    assert math.isnan(first["count_MAE"])
    cost = al.batch_cost(["c", "d"], cells, {"c": (1, 2), "d": (3, 0)})
    assert cost == {"new_images": 2, "new_cells": 7, "new_fp": 4, "new_fn": 2, "new_corrections": 6}
    second = al.cycle_row("random", 0, 1, ["a", "b", "c", "d"], cost, cells, {"F1@0.5": 0.6}, first, first)
    assert (second["labelled_images"], second["labelled_cells"], second["cum_corrections"]) == (4, 21, 20)
    assert (second["added_images"], second["added_cells"], second["added_corrections"]) == (2, 7, 6)
    third = al.cycle_row("random", 0, 2, ["a", "b", "c", "d", "e"], {**cost, "new_corrections": 1},
                         {**cells, "e": 1}, {}, second, first)
    assert (third["cum_corrections"], third["added_corrections"], third["added_images"]) == (21, 7, 3)
    with pytest.raises(ValueError, match="previous"):
        al.cycle_row("random", 0, 1, ["a"], cost, cells, {})
    assert set(al.CSV_FIELDS) <= set(second) | {"promoted", "deployed", "deployed_F1", "deployed_mAP50-95",
                                              "next_s", "learn_s", "weights"}


def _disc(h: int, w: int, cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _instance(mask: np.ndarray, score: float) -> Instance:
    ys, xs = np.nonzero(mask)
    y0, x0 = ys.min(), xs.min()
    return Instance(score, 0, int(x0), int(y0), mask[y0 : ys.max() + 1, x0 : xs.max() + 1])


def test_image_errors_are_fp_plus_fn_at_iou_05_and_conf_025():
    h = w = 64
    cell1, cell2 = _disc(h, w, 16, 16, 8), _disc(h, w, 45, 45, 8)
    gt = torch.from_numpy(np.stack([cell1, cell2]))
    labels = torch.zeros(2, dtype=torch.long)
    found = [_instance(cell1, 0.9), _instance(_disc(h, w, 16, 45, 6), 0.5), _instance(cell2, 0.1)]
    # cell1 found; a droplet where there is none (FP); cell2 only below conf 0.25 (FN)
    assert al.image_errors(found, gt, labels, h, w) == (1, 1, 1)
    assert al.image_errors(found, gt, labels, h, w, conf=0.05) == (2, 1, 0)
    shifted = _instance(np.roll(cell1, 9, axis=1), 0.9)  # IoU < 0.5 with cell1: one FP and one FN
    assert al.image_errors([shifted], gt[:1], labels[:1], h, w) == (0, 1, 1)
    assert al.image_errors([], gt, labels, h, w) == (0, 0, 2)


def synthetic_rows() -> list[dict]:
    """random reaches F1 0.8 with 30 added images; uncertainty gets there at 15; slow never does."""
    curves = {"random": [0.5, 0.6, 0.7, 0.8], "uncertainty": [0.5, 0.7, 0.9, 0.9], "slow": [0.5, 0.55, 0.6, 0.65]}
    rows = []
    for strategy, f1 in curves.items():
        for seed, noise in ((0, -0.02), (1, 0.02)):
            for cycle, y in enumerate(f1):
                per_image = {"random": 2, "uncertainty": 4, "slow": 1}[strategy]
                corr = 10 * cycle * per_image + (seed if cycle else 0)
                rows.append({"strategy": strategy, "seed": seed, "cycle": cycle, "added_images": 10 * cycle,
                             "added_corrections": corr, "F1": y + (noise if cycle else 0)})
    return rows


def test_mean_curve_and_labels_to_reach():
    rows = synthetic_rows()
    xs, mean, std = al.mean_curve(rows, "random", "added_images")
    assert xs.tolist() == [0, 10, 20, 30] and mean == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert std[0] == 0 and std[1] == pytest.approx(0.04 / math.sqrt(2))
    xs, _, _ = al.mean_curve(rows, "random", "added_corrections")
    assert xs.tolist() == [0, 20.5, 40.5, 60.5]  # x averaged over the seeds
    # a cycle only one seed has reached is left out
    partial = rows + [{"strategy": "random", "seed": 0, "cycle": 4, "added_images": 40, "added_corrections": 80,
                       "F1": 0.95}]
    assert al.mean_curve(partial, "random", "added_images")[0].tolist() == [0, 10, 20, 30]

    assert al.labels_to_reach([0, 10, 20], [0.5, 0.7, 0.9], 0.8) == pytest.approx(15)
    assert al.labels_to_reach([0, 10, 20], [0.5, 0.7, 0.9], 0.4) == 0
    assert al.labels_to_reach([0, 10, 20], [0.5, 0.7, 0.9], 0.95) is None
    assert al.labels_to_reach([0, 10, 20, 30], [0.5, 0.9, 0.6, 0.95], 0.8) == pytest.approx(7.5)  # the first crossing

    summary = {s["strategy"]: s for s in al.reach_summary(rows, ["random", "uncertainty", "slow"])}
    assert summary["random"]["target"] == pytest.approx(0.8)
    assert summary["random"]["images"] == pytest.approx(30) and summary["random"]["images_share"] == pytest.approx(1)
    assert summary["uncertainty"]["images"] == pytest.approx(15)
    assert summary["uncertainty"]["images_share"] == pytest.approx(0.5)
    # in corrections: uncertainty's images cost twice as much; reaches at 15 images ~ 60.5 corrections of 60.5
    assert summary["uncertainty"]["corrections_share"] == pytest.approx(1.0, abs=0.01)
    assert summary["slow"]["images"] is None and summary["slow"]["images_share"] is None

    table = al.reach_table(rows, ["random", "uncertainty", "slow"])
    assert "| uncertainty | 0.900 ± 0.028 | 50 % (15 images) |" in table
    assert "| slow |" in table and "not reached" in table
    assert "Per seed" in table and "seed 1" in table
    with pytest.raises(ValueError, match="random"):
        al.reach_summary([r for r in rows if r["strategy"] != "random"], ["uncertainty"])


def test_plot_curves_writes_a_png(tmp_path):
    out = al.plot_curves(synthetic_rows(), ["random", "uncertainty", "slow"], tmp_path / "learning_curves.png")
    image = cv2.imread(str(out))
    assert image is not None and image.shape[:2] == (480, 1200)


def test_pool_counts_cells_and_writes_the_labelled_split(tmp_path):
    root = tmp_path / "dataset"
    for split, frame in (("train", 0), ("train", 1), ("val", 2), ("test", 3)):
        for k in range(2):
            name = f"t{frame:03d}_y0000_x{32 * k:04d}"
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "images" / split / f"{name}.png"), np.zeros((32, 32, 3), np.uint8))
            lines = ["0 0.1 0.1 0.4 0.1 0.4 0.4 0.1 0.4"] * (frame + k)
            (root / "labels" / split / f"{name}.txt").write_text("".join(f"{x}\n" for x in lines))
    (root / "dataset.yaml").write_text("path: .\ntrain: images/train\nval: images/val\ntest: images/test\n"
                                       "names: {0: nucleus}\n")
    pool = al.Pool(root / "dataset.yaml")
    assert pool.sizes == {"train": 4, "val": 2, "test": 2}
    # overlapping identical polygons: the rasterized truth keeps the last one
    assert pool.cells == {"t000_y0000_x0000.png": 0, "t000_y0000_x0032.png": 1, "t001_y0000_x0000.png": 1,
                          "t001_y0000_x0032.png": 1}
    data = pool.write_yaml(["t001_y0000_x0032.png", "t000_y0000_x0000.png"], tmp_path / "cycle1")
    spec = load_dataset_yaml(data)
    assert [p.name for p in spec.splits["train"]] == ["t000_y0000_x0000.png", "t001_y0000_x0032.png"]
    assert len(spec.splits["val"]) == len(spec.splits["test"]) == 2 and spec.names == {0: "nucleus"}


def test_synthetic_pool_has_the_kinds_in_their_shares_and_exact_labels(tmp_path):
    sizes = {"train": 10, "val": 2, "test": 5}
    data, describe = al.build_synthetic(tmp_path / "a", sizes)
    pool = al.Pool(data)
    assert pool.sizes == sizes
    kinds = [demo.synthetic_kind(n) for n in pool.paths]
    assert {k: kinds.count(k) for k in demo.SYNTHETIC_KINDS} == {"plain": 6, "droplets": 1, "crowded": 1, "dim": 1,
                                                               "blurred": 1} == describe["kinds"]["train"]
    assert describe["cells"]["train"] == sum(pool.cells.values()) > 0
    crowded = next(n for n in pool.paths if demo.synthetic_kind(n) == "crowded")
    plain = [pool.cells[n] for n in pool.paths if demo.synthetic_kind(n) == "plain"]
    assert pool.cells[crowded] > max(plain)  # 30-45 cells asked for vs the demo's 6-18
    # a dim image: the same cells and labels as the plain image of that rng, at an eighth of the contrast
    rng = lambda: np.random.default_rng([0, 7])  # noqa: E731
    dim, dim_polys = demo.synthetic_image("dim", rng())
    plain_img, plain_polys = demo.synthetic_image("plain", rng())
    assert all(np.array_equal(a, b) for a, b in zip(dim_polys, plain_polys)) and len(dim_polys) == len(plain_polys)
    assert dim.astype(float).std() < plain_img.astype(float).std() / 3
    # look-alike droplets: painted beside the same cells, unlabelled
    drops, drop_polys = demo.synthetic_image("droplets", rng())
    assert len(drop_polys) == len(plain_polys) and not np.array_equal(drops, plain_img)
    # deterministic: a second build writes the same images and labels
    again, _ = al.build_synthetic(tmp_path / "b", sizes)
    for split in sizes:
        for path in sorted((data.parent / "images" / split).iterdir()):
            twin = again.parent / "images" / split / path.name
            assert path.read_bytes() == twin.read_bytes()
            label = Path(str(path).replace("images", "labels")).with_suffix(".txt")
            assert label.read_text() == Path(str(twin).replace("images", "labels")).with_suffix(".txt").read_text()
    with pytest.raises(ValueError, match="unknown synthetic kind"):
        demo.synthetic_image("foggy", rng())


def test_kinds_table_gives_each_strategys_share_of_hard_picks():
    runs = {"random/0": {"picks": [["syn_0001_plain.png", "syn_0002_dim.png"], ["syn_0003_plain.png"]]},
            "random/1": {"picks": [["syn_0004_plain.png"]]},
            "uncertainty/0": {"picks": [["syn_0005_dim.png", "syn_0006_blurred.png"]]}}
    table = al.kinds_table(runs, ["random", "uncertainty"]).splitlines()
    assert table[2].startswith("| (pool) | | 60% | 10%")
    assert table[3] == "| random | 4 | 75% | 0% | 0% | 25% | 0% |"
    assert table[4] == "| uncertainty | 2 | 0% | 0% | 0% | 50% | 50% |"


def test_parse_flags(tmp_path):
    a = al.parse(["--quick"])
    assert (a.seeds, a.cycles, a.k, a.seed_size, a.epochs, a.train_frames) == ([0], 2, 4, 4, 1, "0-2")
    a = al.parse([])
    assert (a.seeds, a.cycles, a.k, a.epochs, a.arms) == ([0, 1, 2], 5, 12, 10, list(al.ARMS))
    assert al.parse(["--quick", "--k", "6", "--seeds", "3", "4"]).k == 6
    assert (a.dataset, a.imgsz) == ("hela", 320)
    assert al.parse(["--dataset", "synthetic"]).imgsz == 256 and al.parse(["--dataset", "synthetic",
                                                                           "--imgsz", "320"]).imgsz == 320
    assert al.parse(["--arms", "random", "random:guide", "random"]).arms == ["random", "random:guide"]
    for bad in (["--arms", "uncertainty"], ["--arms", "random", "diverse"], ["--k", "0"], ["--imgsz", "300"],
                ["--seed-model", str(tmp_path / "missing.ckpt")]):
        with pytest.raises(SystemExit):
            al.parse(bad)


def test_cycle_table_flags_a_cycle_that_loses_f1():
    rows = []
    for seed, noise in ((0, -0.01), (1, 0.01)):
        for cycle, (f1, promoted) in enumerate(((0.90, ""), (0.88, False), (0.93, True))):
            rows.append({"strategy": "random", "seed": seed, "cycle": cycle, "labelled_images": 20 + 10 * cycle,
                         "F1": f1 + noise, "mAP50-95": 0.7, "deployed_F1": max(0.90, f1) + noise,
                         "promoted": promoted})
    table = al.cycle_table(rows, ["random"])
    assert "| random | 1 | 30 | 0.880 ± 0.014 | 0.700 ± 0.000 | 0.900 ± 0.014 | 0/2 |" in table
    assert "| random | 2 | 40 | 0.930 ± 0.014 | 0.700 ± 0.000 | 0.930 ± 0.014 | 2/2 |" in table
    assert table.endswith("fell below the cycle before: random cycle 1 (-0.020)")
    assert al.cycle_table(rows[:1] + rows[3:4], ["random"]).endswith("cycle before: none")


def test_prepare_out_refuses_a_foreign_folder_and_resume_keeps_a_run(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="--out"):
        al.prepare_out(tmp_path, resume=False)
    fresh = tmp_path / "bench"
    al.prepare_out(fresh, resume=False)
    (fresh / "runs").mkdir()
    al.prepare_out(fresh, resume=True)
    assert (fresh / "runs").exists()
    al.prepare_out(fresh, resume=False)
    assert not (fresh / "runs").exists()
