"""The door to Ultralytics: the chunked mask loss gives Ultralytics' loss and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellseg_pl.data.dataset import Collate, YoloSegDataset
from cellseg_pl.yolo.loss import CroppedMaskLoss, _chunked_segmentation_loss_class, attach_loss
from cellseg_pl.yolo.network import build_network
from cellseg_pl.data.transforms import ValTransform


def dense_batch(tmp_path, n_cells: int = 60, size: int = 128, images: int = 2) -> list[dict]:
    """Samples of ``images`` images with ``n_cells`` small round cells each, through the training data path."""
    import cv2

    from cellseg_pl.data.demo import write_yolo_label

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    paths = []
    for k in range(images):
        img = np.full((size, size, 3), 90, np.uint8)
        grid = [(x, y) for y in range(6, size - 6, 13) for x in range(6, size - 6, 13)]
        polys = []
        for j in rng.choice(len(grid), n_cells, replace=False):
            cx, cy = grid[j] + rng.uniform(-1, 1, 2)
            r = rng.uniform(3, 5.5)
            t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
            poly = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
            cv2.fillPoly(img, [poly.round().astype(np.int32)], (200, 180, 170))
            polys.append(poly)
        cv2.imwrite(str(tmp_path / "images" / f"{k}.png"), img)
        write_yolo_label(tmp_path / "labels" / f"{k}.txt", polys, size, size)
        paths.append(tmp_path / "images" / f"{k}.png")
    ds = YoloSegDataset(paths, 1, imgsz=size, transform=ValTransform(size))
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("overlap", [True, False])
def test_chunked_mask_loss_equals_ultralytics(tmp_path, monkeypatch, overlap):
    monkeypatch.setattr(CroppedMaskLoss, "CHUNK_ELEMENTS", 1 << 13)  # many chunks even at 128 px
    monkeypatch.setattr(_chunked_segmentation_loss_class(), "DIRECT_ELEMENTS", 0)  # every image chunked
    torch.manual_seed(0)
    net = build_network("yolov8n-seg.yaml", 1)
    batch = Collate(4, overlap_mask=overlap)(dense_batch(tmp_path))
    batch["img"] = batch["img"].float() / 255
    preds = net(batch["img"])
    results = {}
    for chunked in (False, True):
        criterion = attach_loss(net, overlap_mask=overlap, chunked_mask_loss=chunked)
        loss, parts = criterion(preds, batch)
        grads = torch.autograd.grad(loss, [preds["mask_coefficient"], preds["proto"]], retain_graph=True)
        results[chunked] = (loss.detach(), parts, grads)
    (loss_u, parts_u, grads_u), (loss_c, parts_c, grads_c) = results[False], results[True]
    assert parts_u["seg_loss"] > 0
    torch.testing.assert_close(loss_c, loss_u, rtol=1e-5, atol=0)
    for key in parts_u:
        torch.testing.assert_close(parts_c[key], parts_u[key], rtol=1e-5, atol=0)
    for gc, gu in zip(grads_c, grads_u):
        assert gu.abs().max() > 0
        torch.testing.assert_close(gc, gu, rtol=1e-5, atol=1e-6 * float(gu.abs().max()))


def test_chunked_mask_loss_without_grad_and_without_cells(tmp_path, monkeypatch):
    monkeypatch.setattr(_chunked_segmentation_loss_class(), "DIRECT_ELEMENTS", 0)
    torch.manual_seed(0)
    net = build_network("yolov8n-seg.yaml", 1)
    samples = dense_batch(tmp_path, n_cells=12, size=64)
    criterion = attach_loss(net, chunked_mask_loss=True)
    reference = attach_loss(net, chunked_mask_loss=False)
    batch = Collate(4)(samples)
    batch["img"] = batch["img"].float() / 255
    with torch.no_grad():  # validation: the same value, no gradient work
        preds = net(batch["img"])
        torch.testing.assert_close(criterion(preds, batch)[0], reference(preds, batch)[0], rtol=1e-5, atol=0)
    empty = Collate(4)([{**s, "cls": s["cls"][:0], "bboxes": s["bboxes"][:0], "instances": s["instances"] * 0}
                        for s in samples])
    empty["img"] = empty["img"].float() / 255
    preds = net(empty["img"])
    loss, parts = criterion(preds, empty)
    loss.backward()  # background-only batch: a zero mask loss that still reaches every output
    assert parts["seg_loss"] == 0


def test_chunked_mask_loss_under_autocast(tmp_path, monkeypatch):
    """Mixed precision: the chunked loss computes in float32 and returns gradients in the inputs' dtype."""
    monkeypatch.setattr(_chunked_segmentation_loss_class(), "DIRECT_ELEMENTS", 0)
    torch.manual_seed(0)
    net = build_network("yolov8n-seg.yaml", 1)
    batch = Collate(4)(dense_batch(tmp_path, n_cells=30))
    batch["img"] = batch["img"].float() / 255
    with torch.autocast("cpu", dtype=torch.bfloat16):
        preds = net(batch["img"])
        inputs = [preds["mask_coefficient"], preds["proto"]]
        out = []
        for chunked in (False, True):
            loss, parts = attach_loss(net, chunked_mask_loss=chunked)(preds, batch)
            out.append((parts["seg_loss"], torch.autograd.grad(loss, inputs, retain_graph=True)))
    (seg_u, grads_u), (seg_c, grads_c) = out
    torch.testing.assert_close(seg_c, seg_u, rtol=1e-3, atol=0)  # Ultralytics' einsum runs in bfloat16 here
    for gc, gu, x in zip(grads_c, grads_u, inputs):
        assert gc.dtype == x.dtype == torch.bfloat16
        assert float((gc.float() - gu.float()).abs().max()) < 0.02 * float(gu.float().abs().max())


def test_sparse_images_take_ultralytics_path_dense_ones_the_chunked_one(tmp_path, monkeypatch):
    """Below ``DIRECT_ELEMENTS`` (anchors x mask pixels) an image takes Ultralytics' own loss (faster there)."""
    torch.manual_seed(0)
    net = build_network("yolov8n-seg.yaml", 1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sparse = dense_batch(tmp_path / "a", n_cells=3)[:1]
    dense = dense_batch(tmp_path / "b", n_cells=60)[:1]
    batch = Collate(4)(sparse + dense)
    batch["img"] = batch["img"].float() / 255
    preds = net(batch["img"])
    reference = attach_loss(net, chunked_mask_loss=False)(preds, batch)[1]["seg_loss"]
    calls = []
    real_apply = CroppedMaskLoss.apply
    monkeypatch.setattr(CroppedMaskLoss, "apply", lambda *a: calls.append(a[0].shape[0]) or real_apply(*a))
    monkeypatch.setattr(_chunked_segmentation_loss_class(), "DIRECT_ELEMENTS", 200 * 32 * 32)
    parts = attach_loss(net, chunked_mask_loss=True)(preds, batch)[1]
    assert len(calls) == 1 and calls[0] > 200  # only the dense image went through the chunked loss
    torch.testing.assert_close(parts["seg_loss"], reference, rtol=1e-5, atol=0)


@pytest.mark.parametrize("yaml", ["yolo11n-seg.yaml", "yolo12n-seg.yaml"])
def test_yolo11_and_yolo12_seg_train_a_step(yaml, tmp_path):
    batch = Collate(4)(dense_batch(tmp_path, n_cells=8, size=64, images=2))
    batch["img"] = batch["img"].float() / 255
    net = build_network(yaml, 1)
    loss, parts = attach_loss(net)(net(batch["img"]), batch)
    assert torch.isfinite(loss) and float(loss) > 0
    loss.backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("yaml, what", [
    ("yolov8n.yaml", "a detection model (Detect)"),
    ("yolo26n-pose.yaml", "a pose model (Pose26)"),
    ("yolov8n-cls.yaml", "a classification model (Classify)"),
    ("yoloe-11s-seg.yaml", "does not build as a segmentation model"),
])  # fmt: skip
def test_models_we_do_not_train_are_one_line_naming_the_flag(yaml, what):
    from cellseg_pl.errors import ModelError

    with pytest.raises(ModelError) as err:
        build_network(yaml, 1)
    message = str(err.value)
    assert message.startswith(f"--model.model: {yaml} ") and what in message and "\n" not in message
    assert "cellseg_pl trains YOLOv8, YOLO11, YOLO12 and YOLO26 -seg models" in message


def test_a_detection_pt_is_refused_by_predict_and_fine_tuning(tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    from cellseg_pl.errors import ModelError
    from cellseg_pl.yolo.network import load_weights, save_ultralytics_checkpoint

    pt = tmp_path / "detector.pt"
    save_ultralytics_checkpoint(DetectionModel("yolov8n.yaml", nc=1, verbose=False), pt, {0: "cell"})
    with pytest.raises(ModelError, match=r"--model: .*detector.pt is a DetectionModel, not a segmentation model"):
        load_weights(pt, flag="--model")
    with pytest.raises(ModelError, match=r"--model.model: .*detector.pt is a DetectionModel, not a segmentation"):
        build_network(str(pt), 1)
