"""benchmarks/real_cells.py: the data-building steps on a tiny synthetic label stack (no download, no training)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

from benchmarks import real_cells as bench

from cellseg_pl.cvat.coco import rle_to_mask  # noqa: E402
from cellseg_pl.cvat.convert import convert_coco_zip  # noqa: E402
from cellseg_pl.data.dataset import load_dataset_yaml, rasterize, read_label  # noqa: E402
from cellseg_pl.data.labels import label_path_for  # noqa: E402


def synthetic_stack(frames: int = 3, h: int = 100, w: int = 150) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """16-bit frames with bright discs and their label images (one id per disc, a few cut by tile edges)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    images, labels = [], []
    for t in range(frames):
        lab = np.zeros((h, w), np.uint16)
        centres = [(20, 20), (25, 75), (70, 40), (60, 110), (48, 64), (85, 135)]
        for k, (cy, cx) in enumerate(centres, start=1):
            lab[(yy - cy - t) ** 2 + (xx - cx) ** 2 <= 9**2] = k
        img = (30000 + rng.integers(0, 200, (h, w)) + 5000 * (lab > 0)).astype(np.uint16)
        images.append(img)
        labels.append(lab)
    return images, labels


def test_to_uint8_stretches_percentiles():
    frame = np.linspace(30000, 40000, 10000).reshape(100, 100).astype(np.uint16)
    out = bench.to_uint8(frame)
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255


def test_uncompressed_rle_is_column_major_and_round_trips():
    mask = np.zeros((5, 4), bool)
    mask[0, 0] = mask[1:3, 2] = True
    rle = bench.uncompressed_rle(mask)
    assert rle["size"] == [5, 4] and sum(rle["counts"]) == 20
    assert rle["counts"][:2] == [0, 1]  # starts with an (empty) run of zeros, then pixel (0, 0)
    assert (rle_to_mask(rle, 5, 4) == mask).all()


def test_parse_frames():
    assert bench.parse_frames("0-2,5") == [0, 1, 2, 5]
    assert bench.parse_frames("13") == [13]
    assert bench.parse_frames("0-12/4") == [0, 4, 8, 12]
    with pytest.raises(ValueError, match="frame list"):
        bench.parse_frames("a-b")


def test_tiles_zip_convert_and_time_split(tmp_path):
    images, labels = synthetic_stack()
    tiles = [t for f in range(3) for t in bench.tile_frame(f, bench.to_uint8(images[f]), labels[f], 64, 8)]
    assert len(tiles) == 3 * 2 * 3  # 100 x 150 px -> 2 rows x 3 columns of 64 px windows per frame
    assert all(t.image.shape == t.labels.shape == (64, 64) for t in tiles)
    for t in tiles:  # fragments under MIN_FRAGMENT_PX are dropped, the rest kept clipped
        _, counts = np.unique(t.labels[t.labels > 0], return_counts=True)
        assert (counts >= bench.MIN_FRAGMENT_PX).all()

    zip_path = tmp_path / "tiles.zip"
    written = bench.write_cvat_zip(tiles, zip_path)
    with zipfile.ZipFile(zip_path) as zf:
        coco = json.loads(zf.read("annotations/instances_default.json"))
        assert all(f"images/default/{im['file_name']}" in zf.namelist() for im in coco["images"])
    kinds = {a["iscrowd"] for a in coco["annotations"]}
    assert kinds == {0, 1} and written["polygons"] and written["rles"]
    for a in coco["annotations"]:
        if a["iscrowd"]:
            assert isinstance(a["segmentation"]["counts"], list)  # uncompressed, as CVAT exports masks
    n_nuclei = sum(len(np.unique(t.labels)) - 1 for t in tiles)
    assert len(coco["annotations"]) == n_nuclei

    summary = convert_coco_zip(zip_path, tmp_path / "dataset")
    assert summary.instances_written == n_nuclei
    data = bench.split_by_frame(tmp_path / "dataset", {"train": [0], "val": [1], "test": [2]})
    spec = load_dataset_yaml(data)
    assert {k: len(v) for k, v in spec.splits.items()} == {"train": 6, "val": 6, "test": 6}
    for split, frame in (("train", 0), ("val", 1), ("test", 2)):
        assert {bench.frame_of(p.name) for p in spec.splits[split]} == {frame}
    by_name = {t.name: t for t in tiles}
    for path in spec.splits["test"]:  # the labels the scorer reads are the tile's nuclei
        classes, polygons, _ = read_label(label_path_for(path), 1)
        truth = by_name[path.name].labels
        assert len(polygons) == len(np.unique(truth)) - 1
        inst, _ = rasterize(polygons, *truth.shape)
        both, either = ((inst > 0) & (truth > 0)).sum(), ((inst > 0) | (truth > 0)).sum()
        assert either == 0 or both / either > 0.9
    assert not (tmp_path / "dataset" / "images" / "_all").exists()


def test_parse_flags():
    a = bench.parse(["--quick"])
    assert (a.epochs, a.seeds, a.train_frames, a.test_frames) == (3, [0], "0-2", "16")
    a = bench.parse([])
    assert a.seeds == [0, 1, 2] and a.nbs == 64 and a.tile == a.imgsz == 320
    with pytest.raises(SystemExit):
        bench.parse(["--imgsz", "300"])
    with pytest.raises(SystemExit):
        bench.parse(["--test-data", "x.zip"])


def test_small_preset_is_the_labs_regime_and_flags_win():
    a = bench.parse(["--preset", "small"])
    assert (a.tile, a.imgsz, a.batch, a.epochs, a.close_mosaic, a.patience) == (256, 256, 4, 150, 10, 20)
    assert (a.train_tiles, a.val_tiles, a.seeds) == (20, 8, [0, 1, 2, 3, 4])
    a = bench.parse(["--preset", "small", "--epochs", "40", "--seeds", "7"])
    assert (a.epochs, a.seeds, a.patience) == (40, [7], 20)
    assert bench.parse([]).patience is None  # the standard run never stops early
    cmd = bench.worker_cmd(bench.parse(["--preset", "small"]), "cellseg_pl", 3, Path("d.yaml"), Path("o"), Path("r"))
    assert cmd[cmd.index("--patience") + 1] == "20" and cmd[cmd.index("--seeds") + 1] == "3"
    assert bench.parse(bench.worker_cmd(bench.parse(["--preset", "small"]), "ultralytics", 0, Path("d.yaml"),
                                        Path("o"), Path("r"))[3:]).patience == 20


def test_subsample_draws_a_fixed_share_of_each_split():
    tiles = [bench.Tile(f"t{f:03d}_y0000_x{k:04d}.png", f, None, None) for f in range(5) for k in range(6)]
    frames = {"train": [0, 1, 2], "val": [3], "test": [4]}
    kept = bench.subsample(tiles, frames, {"train": 5, "val": 2}, seed=0)
    assert [sum(t.frame in fs for t in kept) for fs in frames.values()] == [5, 2, 6]  # test: all
    assert kept == sorted(kept, key=tiles.index)  # in their order
    assert kept == bench.subsample(tiles, frames, {"train": 5, "val": 2}, seed=0)  # the same for every run
    assert kept != bench.subsample(tiles, frames, {"train": 5, "val": 2}, seed=1)
    assert bench.subsample(tiles, frames, {"train": 0, "val": 99}, seed=0) == tiles


def test_cellseg_args_reach_our_runs_only(tmp_path, monkeypatch):
    a = bench.parse(["--cellseg-args=--data.mask_ratio 2 --model.lr0 '0.005'", "--trainers", "cellseg_pl"])
    assert a.cellseg_args == ["--data.mask_ratio", "2", "--model.lr0", "0.005"] and a.trainers == ["cellseg_pl"]
    ours = bench.worker_cmd(a, "cellseg_pl", 0, tmp_path / "d.yaml", tmp_path, tmp_path / "r.json")
    theirs = bench.worker_cmd(a, "ultralytics", 0, tmp_path / "d.yaml", tmp_path, tmp_path / "r.json")
    assert not any(arg.startswith("--cellseg-args") for arg in theirs)
    seen = []
    monkeypatch.setattr(bench, "run_cellseg", lambda knobs, out, extra_args=(): seen.append(extra_args) or {})
    assert bench.worker(bench.parse(ours[3:])) == 0  # the worker process splits the same flags back
    assert seen == [("--data.mask_ratio", "2", "--model.lr0", "0.005")]
    with pytest.raises(SystemExit):  # an unbalanced quote is refused before anything runs
        bench.parse(["--cellseg-args=--model.lr0 '0.001"])


def test_prepare_out_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="--out"):
        bench.prepare_out(tmp_path)
    assert (tmp_path / "precious.txt").exists()
    fresh = tmp_path / "bench"
    bench.prepare_out(fresh)
    (fresh / "data").mkdir()
    bench.prepare_out(fresh)  # its own earlier output is replaced
    assert not (fresh / "data").exists()


def test_workers_get_the_callers_omp_num_threads_not_ultralytics(monkeypatch):
    from benchmarks import common

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what importing Ultralytics (to score a model) leaves behind
    monkeypatch.setattr(common, "_CALLER_OMP_NUM_THREADS", None)
    assert "OMP_NUM_THREADS" not in common.worker_env()
    monkeypatch.setattr(common, "_CALLER_OMP_NUM_THREADS", "3")  # the caller's own choice is kept
    assert common.worker_env()["OMP_NUM_THREADS"] == "3"
