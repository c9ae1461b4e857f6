"""Parity with Ultralytics 8.4's trainer, measured against the real thing on the same tiny data.

* the optimization schedule: lr of every parameter group, momentum and accumulation at every iteration, the number
  of optimizer steps and EMA updates (Ultralytics' trainer is run and recorded through its callbacks);
* the training step itself: Ultralytics' own batches replayed through our LightningModule, from its initial
  weights and with our validation after every epoch, end in its weights;
* augmentation statistics: instances per mosaic sample and padding share of our train loader vs Ultralytics';
* mask targets: our loss targets vs ``polygons2masks_overlap`` for the same polygons, for small nuclei too.
"""

from __future__ import annotations


import numpy as np
import pytest


from benchmarks import parity_schedule as parity

EPOCHS, BATCH, NBS, IMGSZ = 4, 4, 16, 64


@pytest.fixture(scope="module")
def nine_images(tmp_path_factory):
    """9 training images: batches of 4, 4 and 1 (the final batch of one that Ultralytics keeps)."""
    from cellseg_pl.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("nine") / "data", n_train=9, n_val=2, size=IMGSZ, seed=3)


@pytest.mark.slow
def test_schedule_matches_ultralytics_iteration_by_iteration(nine_images, tmp_path):
    theirs = parity.record_ultralytics(nine_images, tmp_path, EPOCHS, IMGSZ, BATCH, NBS)
    ours = parity.record_cellseg(nine_images, tmp_path, EPOCHS, IMGSZ, BATCH, NBS)
    assert len(ours["rows"]) == len(theirs["rows"]) == EPOCHS * 3  # 9 images / batch 4: every image every epoch
    for i, ((lr_o, mom_o, acc_o), (lr_u, mom_u, acc_u)) in enumerate(zip(ours["rows"], theirs["rows"])):
        assert lr_o == pytest.approx(lr_u, rel=1e-6, abs=1e-12), i
        assert mom_o == pytest.approx(mom_u), i
        assert acc_o == acc_u, i
    assert ours["steps"] == theirs["steps"]  # the same iterations step the optimizer
    assert ours["ema_updates"] == theirs["ema_updates"] == len(theirs["steps"])  # one EMA update per step


@pytest.mark.slow
def test_ultralytics_batches_through_our_module_end_in_ultralytics_weights(nine_images, tmp_path):
    """Gradients accumulate to the nominal batch across epoch ends, through our validation (Lightning's default
    releases them before every validation: each step then saw only the batches since the last epoch end)."""
    from copy import deepcopy

    import lightning as L
    import torch
    import ultralytics.engine.trainer as trainer_module
    from ultralytics import YOLO
    from ultralytics.data.dataset import YOLODataset

    from cellseg_pl.data.datamodule import CellSegDataModule
    from cellseg_pl.train.module import CellSegModule

    trainer_module.check_amp = lambda *a, **k: True
    rec = {"batches": [], "on": False}
    collate = YOLODataset.collate_fn

    def recording(batch):
        out = collate(batch)
        if rec["on"]:
            rec["batches"].append(deepcopy(out))
        return out

    def start(tr):
        rec["init"] = deepcopy(tr.model.state_dict())

    def end(tr):
        rec["final"], rec["ema"] = deepcopy(tr.model.state_dict()), deepcopy(tr.ema.ema.state_dict())

    model = YOLO("yolov8n-seg.yaml", task="segment")
    for event, fn in (("on_train_start", start), ("on_train_end", end),
                      ("on_train_epoch_start", lambda tr: rec.update(on=True)),
                      ("on_train_epoch_end", lambda tr: rec.update(on=False))):
        model.add_callback(event, fn)
    YOLODataset.collate_fn = staticmethod(recording)
    try:
        model.train(data=str(nine_images), epochs=EPOCHS, imgsz=IMGSZ, batch=BATCH, nbs=NBS, workers=0, device="cpu",
                    project=str(tmp_path), name="u", exist_ok=True, seed=0, plots=False, val=False, verbose=False,
                    optimizer="auto", amp=False, close_mosaic=1)
    finally:
        YOLODataset.collate_fn = staticmethod(collate)
    assert len(rec["batches"]) == 3 * EPOCHS

    ours = CellSegModule(model="yolov8n-seg.yaml", num_classes=1, class_names={0: "cell"}, nbs=NBS)
    ours.net.load_state_dict(rec["init"])
    ours.ema.module.load_state_dict(rec["init"])
    batches = iter(rec["batches"])
    train = torch.utils.data.DataLoader(list(range(9)), batch_size=BATCH, collate_fn=lambda _: next(batches))
    val = CellSegDataModule(str(nine_images), imgsz=IMGSZ, batch_size=BATCH, num_workers=0).val_dataloader()
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(ours, train_dataloaders=train, val_dataloaders=val)
    for theirs, mine in ((rec["final"], ours.net.state_dict()), (rec["ema"], ours.ema.module.state_dict())):
        worst = max(float((mine[k] - v).abs().max() / (v.abs().max() + 1e-6)) for k, v in theirs.items()
                    if v.dtype.is_floating_point)
        # (AdamW turns float sums in another order into differences of ~0.15 % here; the gradients released at every
        # validation, as Lightning does by default, gave 128 %)
        assert worst < 0.01


# ------------------------------------------------------------------------------------------ augmentation statistics
STATS_RECIPE = dict(degrees=180.0, scale=0.5, flipud=0.5, fliplr=0.5, translate=0.1, copy_paste=0.0, hsv_h=0.0,
                    hsv_s=0.0, hsv_v=0.0)  # (HSV off: padding is counted as pixels of value 114)


@pytest.fixture(scope="module")
def stats_data(tmp_path_factory):
    from cellseg_pl.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("stats") / "data", n_train=32, n_val=2, size=256, seed=5)


def loader_stats(samples, imgsz: int) -> dict[str, float]:
    """Mean instances per sample, share of padding pixels, median box side (sqrt of box area, px)."""
    n, pad, side = [], [], []
    for s in samples:
        n.append(len(s["cls"]))
        pad.append(float((s["img"] == 114).all(0).float().mean()))
        side += ((s["bboxes"][:, 2] * s["bboxes"][:, 3]).sqrt() * imgsz).tolist()
    return {"instances": float(np.mean(n)), "padding": float(np.mean(pad)), "box_side": float(np.median(side))}


@pytest.mark.parametrize("mosaic,copy_paste", [(1.0, 0.0), (0.0, 0.0), (1.0, 0.3), (0.0, 0.3)])
def test_train_samples_carry_what_ultralytics_samples_carry(stats_data, mosaic, copy_paste):
    import random

    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    from cellseg_pl.data.datamodule import CellSegDataModule

    imgsz, n = 128, 64
    recipe = {**STATS_RECIPE, "mosaic": mosaic, "copy_paste": copy_paste}
    spec = check_det_dataset(str(stats_data), autodownload=False)
    theirs = build_yolo_dataset(get_cfg(overrides=dict(task="segment", imgsz=imgsz, **recipe)), spec["train"], 8,
                                spec, mode="train")
    random.seed(0)
    np.random.seed(0)
    u = loader_stats((theirs[i % len(theirs)] for i in range(n)), imgsz)
    ours = CellSegDataModule(str(stats_data), imgsz=imgsz, batch_size=8, num_workers=0, **recipe)
    ds = ours.split_dataset("train", train=True)
    o = loader_stats((ds[i % len(ds)] for i in range(n)), imgsz)
    # (measured with mosaic: Ultralytics 15.6 cells and 5 % padding per sample; before the mosaic canvas, ours had
    # 11.0 cells and 22 % padding. With copy_paste 0.3 Ultralytics' samples carry 22 % more cells (18.9, 200
    # samples); ours, pasting cells of other images into free space with probability 0.3, carried 3 % more (0.88x
    # theirs) until the flip mode made it the same algorithm: 1.04x)
    assert 0.85 <= o["instances"] / u["instances"] <= 1.15, (o, u)
    assert abs(o["padding"] - u["padding"]) < 0.04, (o, u)
    # the same zoom distribution; our boxes span the mask's pixels, Ultralytics' the polygon's vertices (which
    # run through the outline pixels' centres): ours are about one pixel wider
    assert 0 <= o["box_side"] - u["box_side"] <= 1.5, (o, u)


# ------------------------------------------------------------------------------------------ mask targets
def test_mask_targets_agree_with_ultralytics():
    """Our 1/4-resolution targets vs ``polygons2masks_overlap`` for the same polygons, per instance.

    Both resize each instance's full-resolution mask with linear interpolation (the loss trains masks towards that
    size, slightly larger than the polygon). Ultralytics truncates vertices to whole pixels (a shift of up to 1 px to
    the top-left) before drawing, ours keeps 1/16 px; that shift is what still tells them apart. (The "ideal" targets
    of a pixel-centre test, which matched the polygons better, trained worse: see
    :func:`cellseg_pl.data.dataset.mask_targets`.)
    """
    import cv2
    from ultralytics.data.utils import polygons2masks_overlap

    from cellseg_pl.data.dataset import Collate, finalize, rasterize

    size, ratio = 256, 4
    rng = np.random.default_rng(0)
    polys, circles = [], []
    while len(polys) < 40:  # non-overlapping nuclei of 3-16 px radius at sub-pixel positions
        rad, (cx, cy) = rng.uniform(3, 16), rng.uniform(20, size - 20, 2)
        if any(np.hypot(cx - a, cy - b) < rad + c + 3 for a, b, c in circles):
            continue
        circles.append((cx, cy, rad))
        t = np.linspace(0, 2 * np.pi, 33)[:-1]
        polys.append(np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], 1).astype(np.float32))
    inst, order = rasterize([p / size for p in polys], size, size)
    sample = finalize({"image": np.zeros((size, size, 3), np.uint8), "instances": inst,
                       "classes": np.zeros(len(polys), np.int64), "im_file": "x", "ori_shape": (size, size),
                       "ratio_pad": (1.0, (0, 0))})
    ours = Collate(ratio)([sample])["masks"][0].numpy()
    theirs, index = polygons2masks_overlap((size, size), [p.reshape(-1) for p in polys], downsample_ratio=ratio)

    def iou(a, b):
        return (a & b).sum() / max((a | b).sum(), 1)

    rows = []
    for k, poly in enumerate(polys):
        a = ours == int(np.nonzero(order == k)[0][0]) + 1
        b = theirs == int(np.nonzero(index == k)[0][0]) + 1
        rows.append((cv2.contourArea(poly), iou(a, b)))
    rows = np.array(rows)
    small = rows[:, 0] < 100
    assert small.sum() >= 5
    # measured: ours vs theirs 0.80 mean IoU under 100 px (the 1/4-px truncation shift weighs most there), 0.91 above;
    # in all, our targets hold 0.995 of their pixels
    assert rows[small, 1].mean() > 0.75 and rows[~small, 1].mean() > 0.88
    assert 0.97 < (ours > 0).sum() / (theirs > 0).sum() < 1.03
