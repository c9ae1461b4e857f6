"""Tests of cellseg_pl.infer.select: uncertainty ranking for active learning, its outputs and its command line.

A trained network is not available in tests: :class:`DemoCellNet` stands in. It finds the demo images' dark cells by
thresholding the contrast to a smoothed background and emits them as raw YOLOv8-seg head output (like
``tests/test_predict.py``'s ``BlobNet``), so the real path runs (``Predictor`` -> NMS -> masks at the original size
-> scores). Its confidence behaves like a detector's: high for crisp, high-contrast cells, lower where noise
swamps the contrast or blur softens the rims. It is flip-equivariant, so the flip terms of the score must be 0.
"""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

import cellseg_pl.infer.select as select_mod
from cellseg_pl.data.demo import make_image
from cellseg_pl.infer.engine import Instance
from cellseg_pl.__main__ import main as cellseg_main
from cellseg_pl.errors import PredictError
from cellseg_pl.infer.select import flip_disagreement, image_uncertainty, select_images, unflip


class DemoCellNet(nn.Module):
    """Stands in for a trained YOLOv8-seg on demo-style images (see the module docstring); at most 32 cells."""

    def __init__(self) -> None:
        super().__init__()
        self.names = {0: "cell"}
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.weight = nn.Parameter(torch.zeros(1))  # so .to(device) has something to move

    def forward(self, x: torch.Tensor):
        b, _, s, _ = x.shape
        m = s // 4
        det = torch.zeros(b, 4 + 1 + 32, 32)
        proto = torch.full((b, 32, m, m), -1.0)
        for i in range(b):
            gray = x[i].mean(0).cpu().numpy().astype(np.float64)
            smooth = ndimage.gaussian_filter(gray, 1.5)
            darker = ndimage.gaussian_filter(gray, 20) - smooth  # cells are darker than the background
            grad = np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1)) / 8
            residual = gray - smooth
            noise = 1.4826 * np.median(np.abs(residual - np.median(residual)))
            labels, n = ndimage.label(darker > 0.08, structure=np.ones((3, 3)))
            areas = ndimage.sum_labels(np.ones_like(gray), labels, index=np.arange(1, n + 1))
            keep = [k for k in np.argsort(-areas, kind="stable") if areas[k] >= 20][:32]
            for j, k in enumerate(keep):
                blob = labels == k + 1
                ys, xs = np.nonzero(blob)
                x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
                contrast = darker[blob].mean()
                rim = blob & ~ndimage.binary_erosion(blob)
                sharpness = min(1.0, grad[rim].mean() * 4 / contrast)  # ~1 for a crisp rim, lower when blurred
                det[i, :4, j] = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dtype=torch.float32)
                det[i, 4, j] = float((1 - np.exp(-contrast / (noise + 0.005) / 3)) * sharpness)
                det[i, 5 + j, j] = 1.0
                proto[i, j] = torch.from_numpy(blob.reshape(m, 4, m, 4).mean((1, 3)) * 2 - 1)
        return (det.to(x.device), proto.to(x.device)), {}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Two clean demo images, and a noisy and a blurred copy of the first (sub-folders ``clean/`` and ``bad/``)."""
    root = tmp_path_factory.mktemp("pool") / "pool"
    (root / "clean").mkdir(parents=True)
    (root / "bad").mkdir()
    rng = np.random.default_rng(3)
    for k in range(2):
        image, _ = make_image(rng, size=256)
        cv2.imwrite(str(root / "clean" / f"{k}.png"), image)
        if k == 0:
            noisy = image + np.random.default_rng(0).normal(0, 35, image.shape)
            cv2.imwrite(str(root / "bad" / "noisy.png"), np.clip(noisy, 0, 255).astype(np.uint8))
            cv2.imwrite(str(root / "bad" / "blurred.png"), cv2.GaussianBlur(image, (0, 0), 3))
    return root


def read_csv(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------- the score


def test_noisy_and_blurred_images_rank_above_clean_ones(pool, tmp_path):
    summary = select_images(DemoCellNet(), pool, 2, tmp_path / "next_batch.txt", imgsz=256)
    ranked = [r.file for r in summary.ranked]
    assert ranked[:2] == ["bad/noisy.png", "bad/blurred.png"], [(r.file, round(r.score, 3)) for r in summary.ranked]
    assert summary.selected == ranked[:2]
    scores = {r.file: r for r in summary.ranked}
    assert scores["bad/blurred.png"].score > 2 * max(scores["clean/0.png"].score, scores["clean/1.png"].score)
    for r in summary.ranked:  # a flip-equivariant network: the views agree exactly, so unflip is right
        assert r.flip_mask_disagreement == pytest.approx(0, abs=1e-9) and r.flip_count_disagreement == 0
        assert r.detections >= 4


def test_score_formula():
    def inst(score: float, x0: int = 10) -> Instance:
        return Instance(score, 0, x0, 10, np.ones((10, 10), bool))

    same = [inst(0.9), inst(0.5, 40)]
    r = image_uncertainty("a.png", [same, same, same], borderline=0.6)
    assert (r.low_confidence, r.borderline_share, r.flip_mask_disagreement) == pytest.approx((0.3, 0.5, 0.0))
    assert r.score == pytest.approx((0.3 + 0.5) / 4) and r.detections == 2 and r.mean_score == pytest.approx(0.7)
    assert image_uncertainty("a.png", [same]).score == pytest.approx((0.3 + 0.5) / 2)  # without TTA
    nothing = image_uncertainty("b.png", [[], [], []])
    assert nothing.low_confidence == 1 and nothing.score == pytest.approx(0.25)
    # one view shifted by 5 px (IoU 50/150 = 1/3) and missing the second cell
    mask_d, count_d = flip_disagreement(same, [inst(0.9, 15)])
    assert mask_d == pytest.approx(1 - (1 / 3) / 2) and count_d == pytest.approx(0.5)
    weighted = image_uncertainty("a.png", [same, [inst(0.9, 15)]], weights=(0, 0, 1, 0))
    assert weighted.score == pytest.approx(mask_d)


def test_unflip_maps_back_to_the_original_image():
    h, w = 30, 40
    mask = np.zeros((h, w), bool)
    mask[3:9, 5:20] = True
    mask[3, 5] = False  # not symmetric
    for axis in (0, 1):
        flipped = np.flip(mask, axis)
        ys, xs = np.nonzero(flipped)
        crop = flipped[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        back = unflip(Instance(0.9, 0, int(xs.min()), int(ys.min()), crop), h, w, axis)
        assert (back.full_mask(h, w) == mask).all()


# ---------------------------------------------------------------------------------------------- outputs


def test_list_csv_copies_and_predictions(pool, tmp_path):
    out, copies, preds = tmp_path / "cycle1" / "next_batch.txt", tmp_path / "subset", tmp_path / "preds.json"
    summary = select_images(DemoCellNet(), pool, 2, out, copy_to=copies, predictions=preds, imgsz=256)
    assert out.read_text().splitlines() == summary.selected == ["bad/noisy.png", "bad/blurred.png"]
    rows = read_csv(out.with_suffix(".csv"))
    assert [r["file"] for r in rows] == [r.file for r in summary.ranked] and len(rows) == 4
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"] and [r["selected"] for r in rows] == ["1", "1", "0", "0"]
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)
    for rel in summary.selected:  # sub-folders kept, bytes unchanged
        assert (copies / rel).read_bytes() == (pool / rel).read_bytes()
    assert sorted(p.relative_to(copies).as_posix() for p in copies.rglob("*") if p.is_file()) == sorted(
        summary.selected
    )
    coco = json.loads(preds.read_text())
    assert sorted(im["file_name"] for im in coco["images"]) == sorted(summary.selected)
    assert len(coco["annotations"]) == summary.predictions.instances_written > 0
    assert [c["name"] for c in coco["categories"]] == ["cell"]
    assert "copied 2 images" in summary.format() and "predictions:" in summary.format()


def test_copies_never_overwrite(pool, tmp_path):
    copies = tmp_path / "subset"
    (copies / "bad").mkdir(parents=True)
    (copies / "bad" / "noisy.png").write_bytes((pool / "bad" / "noisy.png").read_bytes())  # identical: kept
    summary = select_images(DemoCellNet(), pool, 2, tmp_path / "a.txt", copy_to=copies, imgsz=256)
    assert summary.copied == 1 and summary.already_there == 1 and (copies / "bad" / "blurred.png").is_file()

    other = tmp_path / "other"
    (other / "bad").mkdir(parents=True)
    (other / "bad" / "blurred.png").write_bytes(b"someone else's file")
    with pytest.raises(PredictError, match="already exists and differs"):
        select_images(DemoCellNet(), pool, 2, tmp_path / "b.txt", copy_to=other, imgsz=256)
    assert (other / "bad" / "blurred.png").read_bytes() == b"someone else's file"
    assert not (other / "bad" / "noisy.png").exists() and not (tmp_path / "b.txt").exists()  # nothing written


def test_exclude_skips_images_selected_before(pool, tmp_path):
    first = select_images(DemoCellNet(), pool, 2, tmp_path / "cycle1.txt", imgsz=256)
    second = select_images(DemoCellNet(), pool, 2, tmp_path / "2.txt", imgsz=256, exclude=[tmp_path / "cycle1.txt"])
    assert not set(first.selected) & set(second.selected)
    everything = sorted(p.relative_to(pool).as_posix() for p in pool.rglob("*.png"))
    assert sorted(first.selected + second.selected) == everything
    assert second.excluded == 2 and "2 excluded" in second.format()


# ---------------------------------------------------------------------------------------------- command line


def test_command_line(pool, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(select_mod, "load_network", lambda model, imgsz, overlap=None: (DemoCellNet(), {0: "cell"}, 256))
    out = tmp_path / "next_batch.txt"
    args = ["select", "--model", "m.pt", "--pool", str(pool), "--k", "1", "--output", str(out), "--no-tta"]
    assert cellseg_main(args) == 0
    stdout = capsys.readouterr().out
    assert "selected 1" in stdout and "without flip" in stdout and out.read_text() == "bad/noisy.png\n"
    assert cellseg_main(args) == 2  # the list exists now
    assert "--overwrite" in capsys.readouterr().err
    assert cellseg_main([*args, "--overwrite"]) == 0
    first, second = tmp_path / "cycle1.txt", tmp_path / "cycle2.txt"
    first.write_text("bad/noisy.png\n")
    second.write_text("bad/blurred.png\n")
    again = ["select", "--model", "m.pt", "--pool", str(pool), "--k", "1", "--output", str(tmp_path / "c3.txt"),
             "--no_tta", "--exclude", str(first), f"--exclude={second}", "--batch-size", "2"]  # fmt: skip
    assert cellseg_main(again) == 0  # a repeated --exclude adds up, as argparse's append did
    assert "2 excluded" in capsys.readouterr().out


def test_bad_inputs_give_one_error_line(pool, tmp_path, capsys):
    out = tmp_path / "n.txt"
    (tmp_path / "empty").mkdir()
    base = ["--model", str(tmp_path / "no.pt"), "--pool", str(pool), "--output", str(out)]
    cases = [
        (base, ["no.pt", "does not exist"]),
        (["--model", "m.pt", "--pool", str(tmp_path / "nothere"), "--output", str(out)], ["nothere", "does not exist"]),
        (["--model", "m.pt", "--pool", str(tmp_path / "empty"), "--output", str(out)], ["empty", "no images"]),
        ([*base, "--k", "0"], ["--k", "0"]),
        ([*base[:-1], str(tmp_path / "n.csv")], ["--output", ".csv"]),
        ([*base, "--copy-to", str(pool / "new")], ["--copy-to", "inside --pool"]),
        ([*base, "--exclude", str(tmp_path / "old.txt")], ["old.txt", "does not exist"]),
        ([*base, "--borderline", "0.2"], ["--borderline"]),
        ([*base, "--conf", "2"], ["--conf"]),
        ([*base, "--device", "tpu"], ["--device", "tpu"]),
    ]
    for args, needles in cases:
        code = cellseg_main(["select", *args])
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if line.strip()]  # log lines may come first
        assert code == 2 and [x for x in lines if x.startswith("error")] == lines[-1:], (args, err)
        assert lines[-1].startswith("error: ") and "Traceback" not in err, (args, err)
        for needle in needles:
            assert needle in lines[-1], (needle, lines[-1])
    assert not out.exists() and not out.with_suffix(".csv").exists()


def test_image_over_the_opencv_pixel_limit_is_skipped_and_counted(pool, tmp_path, caplog):
    import shutil

    from conftest import huge_png

    folder = tmp_path / "pool"
    shutil.copytree(pool, folder)
    (folder / "clean" / "slide.png").write_bytes(huge_png(33000, 33000))  # over OpenCV's 2^30 px
    summary = select_images(DemoCellNet(), folder, 2, tmp_path / "next.txt", imgsz=256)
    assert summary.unreadable == ["clean/slide.png"]
    assert sorted(r.file for r in summary.ranked) == sorted(
        p.relative_to(pool).as_posix() for p in pool.rglob("*.png")
    )  # every good image of the pool is scored
    assert summary.selected == ["bad/noisy.png", "bad/blurred.png"]
    assert "skipped 1 images that cannot be decoded (e.g. clean/slide.png" in summary.format()
    warning = [r.getMessage() for r in caplog.records if "slide.png" in r.getMessage()]
    assert len(warning) == 1 and "33000x33000 px" in warning[0] and "CV_IO_MAX_IMAGE_PIXELS" in warning[0]
