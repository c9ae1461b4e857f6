"""Every model family cellseg_pl trains: YOLOv8/11/12 (``Segment`` head) and YOLO26 (end-to-end ``Segment26``).

YOLO26's loss is Ultralytics' ``E2ELoss(SegmentLoss26)``: a one-to-many and a one-to-one branch whose weights move
from 0.8/0.2 to 0.1/0.9 over the run, plus a semantic-mask loss. These tests hold our criterion to Ultralytics' own
in every epoch, and take a YOLO26 model through fit, export, Ultralytics' predict and val, and fine-tuning.
"""

from __future__ import annotations

import csv

import pytest
import torch

from cellseg_pl.__main__ import main
from cellseg_pl.data.dataset import Collate
from cellseg_pl.yolo.loss import attach_loss, semantic_targets
from cellseg_pl.yolo.network import build_network

from conftest import calibrate_batchnorm, fit_args
from test_model import dense_batch


def two_class_batch(tmp_path, overlap: bool = True) -> dict:
    batch = Collate(4, overlap_mask=overlap)(dense_batch(tmp_path, n_cells=8, size=64, images=2))
    batch["img"] = batch["img"].float() / 255
    batch["cls"] = (torch.arange(len(batch["cls"])) % 2).float().view(-1, 1)  # cells and droplets, alternating
    return batch


def ultralytics_semantic_targets(batch: dict) -> torch.Tensor:
    """``batch["sem_masks"]`` as Ultralytics' ``Format`` builds it from an instance map (``mask_overlap``)."""
    out = []
    for i, ids in enumerate(batch["masks"]):
        classes = batch["cls"].view(-1)[batch["batch_idx"].view(-1) == i]
        out.append(classes[ids.long() - 1])  # (uncovered pixels take the last class: the loss ignores them)
    return torch.stack(out).float()


@pytest.mark.parametrize("chunked", [False, True])
def test_yolo26_loss_is_ultralytics_e2e_loss_in_every_epoch(tmp_path, chunked):
    torch.manual_seed(0)
    batch = two_class_batch(tmp_path)
    net = build_network("yolo26n-seg.yaml", 2)
    preds = net(batch["img"])
    ours = attach_loss(net, epochs=10, chunked_mask_loss=chunked)
    assert ours.names == ("box_loss", "seg_loss", "cls_loss", "l1_loss", "sem_loss")
    reference = net.init_criterion()  # Ultralytics' criterion for this network (reads net.args: epochs 10)
    theirs_batch = {**batch, "sem_masks": ultralytics_semantic_targets(batch)}
    for epoch in (0, 1, 5, 9):
        while reference.updates < epoch:  # Ultralytics' trainer: one update() at the end of every epoch
            reference.update()
        loss_u, parts_u = reference(preds, theirs_batch)
        loss, parts = ours(preds, batch, epoch=epoch)
        torch.testing.assert_close(loss, loss_u.sum(), rtol=1e-5, atol=0)
        for k in ours.names:
            torch.testing.assert_close(parts[k], parts_u[k], rtol=1e-5, atol=0)
        assert ours.one_to_many_weight(epoch) == pytest.approx(reference.o2m)
    assert parts["sem_loss"] > 0 and parts["seg_loss"] > 0
    assert ours.one_to_many_weight(0) == pytest.approx(0.8) and ours.one_to_many_weight(9) == pytest.approx(0.1)
    # Ultralytics' resume rebuilds the criterion and sets updates = start_epoch - 1, then update(): the same weight
    resumed = net.init_criterion()
    resumed.updates = 6 - 1
    resumed.update()
    assert ours.one_to_many_weight(6) == pytest.approx(resumed.o2m)
    loss.backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if p.requires_grad), "a head never trained"


def test_semantic_targets_give_each_pixel_its_instance_class(tmp_path):
    for overlap in (True, False):
        (tmp_path / str(overlap)).mkdir()
        batch = two_class_batch(tmp_path / str(overlap), overlap)
        sem = semantic_targets(batch, overlap)
        assert sem.shape == (2, 16, 16)
        if overlap:
            covered = batch["masks"] > 0
            torch.testing.assert_close(sem[covered], ultralytics_semantic_targets(batch)[covered])
            assert (sem[~covered] == 0).all()
    # binary masks (no overlap): where two instances overlap, the smaller wins, as Ultralytics' Format
    masks = torch.zeros(2, 8, 8)
    masks[0, 0:6, 0:6] = 1  # large, class 0
    masks[1, 4:6, 4:6] = 1  # small, class 1, inside the large one
    batch = {"masks": masks, "cls": torch.tensor([[0.0], [1.0]]), "batch_idx": torch.zeros(2),
             "img": torch.zeros(1, 3, 32, 32)}
    sem = semantic_targets(batch, overlap=False)[0]
    assert sem[4:6, 4:6].eq(1).all() and sem[0:4, 0:4].eq(0).all() and sem[7, 7] == 0


def test_yolo11_12_and_26_report_their_own_loss_parts():
    for yaml, names in (("yolov8n-seg.yaml", ("box_loss", "seg_loss", "cls_loss", "dfl_loss")),
                        ("yolo11n-seg.yaml", ("box_loss", "seg_loss", "cls_loss", "dfl_loss")),
                        ("yolo26n-seg.yaml", ("box_loss", "seg_loss", "cls_loss", "l1_loss", "sem_loss"))):
        criterion = attach_loss(build_network(yaml, 1))
        assert criterion.names == names
        assert criterion.one_to_many_weight(3) == (1.0 if "26" not in yaml else pytest.approx(0.8 - 0.7 * 3 / 99))


@pytest.mark.slow
@pytest.mark.parametrize("yaml", ["yolo11n-seg.yaml", "yolo12n-seg.yaml", "yolo26n-seg.yaml"])
def test_fit_export_ultralytics_predict_and_val_then_fine_tune(tiny_data, tmp_path, monkeypatch, yaml):
    """fit -> export -> Ultralytics' predict (same detections) and val -> our predict -> fine-tune from the .pt,
    for each family beside YOLOv8 (which ``test_export.py`` covers)."""
    from test_export import compare, ours, theirs

    from cellseg_pl.train.export import export_model

    monkeypatch.chdir(tmp_path)  # anything Ultralytics writes stays here
    assert main(fit_args(tiny_data, tmp_path, "run", 1, "--model.model", yaml)) == 0
    with (tmp_path / "run" / "results.csv").open(newline="") as f:
        row = list(csv.DictReader(f))[-1]
    if "26" in yaml:
        assert float(row["train/l1_loss"]) > 0 and float(row["train/sem_loss"]) > 0 and "train/dfl_loss" not in row
    else:
        assert float(row["train/dfl_loss"]) > 0 and "train/sem_loss" not in row
    ckpt = tmp_path / "run" / "weights" / "best.ckpt"
    calibrate_batchnorm(ckpt, sorted((tiny_data.parent / "images").rglob("*.png")))

    # the exported .pt predicts in Ultralytics what we predict: same detections, scores, masks
    pt = export_model(ckpt, tmp_path / "models" / "cells.pt")
    val_images = tiny_data.parent / "images" / "val"
    mine, results = ours(ckpt, tiny_data, val_images), theirs(pt, val_images)
    stats = compare(mine, results)
    assert stats["n"] > 0 and stats["box_diff"] < 1e-2 and stats["iou_min"] >= 0.99, stats
    scores = sorted(float(s) for m in mine for s in m["scores"])
    assert max(abs(a - b) for a, b in zip(scores, sorted(float(s) for r in results for s in r.boxes.conf))) < 0.01

    # `yolo segment val model=cells.pt` (data and imgsz from the file)
    from ultralytics import YOLO

    metrics = YOLO(str(pt)).val(batch=4, device="cpu", plots=False, workers=0, project=str(tmp_path), name="val")
    assert 0.0 <= metrics.seg.map50 <= 1.0
    # our predict, and fine-tuning from the exported .pt
    assert main(["predict", "--model", str(pt), "--images", str(val_images), "--output", str(tmp_path / "p.json")]) == 0
    assert main(fit_args(tiny_data, tmp_path, "tuned", 1, "--model.model", str(pt))) == 0
    tuned = torch.load(tmp_path / "tuned" / "weights" / "last.ckpt", weights_only=True)
    head = {"yolo11n-seg.yaml": "Segment", "yolo12n-seg.yaml": "Segment", "yolo26n-seg.yaml": "Segment26"}[yaml]
    assert tuned["hyper_parameters"]["model_yaml"]["head"][-1][2] == head
