"""Tests of cellseg_pl.infer.predict and its engine (cellseg_pl.infer.engine): images -> COCO 1.0 JSON for CVAT, tiling,
overlays, the command line, and the LightningCLI style of predict.

Most tests use :class:`BlobNet`, a stand-in network that finds dark discs by thresholding and emits them as raw
YOLOv8-seg head output (boxes, scores, mask coefficients, 1/4-resolution prototypes), so the real path runs:
NMS (``postprocess``) -> masks at the original size (``to_original``) -> polygons -> JSON. Real randomly initialised
networks, saved as ``.pt`` and ``.ckpt``, check that both weight files load and predict.
"""

from __future__ import annotations

import json
import runpy
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

import cellseg_pl.infer.engine as inference_mod
from cellseg_pl.cvat.coco import polygons_to_mask
from cellseg_pl.cvat.convert import convert_coco_zip
from cellseg_pl.data.dataset import read_label, rasterize
from cellseg_pl.infer.engine import Instance, Predictor, merge_windows, tile_windows
from cellseg_pl.__main__ import main as cellseg_main
from cellseg_pl.infer.predict import predict_folder

REPO = Path(__file__).resolve().parents[1]
BACKGROUND, CELL = 200, 40


# ---------------------------------------------------------------------------------------------- builders


class BlobNet(nn.Module):
    """Stands in for YOLOv8-seg: every dark 8-connected blob of the input is one detection.

    Returns what an eval-mode ``SegmentationModel`` returns: ``((det, proto), raw)`` with ``det`` (B, 4+nc+32, 32)
    (xywh px, class scores, one-hot mask coefficients) and ``proto`` (B, 32, S/4, S/4) whose channel k is +1 inside
    blob k and -1 outside (area-averaged to 1/4 resolution). Blobs smaller than ``small_area`` input px are class 1.
    """

    def __init__(self, names: dict[int, str] | None = None, small_area: float = 0.0) -> None:
        super().__init__()
        self.names = names or {0: "cell"}
        self.small_area = small_area
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.weight = nn.Parameter(torch.zeros(1))  # so .to(device) has something to move

    def forward(self, x: torch.Tensor):
        b, _, s, _ = x.shape
        nc, m = len(self.names), s // 4
        det = torch.zeros(b, 4 + nc + 32, 32)
        proto = torch.full((b, 32, m, m), -1.0)
        for i in range(b):
            dark = (x[i].mean(0) < 0.3).cpu().numpy()
            labels, _ = ndimage.label(dark, structure=np.ones((3, 3)))
            for k, sl in enumerate(ndimage.find_objects(labels)[:32]):
                blob = labels == k + 1
                y, xx = sl
                x0, x1, y0, y1 = xx.start, xx.stop, y.start, y.stop
                det[i, :4, k] = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
                cls = 1 if nc > 1 and blob.sum() < self.small_area else 0
                det[i, 4 + cls, k] = 0.9 - 0.001 * k
                det[i, 4 + nc + k, k] = 1.0
                proto[i, k] = torch.from_numpy(blob.reshape(m, 4, m, 4).mean((1, 3)) * 2 - 1)
        return (det.to(x.device), proto.to(x.device)), {}


def disc(height: int, width: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Pixels whose centre lies in the disc."""
    yy, xx = np.mgrid[:height, :width] + 0.5
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def random_discs(height: int, width: int, n: int, radii: tuple[float, float], seed: int, gap: float = 6) -> list:
    """Non-overlapping discs ``(cx, cy, r)`` fully inside the image."""
    rng = np.random.default_rng(seed)
    discs: list[tuple[float, float, float]] = []
    for _ in range(2000):
        if len(discs) == n:
            break
        r = rng.uniform(*radii)
        cx, cy = rng.uniform(r + 2, width - r - 2), rng.uniform(r + 2, height - r - 2)
        if all(np.hypot(cx - x, cy - y) > r + q + gap for x, y, q in discs):
            discs.append((cx, cy, r))
    assert len(discs) == n, "could not place the discs"
    return discs


def write_image(path: Path, height: int, width: int, discs: list) -> np.ndarray:
    """A bright image with dark discs; returns the true masks (n, H, W)."""
    img = np.full((height, width, 3), BACKGROUND, np.uint8)
    masks = np.stack([disc(height, width, *d) for d in discs]) if discs else np.zeros((0, height, width), bool)
    img[masks.any(0)] = CELL
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return masks


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def match(truth: np.ndarray, found: np.ndarray) -> list[float]:
    """Best IoU of each true mask among the found masks, one-to-one greedy; asserts equal counts."""
    assert len(truth) == len(found), (len(truth), len(found))
    free = list(range(len(found)))
    best = []
    for t in truth:
        scores = [iou(t, found[j]) for j in free]
        j = int(np.argmax(scores))
        best.append(scores[j])
        free.pop(j)
    return best


def ann_masks(coco: dict, file_name: str) -> np.ndarray:
    """The masks CVAT rasterizes from the annotations of one image."""
    image = next(im for im in coco["images"] if im["file_name"] == file_name)
    anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
    masks = [polygons_to_mask(a["segmentation"], image["height"], image["width"]) for a in anns]
    return np.stack(masks) if masks else np.zeros((0, image["height"], image["width"]), bool)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = cellseg_main(["predict", *(str(a) for a in args)])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> dict[str, Path]:
    """A randomly initialised yolov8n-seg saved as an Ultralytics ``.pt`` and as a cellseg_pl ``.ckpt`` (imgsz 64)."""
    from cellseg_pl.yolo.network import save_ultralytics_checkpoint
    from cellseg_pl.train.module import CellSegModule

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    module = CellSegModule(model="yolov8n-seg.yaml", num_classes=1, class_names={0: "cell"})
    pt, ckpt = root / "random.pt", root / "random.ckpt"
    save_ultralytics_checkpoint(module.net, pt, {0: "cell"}, {"imgsz": 64})
    # the keys a Lightning checkpoint of CellSegModule holds that load_weights reads
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
         "datamodule_hyper_parameters": {"imgsz": 64, "dataset": "data/demo/dataset.yaml"}},
        ckpt,
    )  # fmt: skip
    return {"pt": pt, "ckpt": ckpt}


@pytest.fixture
def cells(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """An images folder with ``a.png`` (odd, non-square size) and ``sub/b.png``; returns it and the true masks."""
    root = tmp_path / "images"
    truth = {
        "a.png": write_image(root / "a.png", 221, 300, random_discs(221, 300, 8, (12, 20), seed=1)),
        "sub/b.png": write_image(root / "sub" / "b.png", 160, 144, random_discs(160, 144, 4, (10, 16), seed=2)),
    }
    return root, truth


# ---------------------------------------------------------------------------------------------- JSON for CVAT


def test_json_for_cvat_structure(tmp_path):
    root = tmp_path / "images"
    big = [(40, 40, 18), (110, 60, 16), (60, 120, 17)]
    small = [(140, 130, 5), (20, 140, 5)]
    write_image(root / "a.png", 170, 180, big + small)
    write_image(root / "sub" / "deeper" / "b.png", 100, 90, [(45, 50, 20)])
    net = BlobNet({0: "cell", 1: "droplet"}, small_area=200)
    summary = predict_folder(net, root, tmp_path / "out" / "predictions.json", imgsz=192)
    coco = json.loads((tmp_path / "out" / "predictions.json").read_text())

    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "cell"), (2, "droplet")]
    assert [(im["id"], im["file_name"], im["width"], im["height"]) for im in coco["images"]] == [
        (1, "a.png", 180, 170), (2, "sub/deeper/b.png", 90, 100),
    ]  # fmt: skip
    anns = coco["annotations"]
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))
    per_image = {im["id"]: [a["category_id"] for a in anns if a["image_id"] == im["id"]] for im in coco["images"]}
    assert sorted(per_image[1]) == [1, 1, 1, 2, 2] and per_image[2] == [1]
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    for a in anns:
        assert a["iscrowd"] == 0 and 0 < a["score"] <= 1 and a["attributes"]["score"] == a["score"]
        assert len(a["segmentation"]) == 1 and len(a["segmentation"][0]) >= 6
        pts = np.asarray(a["segmentation"][0]).reshape(-1, 2)
        x, y, w, h = a["bbox"]
        assert (x, y, x + w, y + h) == pytest.approx((*pts.min(0), *pts.max(0)))
        assert a["area"] == polygons_to_mask(a["segmentation"], *sizes[a["image_id"]]).sum() > 0
    assert summary.instances == {"cell": 4, "droplet": 2}
    assert summary.images_written == 2 and summary.images_found == 2


def test_masks_are_built_at_the_original_resolution(cells, tmp_path, monkeypatch):
    root, truth = cells
    shapes = []
    real = inference_mod.to_original

    def spy(result, proto, input_size, ori_shape):
        shapes.append((tuple(input_size), tuple(ori_shape)))
        return real(result, proto, input_size, ori_shape)

    monkeypatch.setattr(inference_mod, "to_original", spy)
    predict_folder(BlobNet(), root, tmp_path / "p.json", imgsz=256)  # a.png is 221 x 300: resized by 256/300
    coco = json.loads((tmp_path / "p.json").read_text())
    assert set(shapes) == {((256, 256), (221, 300)), ((256, 256), (160, 144))}
    for name, masks in truth.items():
        assert min(match(masks, ann_masks(coco, name))) >= 0.8


def test_min_area_drops_droplets_and_counts_them(tmp_path):
    root = tmp_path / "images"
    write_image(root / "x.png", 160, 160, [(40, 40, 15), (110, 100, 16), (120, 30, 6), (30, 120, 5), (80, 70, 4)])
    summary = predict_folder(BlobNet(), root, tmp_path / "p.json", imgsz=160, min_area=500)
    coco = json.loads((tmp_path / "p.json").read_text())
    assert len(coco["annotations"]) == 2 and all(a["area"] >= 500 for a in coco["annotations"])
    assert summary.dropped["min_area"] == 3
    assert "min_area: 3" in summary.format()


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_through_a_cvat_zip_and_convert(cells, tmp_path):
    """predictions.json imported and exported by CVAT (same COCO, plus images) -> convert -> the predicted masks."""
    root, _ = cells
    predict_folder(BlobNet(), root, tmp_path / "predictions.json", imgsz=320)
    coco = json.loads((tmp_path / "predictions.json").read_text())
    zip_path = tmp_path / "annotations_corrected.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("annotations/instances_default.json", json.dumps(coco))
        for im in coco["images"]:
            zf.write(root / im["file_name"], f"images/default/{im['file_name']}")
    summary = convert_coco_zip(zip_path, tmp_path / "dataset", val_fraction=0.5)
    assert summary.instances_written == len(coco["annotations"]) and not summary.skipped_annotations

    predictor = Predictor(BlobNet(), 1, imgsz=320)
    ious = []
    for im in coco["images"]:
        image = cv2.cvtColor(cv2.imread(str(root / im["file_name"])), cv2.COLOR_BGR2RGB)
        h, w = image.shape[:2]
        predicted = np.stack([d.full_mask(h, w) for d in predictor.predict([image])[0]])
        stem = im["file_name"].replace("/", "__").rsplit(".", 1)[0]
        (label,) = (tmp_path / "dataset" / "labels").rglob(f"{stem}.txt")
        classes, polygons, skipped = read_label(label, 1)
        assert not skipped and (classes == 0).all()
        back = np.stack([rasterize([p], h, w)[0] > 0 for p in polygons])
        ious += match(predicted, back)
    assert len(ious) == len(coco["annotations"]) == 12
    assert min(ious) >= 0.9, ious


# ---------------------------------------------------------------------------------------------- tiling


def test_tile_windows_cover_the_image_with_the_overlap():
    windows = tile_windows(300, 700, 128, 32)
    xs = sorted({(x0, x1) for x0, _, x1, _ in windows})
    ys = sorted({(y0, y1) for _, y0, _, y1 in windows})
    assert xs[0][0] == 0 and xs[-1][1] == 700 and ys[0][0] == 0 and ys[-1][1] == 300
    for (a0, a1), (b0, b1) in zip(xs, xs[1:]):
        assert a1 - b0 >= 32 and b0 > a0
    assert all(x1 - x0 == 128 for x0, x1 in xs) and len(windows) == len(xs) * len(ys)
    assert tile_windows(100, 90, 128, 32) == [(0, 0, 90, 100)]


def test_merge_windows_keeps_one_detection_per_object():
    ring = disc(60, 60, 30, 30, 20)
    whole = Instance(0.8, 0, 0, 0, ring, cut=False, window=0)
    cut_piece = Instance(0.9, 0, 0, 0, ring[:, :25], cut=True, window=1)  # the neighbour saw the left part only
    twin = Instance(0.7, 0, 1, 0, ring, cut=False, window=2)  # whole again in a third window, 1 px off
    kept = merge_windows([cut_piece, whole, twin])
    assert len(kept) == 1 and kept[0] is whole

    left = Instance(0.6, 0, 0, 0, ring[:, :40], cut=True, window=0)  # too large for the overlap: cut in both
    right = Instance(0.5, 0, 20, 0, ring[:, 20:], cut=True, window=1)
    (joined,) = merge_windows([left, right])
    assert (joined.full_mask(60, 60) == ring).all() and joined.score == 0.6

    neighbour = Instance(0.5, 0, 0, 0, ring, cut=False, window=0)  # same window: NMS already decided
    assert len(merge_windows([whole, neighbour])) == 2


def test_tiled_prediction_equals_a_single_pass(tmp_path):
    h, w = 290, 352  # the last row of windows starts at y 162: prototype grid out of phase with the single pass
    discs = random_discs(h, w, 14, (10, 15), seed=5)
    truth = write_image(tmp_path / "img.png", h, w, discs)
    image = cv2.cvtColor(cv2.imread(str(tmp_path / "img.png")), cv2.COLOR_BGR2RGB)

    single = Predictor(BlobNet(), 1, imgsz=352, tile="off").predict([image])[0]  # 1:1, one pass
    tiler = Predictor(BlobNet(), 1, imgsz=128, tile="on", tile_overlap=40)
    windows = tiler.windows(h, w)
    assert windows is not None and len(windows) == 12
    seams = {x for x0, _, x1, _ in windows for x in (x0, x1)} - {0, w}
    crossing = [d for d in discs if any(abs(d[0] - s) < d[2] for s in seams)]
    assert len(crossing) >= 3  # the test means something: objects straddle window edges
    tiled = tiler.predict([image])[0]

    a = np.stack([d.full_mask(h, w) for d in single if d.area])
    b = np.stack([d.full_mask(h, w) for d in tiled if d.area])
    assert min(match(a, b)) >= 0.8
    assert min(match(truth, b)) >= 0.8
    overlap = b.astype(np.int32).sum(0)
    assert overlap.max() == 1  # no duplicates at the seams


def test_large_image_is_tiled_at_full_resolution(tmp_path):
    h, w = 600, 700
    root = tmp_path / "images"
    truth = write_image(root / "large.png", h, w, random_discs(h, w, 20, (9, 14), seed=7))
    summary = predict_folder(BlobNet(), root, tmp_path / "p.json", imgsz=128)  # auto: 700 > 2 x 128
    assert summary.tiled_images == 1 and summary.windows == len(tile_windows(h, w, 128, 32))
    coco = json.loads((tmp_path / "p.json").read_text())
    assert min(match(truth, ann_masks(coco, "large.png"))) >= 0.8

    small = Predictor(BlobNet(), 1, imgsz=128, tile="auto")
    assert small.windows(256, 200) is None and small.windows(257, 200) is not None
    assert Predictor(BlobNet(), 1, imgsz=128, tile="off").windows(4000, 4000) is None


def test_tiled_prediction_shows_its_progress(tmp_path, caplog, monkeypatch):
    import logging

    import cellseg_pl.infer.engine as engine

    h, w = 600, 700
    write_image(tmp_path / "large.png", h, w, random_discs(h, w, 20, (9, 14), seed=7))
    image = cv2.cvtColor(cv2.imread(str(tmp_path / "large.png")), cv2.COLOR_BGR2RGB)
    monkeypatch.setattr(engine, "PROGRESS_EVERY_S", 0.0)  # a line after every batch of windows
    monkeypatch.setattr(engine, "PROGRESS_MIN_WINDOWS", 4)
    tiler = Predictor(BlobNet(), 1, imgsz=128, tile="on", batch_size=8)
    n = len(tiler.windows(h, w))
    with caplog.at_level(logging.INFO, logger="cellseg_pl.infer.engine"):
        found = tiler.predict([image])[0]
    lines = [r.getMessage() for r in caplog.records if r.name == "cellseg_pl.infer.engine"]
    assert lines[0] == f"tiling a 700x600 px image into {n} windows of 128 px (overlap 32 px)"
    steps = [line for line in lines if "detections so far" in line]
    assert [line.split()[0] for line in steps] == [f"{k}/{n}" for k in range(8, n, 8)]
    assert lines[-1].startswith(f"  {n}/{n} windows in ") and lines[-1].endswith(f": {len(found)} objects after "
                                                                                 "merging the overlaps")
    caplog.clear()  # ordinary images, and small tilings, say nothing
    monkeypatch.setattr(engine, "PROGRESS_MIN_WINDOWS", n)
    with caplog.at_level(logging.INFO, logger="cellseg_pl.infer.engine"):
        tiler.predict([image])
        Predictor(BlobNet(), 1, imgsz=128, tile="off").predict([image])
    assert not [r for r in caplog.records if r.name == "cellseg_pl.infer.engine"]


# ---------------------------------------------------------------------------------------------- overlays


def test_overlays_keep_the_relative_path(cells, tmp_path):
    root, truth = cells
    write_image(root / "sub" / "c.tif", 90, 100, [(50, 45, 15)])
    summary = predict_folder(BlobNet(), root, tmp_path / "p.json", imgsz=256, save_overlays=tmp_path / "ov")
    assert summary.images_written == 3
    for name, suffix in (("a.png", ".png"), ("sub/b.png", ".png"), ("sub/c.tif", ".png")):
        overlay = cv2.imread(str((tmp_path / "ov" / name).with_suffix(suffix)))
        original = cv2.imread(str(root / name))
        assert overlay is not None and overlay.shape == original.shape
        assert (overlay != original).any(axis=2).sum() > 50  # outlines and the count were drawn


# ---------------------------------------------------------------------------------------------- weights files


@pytest.mark.parametrize("kind", ["pt", "ckpt"])
def test_ckpt_and_pt_weights_are_accepted(weights, cells, tmp_path, capsys, kind):
    root, _ = cells
    out = tmp_path / "p.json"
    # a random network scores around 0.001-0.01: a very low threshold yields detections from the real head
    code, stdout, err = run_main(
        capsys, "--model", weights[kind], "--images", root, "--output", out, "--conf", 0.002, "--max-det", 20
    )
    assert code == 0, err
    assert "imgsz 64" in stdout  # the training size stored in the weights
    coco = json.loads(out.read_text())
    assert [c["name"] for c in coco["categories"]] == ["cell"]
    assert {im["file_name"] for im in coco["images"]} == {"a.png", "sub/b.png"}
    for a in coco["annotations"]:
        image = coco["images"][a["image_id"] - 1]
        x, y, w, h = a["bbox"]
        assert 0 <= x and x + w <= image["width"] and 0 <= y and y + h <= image["height"]
        assert len(a["segmentation"][0]) >= 6 and a["area"] > 0


# ---------------------------------------------------------------------------------------------- command line


def one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]  # log lines may come first
    assert lines[-1].startswith("error: ") and [x for x in lines if x.startswith("error")] == lines[-1:], err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def test_bad_inputs_give_one_error_line(weights, cells, tmp_path, capsys):
    root, _ = cells
    pt, out = weights["pt"], tmp_path / "p.json"
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "exists.json").write_text("{}")
    cases = [
        (["--model", tmp_path / "no.pt", "--images", root, "--output", out], ["--model", "no.pt", "does not exist"]),
        (["--model", pt, "--images", tmp_path / "nothere", "--output", out], ["nothere", "does not exist"]),
        (["--model", pt, "--images", empty, "--output", out], ["empty", "no images"]),
        (["--model", pt, "--images", root, "--output", tmp_path / "exists.json"], ["exists.json", "--overwrite"]),
        (["--model", pt, "--images", root, "--output", tmp_path], ["is a folder"]),
        (["--model", pt, "--images", root, "--output", tmp_path / "exists.json" / "p.json"],
         ["--output", "exists.json is a file, not a folder"]),
        (["--model", pt, "--images", root, "--output", out, "--device", "tpu"], ["--device", "tpu"]),
        (["--model", pt, "--images", root, "--output", out, "--imgsz", 250], ["--imgsz", "250"]),
        (["--model", pt, "--images", root, "--output", out, "--conf", 2], ["--conf"]),
        (["--model", pt, "--images", root, "--output", out, "--save-overlays", root / "ov"], ["--save-overlays"]),
        (["--model", REPO / "README.md", "--images", root, "--output", out], ["--model", "README.md"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["--model", pt, "--images", root, "--output", out, "--device", "0"], ["--device", "CUDA"]))
    for args, needles in cases:
        code, _, err = run_main(capsys, *args)
        one_error_line(code, err, *needles)
    assert not out.exists() and (tmp_path / "exists.json").read_text() == "{}"


def test_broken_weights_files_are_one_line_with_one_flag(weights, cells, tmp_path, capsys):
    root, _ = cells
    data = weights["ckpt"].read_bytes()
    cases = {
        "garbage.pt": (b"not a pickle", "is not a readable PyTorch model file"),
        "cut.ckpt": (data[: len(data) // 2], "is truncated or damaged"),
        "empty.ckpt": (b"", "is empty (0 bytes)"),
    }
    for name, (content, problem) in cases.items():
        (tmp_path / name).write_bytes(content)
        code, _, err = run_main(capsys, "--model", tmp_path / name, "--images", root, "--output", tmp_path / "p.json")
        one_error_line(code, err, f"error: --model: {tmp_path / name} {problem}")
        assert "--model.model" not in err  # one flag: the one the user gave


def test_unreadable_images_are_skipped_and_counted(weights, tmp_path, capsys):
    root = tmp_path / "images"
    write_image(root / "good.png", 64, 64, [(30, 30, 10)])
    (root / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "new" / "folder" / "p.json"  # missing folders are created
    code, stdout, err = run_main(capsys, "--model", weights["pt"], "--images", root, "--output", out)
    assert code == 0, err
    assert "unreadable: 1" in stdout and "broken.png" in stdout
    assert [im["file_name"] for im in json.loads(out.read_text())["images"]] == ["good.png"]

    (root / "good.png").write_bytes(b"")  # now nothing can be read
    code, _, err = run_main(capsys, "--model", weights["pt"], "--images", root, "--output", tmp_path / "q.json")
    one_error_line(code, err, "none of its 2 images could be read")


def test_image_over_the_opencv_pixel_limit_is_skipped_and_counted(weights, tmp_path, capsys, caplog):
    from conftest import huge_png

    root = tmp_path / "images"
    write_image(root / "a.png", 64, 64, [(30, 30, 10)])
    (root / "b_slide.png").write_bytes(huge_png(33000, 33000))  # 33000 x 33000 px: over OpenCV's 2^30 px
    write_image(root / "c.png", 64, 64, [(20, 20, 8)])
    out = tmp_path / "p.json"
    code, stdout, err = run_main(capsys, "--model", weights["pt"], "--images", root, "--output", out)
    assert code == 0, err
    assert "Traceback" not in err
    warning = [r.getMessage() for r in caplog.records if "b_slide.png" in r.getMessage()]
    assert len(warning) == 1 and "33000x33000 px" in warning[0] and "CV_IO_MAX_IMAGE_PIXELS" in warning[0]
    assert "too_large: 1" in stdout and "b_slide.png" in stdout and "predicted 2 of 3 images" in stdout
    assert [im["file_name"] for im in json.loads(out.read_text())["images"]] == ["a.png", "c.png"]


def test_overwrite(weights, cells, tmp_path, capsys):
    root, _ = cells
    out = tmp_path / "p.json"
    args = ["--model", weights["pt"], "--images", root, "--output", out]
    assert run_main(capsys, *args)[0] == 0
    code, _, err = run_main(capsys, *args)
    one_error_line(code, err, "already exists")
    assert run_main(capsys, *args, "--overwrite")[0] == 0


def test_python_m_cellseg_pl_predict_routes_to_the_tool_unless_given_a_run_config(
    weights, cells, tmp_path, capsys, monkeypatch
):
    from cellseg_pl.train import cli
    from cellseg_pl.commands import lightning_style_predict

    root, _ = cells
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    assert cellseg_main(["predict", "--model", str(weights["pt"]), "--images", str(root), "--output", a]) == 0
    underscores = ["--max_det", "10", "--min_area", "5", "--tile", "off", "--tile_overlap", "8", "--batch_size", "2"]
    ckpt = str(weights["ckpt"])
    assert cellseg_main(["predict", "--model", ckpt, f"--images={root}", "--output", b, *underscores]) == 0
    assert (tmp_path / "a.json").is_file() and (tmp_path / "b.json").is_file()

    seen = []
    monkeypatch.setattr(cli, "CellSegCLI", lambda args: seen.append(args))
    assert cellseg_main(["predict", "--config", "x.yaml", "--ckpt_path", "best.ckpt"]) == 0
    assert seen == [["predict", "--config", "x.yaml", "--ckpt_path", "best.ckpt"]]
    assert lightning_style_predict(["--data.predict_images=x", "--trainer.accelerator", "cpu"])
    assert not lightning_style_predict(["--model", "m.pt", "--tile", "on", "--output", "p.json"])
    capsys.readouterr()

    assert cellseg_main(["predict", "--help"]) == 0  # the tool's flags, not LightningCLI's 900 lines
    assert seen == [["predict", "--config", "x.yaml", "--ckpt_path", "best.ckpt"]]
    help_text = capsys.readouterr().out
    assert "--images IMAGES" in help_text and "--min_area" in help_text and "--trainer.max_epochs" not in help_text
    assert "(--output-dir = --output_dir)" in help_text  # --min-area works too
    assert "e.g. 500 for water droplets" in help_text  # the docstring of InferenceOptions
    assert "--config RUN/config.yaml --ckpt_path RUN/weights/best.ckpt" in help_text  # how to reach the other style
    assert cellseg_main(["predict"]) == 2  # no arguments: the tool says which it needs
    assert "--model, --images, --output" in capsys.readouterr().err


def test_both_predict_paths_write_the_same_json_on_a_tiled_image(weights, tiny_data, tmp_path, capsys):
    """``predict --config ... --ckpt_path`` (LightningCLI style) and ``predict --images`` share the engine: same
    tiling, min_area, file filter (hidden files skipped, labels never read), overlays and JSON, byte for byte."""

    images = tmp_path / "pool" / "images"
    write_image(images / "large.png", 170, 200, random_discs(170, 200, 10, (8, 14), seed=3))  # > the 64 px tile
    write_image(images / "sub" / "small.png", 48, 60, [(30, 24, 10)])
    write_image(images / ".hidden.png", 64, 64, [(30, 30, 10)])  # skipped by both
    (tmp_path / "pool" / "labels").mkdir()
    (tmp_path / "pool" / "labels" / "large.txt").write_text("not a label line\n")  # never read
    ckpt = str(weights["ckpt"])  # imgsz 64; a random network scores ~0.001-0.01: a low threshold yields detections
    cli_json, tool_json = tmp_path / "cli.json", tmp_path / "tool.json"
    lightning = [
        "predict", "--config", str(REPO / "configs" / "demo.yaml"), "--data.dataset", str(tiny_data),
        "--data.imgsz", "64", "--data.batch_size", "4", "--data.num_workers", "0", "--data.predict_images",
        str(images), "--ckpt_path", ckpt, "--conf", "0.001", "--max_det", "20",
        "--min_area", "100", "--tile", "on", "--save_overlays", str(tmp_path / "ov_cli"),
        "--trainer.accelerator", "cpu", "--project", str(tmp_path), "--name", "run", "--predictions", str(cli_json),
    ]  # fmt: skip
    assert cellseg_main(lightning) == 0
    cli_out = capsys.readouterr().out
    tool = ["predict", "--model", ckpt, "--images", str(images), "--output", str(tool_json), "--conf", "0.001",
            "--max-det", "20", "--min-area", "100", "--tile", "on", "--batch-size", "4",
            "--save-overlays", str(tmp_path / "ov_tool")]  # fmt: skip
    assert cellseg_main(tool) == 0
    tool_out = capsys.readouterr().out

    a, b = json.loads(cli_json.read_text()), json.loads(tool_json.read_text())
    assert [im["file_name"] for im in a["images"]] == ["large.png", "sub/small.png"]
    assert len(a["annotations"]) > 0 and all(x["area"] >= 100 for x in a["annotations"])
    assert a == b
    windows = len(tile_windows(170, 200, 64, 16))
    assert windows > 1 and f"1 large images tiled into {windows} windows" in cli_out and "  min_area: " in cli_out
    same = [line for line in cli_out.splitlines() if not line.startswith(("predicted", "annotations", "overlays"))]
    assert same == [line for line in tool_out.splitlines() if not line.startswith(("predicted", "annotations", "overlays"))]
    for folder in ("ov_cli", "ov_tool"):
        assert sorted(p.relative_to(tmp_path / folder).as_posix() for p in (tmp_path / folder).rglob("*.png")) == [
            "large.png", "sub/small.png",
        ]  # fmt: skip
    assert cellseg_main(lightning) == 2  # an existing predictions file is never replaced
    assert "--predictions" in capsys.readouterr().err


def test_guide_script_runs_with_the_guide_flags(weights, cells, tmp_path, monkeypatch, capsys):
    root, _ = cells
    out = tmp_path / "predictions.json"
    argv = ["predict_simple_circles.py", "--model", str(weights["pt"]), "--images", str(root), "--output", str(out),
            "--device", "cpu"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / "scripts" / "predict_simple_circles.py"), run_name="__main__")
    assert stop.value.code == 0 and out.is_file()
    assert "objects written" in capsys.readouterr().out


@pytest.mark.slow
def test_lightning_predict_writes_the_same_coco_json(tiny_data, tmp_path):
    """After a real ``fit``: ``predict --config ... --ckpt_path`` gives the file ``predict --images`` gives, with
    the same defaults (the inference settings are declared once: InferenceOptions)."""
    from conftest import calibrate_batchnorm

    from conftest import fit_args

    assert cellseg_main(fit_args(tiny_data, tmp_path, "run", 1)) == 0
    ckpt = tmp_path / "run" / "weights" / "last.ckpt"
    images = tiny_data.parent / "images" / "val"
    calibrate_batchnorm(ckpt, sorted(tiny_data.parent.glob("images/*/*.png")))  # image-dependent detections (see test_export)
    cli_json = tmp_path / "cli.json"
    args = ["predict", "--config", str(REPO / "configs" / "demo.yaml"), "--data.dataset", str(tiny_data),
            "--data.imgsz", "128", "--data.num_workers", "0", "--data.predict_images", str(images),
            "--ckpt_path", str(ckpt), "--conf", "0.001", "--project", str(tmp_path),  # (min_area, iou, max_det: defaults)
            "--name", "run", "--predictions", str(cli_json), "--trainer.enable_progress_bar", "false"]
    assert cellseg_main(args) == 0
    tool_json = tmp_path / "tool.json"
    assert cellseg_main(["predict", "--model", str(ckpt), "--images", str(images), "--output", str(tool_json),
                 "--conf", "0.001"]) == 0
    a, b = json.loads(cli_json.read_text()), json.loads(tool_json.read_text())
    assert a["images"] == b["images"] and a["categories"] == b["categories"]
    assert len(a["annotations"]) > 0 and a == b
    assert cellseg_main(args) == 2  # an existing predictions file is never replaced
